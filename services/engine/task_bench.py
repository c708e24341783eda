"""TaskBench: a fixed set of retrieval tasks (and KL texts), prefilled once (caches held in bfloat16), scored
under any head map.

Calibration builds one on the corpus's calibration part and one on its validation part (other seeds). Each
task belongs to a CELL (family, length); the target (`Target.met_by`) is checked per cell against the full
cache on the SAME documents: accuracy within `max_accuracy_drop` of the full cache's, and of the tasks the
full cache answers, at least `min_kept` still answered.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Callable

from .cache import CompressionParams
from .corpus import prose_ids
from .evaluation import (continuation_logprobs, full_prefill, held, kl_divergence, retrieval_tasks, score_answers,
                         session_from_full)
from .generation import Engine
from .headmap import HeadMap

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Target:
    max_accuracy_drop: float = 0.02    # per cell: accuracy >= the full cache's - this
    min_kept: float = 0.97             # per cell: of the full cache's correct answers, at least this fraction kept
    max_kl: float | None = None        # and, when set: mean KL(full || variant) on real text <= this

    def met_by(self, point: dict, full: dict) -> bool:
        for family, accs in point["accuracy_by_family"].items():
            for acc, full_acc, kept in zip(accs, full["accuracy_by_family"][family], point["kept_by_family"][family]):
                if acc < full_acc - self.max_accuracy_drop - 1e-9 or kept < self.min_kept - 1e-9:
                    return False
        return self.max_kl is None or point.get("kl", 0.0) <= self.max_kl


class TaskBench:
    """Tasks of every (family, length) cell with their full prefill; `score` measures a head map on them."""

    def __init__(self, engine: Engine, families: tuple[str, ...], lengths: tuple[int, ...], n_per_cell: int,
                 seed: int, part: str, kl_tokens: int, progress: Progress, stage: str):
        self.engine, self.fp, self.families, self.lengths = engine, engine.loaded.fingerprint, families, lengths
        dims = engine.dims
        vocab = (min(1000, dims.vocab_size // 2), min(20000, dims.vocab_size))
        self.tasks, self.cells = [], []
        for family in families:
            for i, length in enumerate(lengths):
                for task in retrieval_tasks(family, length, n_per_cell, seed + i, engine.tokenizer, vocab=vocab,
                                            bos=dims.bos_id or 0, part=part):
                    self.tasks.append(task)
                    self.cells.append((family, length))
        self.kl_docs = [self._kl_document(part, length, kl_tokens, seed + i, vocab) for i, length in enumerate(lengths)]
        total = len(self.tasks) + len(self.kl_docs)
        self.kvs = []
        for i, task in enumerate(self.tasks):
            self.kvs.append(held(full_prefill(engine, task.document)))   # all held: half the bytes
            progress(i + 1, total, stage)
        self.kl_kvs, self.kl_full = [], []   # full-cache next-token log-probs [T, V] per KL document
        full_map = HeadMap.full(self.fp)
        for i, (context, continuation) in enumerate(self.kl_docs):
            self.kl_kvs.append(held(full_prefill(engine, context)))
            self.kl_full.append(continuation_logprobs(engine, context, continuation, self.kl_kvs[-1], full_map))
            progress(len(self.tasks) + i + 1, total, stage)
        self.all_heads = [(layer, h) for layer in range(self.fp.n_layers) for h in range(self.fp.n_kv_heads)]
        self.full_hits = [hit for _, hit in score_answers(engine, self.tasks, self.kvs, full_map)]
        self.full = {**self.score(set(self.all_heads), CompressionParams(), kl=False), "kl": 0.0}

    def _kl_document(self, part: str, length: int, kl_tokens: int, seed: int, vocab) -> tuple[list, list]:
        """(context, continuation): running prose of the bench's corpus part, or random ids without a tokenizer."""
        if self.engine.tokenizer is not None:
            ids = prose_ids(self.engine.tokenizer, part, length + kl_tokens, index=seed)
        else:
            rng = random.Random(seed)
            ids = [rng.randrange(*vocab) for _ in range(length + kl_tokens)]
        return ids[:length], ids[length:]

    def head_map(self, heads: set, compression: CompressionParams) -> HeadMap:
        kv = [[h for h in range(self.fp.n_kv_heads) if (layer, h) in heads] for layer in range(self.fp.n_layers)]
        zeros = [[0.0] * self.fp.n_heads for _ in range(self.fp.n_layers)]
        return HeadMap(self.fp, zeros, zeros, [], kv, compression, method="calibrated")

    def indices(self, families=None, lengths=None) -> list[int]:
        return [i for i, (f, n) in enumerate(self.cells)
                if (families is None or f in families) and (lengths is None or n in lengths)]

    def answer_logprobs(self, heads: set, compression: CompressionParams, which: list[int]) -> list[float]:
        hm = self.head_map(heads, compression)
        return [lp for lp, _ in score_answers(self.engine, [self.tasks[i] for i in which],
                                              [self.kvs[i] for i in which], hm)]

    def score(self, heads: set, compression: CompressionParams, families=None, kl: bool = True) -> dict:
        """Accuracy per family and length (and what fraction of the full cache's hits it keeps), mean answer
        log-prob, KV bytes per length and, with `kl`, mean KL to the full cache on the KL texts."""
        hm = self.head_map(heads, compression)
        which = self.indices(families)
        results = score_answers(self.engine, [self.tasks[i] for i in which], [self.kvs[i] for i in which], hm)
        hits = dict(zip(which, (hit for _, hit in results)))
        point = {"logprob": statistics.mean(lp for lp, _ in results), "accuracy": statistics.mean(hits.values()),
                 "accuracy_by_family": {}, "kept_by_family": {}}
        for family in (families or self.families):
            cells = [[i for i in which if self.cells[i] == (family, n)] for n in self.lengths]
            point["accuracy_by_family"][family] = [statistics.mean(hits[i] for i in c) for c in cells]
            point["kept_by_family"][family] = [_kept([hits[i] for i in c], [self.full_hits[i] for i in c])
                                               for c in cells]
        point["accuracy_by_length"] = [statistics.mean(hits[i] for i in which if self.cells[i][1] == n)
                                       for n in self.lengths]
        point["bytes_by_length"] = [self._bytes_fraction(hm, n) for n in self.lengths]
        point["bytes_fraction"] = statistics.mean(point["bytes_by_length"])
        if kl:
            point["kl"] = statistics.mean(
                kl_divergence(full, continuation_logprobs(self.engine, context, continuation, kv, hm))
                for (context, continuation), kv, full in zip(self.kl_docs, self.kl_kvs, self.kl_full))
        return point

    def _bytes_fraction(self, hm: HeadMap, length: int) -> float:
        i = self.cells.index((self.cells[0][0], length))
        state = session_from_full(self.engine, self.tasks[i].document, self.kvs[i], hm)
        return state.cache.bytes_fraction()   # counted as 16-bit: int8 heads weigh what they would on a GPU


def _kept(hits: list[bool], full_hits: list[bool]) -> float:
    """Of the tasks the full cache answers, the fraction still answered (1.0 when it answers none)."""
    answered = [h for h, f in zip(hits, full_hits) if f]
    return statistics.mean(answered) if answered else 1.0
