"""DecodeSlab: the storage of the sessions that are decoding, batched per head layout (and size class, where
one slab for the whole layout would give some turn a slot larger than its bound).

While a turn decodes, its session's cache lives in one slot of a slab instead of in its own `KVBuffer`s, so a
decode step appends, attends and compresses every session of the slab with a few tensor ops per layer: no
per-session work and no gathering of caches into a padded batch. Per decoder layer:
  retrieval     [B, r, rows, D]            token t at row t (rows: the slab's size class, >= every final length);
                                           in 8 bits int8, with float16 scales [B, r, rows, D / group] beside;
                                           4-bit values packed two a byte, [B, r, rows, D / 2] uint8; 6-bit
                                           keys four in three bytes, [B, r, rows, 3 D / 4] uint8
  local         [B, l, sink + ring + 1, D] token t < sink at row t, later tokens at sink + (t - sink) % ring; the
                                           last row is the compensation token in the cache dtype (in integers
                                           with scales, like retrieval rows, when `local_bits` < 16: then the
                                           compensation row is written into the dequantised copy attention reads)
  compensation  [B, l, 1, D] float32       running means of the evicted keys and values; counts per slot
  recent        [B, h, R, D] per group     a group in integers with `recent_rows` R: token t's row as computed at
                                           t % R too; attention reads the last R tokens there (their integer rows
                                           masked), unrotated rows rotated to the keys' basis each step
Attention does not depend on the order of keys, so the window can be a ring: evicting a token moves nothing (it
is folded into the compensation mean and its row is reused). `ring` = W(rows) + 1 holds the window and the new
token of a step before the window is trimmed, as `RazorLayer.compress` orders it. Masks say which rows are live;
the compensation row's bias is log(count), so one attention call weighs it as `count` copies (paper eq. 5) where
the per-session path merges it in through the log-sum-exp.

A slab's storage is rebuilt (one copy of its slots) only when its members change, i.e. when a turn starts or
stops decoding; between those, every step writes one row per session and layer. A slot holds at most the bytes
`CompressedKVCache.bytes_bound` reserves for the turn, so the service's KV budget still holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kv_quant
from .cache import CompressedKVCache, recent_nbytes
from .kvbuffer import encoded, restored

CLASS_GROWTH = 1.2   # size classes grow by 1.2x: a slot is at most 1.2x its turn's final length (bytes_bound: 1.25x)
SMALLEST_CLASS = 16


def size_class(tokens: int) -> int:
    """The rows of the retrieval slot for a turn whose cache grows to `tokens` tokens."""
    rows = SMALLEST_CLASS
    while rows < tokens:
        rows = math.ceil(rows * CLASS_GROWTH)
    return rows


@dataclass
class LayerSlots:
    """One layer's storage for every slot; None for a head group the layer does not have."""

    keys: torch.Tensor | None            # [B, r, rows, D] (int8 in 8 bits; packed uint8 [B, r, rows, 3 D / 4] in 6)
    values: torch.Tensor | None
    local_keys: torch.Tensor | None      # [B, l, sink + ring + 1, D] (or as integers, like `keys`)
    local_values: torch.Tensor | None
    comp_keys: torch.Tensor | None       # [B, l, 1, D] float32
    comp_values: torch.Tensor | None
    key_scales: torch.Tensor | None = None     # [B, r, rows, D / group] float16, retrieval heads in integers only
    value_scales: torch.Tensor | None = None
    local_key_scales: torch.Tensor | None = None    # [B, l, sink + ring + 1, D / group], local rows in integers only
    local_value_scales: torch.Tensor | None = None
    recent_keys: torch.Tensor | None = None          # [B, r, R, D] in the cache dtype, retrieval rows in integers
    recent_values: torch.Tensor | None = None        # with recent rows only
    local_recent_keys: torch.Tensor | None = None    # [B, l, R_l, D], as those
    local_recent_values: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.local_keys, self.local_values, self.comp_keys,
                            self.comp_values, self.key_scales, self.value_scales, self.local_key_scales,
                            self.local_value_scales, self.recent_keys, self.recent_values, self.local_recent_keys,
                            self.local_recent_values) if t is not None]

    def retrieval_stores(self) -> dict[str, torch.Tensor]:
        """The retrieval group's slot tensors by the `KVBuffer` store they mirror."""
        named = {"k_store": self.keys, "v_store": self.values, "k_scale": self.key_scales, "v_scale": self.value_scales}
        return {store: t for store, t in named.items() if t is not None}

    def local_stores(self) -> dict[str, torch.Tensor]:
        """The local group's slot tensors by the `KVBuffer` store they mirror."""
        named = {"k_store": self.local_keys, "v_store": self.local_values, "k_scale": self.local_key_scales,
                 "v_scale": self.local_value_scales}
        return {store: t for store, t in named.items() if t is not None}

    def recent(self, group: str) -> dict[str, torch.Tensor]:
        """A group's ("retrieval" or "local") recent rows by the `KVBuffer` store they mirror; {} without."""
        prefix = "" if group == "retrieval" else "local_"
        keys, values = getattr(self, f"{prefix}recent_keys"), getattr(self, f"{prefix}recent_values")
        return {} if keys is None else {"k_recent": keys, "v_recent": values}


class DecodeSlab:
    """The decoding sessions of one head layout and size class. Slot i holds `members[i]`."""

    def __init__(self, template: CompressedKVCache, rows: int, head_dim: int, dtype: torch.dtype, device):
        self.params, self.rows = template.params, rows
        self.key_bits, self.value_bits = self.params.retrieval_bits, self.params.value_bits
        self.local_key_bits, self.local_value_bits = self.params.local_storage_bits
        self.quantized, self.local_quantized = self.key_bits < 16, self.local_key_bits < 16
        self.recent = dict(zip(("retrieval", "local"), self.params.recent))   # group -> R (0: none)
        self.key = (template.layout, rows)
        self.ring = self.params.window(rows) + 1
        self.local_rows = self.params.sink + self.ring + 1   # + the compensation row, last
        self.head_dim, self.dtype, self.device = head_dim, dtype, torch.device(device)
        # keys stored rotated are read in the rotation's basis, with the query rotated to match (None: not rotated)
        self.key_rotation, self.local_key_rotation = (
            kv_quant.rotation(head_dim, self.device) if bits in kv_quant.ROTATED else None
            for bits in (self.key_bits, self.local_key_bits))
        self.r_heads = [len(layer.retrieval_heads) for layer in template.layers]
        self.l_heads = [len(layer.local_heads) for layer in template.layers]
        group_idx = [_head_indices(layer, self.device) for layer in template.layers]
        self.r_idx, self.l_idx = [r for r, _ in group_idx], [l for _, l in group_idx]
        self.members: list[CompressedKVCache] = []
        self.storage: list[LayerSlots] = []
        self._stored: list[CompressedKVCache] = []    # who occupies the storage's slots (members, until a rebuild)

    # --- membership ---------------------------------------------------------------------------------
    def set_members(self, caches: list[CompressedKVCache]) -> None:
        """Seat `caches` (the members that stay keep their order); rebuilds the storage if anything changed."""
        wanted = {id(c) for c in caches}
        staying = [c for c in self.members if id(c) in wanted]
        for cache in [c for c in self.members if id(c) not in wanted]:
            self.unseat(cache)
        seated = {id(c) for c in staying}
        joining = [c for c in caches if id(c) not in seated]
        members = staying + joining
        if _same(members, self._stored):
            return
        self._rebuild(members)

    def unseat(self, cache: CompressedKVCache) -> None:
        """Copy `cache`'s slot back into its own KVBuffers; the slot is reclaimed at the next rebuild."""
        slot = _index(self._stored, cache)
        for layer, slots in zip(cache.layers, self.storage):
            self._unpack(layer, slots, slot)
        self.members = [c for c in self.members if c is not cache]
        cache.seat = None
        if not self.members:   # free the memory now: an idle scheduler may not step again for a while
            self.storage, self._stored = [], []

    def _rebuild(self, members: list[CompressedKVCache]) -> None:
        kept = [_index(self._stored, c) for c in members if c.seat is self]
        storage = [self._allocate(layer_idx, len(members), len(kept)) for layer_idx in range(len(self.r_heads))]
        if kept:
            kept_idx = torch.tensor(kept, device=self.device)
            for new, old in zip(storage, self.storage):
                for dst, src in zip(new.tensors(), old.tensors()):
                    torch.index_select(src, 0, kept_idx, out=dst[:len(kept)])   # straight into place
        for slot, cache in enumerate(members[len(kept):], start=len(kept)):
            for layer, slots in zip(cache.layers, storage):
                self._pack(layer, slots, slot)
            cache.seat = self
        self.members, self._stored, self.storage = list(members), list(members), storage

    def _allocate(self, layer_idx: int, n: int, copied: int) -> LayerSlots:
        """Storage for `n` slots, the first `copied` of which the caller fills whole; the others are zeros, not
        empty: their masked rows still meet the values in a matmul, and 0 * NaN would be NaN."""
        def zeros(heads: int, rows: int, dtype=self.dtype, width=self.head_dim):
            if not heads:
                return None
            store = torch.empty(n, heads, rows, width, dtype=dtype, device=self.device)
            store[copied:].zero_()
            return store
        def stores(heads: int, rows: int, bits: tuple[int, int]) -> list[torch.Tensor | None]:
            """Keys and values of `bits`, then their scales (None in 16 bits)."""
            kv = [zeros(heads, rows, kv_quant.store_dtype(b, self.dtype), kv_quant.store_width(self.head_dim, b))
                  for b in bits]
            width = kv_quant.scale_width(self.head_dim)
            return kv + [zeros(heads, rows, kv_quant.SCALE_DTYPE, width) if bits[0] < 16 else None for _ in bits]
        r, l = self.r_heads[layer_idx], self.l_heads[layer_idx]
        keys, values, key_scales, value_scales = stores(r, self.rows, (self.key_bits, self.value_bits))
        local_keys, local_values, local_key_scales, local_value_scales = stores(
            l, self.local_rows, (self.local_key_bits, self.local_value_bits))
        r_recent, l_recent = self.recent["retrieval"], self.recent["local"]
        return LayerSlots(keys, values, local_keys, local_values, zeros(l, 1, torch.float32),
                          zeros(l, 1, torch.float32), key_scales, value_scales, local_key_scales, local_value_scales,
                          zeros(r if r_recent else 0, r_recent), zeros(r if r_recent else 0, r_recent),
                          zeros(l if l_recent else 0, l_recent), zeros(l if l_recent else 0, l_recent))

    # --- a session's rows in and out of a slot ------------------------------------------------------
    def _local_token_rows(self, seq_len: int, n_window: int) -> torch.Tensor:
        """Rows of the last `n_window` tokens (those after the sinks) of a session of `seq_len` tokens."""
        return torch.tensor([self._ring_row(t) for t in range(seq_len - n_window, seq_len)],
                            dtype=torch.long, device=self.device)

    def _pack(self, layer, slots: LayerSlots, slot: int) -> None:
        """Move one layer of a session into `slot`, then free its own storage."""
        n = layer.seq_len
        assert n < self.rows, (n, self.rows)
        if layer.retrieval is not None:
            stores = slots.retrieval_stores()
            for store, rows in layer.retrieval.live_rows().items():   # as stored: int8 stays int8
                stores[store][slot, :, :n] = rows[0]
            self._pack_recent(layer.retrieval, slots.recent("retrieval"), slot, n)
        if layer.local is not None:
            stored = len(layer.local)
            n_sink = min(self.params.sink, stored)
            n_window = stored - n_sink
            assert n_window < self.ring, (n_window, self.ring)   # compressed: at most W(n) <= W(rows) tokens
            rows = self._local_token_rows(n, n_window)
            stores = slots.local_stores()
            for store, src in layer.local.live_rows().items():   # as stored: integers stay integers
                stores[store][slot, :, :n_sink] = src[0, :, :n_sink]
                stores[store][slot, :, rows] = src[0, :, n_sink:]
            self._pack_recent(layer.local, slots.recent("local"), slot, n)
            if layer.comp_keys is not None:
                slots.comp_keys[slot] = layer.comp_keys[0]
                slots.comp_values[slot] = layer.comp_values[0]
                if not self.local_quantized:   # integer rows get their compensation row at attend time
                    slots.local_keys[slot, :, -1] = layer.comp_keys[0, :, 0]
                    slots.local_values[slot, :, -1] = layer.comp_values[0, :, 0]
        layer.retrieval = layer.local = layer.comp_keys = layer.comp_values = None

    def _pack_recent(self, buffer, recent: dict[str, torch.Tensor], slot: int, n: int) -> None:
        """A group's recent rows (the last m of a session of `n` tokens) into ring rows t % R of `slot`."""
        if not recent:
            return
        src = buffer.recent_rows()
        m, ring = src["k_recent"].shape[2], recent["k_recent"].shape[2]
        rows = torch.arange(n - m, n, device=self.device) % ring
        for store, t in src.items():
            recent[store][slot, :, rows] = t[0]

    def _recent_of(self, recent: dict[str, torch.Tensor], slot: int, n: int) -> dict[str, torch.Tensor]:
        """A group's recent rows of `slot` in token order, as `KVBuffer.recent_rows` holds them ({} without)."""
        if not recent:
            return {}
        ring = recent["k_recent"].shape[2]
        rows = torch.arange(max(0, n - ring), n, device=self.device) % ring
        return {store: t[slot:slot + 1, :, rows] for store, t in recent.items()}

    def _unpack(self, layer, slots: LayerSlots, slot: int) -> None:
        """Copy one layer of `slot` back into the session's own (new) KVBuffers, sinks then window in order."""
        n = layer.seq_len
        if slots.keys is not None:
            rows = {store: t[slot:slot + 1, :, :n] for store, t in slots.retrieval_stores().items()}
            rows.update(self._recent_of(slots.recent("retrieval"), slot, n))
            layer.retrieval = restored(self.params.buffer_class(), rows, self.dtype, self.recent["retrieval"])
        if slots.local_keys is not None:
            n_sink = min(self.params.sink, n)
            rows = self._local_token_rows(n, min(n - n_sink, self.params.window(n)))
            live = {store: torch.cat([t[slot, :, :n_sink], t[slot, :, rows]], dim=1)[None]
                    for store, t in slots.local_stores().items()}
            live.update(self._recent_of(slots.recent("local"), slot, n))
            layer.local = restored(self.params.local_buffer_class(), live, self.dtype, self.recent["local"])
            if layer.comp_count:
                layer.comp_keys = slots.comp_keys[slot:slot + 1].clone()
                layer.comp_values = slots.comp_values[slot:slot + 1].clone()

    # --- one decode step over every member ----------------------------------------------------------
    def begin_step(self) -> None:
        """Rows to write and masks to read for this step (shared by every layer)."""
        assert _same(self.members, self._stored), "a slab steps only with its storage rebuilt for its members"
        sink, device = self.params.sink, self.device
        self._lengths = [c.seq_length for c in self.members]                # N before the step
        assert max(self._lengths) < self.rows, (self._lengths, self.rows)
        n = torch.tensor(self._lengths, device=device)                      # [B]
        self._slots = torch.arange(len(self.members), device=device)
        self._row = n                                                       # the new token's retrieval row
        self._local_row = torch.where(n < sink, n, sink + (n - sink) % self.ring)
        self._recent_row = {group: n % ring for group, ring in self.recent.items() if ring}
        self._flat: dict = {}
        self._span = max(self._lengths) + 1                                 # retrieval rows worth reading
        self._r_mask = self._retrieval_mask(n)                              # [B, 1, 1, span (+ R)]
        self._counts = [_comp_count(c) for c in self.members]
        self._l_bias = self._local_bias(n)                                  # [B, 1, 1, sink + ring + 1 (+ R)]

    def _retrieval_mask(self, n: torch.Tensor) -> torch.Tensor:
        """True for the retrieval rows read after this step's append: tokens 0..n, the last R of them (with recent
        rows) from the recent rows, after the integer rows."""
        ring, device = self.recent["retrieval"], self.device
        live = torch.arange(self._span, device=device) < (n + 1 - ring)[:, None]                  # [B, span]
        if ring:
            live = torch.cat([live, torch.arange(ring, device=device) < (n + 1)[:, None]], dim=1)
        return live[:, None, None]

    def _local_bias(self, n: torch.Tensor) -> torch.Tensor:
        """0 for the live local rows after this step's append (sinks, window and the new token), else -inf; the
        compensation row's is log(count) (-inf for none); with recent rows, their tokens' integer rows are -inf and
        the recent rows follow. In the cache dtype, as the attention kernel takes it."""
        sink, device = self.params.sink, self.device
        keep = torch.tensor([self.params.window(x) + 1 for x in self._lengths], device=device)     # [B]
        present = n + 1                                                                             # tokens
        sink_live = torch.arange(sink, device=device)[None, :] < present[:, None]                  # [B, sink]
        ring_idx = torch.arange(self.ring, device=device)[None, :]                                 # [1, ring]
        after_sink = (present - sink)[:, None]                                                      # [B, 1]
        age = (after_sink - 1 - ring_idx) % self.ring                                               # [B, ring]
        ring_live = (ring_idx < after_sink) & (age < keep[:, None])
        live = torch.cat([sink_live, ring_live], dim=1)
        recent = self.recent["local"]
        parts = [live, torch.ones_like(present[:, None], dtype=torch.bool)]   # the compensation row: its bias below
        if recent:   # the last R tokens are read from the recent rows, after the compensation row
            sink_age = n[:, None] - torch.arange(sink, device=device)[None, :]
            parts[0] = live & (torch.cat([sink_age, age], dim=1) >= recent)
            parts.append(torch.arange(recent, device=device)[None, :] < present[:, None])
        live = torch.cat(parts, dim=1)
        bias = torch.zeros(live.shape, device=device).masked_fill(~live, float("-inf"))
        log_count = torch.tensor(self._counts, dtype=torch.float32, device=device).log()                # [B]
        bias[:, sink + self.ring] = log_count                                                           # the comp row
        return bias.to(self.dtype)[:, None, None]

    def append(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """This step's token of every member: keys, values [B, n_kv_heads, D] (after RoPE)."""
        slots = self.storage[layer_idx]
        if slots.keys is not None:
            r_idx = self.r_idx[layer_idx]
            k, v = keys.index_select(1, r_idx), values.index_select(1, r_idx)                  # [B, r, D] each
            rows = self._flat_rows("retrieval", len(r_idx), self.rows, self._row)
            for store, row in zip(slots.retrieval_stores().values(), encoded(k, v, self.key_bits, self.value_bits)):
                _write_rows(store, rows, row)
            self._append_recent("retrieval", slots, k, v)
        if slots.local_keys is not None:
            l_idx = self.l_idx[layer_idx]
            k, v = keys.index_select(1, l_idx), values.index_select(1, l_idx)
            rows = self._flat_rows("local", len(l_idx), self.local_rows, self._local_row)
            new = encoded(k, v, self.local_key_bits, self.local_value_bits)
            for store, row in zip(slots.local_stores().values(), new):
                _write_rows(store, rows, row)
            self._append_recent("local", slots, k, v)

    def _append_recent(self, group: str, slots: LayerSlots, k: torch.Tensor, v: torch.Tensor) -> None:
        """This step's rows of a group ([B, h, D] each) as computed, into its recent rows (if it keeps any)."""
        recent = slots.recent(group)
        if not recent:
            return
        rows = self._flat_rows(f"{group} recent", k.shape[1], self.recent[group], self._recent_row[group])
        for store, row in zip(recent.values(), (k, v)):
            _write_rows(store, rows, row)

    def _flat_rows(self, store: str, heads: int, rows: int, row: torch.Tensor) -> torch.Tensor:
        """Indices into a [B * heads * rows, D] view of a store of each member's `row` in every head: [B * heads]."""
        key = (store, heads, rows)
        if key not in self._flat:   # per step and store, shared by every layer with that many heads
            base = (self._slots[:, None] * heads + torch.arange(heads, device=self.device)[None, :]) * rows
            self._flat[key] = (base + row[:, None]).reshape(-1)
        return self._flat[key]

    def attend(self, layer_idx: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [B, Hq, 1, D], one decode query per member -> [B, Hq, 1, D].

        With one query per session there is no causal mask, so each KV head's G query heads ride as G query
        rows of that head: GQA without repeating keys and values."""
        slots = self.storage[layer_idx]
        bsz, n_heads, _, head_dim = q.shape
        n_kv = self.r_heads[layer_idx] + self.l_heads[layer_idx]
        q_kv = q.view(bsz, n_kv, n_heads // n_kv, head_dim)                                  # [B, Hkv, G, D]
        out = torch.empty_like(q_kv)
        if slots.keys is not None:
            r_idx = self.r_idx[layer_idx]
            keys, values = _with_recent(*self._retrieval_rows(slots), slots.recent("retrieval"), self.key_rotation)
            o = F.scaled_dot_product_attention(_rotated(q_kv.index_select(1, r_idx), self.key_rotation), keys,
                                               values, attn_mask=self._r_mask, scale=scale)
            out.index_copy_(1, r_idx, o)
        if slots.local_keys is not None:
            l_idx = self.l_idx[layer_idx]
            local_keys, local_values = _with_recent(*self._local_rows(slots), slots.recent("local"),
                                                    self.local_key_rotation)
            o = F.scaled_dot_product_attention(_rotated(q_kv.index_select(1, l_idx), self.local_key_rotation),
                                               local_keys, local_values, attn_mask=self._l_bias,
                                               scale=scale)                                         # [B, l, G, D]
            out.index_copy_(1, l_idx, o)
        return out.view(bsz, n_heads, 1, head_dim)

    def _retrieval_rows(self, slots: LayerSlots) -> tuple[torch.Tensor, torch.Tensor]:
        """The retrieval rows this step reads, [B, r, span, D] in the cache dtype (dequantised from integers; keys
        stored rotated stay in the rotation's basis)."""
        span = self._span
        if not self.quantized:
            return slots.keys[:, :, :span], slots.values[:, :, :span]
        return (kv_quant.dequantize(slots.keys[:, :, :span], slots.key_scales[:, :, :span], self.dtype,
                                    self.key_bits, unrotate=False),
                kv_quant.dequantize(slots.values[:, :, :span], slots.value_scales[:, :, :span], self.dtype,
                                    self.value_bits))

    def _local_rows(self, slots: LayerSlots) -> tuple[torch.Tensor, torch.Tensor]:
        """Every local row, [B, l, sink + ring + 1, D] in the cache dtype, the compensation row last (integer rows
        are dequantised, and the compensation row written into the copy; keys stored rotated, and so their
        compensation row, in the rotation's basis)."""
        if not self.local_quantized:
            return slots.local_keys, slots.local_values
        keys = kv_quant.dequantize(slots.local_keys, slots.local_key_scales, self.dtype, self.local_key_bits,
                                   unrotate=False)
        values = kv_quant.dequantize(slots.local_values, slots.local_value_scales, self.dtype, self.local_value_bits)
        comp_keys = slots.comp_keys[:, :, 0]                                                 # [B, l, D] float32
        keys[:, :, -1] = comp_keys if self.local_key_rotation is None else comp_keys @ self.local_key_rotation
        values[:, :, -1] = slots.comp_values[:, :, 0]
        return keys, values

    def end_step(self) -> None:
        """Fold the token that left each member's window into its compensation token; every member grew by one."""
        params, sink = self.params, self.params.sink
        leaving, weights = [], []
        for n, count in zip(self._lengths, self._counts):
            first_before, first_after = max(sink, n - params.window(n)), max(sink, n + 1 - params.window(n + 1))
            gone = params.compensation and first_after > first_before      # at most one token per step
            leaving.append(self._ring_row(first_before if gone else n))
            weights.append(1.0 / (count + 1) if gone else 0.0)
        if any(weights):
            self._fold(torch.tensor(leaving, device=self.device),
                       torch.tensor(weights, dtype=torch.float32, device=self.device)[:, None, None, None])
        for cache, count, w in zip(self.members, self._counts, weights):
            for layer in cache.layers:
                layer.seq_len += 1
                if layer.local_heads and w:
                    layer.comp_count = count + 1

    def _ring_row(self, token: int) -> int:
        """The local row of token `token` (the tensor form is `_local_row` in `begin_step`)."""
        sink = self.params.sink
        return token if token < sink else sink + (token - sink) % self.ring

    def _fold(self, rows: torch.Tensor, weights: torch.Tensor) -> None:
        # rows: [B] local row leaving each member (a live row, weight 0, for members with none); weights [B,1,1,1]
        for slots in self.storage:
            if slots.local_keys is None:
                continue
            leaving = self._leaving_rows(slots, rows)
            for comp, store, row in ((slots.comp_keys, slots.local_keys, leaving[0]),
                                     (slots.comp_values, slots.local_values, leaving[1])):
                comp.lerp_(row.unsqueeze(2).float(), weights)                              # [B, l, 1, D]
                if not self.local_quantized:
                    store[:, :, -1] = comp[:, :, 0]                                      # the row attention reads

    def _leaving_rows(self, slots: LayerSlots, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value rows `rows` ([B]: one local row per member) in the cache dtype, [B, l, D] each."""
        if not self.local_quantized:
            return slots.local_keys[self._slots, :, rows], slots.local_values[self._slots, :, rows]
        pick = lambda t: t[self._slots, :, rows]   # noqa: E731
        return (kv_quant.dequantize(pick(slots.local_keys), pick(slots.local_key_scales), self.dtype,
                                    self.local_key_bits),
                kv_quant.dequantize(pick(slots.local_values), pick(slots.local_value_scales), self.dtype,
                                    self.local_value_bits))

    # --- accounting ---------------------------------------------------------------------------------
    def slot_nbytes(self) -> int:
        """Bytes one slot holds on the device."""
        return sum(t[0].numel() * t.element_size() for slots in self.storage for t in slots.tensors())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for slots in self.storage for t in slots.tensors())


def slot_bytes(template: CompressedKVCache, rows: int, head_dim: int, itemsize: int) -> int:
    """Bytes of one slot of a slab of `rows` rows for `template`'s head layout (what `_allocate` makes per slot)."""
    params = template.params
    local_rows = params.sink + params.window(rows) + 2   # the ring (window + the step's new token), compensation
    r_row = params.retrieval_row_nbytes(head_dim, itemsize)                      # a key and a value
    l_row = params.local_row_nbytes(head_dim, itemsize)
    total = 0
    for layer in template.layers:
        r, l = len(layer.retrieval_heads), len(layer.local_heads)
        total += r * rows * r_row + l * (local_rows * l_row + 2 * head_dim * 4)   # K and V; compensation f32
        total += recent_nbytes(layer, head_dim, itemsize)
    return total


def _with_recent(keys: torch.Tensor, values: torch.Tensor, recent: dict[str, torch.Tensor],
                 rotation: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows a group reads this step ([B, h, S, D]) followed by its recent rows ([B, h, R, D], keys turned into
    the basis `rotation` reads them in), or as they are without recent rows."""
    if not recent:
        return keys, values
    return (torch.cat([keys, _rotated(recent["k_recent"], rotation)], dim=2),
            torch.cat([values, recent["v_recent"]], dim=2))


def _rotated(q: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """Queries [B, h, G, D] (or keys as computed) in the basis `rotation` ([D, D], float32) stores keys in (None:
    as they are)."""
    return q if rotation is None else (q.float() @ rotation).to(q.dtype)


def _write_rows(store: torch.Tensor, flat_rows: torch.Tensor, rows: torch.Tensor) -> None:
    """store [B, h, S, D]; rows [B, h, D] written at `flat_rows` of the store seen as [B * h * S, D]."""
    store.view(-1, store.shape[-1]).index_copy_(0, flat_rows, rows.reshape(-1, rows.shape[-1]))


def _comp_count(cache: CompressedKVCache) -> int:
    """Tokens folded into the session's compensation tokens (every layer with local heads folds the same ones)."""
    return max(layer.comp_count for layer in cache.layers)


def _head_indices(layer, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(layer.retrieval_heads, dtype=torch.long, device=device),
            torch.tensor(layer.local_heads, dtype=torch.long, device=device))


def _index(caches: list[CompressedKVCache], cache: CompressedKVCache) -> int:
    return next(i for i, c in enumerate(caches) if c is cache)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class SlabPool:
    """Every slab of one scheduler: seats the decoding turns' caches each step, by head layout and size class."""

    def __init__(self, head_dim: int, dtype: torch.dtype, device):
        self.head_dim, self.dtype, self.device = head_dim, dtype, device
        self.slabs: dict[tuple, DecodeSlab] = {}

    def arrange(self, decoding: list[tuple[CompressedKVCache, int]]) -> None:
        """Seat every (cache, final length) of this step's decoding turns; unseat everyone else.

        The turns of one head layout share one slab, sized for the longest, when every one of them still fits its
        slot within its own bound (a step costs per slab, nearly whatever its members: two slabs of 14 and 2 cost
        almost twice one of 16); otherwise each size class has its own."""
        wanted: dict[tuple, list[CompressedKVCache]] = {}
        by_layout: dict[tuple, list[tuple[CompressedKVCache, int]]] = {}
        for cache, final in decoding:
            by_layout.setdefault(cache.layout, []).append((cache, final))
        for layout, turns in by_layout.items():
            shared = self._shared_rows(layout, turns)
            for cache, final in turns:
                key = ((layout, shared) if shared else cache.seat.key if cache.seat is not None
                       else (layout, size_class(final)))
                wanted.setdefault(key, []).append(cache)
        for key in list(self.slabs):
            if key not in wanted:
                self.slabs.pop(key).set_members([])
        for key, caches in wanted.items():
            if key not in self.slabs:
                self.slabs[key] = DecodeSlab(caches[0], key[1], self.head_dim, self.dtype, self.device)
            self.slabs[key].set_members(caches)

    def _shared_rows(self, layout: tuple, turns: list[tuple[CompressedKVCache, int]]) -> int | None:
        """Rows of one slab for all `turns` of `layout` (a present slab's if it is large enough, so a leaving long
        turn moves nobody), or None when some turn's slot would exceed its bound there."""
        rows = size_class(max(final for _, final in turns))
        present = [key[1] for key in self.slabs if key[0] == layout and key[1] >= rows]
        rows = min(present, default=rows)
        if all(cache.seat is not None and cache.seat.rows == rows for cache, _ in turns):
            return rows   # everyone is seated there already (each was checked when it joined)
        itemsize = self.dtype.itemsize
        template = turns[0][0]
        slot = slot_bytes(template, rows, self.head_dim, itemsize)
        fits = all(slot <= cache.bytes_bound(final, 1, self.head_dim, itemsize) for cache, final in turns)
        return rows if fits else None

    def unseat(self, cache: CompressedKVCache) -> None:
        """Give `cache` its own storage back (its turn ended); a slab left empty is dropped."""
        slab = cache.seat
        slab.unseat(cache)
        if not slab.members:
            self.slabs.pop(slab.key, None)

    def nbytes(self) -> int:
        return sum(slab.nbytes() for slab in self.slabs.values())
