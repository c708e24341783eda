"""Compressed cache: the compensation token (eq. 4 and 5), real memory release, spilling round trip."""
from __future__ import annotations

import math

import pytest
import torch

from services.engine import CompressedKVCache, CompressionParams, Engine, SamplingParams, SessionState, forward
from services.engine.attention import attend_with_lse, attend_with_lse_math, merge_compensation
from services.engine.cache import RazorLayer
from services.engine.headmap import shipped_head_map
from tests.engine_models import smollm2, tiny


def test_compensation_equals_materialised_copies():
    """Merging (k̂, v̂) with weight log(count) equals attending over `count` real copies of it."""
    torch.manual_seed(0)
    bsz, n_heads, n_kv, q_len, kv_len, dim, count = 2, 6, 2, 5, 9, 16, 7
    q = torch.randn(bsz, n_heads, q_len, dim)
    k, v = torch.randn(bsz, n_kv, kv_len, dim), torch.randn(bsz, n_kv, kv_len, dim)
    comp_k, comp_v = torch.randn(bsz, n_kv, 1, dim), torch.randn(bsz, n_kv, 1, dim)
    scale = dim ** -0.5

    out, lse = attend_with_lse(q, k, v, scale)
    merged = merge_compensation(out, lse, q, comp_k, comp_v, count, scale)

    # Slow reference: `count` copies placed before the window, visible to every query.
    k_ref = torch.cat([comp_k.expand(-1, -1, count, -1), k], dim=2).repeat_interleave(3, dim=1)
    v_ref = torch.cat([comp_v.expand(-1, -1, count, -1), v], dim=2).repeat_interleave(3, dim=1)
    logits = q @ k_ref.transpose(-1, -2) * scale
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    visible = torch.cat([torch.ones(q_len, count, dtype=torch.bool), causal], dim=1)
    ref = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1) @ v_ref
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-5)


def test_fused_lse_attention_equals_matmul_reference():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 6, 4, 16), torch.randn(1, 2, 11, 16), torch.randn(1, 2, 11, 16)
    out, lse = attend_with_lse(q, k, v, 0.25)
    ref_out, ref_lse = attend_with_lse_math(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), 0.25)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len, kv_len", [(11, 11), (4, 11), (1, 11)])   # prefill, continued turn, decode
def test_chunked_matmul_attention_equals_one_chunk_and_the_fused_kernel(q_len, kv_len):
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 6, q_len, 16), torch.randn(1, 2, kv_len, 16), torch.randn(1, 2, kv_len, 16)
    k6, v6 = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    whole = attend_with_lse_math(q, k6, v6, 0.25)
    chunked = attend_with_lse_math(q, k6, v6, 0.25, chunk_elements=6 * kv_len * 2)   # two query rows at a time
    fused = attend_with_lse(q, k, v, 0.25)
    for got in (chunked, fused):
        torch.testing.assert_close(got[0], whole[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], whole[1], atol=1e-5, rtol=1e-5)


def test_incremental_running_mean_equals_batch_mean():
    torch.manual_seed(1)
    params = CompressionParams(sink=2, min_window=3, ratio=1000.0)
    layer = RazorLayer([], n_kv_heads=2, params=params)
    keys, values = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    layer.append(keys[:, :, :10], values[:, :, :10])
    layer.compress()
    for t in range(10, 40):  # one token at a time, as in decoding
        layer.append(keys[:, :, t:t + 1], values[:, :, t:t + 1])
        layer.compress()
    dropped = slice(2, 40 - 3)
    assert layer.comp_count == 35
    torch.testing.assert_close(layer.comp_keys, keys[:, :, dropped].mean(2, keepdim=True), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.comp_values, values[:, :, dropped].mean(2, keepdim=True), atol=1e-6, rtol=1e-6)
    # sinks and the most recent window are kept verbatim, in order
    torch.testing.assert_close(layer.local_keys, torch.cat([keys[:, :, :2], keys[:, :, -3:]], dim=2))


def test_window_follows_paper_rule():
    p = CompressionParams(sink=4, min_window=256, ratio=5.0)
    assert p.window(100) == 256 and p.window(2000) == 400 and p.window(4001) == 801
    with pytest.raises(ValueError, match="ratio"):
        CompressionParams(ratio=0.5)


@pytest.mark.slow
def test_local_group_bounded_after_long_prompt_and_decode():
    """After a 1,200-token prompt and after 40 decode steps (the window grows 4 tokens, and 36 tokens leave it for
    the compensation token), local heads hold at most N0 + L_h + 1 tokens."""
    loaded = smollm2()
    head_map = shipped_head_map(loaded.fingerprint)
    assert head_map is not None, "the embedded model ships its head map"
    engine = Engine(loaded, head_map)
    params = head_map.compression
    prompt = torch.randint(1000, 20000, (1200,), generator=torch.Generator().manual_seed(0)).tolist()

    def check(state):
        n = state.cache.seq_length
        bound = params.sink + params.window(n) + 1
        for layer in state.cache.layers:
            if layer.local_heads:
                assert layer.local_keys.shape[-2] + 1 <= bound          # + 1: the compensation token
                assert layer.local_keys.shape[-2] == params.sink + params.window(n)
                assert layer.comp_count == n - params.sink - params.window(n)
        assert state.nbytes() < 0.6 * state.full_nbytes()               # memory really shrank

    state, _ = engine.generate(prompt, SamplingParams(max_new_tokens=1))
    check(state)
    token = state.token_ids[-1]
    for _ in range(40):  # exactly 40 decode steps (generate() could stop early at an EOS)
        token = int(forward(loaded.model, [token], state.cache).argmax())
        state.token_ids.append(token)
    check(state)
    assert state.cache.seq_length == 1200 + 40


def test_spill_round_trip_continues_identically():
    loaded = tiny()
    from services.engine import ProfileParams, profile_model
    head_map = profile_model(loaded, ProfileParams(seq_len=16, n_samples=1),
                             CompressionParams(sink=2, min_window=8, ratio=4.0))
    engine = Engine(loaded, head_map)
    params = SamplingParams(max_new_tokens=10)
    state, _ = engine.generate(list(range(300, 380)), params)
    tensors, meta = state.to_tensors()
    restored = SessionState.from_tensors({k: v.clone() for k, v in tensors.items()}, meta, "cpu")
    assert restored.token_ids == state.token_ids
    again, _ = restored.to_tensors()
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    a = engine.continue_session(state, [700, 701, 702], params)
    b = engine.continue_session(restored, [700, 701, 702], params)
    assert a.token_ids == b.token_ids
    assert any(layer.comp_count > 0 for layer in state.cache.layers)


def test_cache_layer_rejects_bad_heads():
    with pytest.raises(ValueError, match="out of range"):
        CompressedKVCache([[5]], n_kv_heads=2, params=CompressionParams())


def test_running_mean_started_by_a_single_token_owns_its_storage():
    """The first fold of one token must not alias the buffer row it came from: that row is reused."""
    torch.manual_seed(4)
    layer = RazorLayer([], n_kv_heads=1, params=CompressionParams(sink=1, min_window=3, ratio=1000.0))
    keys, values = torch.randn(1, 1, 80, 8), torch.randn(1, 1, 80, 8)
    for t in range(80):   # one token at a time from the first: every fold drops exactly one token
        layer.append(keys[:, :, t:t + 1], values[:, :, t:t + 1])
        layer.compress()
    dropped = slice(1, 80 - 3)
    torch.testing.assert_close(layer.comp_keys, keys[:, :, dropped].mean(2, keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.comp_values, values[:, :, dropped].mean(2, keepdim=True), atol=1e-5, rtol=1e-5)
