"""StepBatch: one forward over several sessions' new tokens, packed into one sequence.

Each session contributes a segment of the packed sequence (one decode token, or a chunk of its prompt) and
keeps its own `CompressedKVCache`. The batch is the step target `hf.forward_step` runs against:
  append   splits each layer's new K/V by segment into the sessions' caches (no copy of the caches)
  attend   chunk segments: per session (`split_cache_attention`, causal within the chunk);
           decode segments: grouped by head layout (sessions under different head maps differ per layer),
           each group in one padded, masked call (`decode_attention`), or per session when alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import attention
from .cache import CompressedKVCache


@dataclass(frozen=True)
class Segment:
    cache: CompressedKVCache
    token_ids: list[int]
    start: int                 # offset in the packed sequence

    @property
    def length(self) -> int:
        return len(self.token_ids)


@dataclass
class DecodeGroup:
    """Decode segments whose caches share a head layout, with what their padded attention needs."""

    segments: list[Segment]
    positions: torch.Tensor    # [B] offsets in the packed sequence
    masks: dict = field(default_factory=dict)   # per-session (retrieval rows, local rows, comp count) -> DecodeMasks


@dataclass(frozen=True)
class DecodeMasks:
    retrieval: torch.Tensor    # [B, 1, 1, S_r] bool, True = a real key
    local_bias: torch.Tensor   # [B, 1, 1, S_l] float, 0 or -inf
    comp_count: torch.Tensor   # [B, 1, 1] float, tokens folded into each compensation token


class StepBatch:
    def __init__(self, segments: list[tuple[CompressedKVCache, list[int]]], device):
        self.segments, start = [], 0
        for cache, ids in segments:
            assert ids, "every segment runs at least one token"
            self.segments.append(Segment(cache, list(ids), start))
            start += len(ids)
        self.n_tokens, self.device = start, torch.device(device)
        by_layout: dict = {}
        for seg in self.segments:
            if seg.length == 1:
                by_layout.setdefault(seg.cache.layout, []).append(seg)
        self.groups = [DecodeGroup(segs, torch.tensor([s.start for s in segs], device=self.device))
                       for segs in by_layout.values() if len(segs) > 1]
        grouped = {id(s) for g in self.groups for s in g.segments}
        self.singles = [s for s in self.segments if id(s) not in grouped]   # attended one session at a time

    # --- inputs -----------------------------------------------------------------------------------
    def input_ids(self) -> torch.Tensor:
        return torch.tensor([[t for s in self.segments for t in s.token_ids]], device=self.device)   # [1, T]

    def position_ids(self) -> torch.Tensor:
        """Each token's position in its own session (the cache length before this step, onwards)."""
        pos = [p for s in self.segments for p in range(s.cache.seq_length, s.cache.seq_length + s.length)]
        return torch.tensor([pos], device=self.device)                                             # [1, T]

    def last_positions(self) -> torch.Tensor:
        return torch.tensor([s.start + s.length - 1 for s in self.segments], device=self.device)   # [n]

    # --- step target (hf.forward_step) --------------------------------------------------------------
    def append(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # key_states, value_states: [1, n_kv_heads, T, D]
        assert key_states.shape[2] == self.n_tokens, (key_states.shape, self.n_tokens)
        split: dict = {}   # head layout -> the whole step's rows split once into (retrieval, local) heads
        for seg in self.segments:
            layer = seg.cache.layers[layer_idx]
            if seg.cache.layout not in split:
                split[seg.cache.layout] = (layer.split(key_states), layer.split(value_states))
            keys, values = split[seg.cache.layout]
            rows = slice(seg.start, seg.start + seg.length)
            layer.append_split(_rows(keys, rows), _rows(values, rows))

    def attend(self, layer_idx: int, query: torch.Tensor, scale: float) -> torch.Tensor:
        # query: [1, Hq, T, D] -> [1, Hq, T, D]
        if len(self.segments) == 1:
            return attention.split_cache_attention(query, self.segments[0].cache.layers[layer_idx], scale)
        out = torch.empty_like(query)
        for seg in self.singles:
            span = slice(seg.start, seg.start + seg.length)
            out[:, :, span] = attention.split_cache_attention(query[:, :, span], seg.cache.layers[layer_idx], scale)
        for group in self.groups:
            out[0, :, group.positions] = self._attend_group(group, layer_idx, query, scale)
        return out

    def _attend_group(self, group: DecodeGroup, layer_idx: int, query: torch.Tensor, scale: float) -> torch.Tensor:
        """-> [Hq, B, D] for the group's rows of the packed output."""
        layers = [s.cache.layers[layer_idx] for s in group.segments]
        q = query[0, :, group.positions].transpose(0, 1).unsqueeze(2)                      # [B, Hq, 1, D]
        lengths = tuple((l.retrieval_length(), l.local_length(), l.comp_count) for l in layers)
        masks = group.masks.get(lengths)
        if masks is None:   # layers of one layout mostly share lengths: built once or twice per step
            masks = group.masks[lengths] = decode_masks(lengths, self.device)
        return attention.decode_attention(q, layers, masks, scale)[:, :, 0].transpose(0, 1)

    def compress(self, caches: list[CompressedKVCache] | None = None) -> None:
        """Compress `caches` (default: every segment's). A session midway through a chunked prefill is left
        uncompressed until its last chunk, so chunking never changes what its prompt's tokens attend to."""
        for cache in (caches if caches is not None else [s.cache for s in self.segments]):
            cache.compress()


def _rows(pair: tuple, rows: slice) -> tuple:
    return tuple(None if t is None else t[:, :, rows] for t in pair)


def decode_masks(lengths: tuple[tuple[int, int, int], ...], device) -> DecodeMasks:
    """Key-padding masks from each session's (retrieval rows, local rows, compensation count)."""
    r_len = torch.tensor([r for r, _, _ in lengths], device=device)
    l_len = torch.tensor([n for _, n, _ in lengths], device=device)
    retrieval = torch.arange(int(r_len.max()), device=device)[None, :] < r_len[:, None]          # [B, S_r]
    local = torch.arange(int(l_len.max()), device=device)[None, :] < l_len[:, None]              # [B, S_l]
    bias = torch.zeros(local.shape, device=device).masked_fill(~local, float("-inf"))
    counts = torch.tensor([float(c) for _, _, c in lengths], device=device)
    return DecodeMasks(retrieval[:, None, None], bias[:, None, None], counts[:, None, None])
