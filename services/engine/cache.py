"""CompressedKVCache: RazorAttention's split KV cache as a transformers `Cache`.

Per decoder layer the KV heads split in two dense groups:
  retrieval group  [B, r, N, D]       every token, as a normal cache (grows with the session)
  local group      [B, l, S, D]       the first `sink` tokens + the most recent L_h tokens, S <= sink + L_h
  compensation     [B, l, 1, D] x 2   running means of every dropped key and value, plus their count

L_h = max(S0, ceil(N / C)) as in the paper's Algorithm 1 (S0 = `min_window`, C = `ratio`, N0 = `sink`).
Dropped tokens are *removed* from the tensors (memory is freed, not masked); `compress()` folds them into
the compensation token after every forward, so its mean is exact (eq. 4) and grows incrementally in decode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass(frozen=True)
class CompressionParams:
    """Paper defaults are N0=4, S0=4000, C=5 for 128k-context models. S0=4000 would compress nothing on an
    8k-context model such as SmolLM2, so S0 defaults to 256 (the same ~3% of the context)."""

    sink: int = 4            # N0: attention-sink tokens every local head keeps
    min_window: int = 256    # S0: local heads never keep fewer recent tokens than this
    ratio: float = 5.0       # C: local heads keep N / C recent tokens once that exceeds S0
    compensation: bool = True  # False drops evicted tokens outright (StreamingLLM-style ablation)

    def __post_init__(self):
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.min_window < 1:
            raise ValueError(f"min_window must be >= 1, got {self.min_window}")
        if not self.ratio >= 1.0:
            raise ValueError(f"ratio must be >= 1, got {self.ratio}")

    def window(self, seq_len: int) -> int:
        """L_h: recent tokens a local head keeps at sequence length N."""
        return max(self.min_window, math.ceil(seq_len / self.ratio))

    def to_dict(self) -> dict:
        return {"sink": self.sink, "min_window": self.min_window, "ratio": self.ratio,
                "compensation": self.compensation}


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=-2)


class RazorLayer(CacheLayerMixin):
    """One layer's split cache. `keys`/`values` (the mixin's fields) hold the retrieval group."""

    def __init__(self, retrieval_heads: list[int], n_kv_heads: int, params: CompressionParams):
        super().__init__()
        if any(not 0 <= h < n_kv_heads for h in retrieval_heads):
            raise ValueError(f"retrieval heads {retrieval_heads} out of range for {n_kv_heads} KV heads")
        self.retrieval_heads = sorted(set(retrieval_heads))
        self.local_heads = [h for h in range(n_kv_heads) if h not in self.retrieval_heads]
        self.n_kv_heads = n_kv_heads
        self.params = params
        self.seq_len = 0                               # N: tokens seen, not tokens stored
        self.local_keys = self.local_values = None     # [B, l, S, D]
        self.comp_keys = self.comp_values = None       # [B, l, 1, D] float32 running means
        self.comp_count = 0                            # |D|: tokens folded into the compensation token

    # --- transformers Cache layer API -----------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self._r_idx = torch.tensor(self.retrieval_heads, dtype=torch.long, device=self.device)
        self._l_idx = torch.tensor(self.local_heads, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        # key_states, value_states: [B, n_kv_heads, Q, D], after RoPE
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert key_states.shape[1] == self.n_kv_heads, key_states.shape
        if self.retrieval_heads:
            self.keys = _cat(self.keys, key_states.index_select(1, self._r_idx))
            self.values = _cat(self.values, value_states.index_select(1, self._r_idx))
        if self.local_heads:
            self.local_keys = _cat(self.local_keys, key_states.index_select(1, self._l_idx))
            self.local_values = _cat(self.local_values, value_states.index_select(1, self._l_idx))
        self.seq_len += key_states.shape[-2]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_len + query_length, 0

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_max_length(self) -> int:
        return -1

    # --- compression ----------------------------------------------------------------------------
    def compress(self) -> None:
        """Fold local tokens outside sink + window into the compensation token (eq. 4, running mean)."""
        if self.local_keys is None:
            return
        stored = self.local_keys.shape[-2]
        n_sink = min(self.params.sink, stored)
        keep_recent = self.params.window(self.seq_len)
        n_drop = stored - n_sink - keep_recent
        if n_drop <= 0:
            return
        drop = slice(n_sink, n_sink + n_drop)
        if self.params.compensation:
            self._fold(self.local_keys[..., drop, :], self.local_values[..., drop, :])
        kept = lambda t: torch.cat([t[..., :n_sink, :], t[..., n_sink + n_drop:, :]], dim=-2)  # noqa: E731
        # torch.cat copies, so the dropped rows' storage is released here.
        self.local_keys, self.local_values = kept(self.local_keys), kept(self.local_values)

    def _fold(self, k_drop: torch.Tensor, v_drop: torch.Tensor) -> None:
        # k_drop, v_drop: [B, l, d, D]; mean_new = mean_old + (sum - d * mean_old) / (count + d)
        d = k_drop.shape[-2]
        k_sum = k_drop.float().sum(dim=-2, keepdim=True)
        v_sum = v_drop.float().sum(dim=-2, keepdim=True)
        if self.comp_count == 0:
            self.comp_keys, self.comp_values = k_sum / d, v_sum / d
        else:
            total = self.comp_count + d
            self.comp_keys = self.comp_keys + (k_sum - d * self.comp_keys) / total
            self.comp_values = self.comp_values + (v_sum - d * self.comp_values) / total
        self.comp_count += d

    # --- accounting -----------------------------------------------------------------------------
    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.local_keys, self.local_values, self.comp_keys, self.comp_values)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def full_nbytes(self) -> int:
        """Bytes a full cache of the same length would hold for this layer."""
        ref = self.keys if self.keys is not None else self.local_keys
        if ref is None:
            return 0
        bsz, _, _, head_dim = ref.shape
        return 2 * bsz * self.n_kv_heads * self.seq_len * head_dim * ref.element_size()

    def local_length(self) -> int:
        return 0 if self.local_keys is None else self.local_keys.shape[-2]


class CompressedKVCache(Cache):
    """A `Cache` of `RazorLayer`s. `retrieval_kv_heads[layer]` lists the KV heads kept in full."""

    def __init__(self, retrieval_kv_heads: list[list[int]], n_kv_heads: int, params: CompressionParams):
        super().__init__(layers=[RazorLayer(heads, n_kv_heads, params) for heads in retrieval_kv_heads])
        self.params = params
        self.retrieval_kv_heads = [layer.retrieval_heads for layer in self.layers]
        self.n_kv_heads = n_kv_heads

    @property
    def seq_length(self) -> int:
        return self.layers[0].seq_len

    @classmethod
    def from_full(cls, keys: list[torch.Tensor], values: list[torch.Tensor], retrieval_kv_heads: list[list[int]],
                  params: CompressionParams) -> "CompressedKVCache":
        """Compress a full cache (per layer [B, n_kv_heads, N, D]) after the fact.

        Prefill attention is exact whatever the head map, so this equals prefilling with the map: evaluations
        prefill a document once and derive every compressed variant from it.
        """
        cache = cls(retrieval_kv_heads, keys[0].shape[1], params)
        for layer, k, v in zip(cache.layers, keys, values):
            layer.update(k, v)
        cache.compress()
        return cache

    def compress(self) -> None:
        for layer in self.layers:
            layer.compress()

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        return sum(layer.full_nbytes() for layer in self.layers)

    def layer_nbytes(self) -> list[int]:
        return [layer.nbytes() for layer in self.layers]

    # --- spilling: a flat dict of tensors plus JSON-safe metadata ----------------------------------
    _TENSORS = ("keys", "values", "local_keys", "local_values", "comp_keys", "comp_values")

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {}
        for i, layer in enumerate(self.layers):
            for name in self._TENSORS:
                t = getattr(layer, name)
                if t is not None:
                    tensors[f"{i}.{name}"] = t
        meta = {"n_kv_heads": self.n_kv_heads, "params": self.params.to_dict(),
                "retrieval_kv_heads": self.retrieval_kv_heads,
                "seq_len": [layer.seq_len for layer in self.layers],
                "comp_count": [layer.comp_count for layer in self.layers]}
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, device) -> "CompressedKVCache":
        cache = cls(meta["retrieval_kv_heads"], meta["n_kv_heads"], CompressionParams(**meta["params"]))
        for i, layer in enumerate(cache.layers):
            present = {n: tensors[f"{i}.{n}"].to(device) for n in cls._TENSORS if f"{i}.{n}" in tensors}
            if not present:
                continue
            any_kv = present.get("keys", present.get("local_keys"))
            layer.lazy_initialization(any_kv, any_kv)
            for name, t in present.items():
                setattr(layer, name, t)
            layer.seq_len, layer.comp_count = meta["seq_len"][i], meta["comp_count"][i]
        return cache
