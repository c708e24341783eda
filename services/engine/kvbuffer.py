"""KVBuffer: keys and values of some heads of one layer, in preallocated storage that grows in place.

Rows [lo, hi) of a `[1, h, capacity, D]` store are live. Appending writes rows at `hi`; evicting moves `lo`
forward (and the few sink rows with it), so neither copies the cache. Only when `hi` reaches the end is the
store compacted or regrown, by a factor of 1.25 (+ at least `MIN_SLACK` rows): amortised, every appended
token copies O(1) rows, never the whole cache (an earlier `torch.cat` per step copied all of it).
"""
from __future__ import annotations

import torch

MIN_SLACK = 16   # rows of headroom at least: a compaction moves the live rows at most every 16 appends


def capacity_for(rows: int) -> int:
    """The capacity a store is (re)allocated with when it must hold `rows` rows."""
    return rows + max(MIN_SLACK, rows // 4)


class KVBuffer:
    def __init__(self, n_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 0):
        self.n_heads, self.head_dim = n_heads, head_dim
        shape = (1, n_heads, capacity, head_dim)
        self.k_store = torch.empty(shape, dtype=dtype, device=device)   # [1, h, cap, D]
        self.v_store = torch.empty(shape, dtype=dtype, device=device)
        self.lo = self.hi = 0

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

    def nbytes(self) -> int:
        """Allocated bytes (what the device holds), not just live rows."""
        return 2 * self.k_store.numel() * self.k_store.element_size()

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [1, h, q, D]
        assert k.shape[0] == 1 and k.shape[1] == self.n_heads and k.shape[3] == self.head_dim, k.shape
        q = k.shape[2]
        self._make_room(q)
        self.k_store[:, :, self.hi:self.hi + q] = k
        self.v_store[:, :, self.hi:self.hi + q] = v
        self.hi += q

    def evict(self, n_keep: int, n_drop: int) -> None:
        """Remove `n_drop` rows after the first `n_keep` (the sinks), keeping the sinks just before the rest."""
        assert 0 <= n_keep and 0 < n_drop and n_keep + n_drop <= len(self), (n_keep, n_drop, len(self))
        lo = self.lo
        if n_keep:
            # The sink rows move forward by n_drop (cloned first only when source and target overlap).
            for store in (self.k_store, self.v_store):
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
        for name in ("k_store", "v_store"):
            old = getattr(self, name)
            rows = old[:, :, self.lo:self.hi].clone() if in_place else old[:, :, self.lo:self.hi]
            new = old if in_place else old.new_empty(1, self.n_heads, capacity, self.head_dim)
            new[:, :, :live] = rows
            setattr(self, name, new)
        self.lo, self.hi = 0, live

    @classmethod
    def holding(cls, k: torch.Tensor, v: torch.Tensor) -> "KVBuffer":
        """A buffer whose live rows are `k`, `v` ([1, h, n, D]), with the usual headroom."""
        buf = cls(k.shape[1], k.shape[3], k.dtype, k.device, capacity_for(k.shape[2]))
        buf.append(k, v)
        return buf
