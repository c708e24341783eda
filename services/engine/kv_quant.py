"""Integer keys and values: symmetric, one float16 scale per group of channels of a row; 8 bits (int8), 6 bits
(four values in three bytes, uint8) or 4 bits (two values a byte, uint8).

A retrieval head keeps every token, so at a quarter of the full cache's bytes a 16-bit map keeps only ~20 of
SmolLM2's 90 KV heads full; stored in 8 bits, twice as many fit (docs/benchmarks.md 3.2g measured 8 bits to
answer cell for cell what 16 bits answer). Rows are quantised once, when they are appended (per token, per
head, per `GROUP` channels: no statistics to keep up to date as the cache grows), and dequantised where
attention reads them. Values take 4 bits where keys do not (3.2l: 4-bit keys lose answers, 4-bit values
none measured; keys carry the outlier channels, as KIVI observed), so a map stores its retrieval heads as
16/16, 8/8, 8/4 or 6/4 bits (keys / values). 6-bit keys cost 52 bytes a row of 64 channels where 8 bits cost
68: more whole heads in the same bytes. They are rounded after a fixed orthonormal rotation of the channels
(a Hadamard matrix with random signs, as QuaRot rotates): it spreads a key's outlier channels over all of them, so
one scale per group fits every channel, and on SmolLM2's keys it cuts the rounding error 2.7x (docs 3.2o);
dequantising rotates back, so attention reads ordinary keys.
"""
from __future__ import annotations

from functools import lru_cache

import torch

GROUP = 32                   # channels sharing one scale (a head_dim it does not divide has one group a row)
QMAX = {8: 127, 6: 31, 4: 7}  # symmetric: -QMAX..QMAX, so a group's largest magnitude is represented exactly
SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0 ** -14       # float16's smallest normal: a row of near-zeros must not get a scale of 0
BITS = (16, 8, 6)            # retrieval_bits (keys) a map may ask for: 16 = the model's dtype, else integers + scales
STORAGES = ((16, 16), (8, 8), (8, 4), (6, 4))   # (key bits, value bits) a retrieval group may be stored in
PACKED = (6, 4)              # bits stored packed in bytes (6 bits: 4 channels in 3 bytes; 4: 2 in 1)
ROTATED = (6,)               # bits whose rows are rounded in `rotation(head_dim)`'s basis
ROTATION_SEED = 0            # the rotation's signs: part of the 6-bit format (a spill dequantises with it)


def group_size(head_dim: int) -> int:
    return GROUP if head_dim % GROUP == 0 else head_dim


def scale_width(head_dim: int) -> int:
    """Scales per row of `head_dim` channels."""
    return head_dim // group_size(head_dim)


def store_width(head_dim: int, bits: int) -> int:
    """Elements a store holds per row of `head_dim` channels at `bits` (bytes when packed: 6 bits take 3/4 of a
    byte a channel, 4 bits half)."""
    return head_dim * bits // 8 if bits in PACKED else head_dim


def channels(width: int, bits: int) -> int:
    """head_dim of a store `width` elements wide at `bits` (store_width's inverse)."""
    return width * 8 // bits if bits in PACKED else width


def store_dtype(bits: int, dtype: torch.dtype) -> torch.dtype:
    """What a store of `bits` holds; 16 bits: the cache's `dtype` itself."""
    return torch.uint8 if bits in PACKED else {8: torch.int8}.get(bits, dtype)


def row_nbytes(head_dim: int, bits: int, itemsize: int) -> int:
    """Bytes one token of one head's keys (or values) takes at `bits` (16: the model dtype's `itemsize`)."""
    if bits == 16:
        return head_dim * itemsize
    return store_width(head_dim, bits) + scale_width(head_dim) * SCALE_DTYPE.itemsize


def check_storage(key_bits: int, value_bits: int) -> None:
    if (key_bits, value_bits) not in STORAGES:
        raise ValueError(f"keys / values are stored in one of "
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
    """x: [..., D] -> (int8 [..., D], or packed uint8 [..., D * bits / 8] in 6 or 4 bits, and float16 scales
    [..., D / group])."""
    head_dim, qmax = x.shape[-1], QMAX[bits]
    x = x.float() @ rotation(head_dim, x.device) if bits in ROTATED else x.float()
    groups = x.unflatten(-1, (scale_width(head_dim), group_size(head_dim)))    # [..., G, group]
    scale = (groups.abs().amax(-1) / qmax).clamp(min=MIN_SCALE).to(SCALE_DTYPE)         # [..., G]
    q = torch.round(groups / scale.float().unsqueeze(-1)).clamp(-qmax, qmax).flatten(-2)
    return (_PACK[bits](q) if bits in PACKED else q.to(torch.int8)), scale


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


def _pack_sextets(q: torch.Tensor) -> torch.Tensor:
    """Integers in -31..31, [..., D] (float) -> uint8 [..., 3 D / 4]: each 4 channels (offset by 32, so 1..63) in 3
    bytes, low bits first: byte 0 = u0 | u1 << 6, byte 1 = u1 >> 2 | u2 << 4, byte 2 = u2 >> 4 | u3 << 2."""
    assert q.shape[-1] % 4 == 0, q.shape
    u = (q + 32).to(torch.uint8).unflatten(-1, (-1, 4))                                 # [..., D / 4, 4]
    u0, u1, u2, u3 = u.unbind(-1)
    return torch.stack([u0 | (u1 << 6), (u1 >> 2) | (u2 << 4), (u2 >> 4) | (u3 << 2)], -1).flatten(-2)


def _unpack_sextets(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3 D / 4] -> float [..., D] in -31..31."""
    b0, b1, b2 = packed.unflatten(-1, (-1, 3)).unbind(-1)                               # [..., D / 4] each
    u = torch.stack([b0 & 63, (b0 >> 6) | ((b1 & 15) << 2), (b1 >> 4) | ((b2 & 3) << 4), b2 >> 2], -1)
    return u.flatten(-2).float() - 32


_PACK = {6: _pack_sextets, 4: _pack_nibbles}
_UNPACK = {6: _unpack_sextets, 4: _unpack_nibbles}


def integers(q: torch.Tensor, bits: int) -> torch.Tensor:
    """A store of `bits` as its integers, [..., D] as float (packed rows unpacked)."""
    return _UNPACK[bits](q) if bits in PACKED else q.float()


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, bits: int,
               unrotate: bool = True) -> torch.Tensor:
    """(a store of `bits`: int8 [..., D] or packed uint8 [..., D * bits / 8]; scales [..., G]) -> [..., D] in
    `dtype`. `unrotate=False` leaves rows of `ROTATED` bits in the rotation's basis: a decode step rotates its one
    query instead of every key (q.k is the same in any orthonormal basis), a [D, D] product per row saved."""
    ints = integers(q, bits)                                                             # [..., D]
    assert ints.shape[:-1] == scale.shape[:-1] and ints.shape[-1] % scale.shape[-1] == 0, (q.shape, scale.shape)
    groups = ints.unflatten(-1, (scale.shape[-1], ints.shape[-1] // scale.shape[-1]))
    rows = (groups * scale.float().unsqueeze(-1)).flatten(-2)
    if bits in ROTATED and unrotate:
        rows = rows @ rotation(rows.shape[-1], rows.device).T
    return rows.to(dtype)


@lru_cache(maxsize=None)
def rotation(head_dim: int, device: torch.device) -> torch.Tensor:
    """[D, D] float32, orthonormal: Sylvester Hadamard blocks (one per power of two in `head_dim`, on the diagonal)
    with fixed random column signs. Entries are +-1 / sqrt(block), so the rotation is the same on every machine."""
    sizes = [1 << b for b in reversed(range(head_dim.bit_length())) if head_dim >> b & 1]
    signs = torch.randint(0, 2, (head_dim,), generator=torch.Generator().manual_seed(ROTATION_SEED)) * 2 - 1
    return (torch.block_diag(*map(_hadamard, sizes)) * signs).to(device)


def _hadamard(n: int) -> torch.Tensor:
    """[n, n] Sylvester's Hadamard matrix over sqrt(n) (n a power of two): orthonormal."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5
