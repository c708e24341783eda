"""8-bit keys and values: symmetric int8 with one float16 scale per group of channels of a row.

A retrieval head keeps every token, so at a quarter of the full cache's bytes a 16-bit map keeps only ~20 of
SmolLM2's 90 KV heads full; stored in 8 bits, twice as many fit (docs/benchmarks.md 3.2g measured 8 bits to
answer cell for cell what 16 bits answer). Rows are quantised once, when they are appended (per token, per
head, per `GROUP` channels: no statistics to keep up to date as the cache grows), and dequantised where
attention reads them.
"""
from __future__ import annotations

import torch

GROUP = 32                   # channels sharing one scale (a head_dim it does not divide has one group a row)
QMAX = 127                   # symmetric: -127..127, so a row's largest magnitude is represented exactly
SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0 ** -14       # float16's smallest normal: a row of near-zeros must not get a scale of 0
BITS = (16, 8)               # retrieval_bits a map may ask for: 16 = the model's dtype, 8 = int8 + scales


def group_size(head_dim: int) -> int:
    return GROUP if head_dim % GROUP == 0 else head_dim


def scale_width(head_dim: int) -> int:
    """Scales per row of `head_dim` channels."""
    return head_dim // group_size(head_dim)


def row_nbytes(head_dim: int, bits: int, itemsize: int) -> int:
    """Bytes one token of one head's keys (or values) takes at `bits` (16: the model dtype's `itemsize`)."""
    if bits == 16:
        return head_dim * itemsize
    return head_dim + scale_width(head_dim) * SCALE_DTYPE.itemsize


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., D] -> (int8 [..., D], float16 scales [..., D / group])."""
    head_dim = x.shape[-1]
    groups = x.float().unflatten(-1, (scale_width(head_dim), group_size(head_dim)))    # [..., G, group]
    scale = (groups.abs().amax(-1) / QMAX).clamp(min=MIN_SCALE).to(SCALE_DTYPE)         # [..., G]
    q = torch.round(groups / scale.float().unsqueeze(-1)).clamp(-QMAX, QMAX).to(torch.int8)
    return q.flatten(-2), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(int8 [..., D], scales [..., G]) -> [..., D] in `dtype`."""
    assert q.shape[:-1] == scale.shape[:-1] and q.shape[-1] % scale.shape[-1] == 0, (q.shape, scale.shape)
    groups = q.float().unflatten(-1, (scale.shape[-1], q.shape[-1] // scale.shape[-1]))
    return (groups * scale.float().unsqueeze(-1)).flatten(-2).to(dtype)
