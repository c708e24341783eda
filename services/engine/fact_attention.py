"""Which KV heads read the fact: attention mass from the answer's positions onto the fact in the document.

One full-attention forward per task (document + interlude + question + answer) gives a score for every head
at once, where single-head ablation needs one forward per head (90 on SmolLM2): the cheap ranking for
calibration. A KV head's score on a task is the max over its query heads (GQA memory is per KV head) of the
mean attention mass, over the positions that predict answer tokens, on the answer's tokens where the
document states them (Wu et al.'s retrieval heads: heads that copy from the needle).
"""
from __future__ import annotations

import torch

from . import hf
from .retrieval_tasks import RetrievalTask


class FactProbe:
    """Receives each layer's attention probabilities; keeps the mass the query rows put on the fact's keys."""

    def __init__(self, n_layers: int, n_heads: int, queries: list[int], keys: list[int]):
        self.mass = torch.zeros(n_layers, n_heads)
        self.queries, self.keys = torch.tensor(queries), torch.tensor(keys)

    def record(self, layer_idx: int, probs: torch.Tensor) -> None:
        # probs: [1, Hq, N, N]
        rows = probs[0][:, self.queries].float()                                  # [Hq, A, N]
        self.mass[layer_idx] = rows[:, :, self.keys].sum(-1).mean(-1).cpu()       # [Hq]


def fact_span(task: RetrievalTask) -> list[int]:
    """Positions of the answer's tokens in the document (its last statement; [] if tokenised differently)."""
    doc, answer = task.document, list(task.answer)
    for start in range(len(doc) - len(answer), -1, -1):
        if doc[start:start + len(answer)] == answer:
            return list(range(start, start + len(answer)))
    return []


@torch.no_grad()
def fact_attention(engine, task: RetrievalTask) -> torch.Tensor | None:
    """[n_layers, n_kv_heads] attention mass on the fact for one task (None when the fact is not found)."""
    keys = fact_span(task)
    if not keys:
        return None
    fp = engine.loaded.fingerprint
    ids = list(task.document) + list(task.interlude) + list(task.question) + list(task.answer)
    first = len(ids) - len(task.answer) - 1          # the question's last token predicts the first answer token
    probe = FactProbe(fp.n_layers, fp.n_heads, list(range(first, len(ids) - 1)), keys)
    hf.probe_forward(engine.model, torch.tensor([ids], device=engine.device), probe)
    per_kv = probe.mass.view(fp.n_layers, fp.n_kv_heads, fp.group_size)           # [L, Hkv, G]
    return per_kv.amax(-1)


def one_vote_per_family(scores: dict[str, dict]) -> dict:
    """{family: {head: score}} -> {head: votes}: each family's scores scaled to its best head's and summed, so
    every retrieval skill weighs the same however much attention (or damage) its tasks happen to carry."""
    votes: dict = {}
    for per_head in scores.values():
        top = max(per_head.values(), default=0.0)
        for head, score in per_head.items():
            votes[head] = votes.get(head, 0.0) + (score / top if top > 0 else 0.0)
    return votes
