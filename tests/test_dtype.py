"""RAZOR_DTYPE: models load in bfloat16 / float16 / float32, the fingerprint stays the same across dtypes,
the full map reproduces transformers' own bfloat16 generation, and the compensation token stays float32."""
from __future__ import annotations

import copy
import logging
import typing
from functools import lru_cache

import pytest
import torch
from pydantic import ValidationError
from transformers import DynamicCache

from services.engine import Engine, HeadMap, LoadedModel, ModelLoadError, SamplingParams, forward, load_model
from services.engine.models import (DTYPE_CHOICES, DTYPES, cast_weights, embedded_tokenizer, resolve_dtype,
                                    stored_float_dtypes, tiny_random_llama)
from services.inference import codec
from services.settings import Settings
from tests.engine_models import smollm2, tiny

BF16_TOL = dict(atol=2e-2, rtol=2e-2)   # a few bfloat16 ulps (8 mantissa bits) on logits of order 1


@lru_cache(maxsize=None)
def tiny_bf16():
    return load_model("tiny-random", "cpu", dtype="bfloat16")


# ---- the setting ---------------------------------------------------------------------------------
def test_setting_accepts_the_four_names_and_refuses_others(monkeypatch):
    assert Settings().dtype == "auto"
    assert Settings(dtype=" BFloat16 ").dtype == "bfloat16"
    monkeypatch.setenv("RAZOR_DTYPE", "float16")
    assert Settings().dtype == "float16"
    with pytest.raises(ValidationError, match="auto, float32, bfloat16 or float16"):
        Settings(dtype="int8")
    # One list: what the setting accepts is what load_model understands.
    assert typing.get_args(Settings.model_fields["dtype"].annotation) == DTYPE_CHOICES


def test_auto_is_bfloat16_on_cuda_and_float32_on_cpu(monkeypatch):
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16   # pre-Ampere GPUs
    assert resolve_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16


def test_unknown_dtype_is_a_model_load_error_naming_the_choices():
    with pytest.raises(ModelLoadError, match="auto, float32, bfloat16, float16"):
        load_model("tiny-random", "cpu", dtype="nonsense")
    with pytest.raises(ModelLoadError):
        resolve_dtype(torch.int8, torch.device("cpu"))
    assert issubclass(ModelLoadError, ValueError)


def test_float16_on_cpu_loads_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="services.engine.models"):
        loaded = load_model("tiny-random", "cpu", dtype="float16")
    assert loaded.dtype == torch.float16 and loaded.dtype_name == "float16"
    assert any("float16" in r.getMessage() and "slow" in r.getMessage() for r in caplog.records)


# ---- what loading in a dtype does ------------------------------------------------------------------
def test_bfloat16_load_keeps_the_fingerprint_and_rope_in_float32():
    fp32, bf16 = tiny(), tiny_bf16()
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    # Head maps are keyed by the fingerprint: one profiled in float32 serves the bfloat16 model too.
    assert bf16.fingerprint == fp32.fingerprint
    assert bf16.dtype_name == "bfloat16" and fp32.dtype_name == "float32"
    # As from_pretrained(dtype=bfloat16) leaves it: RoPE frequencies in bfloat16 would wreck long positions.
    assert bf16.model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_loaded_model_infers_its_dtype_when_not_given():
    model = tiny_random_llama().to(torch.bfloat16)
    loaded = LoadedModel(model, None, tiny().fingerprint, "x", torch.device("cpu"), 4096)
    assert loaded.dtype == torch.bfloat16


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_checkpoint_fingerprint_is_the_same_in_every_dtype(tmp_path, stored, caplog):
    """A float32 checkpoint is loaded in float32, fingerprinted, then cast; a bfloat16 one loads directly."""
    cast_weights(tiny_random_llama(3), stored).save_pretrained(tmp_path)
    embedded_tokenizer().save_pretrained(tmp_path)
    assert stored_float_dtypes(tmp_path) == {stored}
    loaded = {}
    for name in ("float32", "bfloat16", "float16"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="services.engine.models"):
            loaded[name] = load_model(str(tmp_path), "cpu", dtype=name)
        via_float32 = any("in float32 to fingerprint" in r.getMessage() for r in caplog.records)
        assert via_float32 == (name != "float32" and DTYPES[name] != stored), name
    assert len({m.fingerprint.id for m in loaded.values()}) == 1
    assert [m.dtype for m in loaded.values()] == [torch.float32, torch.bfloat16, torch.float16]
    assert loaded["bfloat16"].model.model.rotary_emb.inv_freq.dtype == torch.float32


# ---- exactness in bfloat16 -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def varied_checkpoint(tmp_path_factory):
    """A float32 checkpoint of a tiny Llama whose larger weights make greedy decoding pick varied tokens
    (the default init repeats one token), so the token comparison means something."""
    path = tmp_path_factory.mktemp("varied")
    tiny_random_llama(1, initializer_range=0.2).save_pretrained(path)
    embedded_tokenizer().save_pretrained(path)
    return path


@torch.no_grad()
def transformers_generate(loaded, prompt: torch.Tensor, steps: int):
    """transformers' own greedy generation (sdpa, DynamicCache) on a copy of the model: (tokens, logits)."""
    ref_model = copy.deepcopy(loaded.model)
    ref_model.set_attn_implementation("sdpa")
    out = ref_model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             cache=DynamicCache(config=ref_model.config), output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, prompt.shape[1]:].tolist(), [step[0].float() for step in out.logits]


@torch.no_grad()
def assert_engine_matches(loaded, prompt: torch.Tensor, ref_tokens: list[int], ref_logits: list[torch.Tensor]):
    steps = len(ref_tokens)
    engine = Engine(loaded, HeadMap.full(loaded.fingerprint))
    # Teacher-forced on the reference tokens: the logits at every step.
    cache = engine.new_cache()
    got = forward(loaded.model, prompt[0].tolist(), cache)
    for step in range(steps):
        torch.testing.assert_close(got.float(), ref_logits[step], **BF16_TOL, msg=lambda m: f"step {step}: {m}")
        if step + 1 < steps:
            got = forward(loaded.model, [ref_tokens[step]], cache)
    assert cache.layers[0].keys.dtype == loaded.dtype
    # Free-running: the engine's own greedy loop picks the same tokens (it stops at EOS, generate did not).
    _, result = engine.generate(prompt[0].tolist(), SamplingParams(max_new_tokens=steps))
    eos = engine.eos_ids
    stop = next((i + 1 for i, t in enumerate(ref_tokens) if t in eos), steps)
    assert result.token_ids == ref_tokens[:stop]


def test_full_map_matches_transformers_bfloat16_generation(varied_checkpoint):
    """Same greedy tokens over 32 steps as transformers' generate in bfloat16, logits within bf16 tolerance."""
    loaded = load_model(str(varied_checkpoint), "cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    prompt = torch.randint(100, 20000, (1, 48), generator=torch.Generator().manual_seed(0))
    tokens, logits = transformers_generate(loaded, prompt, 32)
    assert len(set(tokens)) > 8, "greedy decoding of this model varies"
    assert_engine_matches(loaded, prompt, tokens, logits)
    # The tolerance tells the dtypes apart: float32 logits of the same checkpoint fall outside it.
    fp32 = load_model(str(varied_checkpoint), "cpu", dtype="float32")
    _, fp32_logits = transformers_generate(fp32, prompt, 32)
    assert not all(torch.allclose(a, b, **BF16_TOL) for a, b in zip(fp32_logits, logits))


@pytest.mark.slow
def test_full_map_matches_transformers_bfloat16_generation_smollm2():
    fp32 = smollm2()
    # What load_model does for a GGUF: float32, fingerprint, cast (from the cached float32 load: no reload).
    loaded = LoadedModel(cast_weights(copy.deepcopy(fp32.model), torch.bfloat16), fp32.tokenizer,
                         fp32.fingerprint, fp32.ref, fp32.device, fp32.max_context)
    assert loaded.dtype == torch.bfloat16
    prompt = loaded.tokenizer("The history of the river valley begins with", return_tensors="pt").input_ids
    tokens, logits = transformers_generate(loaded, prompt, 16)
    assert_engine_matches(loaded, prompt, tokens, logits)


@torch.no_grad()
def test_compensation_stays_float32_in_a_bfloat16_cache_and_through_a_spill(tiny_head_map):
    loaded = tiny_bf16()
    # The map was profiled on the float32 model; the fingerprint makes it valid for the bfloat16 one.
    engine = Engine(loaded, tiny_head_map)
    ids = torch.randint(100, 20000, (80,), generator=torch.Generator().manual_seed(1)).tolist()
    state, _ = engine.generate(ids, SamplingParams(max_new_tokens=16))
    local = [layer for layer in state.cache.layers if layer.local is not None]
    assert local, "the map has local heads"
    for layer in local:
        assert layer.comp_count > 0, "generated past the window: tokens were folded into the compensation token"
        assert layer.local_keys.dtype == torch.bfloat16
        assert layer.comp_keys.dtype == torch.float32 and layer.comp_values.dtype == torch.float32
    # Spilled and restored through the codec, every tensor keeps its dtype, bit for bit.
    tensors, meta = state.to_tensors()
    enc = codec.encode(tensors, {"state": meta})
    back, _ = codec.decode(enc.header, enc.chunks)
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in tensors.items())
    assert {t.dtype for k, t in back.items() if k.endswith(("comp_keys", "comp_values"))} == {torch.float32}
