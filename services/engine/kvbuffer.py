"""KVBuffer: keys and values of some heads of one layer, in preallocated storage that grows in place.

Rows [lo, hi) of a `[1, h, capacity, D]` store are live. Appending writes rows at `hi`; evicting moves `lo`
forward (and the few sink rows with it), so neither copies the cache. Only when `hi` reaches the end is the
store compacted or regrown, by a factor of 1.25 (+ at least `MIN_SLACK` rows): amortised, every appended
token copies O(1) rows, never the whole cache (an earlier `torch.cat` per step copied all of it).

`QuantizedKVBuffer` keeps the same rows as int8 with float16 scales (kv_quant.py) and hands out dequantised
copies: a retrieval head in 8 bits costs about half of one in 16; `Int4ValuesKVBuffer` keeps its values in 4.
With `recent` > 0 it also keeps the last `recent` rows appended in `dtype` and reads them from there, so a row is
read rounded only once that many newer rows follow it (KIVI's full-precision residual: the question being
answered, and the tokens just generated, are read as computed).
"""
from __future__ import annotations

import torch

from . import kv_quant

MIN_SLACK = 16   # rows of headroom at least: a compaction moves the live rows at most every 16 appends


def capacity_for(rows: int) -> int:
    """The capacity a store is (re)allocated with when it must hold `rows` rows."""
    return rows + max(MIN_SLACK, rows // 4)


class KVBuffer:
    STORES = ("k_store", "v_store")   # every [1, h, capacity, width] tensor a row is written to
    KEY_BITS = VALUE_BITS = 16        # as stored: 16 = `dtype` itself

    def __init__(self, n_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 0, recent: int = 0):
        assert recent == 0 or self.KEY_BITS < 16, "rows in `dtype` are read as computed already"
        self.n_heads, self.head_dim, self.dtype = n_heads, head_dim, dtype   # dtype: what `keys` returns
        self.recent = recent
        # the last min(recent, rows appended) rows as appended, in `dtype`: [1, h, m, D] each, tensors of their own
        self.k_recent = self.v_recent = torch.empty((1, n_heads, 0, head_dim), dtype=dtype, device=device)
        for name, (store_dtype, width) in zip(self.STORES, self._layout()):
            setattr(self, name, torch.empty((1, n_heads, capacity, width), dtype=store_dtype, device=device))
        self.lo = self.hi = 0

    def _layout(self) -> list[tuple[torch.dtype, int]]:
        """(dtype, width) of each store, in `STORES` order."""
        return [(self.dtype, self.head_dim)] * 2

    def _encode(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """New rows as each store holds them, in `STORES` order."""
        return encoded(k, v, self.KEY_BITS, self.VALUE_BITS)

    def _stores(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.STORES]

    @property
    def capacity(self) -> int:
        return self.k_store.shape[2]

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def keys(self) -> torch.Tensor:
        return self.k_store[:, :, self.lo:self.hi]                      # [1, h, n, D], a view

    @property
    def values(self) -> torch.Tensor:
        return self.v_store[:, :, self.lo:self.hi]

    def live_rows(self) -> dict[str, torch.Tensor]:
        """Every store's live rows as held ({store name: [1, h, n, width]} views): what a spill writes."""
        return {name: store[:, :, self.lo:self.hi] for name, store in zip(self.STORES, self._stores())}

    def recent_rows(self) -> dict[str, torch.Tensor]:
        """{"k_recent": [1, h, m, D], "v_recent": ...}: the rows also kept in `dtype`; {} without any."""
        return {"k_recent": self.k_recent, "v_recent": self.v_recent} if self.recent else {}

    def nbytes(self) -> int:
        """Allocated bytes (what the device holds), not just live rows."""
        return sum(store.numel() * store.element_size() for store in self._stores()) + self._recent_nbytes()

    def stored_nbytes(self) -> int:
        """Bytes of the live rows (and the recent rows' copies), headroom excluded."""
        row = sum(store[:, :, :1].numel() * store.element_size() for store in self._stores())
        return len(self) * row + self._recent_nbytes()

    def _recent_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_recent, self.v_recent))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [1, h, q, D]
        assert k.shape[0] == 1 and k.shape[1] == self.n_heads and k.shape[3] == self.head_dim, k.shape
        self.append_encoded(self._encode(k, v))
        if self.recent:
            self.k_recent, self.v_recent = _tail(self.k_recent, k, self.recent), _tail(self.v_recent, v, self.recent)

    def append_encoded(self, rows: tuple[torch.Tensor, ...]) -> None:
        """Append rows already as the stores hold them (`_encode`'s, or a spill's), each [1, h, q, width]."""
        q = rows[0].shape[2]
        self._make_room(q)
        for store, part in zip(self._stores(), rows):
            store[:, :, self.hi:self.hi + q] = part
        self.hi += q

    def evict(self, n_keep: int, n_drop: int) -> None:
        """Remove `n_drop` rows after the first `n_keep` (the sinks), keeping the sinks just before the rest."""
        assert 0 <= n_keep and 0 < n_drop and n_keep + n_drop <= len(self), (n_keep, n_drop, len(self))
        lo = self.lo
        if n_keep:
            # The sink rows move forward by n_drop (cloned first only when source and target overlap).
            for store in self._stores():
                rows = store[:, :, lo:lo + n_keep]
                store[:, :, lo + n_drop:lo + n_drop + n_keep] = rows.clone() if n_drop < n_keep else rows
        self.lo += n_drop

    def shrink(self) -> None:
        """Give back headroom a large prefill left behind (more than twice what the live rows need)."""
        if self.capacity > 2 * capacity_for(len(self)):
            self._relocate(capacity_for(len(self)))

    def _make_room(self, q: int) -> None:
        if self.hi + q <= self.capacity:
            return
        live = len(self)
        # Compact in place only while that leaves the usual headroom; else regrow (a store grown to just fit
        # would otherwise compact, copying every live row, on each append).
        capacity = self.capacity if capacity_for(live + q) <= self.capacity else capacity_for(live + q)
        self._relocate(capacity)

    def _relocate(self, capacity: int) -> None:
        """Move the live rows to the front of a store of `capacity` rows (the same store when it fits)."""
        live, in_place = len(self), capacity == self.capacity
        for name in self.STORES:
            old = getattr(self, name)
            rows = old[:, :, self.lo:self.hi].clone() if in_place else old[:, :, self.lo:self.hi]
            new = old if in_place else old.new_empty(1, self.n_heads, capacity, old.shape[-1])
            new[:, :, :live] = rows
            setattr(self, name, new)
        self.lo, self.hi = 0, live

    def _with_recent(self, rows: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
        """`rows` ([1, h, n, D], a dequantised copy of the live rows) with its last rows replaced by `recent`'s."""
        m = recent.shape[2]
        assert m <= len(self), (m, len(self))   # a local group keeps at most its smallest window recent
        if m:
            rows[:, :, len(self) - m:] = recent
        return rows

    @classmethod
    def holding(cls, k: torch.Tensor, v: torch.Tensor) -> "KVBuffer":
        """A buffer whose live rows are `k`, `v` ([1, h, n, D]), with the usual headroom."""
        buf = cls(k.shape[1], k.shape[3], k.dtype, k.device, capacity_for(k.shape[2]))
        buf.append(k, v)
        return buf


class QuantizedKVBuffer(KVBuffer):
    """The same rows as integers, one float16 scale per group of channels (kv_quant.py): keys in `KEY_BITS`,
    values in `VALUE_BITS`; `keys` and `values` are dequantised copies in `dtype` (a decode step reads each once)."""

    STORES = ("k_store", "v_store", "k_scale", "v_scale")
    KEY_BITS = VALUE_BITS = 8

    def _layout(self) -> list[tuple[torch.dtype, int]]:
        width = kv_quant.scale_width(self.head_dim)
        return [*[(kv_quant.store_dtype(bits, self.dtype), kv_quant.store_width(self.head_dim, bits))
                  for bits in (self.KEY_BITS, self.VALUE_BITS)],
                *[(kv_quant.SCALE_DTYPE, width)] * 2]

    @property
    def keys(self) -> torch.Tensor:
        live = slice(self.lo, self.hi)
        rows = kv_quant.dequantize(self.k_store[:, :, live], self.k_scale[:, :, live], self.dtype,   # [1, h, n, D]
                                   self.KEY_BITS)
        return self._with_recent(rows, self.k_recent)

    @property
    def values(self) -> torch.Tensor:
        live = slice(self.lo, self.hi)
        rows = kv_quant.dequantize(self.v_store[:, :, live], self.v_scale[:, :, live], self.dtype, self.VALUE_BITS)
        return self._with_recent(rows, self.v_recent)


class Int4ValuesKVBuffer(QuantizedKVBuffer):
    """Keys in int8, values in 4 bits (two a byte): a token of a head in about 0.41 of its 16-bit bytes."""

    VALUE_BITS = 4


class Int6KeysKVBuffer(QuantizedKVBuffer):
    """Keys in 6 bits (four in three bytes), values in 4: a token of a head in about 0.34 of its 16-bit bytes."""

    KEY_BITS, VALUE_BITS = 6, 4


BUFFER_CLASSES = {(16, 16): KVBuffer, (8, 8): QuantizedKVBuffer, (8, 4): Int4ValuesKVBuffer, (6, 4): Int6KeysKVBuffer}


def encoded(k: torch.Tensor, v: torch.Tensor, key_bits: int, value_bits: int) -> tuple[torch.Tensor, ...]:
    """Rows [..., D] as a store of `key_bits` / `value_bits` holds them, in `STORES` order: (k, v) in 16 bits,
    else (integer keys, integer values, key scales, value scales). The decode slab writes its rows with this too,
    so a slot holds exactly what the session's own buffer would."""
    if key_bits == 16:
        return k, v
    (qk, sk), (qv, sv) = kv_quant.quantize(k, key_bits), kv_quant.quantize(v, value_bits)
    return qk, qv, sk, sv


def buffer_class(bits: int, value_bits: int | None = None) -> type[KVBuffer]:
    """The store for heads whose keys are kept at `bits` and values at `value_bits` (default `bits`; 16: the
    model's dtype)."""
    value_bits = bits if value_bits is None else value_bits
    kv_quant.check_storage(bits, value_bits)
    return BUFFER_CLASSES[bits, value_bits]


def restored(cls: type[KVBuffer], rows: dict[str, torch.Tensor], dtype: torch.dtype, recent: int = 0) -> KVBuffer:
    """A `cls` buffer holding spilled `rows` ({store name: [1, h, n, width]}, as `live_rows` gave them, and
    "k_recent" / "v_recent" as `recent_rows` did where `recent`) exactly."""
    k = rows["k_store"]
    head_dim = kv_quant.channels(k.shape[3], cls.KEY_BITS)
    buf = cls(k.shape[1], head_dim, dtype, k.device, capacity_for(k.shape[2]), recent=recent)
    buf.append_encoded(tuple(rows[name] for name in cls.STORES))
    if recent:
        buf.k_recent, buf.v_recent = rows["k_recent"].clone(), rows["v_recent"].clone()
    return buf


def _tail(old: torch.Tensor, new: torch.Tensor, n: int) -> torch.Tensor:
    """The last `n` rows of `old` followed by `new` ([1, h, rows, D] each), in a tensor of their own (a slice of a
    long prefill chunk would keep all of it alive)."""
    new = new[:, :, -n:]
    keep = min(old.shape[2], n - new.shape[2])
    return torch.cat([old[:, :, old.shape[2] - keep:], new], dim=2)
