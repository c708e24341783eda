"""Attention over split caches: the kernels, and `razor_attention`, the function `hf.install` registers.

`razor_attention` is called by every Llama-family attention module after the step cache has appended the new
tokens. It asks the step target (`batch.StepBatch`) for the output; the target calls the functions here:
  split_cache_attention   one session's queries against its layer: retrieval heads SDPA over the full group,
                          local heads over sink + window with the compensation token merged through log-sum-exp
  decode_attention        one session's decode token (outside a scheduler: evaluation, calibration)
A scheduler's decoding sessions attend together in their `slab.DecodeSlab`, through the kernels here.
The local group's kernel never sees the compensation token, so it stays FlashAttention-compatible (eq. 5 is
recovered exactly by the LSE merge). With a probe kwarg it instead computes eager attention and hands the
probabilities to the profiler; with a gates kwarg, gate training's mix of full and local attention
(head_gates.py).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import hf

try:  # optional: only used for CUDA tensors
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - no flash-attn on CPU machines
    flash_attn_func = None

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """[Q, S] bool, bottom-right aligned: the queries are the last q_len of the kv_len positions."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [B, Hq, Q, D]; k, v: [B, Hkv, S, D] with Hq a multiple of Hkv -> [B, Hq, Q, D]
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if q_len == kv_len and q_len > 1:
        # A fresh prefill: is_causal keeps the fused (flash) kernels and builds no [Q, S] mask, which at 32k
        # tokens would be a gigabyte on its own.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    mask = None if q_len == 1 else causal_mask(q_len, kv_len, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def attend_with_lse(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention that also returns the log-sum-exp of the logits: ([B, Hq, Q, D], [B, Hq, Q])."""
    if q.is_cuda and flash_attn_func is not None and q.dtype in (torch.float16, torch.bfloat16):
        # flash-attn takes [B, Q, H, D], handles GQA and aligns causality bottom-right.
        out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      softmax_scale=scale, causal=True, return_attn_probs=True)
        return out.transpose(1, 2), lse
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        # PyTorch's fused CPU flash kernel also returns the LSE (a private op: guarded, with a fallback).
        q_len, kv_len = q.shape[-2], k.shape[-2]
        if q_len == kv_len and q_len > 1:   # top-left and bottom-right causality agree: no mask needed
            return _CPU_FLASH(q, k, v, 0.0, True, scale=scale)
        mask = None
        if q_len > 1:
            allowed = causal_mask(q_len, kv_len, q.device)
            mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse
    return attend_with_lse_math(q, k, v, scale)


MATH_CHUNK_ELEMENTS = 1 << 26   # logits per query chunk in the matmul path: 256 MiB of float32


def attend_with_lse_math(q, k, v, scale: float, chunk_elements: int = MATH_CHUNK_ELEMENTS
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in plain matmuls (any device); k, v already expanded to the query heads.

    Queries go in chunks so the [B, Hq, chunk, S] logits stay under `chunk_elements`: a long new turn
    over a long window (e.g. on a GPU without flash-attn) would otherwise materialise Q x S logits at once."""
    bsz, n_heads, q_len, _ = q.shape
    kv_len = k.shape[-2]
    rows = max(1, chunk_elements // max(1, bsz * n_heads * kv_len))
    mask = causal_mask(q_len, kv_len, q.device) if q_len > 1 else None              # [Q, S]
    outs, lses = [], []
    for start in range(0, q_len, rows):
        logits = torch.matmul(q[:, :, start:start + rows].float(), k.float().transpose(-1, -2)) * scale
        if mask is not None:                                                        # [B, Hq, rows, S]
            logits = logits.masked_fill(~mask[start:start + rows], float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)                                       # [B, Hq, rows]
        outs.append(torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), v.float()))
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def merge_compensation(out, lse, q, comp_k, comp_v, count, scale: float) -> torch.Tensor:
    """Add the compensation token as `count` copies of (k̂, v̂) to an attention result (paper eq. 5).

    out: [B, Hq, Q, D], lse: [B, Hq, Q], q: [B, Hq, Q, D], comp_k/comp_v: [B, Hkv, 1, D] (float32);
    count: an int, or a float tensor broadcastable to [B, Hq, Q] (0 = no compensation for that row)
    """
    group = q.shape[1] // comp_k.shape[1]
    comp_k, comp_v = comp_k.repeat_interleave(group, dim=1), comp_v.repeat_interleave(group, dim=1)
    log_count = math.log(count) if isinstance(count, int) else torch.log(count)   # log(0) = -inf: weight 0
    comp_logit = (q.float() * comp_k).sum(-1) * scale + log_count                   # [B, Hq, Q]
    total = torch.logaddexp(lse.float(), comp_logit)
    w_local = torch.exp(lse.float() - total).unsqueeze(-1)
    w_comp = torch.exp(comp_logit - total).unsqueeze(-1)
    return (out.float() * w_local + comp_v * w_comp).to(out.dtype)


def eager_probs(q, k, scale: float) -> torch.Tensor:
    """Softmax attention probabilities [B, Hq, Q, S] for the profiler."""
    group = q.shape[1] // k.shape[1]
    logits = torch.matmul(q.float(), k.repeat_interleave(group, dim=1).float().transpose(-1, -2)) * scale
    logits = logits.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return torch.softmax(logits, dim=-1)


def razor_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """transformers attention interface. query: [1, Hq, T, D] -> ([1, T, Hq, D], None)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    step, probe, gates = hf.step_kwargs(kwargs)
    if gates is not None:
        out = gates.attend(module.layer_idx, query, key, value, scale)
    elif probe is not None:
        probs = eager_probs(query, key, scale)
        probe.record(module.layer_idx, probs)
        group = query.shape[1] // key.shape[1]
        out = torch.matmul(probs.to(value.dtype), value.repeat_interleave(group, dim=1))
    elif step is None:
        out = sdpa(query, key, value, scale)
    else:
        out = step.attend(module.layer_idx, query, scale)
    return out.transpose(1, 2).contiguous(), None


def split_cache_attention(query: torch.Tensor, layer, scale: float) -> torch.Tensor:
    # query: [B, Hq, Q, D]; query heads h*G .. h*G+G-1 read KV head h (GQA, as repeat_kv lays them out)
    bsz, n_heads, q_len, head_dim = query.shape
    if q_len == 1 and bsz == 1:
        return decode_attention(query, layer, scale)
    group = n_heads // layer.n_kv_heads
    out = query.new_empty(bsz, n_heads, q_len, head_dim)
    if layer.retrieval_heads:
        q_idx = _query_heads(layer.retrieval_heads, group, query.device)
        out[:, q_idx] = sdpa(query[:, q_idx], layer.keys, layer.values, scale)
    if layer.local_heads:
        q_idx = _query_heads(layer.local_heads, group, query.device)
        q_local = query[:, q_idx]
        if layer.comp_count == 0:
            out[:, q_idx] = sdpa(q_local, layer.local_keys, layer.local_values, scale)
        else:
            o, lse = attend_with_lse(q_local, layer.local_keys, layer.local_values, scale)
            out[:, q_idx] = merge_compensation(o, lse, q_local, layer.comp_keys, layer.comp_values,
                                               layer.comp_count, scale)
    return out


def _query_heads(kv_heads: list[int], group: int, device) -> torch.Tensor:
    return _query_heads_cached(tuple(kv_heads), group, device)


@functools.lru_cache(maxsize=4096)
def _query_heads_cached(kv_heads: tuple[int, ...], group: int, device) -> torch.Tensor:
    # Built once per (layer layout, device), not on every decode step.
    return torch.tensor([h * group + g for h in kv_heads for g in range(group)], device=device)


def decode_attention(q: torch.Tensor, layer, scale: float) -> torch.Tensor:
    """One session's decode query against its own cache views. q: [1, Hq, 1, D] -> [1, Hq, 1, D].

    (A scheduler's decoding sessions attend together in their `slab.DecodeSlab` instead.) With one query there is
    no causal mask, so each KV head's G query heads ride as G query rows of that head: GQA without repeating
    keys and values."""
    bsz, n_heads, _, head_dim = q.shape
    q_kv = q.view(bsz, layer.n_kv_heads, n_heads // layer.n_kv_heads, head_dim)           # [1, Hkv, G, D]
    out = torch.empty_like(q_kv)
    if layer.retrieval_heads:
        out[:, layer._r_idx] = F.scaled_dot_product_attention(q_kv[:, layer._r_idx], layer.keys, layer.values,
                                                               scale=scale)
    if layer.local_heads:
        q_local = q_kv[:, layer._l_idx]                                                    # [1, l, G, D]
        o, lse = attend_with_lse_masked(q_local, layer.local_keys, layer.local_values, None, scale)
        if layer.comp_count:
            o = merge_compensation(o, lse, q_local, layer.comp_keys, layer.comp_values, layer.comp_count, scale)
        out[:, layer._l_idx] = o
    return out.view(bsz, n_heads, 1, head_dim)


def attend_with_lse_masked(q, k, v, bias: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention with an additive key bias (0 or -inf, [B, 1, 1, S], or None) -> ([B, H, Q, D], [B, H, Q]).

    q, k, v have the same heads (decode folds a GQA group into query rows)."""
    assert q.shape[1] == k.shape[1], (q.shape, k.shape)
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        return _CPU_FLASH(q, k, v, 0.0, False, attn_mask=None if bias is None else bias.to(q.dtype), scale=scale)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale                  # [B, H, Q, S]
    if bias is not None:
        logits = logits + bias
    lse = torch.logsumexp(logits, dim=-1)
    return torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), v.float()).to(q.dtype), lse
