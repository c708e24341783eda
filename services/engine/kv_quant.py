"""Integer keys and values: symmetric, one float16 scale per group of channels of a row; 8 bits (int8) or 4
bits (two values a byte, uint8).

A retrieval head keeps every token, so at a quarter of the full cache's bytes a 16-bit map keeps only ~20 of
SmolLM2's 90 KV heads full; stored in 8 bits, twice as many fit (docs/benchmarks.md 3.2g measured 8 bits to
answer cell for cell what 16 bits answer). Rows are quantised once, when they are appended (per token, per
head, per `GROUP` channels: no statistics to keep up to date as the cache grows), and dequantised where
attention reads them. Values take 4 bits where keys do not (3.2l: 4-bit keys lose answers, 4-bit values
none measured; keys carry the outlier channels, as KIVI observed), so a map stores its retrieval heads as
16/16, 8/8 or 8/4 bits (keys / values).
"""
from __future__ import annotations

import torch

GROUP = 32                   # channels sharing one scale (a head_dim it does not divide has one group a row)
QMAX = {8: 127, 4: 7}        # symmetric: -QMAX..QMAX, so a group's largest magnitude is represented exactly
SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0 ** -14       # float16's smallest normal: a row of near-zeros must not get a scale of 0
BITS = (16, 8)               # retrieval_bits (keys) a map may ask for: 16 = the model's dtype, 8 = int8 + scales
STORAGES = ((16, 16), (8, 8), (8, 4))   # (key bits, value bits) a retrieval group may be stored in


def group_size(head_dim: int) -> int:
    return GROUP if head_dim % GROUP == 0 else head_dim


def scale_width(head_dim: int) -> int:
    """Scales per row of `head_dim` channels."""
    return head_dim // group_size(head_dim)


def store_width(head_dim: int, bits: int) -> int:
    """Elements a store holds per row of `head_dim` channels at `bits` (4 bits: two channels a byte)."""
    return head_dim // 2 if bits == 4 else head_dim


def store_dtype(bits: int, dtype: torch.dtype) -> torch.dtype:
    """What a store of `bits` holds; 16 bits: the cache's `dtype` itself."""
    return {8: torch.int8, 4: torch.uint8}.get(bits, dtype)


def row_nbytes(head_dim: int, bits: int, itemsize: int) -> int:
    """Bytes one token of one head's keys (or values) takes at `bits` (16: the model dtype's `itemsize`)."""
    if bits == 16:
        return head_dim * itemsize
    return store_width(head_dim, bits) + scale_width(head_dim) * SCALE_DTYPE.itemsize


def check_storage(key_bits: int, value_bits: int) -> None:
    if (key_bits, value_bits) not in STORAGES:
        raise ValueError(f"retrieval heads store keys / values in one of "
                         f"{', '.join(f'{k}/{v}' for k, v in STORAGES)} bits, got {key_bits}/{value_bits}")


def parse_storage(storage: int | str) -> tuple[int, int]:
    """16, 8, "8" or "8/4" -> (key bits, value bits); ValueError naming the storages there are."""
    key, _, value = str(storage).partition("/")
    try:
        pair = int(key), int(value or key)
    except ValueError:
        raise ValueError(f"a retrieval storage is KEY_BITS or KEY_BITS/VALUE_BITS, got {storage!r}") from None
    check_storage(*pair)
    return pair


def storage_label(key_bits: int, value_bits: int) -> int | str:
    """8 for 8/8 (as maps named it before values had bits of their own), "8/4" for 8/4."""
    return key_bits if key_bits == value_bits else f"{key_bits}/{value_bits}"


def quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., D] -> (int8 [..., D], or in 4 bits uint8 [..., D / 2], and float16 scales [..., D / group])."""
    head_dim, qmax = x.shape[-1], QMAX[bits]
    groups = x.float().unflatten(-1, (scale_width(head_dim), group_size(head_dim)))    # [..., G, group]
    scale = (groups.abs().amax(-1) / qmax).clamp(min=MIN_SCALE).to(SCALE_DTYPE)         # [..., G]
    q = torch.round(groups / scale.float().unsqueeze(-1)).clamp(-qmax, qmax).flatten(-2)
    return (q.to(torch.int8) if bits == 8 else _pack_nibbles(q)), scale


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Integers in -7..7, [..., D] (float) -> uint8 [..., D / 2]: channel 2i in the low nibble, 2i + 1 in the high,
    each offset by 8 (so 0..15)."""
    assert q.shape[-1] % 2 == 0, q.shape
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D / 2] -> float [..., D] in -7..7 (interleaved as bytes, then one float conversion: this runs on
    every decode step)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).float() - 8


def integers(q: torch.Tensor) -> torch.Tensor:
    """A store's integers, [..., D] as float (4-bit rows unpacked)."""
    return _unpack_nibbles(q) if q.dtype == torch.uint8 else q.float()


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(int8 [..., D] or packed 4-bit uint8 [..., D / 2], scales [..., G]) -> [..., D] in `dtype`."""
    ints = integers(q)                                                                   # [..., D]
    assert ints.shape[:-1] == scale.shape[:-1] and ints.shape[-1] % scale.shape[-1] == 0, (q.shape, scale.shape)
    groups = ints.unflatten(-1, (scale.shape[-1], ints.shape[-1] // scale.shape[-1]))
    return (groups * scale.float().unsqueeze(-1)).flatten(-2).to(dtype)
