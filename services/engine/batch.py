"""StepBatch: one forward over several sessions' new tokens, packed into one sequence.

Each session contributes a segment of the packed sequence (one decode token, or a chunk of its prompt) and
keeps its own `CompressedKVCache`. The batch is the step target `hf.forward_step` runs against:
  append   each layer's new K/V by segment: decoding sessions seated in a `slab.DecodeSlab` all at once (one
           row per session), the others split into their own caches (no copy of the caches)
  attend   seated sessions: one call per slab and head group (`DecodeSlab.attend`); the others (prompt chunks,
           or a decode step outside a scheduler) per session (`split_cache_attention`, causal within the chunk)
A scheduler seats its decoding turns before each step (`slab.SlabPool.arrange`); every member of a slab must
then be in the batch, since a slab steps all of its slots together.
"""
from __future__ import annotations

from dataclasses import dataclass

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


class StepBatch:
    def __init__(self, segments: list[tuple[CompressedKVCache, list[int]]], device):
        self.segments, start = [], 0
        for cache, ids in segments:
            assert ids, "every segment runs at least one token"
            self.segments.append(Segment(cache, list(ids), start))
            start += len(ids)
        self.n_tokens, self.device = start, torch.device(device)
        by_slab: dict = {}
        for seg in self.segments:
            if seg.cache.seat is not None:
                assert seg.length == 1, "a seated session decodes one token per step"
                by_slab.setdefault(id(seg.cache.seat), (seg.cache.seat, []))[1].append(seg)
        self.slabs = []   # (slab, positions [B] of its members' tokens in slot order)
        for slab, segs in by_slab.values():
            start_of = {id(s.cache): s.start for s in segs}
            assert len(segs) == len(slab.members), "every member of a slab steps together"
            self.slabs.append((slab, torch.tensor([start_of[id(c)] for c in slab.members], device=self.device)))
            slab.begin_step()   # rows and masks of this step, shared by every layer
        self.singles = [s for s in self.segments if s.cache.seat is None]   # attended one session at a time

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
        for slab, positions in self.slabs:   # [B, n_kv_heads, D] each
            slab.append(layer_idx, key_states[0, :, positions].transpose(0, 1),
                        value_states[0, :, positions].transpose(0, 1))
        split: dict = {}   # head layout -> the whole step's rows split once into (retrieval, local) heads
        for seg in self.singles:
            layer = seg.cache.layers[layer_idx]
            if seg.cache.layout not in split:
                split[seg.cache.layout] = (layer.split(key_states), layer.split(value_states))
            keys, values = split[seg.cache.layout]
            rows = slice(seg.start, seg.start + seg.length)
            layer.append_split(_rows(keys, rows), _rows(values, rows))

    def attend(self, layer_idx: int, query: torch.Tensor, scale: float) -> torch.Tensor:
        # query: [1, Hq, T, D] -> [1, Hq, T, D]
        if len(self.segments) == 1 and not self.slabs:
            return attention.split_cache_attention(query, self.segments[0].cache.layers[layer_idx], scale)
        out = torch.empty_like(query)
        for seg in self.singles:
            span = slice(seg.start, seg.start + seg.length)
            out[:, :, span] = attention.split_cache_attention(query[:, :, span], seg.cache.layers[layer_idx], scale)
        for slab, positions in self.slabs:
            q = query[0, :, positions].transpose(0, 1).unsqueeze(2)                             # [B, Hq, 1, D]
            out[0, :, positions] = slab.attend(layer_idx, q, scale)[:, :, 0].transpose(0, 1)
        return out

    def compress(self, caches: list[CompressedKVCache] | None = None) -> None:
        """Compress `caches` (default: every segment's) after the forward; seated ones through their slab, which
        compresses all its members. A session midway through a chunked prefill is left uncompressed until its
        last chunk, so chunking never changes what its prompt's tokens attend to."""
        for cache in (caches if caches is not None else [s.cache for s in self.segments]):
            if cache.seat is None:
                cache.compress()
        for slab, _ in self.slabs:
            slab.end_step()


def _rows(pair: tuple, rows: slice) -> tuple:
    return tuple(None if t is None else t[:, :, rows] for t in pair)
