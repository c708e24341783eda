"""CompressedKVCache: RazorAttention's split KV cache, one session's, in growable storage.

Per decoder layer the KV heads split in two groups, each a `KVBuffer` (preallocated, grows in place):
  retrieval group  [1, r, N, D]       every token, as a normal cache (grows with the session); in int8 with
                                      float16 scales when `retrieval_bits` is 8 (kvbuffer.QuantizedKVBuffer),
                                      values in 4 bits when `retrieval_value_bits` is 4
  local group      [1, l, S, D]       the first `sink` tokens + the most recent L_h tokens, S <= sink + L_h;
                                      in integers with scales when `local_bits` is below 16, as retrieval rows
  recent rows      [1, h, R, D] x 2   a group stored in integers keeps its last R = `recent_rows` tokens in the
                                      model's dtype too, and reads them from there (kvbuffer.py)
  compensation     [1, l, 1, D] x 2   running means of every dropped key and value (float32), plus their count

L_h = max(S0, ceil(N / C)) as in the paper's Algorithm 1 (S0 = `min_window`, C = `ratio`, N0 = `sink`).
Dropped tokens leave the live rows (the store's headroom is bounded and reported by `nbytes()`); `compress()`
folds them into the compensation token after every forward, so its mean is exact (eq. 4). This module is
plain torch: `hf.py` is what plugs a batch of these caches into a transformers forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from . import kv_quant
from .kvbuffer import KVBuffer, buffer_class, capacity_for, restored


@dataclass(frozen=True)
class CompressionParams:
    """Paper defaults are N0=4, S0=4000, C=5 for 128k-context models. S0=4000 would compress nothing on an
    8k-context model such as SmolLM2, so S0 defaults to 256 (the same ~3% of the context)."""

    sink: int = 4            # N0: attention-sink tokens every local head keeps
    min_window: int = 256    # S0: local heads never keep fewer recent tokens than this
    ratio: float = 5.0       # C: local heads keep N / C recent tokens once that exceeds S0
    compensation: bool = True  # False drops evicted tokens outright (StreamingLLM-style ablation)
    retrieval_bits: int = 16   # 8: retrieval heads' keys and values in int8 + scales (kv_quant.py); 16: model dtype
    # 4: their values in 4 bits (keys in 8). None (kept so when equal): as `retrieval_bits`, so replacing
    # `retrieval_bits` alone moves both
    retrieval_value_bits: int | None = None
    local_bits: int = 16       # the local heads' sink and window rows, as `retrieval_bits` (the compensation
    local_value_bits: int | None = None   # token stays float32); values as `retrieval_value_bits`
    # The last `recent_rows` tokens of a group stored in integers are also kept in the model's dtype and read
    # from there, so the turn being answered is read as computed (docs 3.2q); a local group keeps at most
    # `min_window` of them, so its window never evicts one. `local_recent_rows`: the local group's own count
    # (None, kept so when equal: as `recent_rows`).
    recent_rows: int = 0
    local_recent_rows: int | None = None

    def __post_init__(self):
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.min_window < 1:
            raise ValueError(f"min_window must be >= 1, got {self.min_window}")
        if not self.ratio >= 1.0:
            raise ValueError(f"ratio must be >= 1, got {self.ratio}")
        for group in ("retrieval", "local"):
            self._check_bits(f"{group}_bits", f"{group}_value_bits")
        self._check_count("recent_rows")
        if self.local_recent_rows is not None:
            self._check_count("local_recent_rows")
            if self.local_recent_rows == self.recent_rows:
                object.__setattr__(self, "local_recent_rows", None)

    def _check_count(self, name: str) -> None:
        count = getattr(self, name)
        if isinstance(count, bool) or not isinstance(count, (int, float)) or count < 0 or count != int(count):
            raise ValueError(f"{name} must be a count of tokens >= 0, got {count!r}")
        object.__setattr__(self, name, int(count))   # 32.0 from a job's JSON: one map

    def _check_bits(self, key_field: str, value_field: str) -> None:
        """One group's (key bits, value bits): a storage kv_quant has; stored as ints, values None when equal."""
        key_bits, value_bits = getattr(self, key_field), getattr(self, value_field)
        if isinstance(key_bits, bool) or key_bits not in kv_quant.BITS:
            raise ValueError(f"{key_field} must be one of {kv_quant.BITS}, got {key_bits}")
        value_bits = key_bits if value_bits is None else value_bits
        if isinstance(value_bits, bool) or not isinstance(value_bits, (int, float)):
            raise ValueError(f"{value_field} must be a number of bits, got {value_bits!r}")
        try:
            kv_quant.check_storage(key_bits, value_bits)
        except ValueError as e:
            raise ValueError(f"{key_field} / {value_field}: {e}") from None
        object.__setattr__(self, key_field, int(key_bits))   # 8.0 from a job's JSON: one map
        object.__setattr__(self, value_field, None if value_bits == key_bits else int(value_bits))

    @property
    def value_bits(self) -> int:
        """The bits retrieval heads' values are stored in."""
        return self.retrieval_bits if self.retrieval_value_bits is None else self.retrieval_value_bits

    @property
    def local_storage_bits(self) -> tuple[int, int]:
        """(key bits, value bits) of the local heads' sink and window rows."""
        return self.local_bits, self.local_bits if self.local_value_bits is None else self.local_value_bits

    @property
    def recent(self) -> tuple[int, int]:
        """Rows (retrieval, local) a group keeps in the model's dtype beside their integers (0 in 16 bits)."""
        local = self.recent_rows if self.local_recent_rows is None else self.local_recent_rows
        return (self.recent_rows if self.retrieval_bits < 16 else 0,
                min(local, self.min_window) if self.local_bits < 16 else 0)

    def window(self, seq_len: int) -> int:
        """L_h: recent tokens a local head keeps at sequence length N."""
        return max(self.min_window, math.ceil(seq_len / self.ratio))

    def retrieval_row_nbytes(self, head_dim: int, itemsize: int) -> int:
        """Bytes of one token's key and value in one retrieval head (16 bits: the model dtype's `itemsize`)."""
        return sum(kv_quant.row_nbytes(head_dim, bits, itemsize)
                   for bits in (self.retrieval_bits, self.value_bits))

    def local_row_nbytes(self, head_dim: int, itemsize: int) -> int:
        """Bytes of one token's key and value in one local head's sink or window rows."""
        return sum(kv_quant.row_nbytes(head_dim, bits, itemsize) for bits in self.local_storage_bits)

    def buffer_class(self):
        """The KVBuffer class retrieval heads are stored in."""
        return buffer_class(self.retrieval_bits, self.value_bits)

    def local_buffer_class(self):
        """The KVBuffer class local heads' sink and window rows are stored in."""
        return buffer_class(*self.local_storage_bits)

    def to_dict(self) -> dict:
        # the bits only when not the default: maps and spilled sessions from before them read (and hash) the same
        bits = {} if self.retrieval_bits == 16 else {"retrieval_bits": self.retrieval_bits}
        if self.retrieval_value_bits is not None:
            bits["retrieval_value_bits"] = self.retrieval_value_bits
        if self.local_bits != 16:
            bits["local_bits"] = self.local_bits
        if self.local_value_bits is not None:
            bits["local_value_bits"] = self.local_value_bits
        if self.recent_rows:
            bits["recent_rows"] = self.recent_rows
        if self.local_recent_rows is not None:
            bits["local_recent_rows"] = self.local_recent_rows
        return {"sink": self.sink, "min_window": self.min_window, "ratio": self.ratio,
                "compensation": self.compensation, **bits}

    def storage(self) -> int | str:
        """16, 8 or "8/4": the retrieval heads' key / value bits (`kv_quant.parse_storage` reads it back)."""
        return kv_quant.storage_label(self.retrieval_bits, self.value_bits)

    def stored_as(self, storage: int | str) -> "CompressionParams":
        """These parameters with the retrieval heads stored as `storage` (16, 8 or "8/4")."""
        key_bits, value_bits = kv_quant.parse_storage(storage)
        return replace(self, retrieval_bits=key_bits, retrieval_value_bits=value_bits)

    def local_storage(self) -> int | str:
        """The local rows' storage label, as `storage`."""
        return kv_quant.storage_label(*self.local_storage_bits)

    def local_stored_as(self, storage: int | str) -> "CompressionParams":
        """These parameters with the local heads' rows stored as `storage`."""
        key_bits, value_bits = kv_quant.parse_storage(storage)
        return replace(self, local_bits=key_bits, local_value_bits=value_bits)


class RazorLayer:
    """One layer's split cache: `retrieval` and `local` KVBuffers plus the compensation token."""

    def __init__(self, retrieval_heads: list[int], n_kv_heads: int, params: CompressionParams):
        if any(not 0 <= h < n_kv_heads for h in retrieval_heads):
            raise ValueError(f"retrieval heads {retrieval_heads} out of range for {n_kv_heads} KV heads")
        self.retrieval_heads = sorted(set(retrieval_heads))
        self.local_heads = [h for h in range(n_kv_heads) if h not in self.retrieval_heads]
        self.n_kv_heads = n_kv_heads
        self.params = params
        self.seq_len = 0                               # N: tokens seen, not tokens stored
        self.retrieval: KVBuffer | None = None
        self.local: KVBuffer | None = None
        self.comp_keys = self.comp_values = None       # [1, l, 1, D] float32 running means
        self.comp_count = 0                            # |D|: tokens folded into the compensation token
        self._r_idx = self._l_idx = None               # head index tensors, built on the device of the first K/V

    # --- views ------------------------------------------------------------------------------------
    keys = property(lambda self: None if self.retrieval is None else self.retrieval.keys)          # [1, r, N, D]
    values = property(lambda self: None if self.retrieval is None else self.retrieval.values)
    local_keys = property(lambda self: None if self.local is None else self.local.keys)            # [1, l, S, D]
    local_values = property(lambda self: None if self.local is None else self.local.values)

    def local_length(self) -> int:
        return 0 if self.local is None else len(self.local)

    def retrieval_length(self) -> int:
        return 0 if self.retrieval is None else len(self.retrieval)

    # --- growth -----------------------------------------------------------------------------------
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Add new tokens' keys and values ([1, n_kv_heads, Q, D], after RoPE) to both groups."""
        assert key_states.shape[0] == 1 and key_states.shape[1] == self.n_kv_heads, key_states.shape
        self.append_split(self.split(key_states), self.split(value_states))

    def split(self, states: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """[B, n_kv_heads, Q, D] -> (retrieval heads' rows, local heads' rows); a batch splits once for all."""
        if self._r_idx is None:
            self._index(states.device)
        pick = lambda idx: states.index_select(1, idx) if len(idx) else None   # noqa: E731
        return pick(self._r_idx), pick(self._l_idx)

    def append_split(self, keys: tuple, values: tuple) -> None:
        """Append (retrieval, local) pairs as `split` returns them, each [1, h, Q, D]."""
        (k_r, k_l), (v_r, v_l) = keys, values
        like = k_r if k_r is not None else k_l
        if self._r_idx is None:   # another session of the layout may have split the batch's rows
            self._index(like.device)
        if self.retrieval is None and self.local is None:
            self._allocate(like)
        if self.retrieval is not None:
            self.retrieval.append(k_r, v_r)
        if self.local is not None:
            self.local.append(k_l, v_l)
        self.seq_len += like.shape[-2]

    def _allocate(self, like: torch.Tensor) -> None:
        _, _, q_len, head_dim = like.shape
        r_recent, l_recent = self.params.recent
        if self.retrieval_heads:
            self.retrieval = self.params.buffer_class()(
                len(self.retrieval_heads), head_dim, like.dtype, like.device, capacity_for(q_len), r_recent)
        if self.local_heads:
            self.local = self.params.local_buffer_class()(
                len(self.local_heads), head_dim, like.dtype, like.device, capacity_for(q_len), l_recent)

    def _index(self, device) -> None:
        self._r_idx = torch.tensor(self.retrieval_heads, dtype=torch.long, device=device)
        self._l_idx = torch.tensor(self.local_heads, dtype=torch.long, device=device)

    # --- compression ------------------------------------------------------------------------------
    def compress(self) -> None:
        """Fold local tokens outside sink + window into the compensation token (eq. 4, running mean)."""
        if self.local is None:
            return
        stored = len(self.local)
        n_sink = min(self.params.sink, stored)
        n_drop = stored - n_sink - self.params.window(self.seq_len)
        if n_drop <= 0:
            return
        if self.params.compensation:
            drop = slice(n_sink, n_sink + n_drop)
            self._fold(self.local.keys[..., drop, :], self.local.values[..., drop, :])
        self.local.evict(n_sink, n_drop)
        self.local.shrink()

    def _fold(self, k_drop: torch.Tensor, v_drop: torch.Tensor) -> None:
        # k_drop, v_drop: [1, l, d, D]. Running mean: mean += (mean(dropped) - mean) * d / (count + d), in place.
        d = k_drop.shape[-2]
        if d == 1:   # the usual decode step: the row is its own mean (a reduction per layer costs more than it does)
            k_mean, v_mean = k_drop.float(), v_drop.float()
        else:
            k_mean = k_drop.mean(dim=-2, keepdim=True, dtype=torch.float32)
            v_mean = v_drop.mean(dim=-2, keepdim=True, dtype=torch.float32)
        self.comp_count += d
        if self.comp_count == d:   # own storage: k_mean may be a view of a row the buffer will reuse
            self.comp_keys, self.comp_values = k_mean.clone(), v_mean.clone()
        else:
            self.comp_keys.lerp_(k_mean, d / self.comp_count)
            self.comp_values.lerp_(v_mean, d / self.comp_count)

    # --- accounting -------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes allocated on the device for this layer (storage headroom included)."""
        buffers = sum(b.nbytes() for b in (self.retrieval, self.local) if b is not None)
        comp = sum(t.numel() * t.element_size() for t in (self.comp_keys, self.comp_values) if t is not None)
        return buffers + comp

    def stored_nbytes(self) -> int:
        """Bytes of what the layer keeps (live rows and the compensation token), headroom excluded."""
        rows = sum(b.stored_nbytes() for b in (self.retrieval, self.local) if b is not None)
        comp = sum(t.numel() * t.element_size() for t in (self.comp_keys, self.comp_values) if t is not None)
        return rows + comp

    def retrieval_or_local(self) -> KVBuffer | None:
        return self.retrieval if self.retrieval is not None else self.local

    def full_nbytes(self) -> int:
        """Bytes a full cache of the same length would hold for this layer."""
        ref = self.retrieval_or_local()
        return 0 if ref is None else self.full_nbytes_at(ref.dtype.itemsize)

    def full_nbytes_at(self, itemsize: int) -> int:
        ref = self.retrieval_or_local()
        return 0 if ref is None else 2 * self.n_kv_heads * self.seq_len * ref.head_dim * itemsize

    def stored_nbytes_at(self, itemsize: int) -> int:
        """`stored_nbytes` were the model's dtype `itemsize` bytes an element (int8 rows and float32 means stay)."""
        ref = self.retrieval_or_local()
        if ref is None:
            return 0
        r_rows = len(self.retrieval_heads) * self.retrieval_length() * self.params.retrieval_row_nbytes(
            ref.head_dim, itemsize)                                                      # keys and values
        l_rows = len(self.local_heads) * self.local_length() * self.params.local_row_nbytes(ref.head_dim, itemsize)
        recent = sum(b.k_recent.shape[1] * b.k_recent.shape[2] for b in (self.retrieval, self.local) if b is not None)
        comp = 0 if self.comp_keys is None else self.comp_keys.numel() * self.comp_keys.element_size()
        return r_rows + l_rows + recent * 2 * ref.head_dim * itemsize + 2 * comp

    def bytes_bound(self, seq_len: int, chunk: int, head_dim: int, itemsize: int) -> int:
        """Most bytes this layer can hold while it grows to `seq_len` tokens fed `chunk` at a time."""
        # A store never shrinks below what it holds now (a larger earlier chunk may have left headroom). The local
        # group may also hold more than sink + window now: a turn cancelled mid-prefill leaves its chunks
        # uncompressed until the next turn's prompt ends, and they stay beside that prompt's chunks till then.
        r_rows = max(capacity_for(seq_len), self.retrieval.capacity if self.retrieval is not None else 0)
        l_held = max(self.params.sink + self.params.window(seq_len), self.local_length())
        l_rows = max(capacity_for(l_held + chunk), self.local.capacity if self.local is not None else 0)
        r_rows, l_rows = (r_rows if self.retrieval_heads else 0), (l_rows if self.local_heads else 0)
        comp = 2 * len(self.local_heads) * head_dim * 4
        retrieval = len(self.retrieval_heads) * r_rows * self.params.retrieval_row_nbytes(head_dim, itemsize)
        local = len(self.local_heads) * l_rows * self.params.local_row_nbytes(head_dim, itemsize)
        return retrieval + local + comp + recent_nbytes(self, head_dim, itemsize)

    # --- spilling ---------------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """What a spill writes: both groups' rows as stored (integers and their scales where they are), so a
        restore is exact."""
        named = {"comp_keys": self.comp_keys, "comp_values": self.comp_values}
        for names, buffer in ((SPILL_NAMES, self.retrieval), (LOCAL_SPILL_NAMES, self.local)):
            if buffer is not None:
                rows = {**buffer.live_rows(), **buffer.recent_rows()}
                named.update({names[store]: t for store, t in rows.items()})
        return {name: t.contiguous() for name, t in named.items() if t is not None}

    def load_tensors(self, present: dict[str, torch.Tensor], seq_len: int, comp_count: int,
                     dtype: torch.dtype) -> None:
        any_kv = present.get("keys", present.get("local_keys"))
        self._index(any_kv.device)
        r_recent, l_recent = self.params.recent
        if "keys" in present:
            self.retrieval = _restored(self.params.buffer_class(), SPILL_NAMES, present, dtype, r_recent)
        if "local_keys" in present:
            self.local = _restored(self.params.local_buffer_class(), LOCAL_SPILL_NAMES, present, dtype, l_recent)
        self.comp_keys, self.comp_values = present.get("comp_keys"), present.get("comp_values")
        self.seq_len, self.comp_count = seq_len, comp_count


# a buffer's store -> the name a spill gives its rows (scales only where stored in integers, recent rows only
# where kept)
SPILL_NAMES = {"k_store": "keys", "v_store": "values", "k_scale": "key_scales", "v_scale": "value_scales",
               "k_recent": "recent_keys", "v_recent": "recent_values"}
LOCAL_SPILL_NAMES = {store: f"local_{name}" for store, name in SPILL_NAMES.items()}
RECENT_STORES = ("k_recent", "v_recent")


def recent_nbytes(layer: RazorLayer, head_dim: int, itemsize: int) -> int:
    """Bytes of the recent rows a layer keeps at most, both groups, in the model's dtype of `itemsize` bytes."""
    r_recent, l_recent = layer.params.recent
    return (len(layer.retrieval_heads) * r_recent + len(layer.local_heads) * l_recent) * 2 * head_dim * itemsize


def _restored(cls: type[KVBuffer], names: dict[str, str], present: dict[str, torch.Tensor],
              dtype: torch.dtype, recent: int) -> KVBuffer:
    """A `cls` buffer of the spilled tensors `present` names (`names`: store -> spill name)."""
    stores = (*cls.STORES, *(RECENT_STORES if recent else ()))
    return restored(cls, {store: present[names[store]] for store in stores}, dtype, recent)


class CompressedKVCache:
    """One session's `RazorLayer`s. `retrieval_kv_heads[layer]` lists the KV heads kept in full."""

    def __init__(self, retrieval_kv_heads: list[list[int]], n_kv_heads: int, params: CompressionParams):
        self.layers = [RazorLayer(heads, n_kv_heads, params) for heads in retrieval_kv_heads]
        self.params = params
        self.retrieval_kv_heads = [layer.retrieval_heads for layer in self.layers]
        self.n_kv_heads = n_kv_heads
        # Sessions with equal layouts split every layer the same way, so a batch attends to them together.
        self.layout = (tuple(tuple(h) for h in self.retrieval_kv_heads), params)
        self.seat = None   # the `slab.DecodeSlab` holding this cache while its turn decodes (its layers hold none)

    @property
    def seq_length(self) -> int:
        return self.layers[0].seq_len

    @classmethod
    def from_full(cls, keys: list[torch.Tensor], values: list[torch.Tensor], retrieval_kv_heads: list[list[int]],
                  params: CompressionParams) -> "CompressedKVCache":
        """Compress a full cache (per layer [1, n_kv_heads, N, D]) after the fact.

        Prefill attention is exact whatever the head map, so this equals prefilling with the map: evaluations
        prefill a document once and derive every compressed variant from it.
        """
        cache = cls(retrieval_kv_heads, keys[0].shape[1], params)
        for layer, k, v in zip(cache.layers, keys, values):
            layer.append(k, v)
        cache.compress()
        return cache

    def append(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.layers[layer_idx].append(key_states, value_states)

    def compress(self) -> None:
        self._check_settled()
        for layer in self.layers:
            layer.compress()

    def nbytes(self) -> int:
        if self.seat is not None:
            return self.seat.slot_nbytes()
        return sum(layer.nbytes() for layer in self.layers)

    def stored_nbytes(self) -> int:
        self._check_settled()
        return sum(layer.stored_nbytes() for layer in self.layers)

    def _check_settled(self) -> None:
        if self.seat is not None:
            raise RuntimeError("this cache is in a decode slab: its turn is still decoding")

    def full_nbytes(self) -> int:
        self._check_settled()
        return sum(layer.full_nbytes() for layer in self.layers)

    def bytes_fraction(self, itemsize: int = 2) -> float:
        """Stored bytes over a full cache's, both counted with the model's dtype at `itemsize` bytes (16-bit by
        default): the fraction a map is chosen by is the same on a float32 CPU as on a bfloat16 GPU, where int8
        rows would otherwise weigh a quarter of a float32 row here and half a row there."""
        self._check_settled()
        full = sum(layer.full_nbytes_at(itemsize) for layer in self.layers)
        return sum(layer.stored_nbytes_at(itemsize) for layer in self.layers) / max(1, full)

    def bytes_bound(self, seq_len: int, chunk: int, head_dim: int, itemsize: int) -> int:
        """Most bytes the cache can hold once it has grown to `seq_len` tokens (for admission budgets)."""
        return sum(layer.bytes_bound(seq_len, chunk, head_dim, itemsize) for layer in self.layers)

    # --- spilling: a flat dict of tensors plus JSON-safe metadata ----------------------------------
    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        self._check_settled()
        tensors = {f"{i}.{name}": t for i, layer in enumerate(self.layers) for name, t in layer.to_tensors().items()}
        meta = {"n_kv_heads": self.n_kv_heads, "params": self.params.to_dict(), **self._dtype_meta(),
                "retrieval_kv_heads": self.retrieval_kv_heads,
                "seq_len": [layer.seq_len for layer in self.layers],
                "comp_count": [layer.comp_count for layer in self.layers]}
        return tensors, meta

    def _dtype_meta(self) -> dict:
        """{"dtype": what attention computes in} (a store in 8 bits holds integers); {} for an empty cache."""
        buffers = [b for layer in self.layers for b in (layer.retrieval, layer.local) if b is not None]
        return {"dtype": str(buffers[0].dtype).removeprefix("torch.")} if buffers else {}

    _TENSORS = (*SPILL_NAMES.values(), *LOCAL_SPILL_NAMES.values(), "comp_keys", "comp_values")

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, device) -> "CompressedKVCache":
        cache = cls(meta["retrieval_kv_heads"], meta["n_kv_heads"], CompressionParams(**meta["params"]))
        # Spills from before 8-bit heads have no dtype: every tensor but the compensation was in it.
        dtype = getattr(torch, meta["dtype"]) if "dtype" in meta else None
        for i, layer in enumerate(cache.layers):
            present = {n: tensors[f"{i}.{n}"].to(device) for n in cls._TENSORS if f"{i}.{n}" in tensors}
            if present:
                kv = present.get("local_keys", present.get("keys"))
                layer.load_tensors(present, meta["seq_len"][i], meta["comp_count"][i], dtype or kv.dtype)
        return cache
