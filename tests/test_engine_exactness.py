"""With every head a retrieval head, the razor path must reproduce the model's own full-cache logits."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from services.engine import Engine, HeadMap, forward
from tests.engine_models import smollm2, tiny


def reference_model(loaded):
    ref = copy.deepcopy(loaded.model)
    ref.set_attn_implementation("sdpa")
    return ref


@torch.no_grad()
def compare_turns(loaded, prompt_len=60, decode_steps=20, turn_len=23, atol=1e-4):
    """Prefill, greedy decode steps and a continued turn, compared logit by logit."""
    ref_model = reference_model(loaded)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 20000, (1, prompt_len), generator=gen)
    ref_cache = DynamicCache(config=ref_model.config)
    engine = Engine(loaded, HeadMap.full(loaded.fingerprint))
    cache = engine.new_cache()

    ref = ref_model(prompt, cache=ref_cache, use_cache=True).logits[0, -1]
    got = forward(loaded.model, prompt[0].tolist(), cache)
    torch.testing.assert_close(got, ref, atol=atol, rtol=1e-4)
    for _ in range(decode_steps):
        token = int(ref.argmax())
        ref = ref_model(torch.tensor([[token]]), cache=ref_cache, use_cache=True).logits[0, -1]
        got = forward(loaded.model, [token], cache)
        torch.testing.assert_close(got, ref, atol=atol, rtol=1e-4)
    turn = torch.randint(100, 20000, (1, turn_len), generator=gen)
    ref = ref_model(turn, cache=ref_cache, use_cache=True).logits[0, -1]
    got = forward(loaded.model, turn[0].tolist(), cache)
    torch.testing.assert_close(got, ref, atol=atol, rtol=1e-4)
    assert cache.seq_length == prompt_len + decode_steps + turn_len
    # Nothing compressed when every head is retrieval: the full bytes plus the store's bounded headroom.
    bound = cache.bytes_bound(cache.seq_length, turn_len, loaded.fingerprint.head_dim, 4)
    assert cache.full_nbytes() <= cache.nbytes() <= bound


def test_full_map_matches_full_cache_tiny_gqa():
    loaded = tiny()
    assert loaded.fingerprint.n_heads > loaded.fingerprint.n_kv_heads  # GQA
    compare_turns(loaded)


@pytest.mark.slow
def test_full_map_matches_full_cache_smollm2():
    compare_turns(smollm2(), prompt_len=80)


def test_generation_equals_reference_greedy_loop_tiny():
    """Engine.generate + continue_session (greedy) equal a plain full-cache greedy loop over the conversation."""
    loaded = tiny()
    engine = Engine(loaded, HeadMap.full(loaded.fingerprint))
    from services.engine import SamplingParams
    params = SamplingParams(max_new_tokens=12)
    prompt, turn = list(range(500, 540)), list(range(900, 910))
    state, first = engine.generate(prompt, params)
    second = engine.continue_session(state, turn, params)

    ref_model = reference_model(loaded)
    ids = prompt[:]
    with torch.no_grad():
        for expected_len, result in ((len(prompt), first), (len(prompt) + 12 + len(turn), second)):
            if len(ids) < expected_len:
                ids += turn
            out = []
            for _ in range(12):
                token = int(ref_model(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(token)
                out.append(token)
            assert result.token_ids == out
    assert second.cached_tokens == len(prompt) + 11  # the last sampled token was pending, not cached
