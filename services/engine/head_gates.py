"""Which KV heads the answers need, learned: one gate per KV head, trained like DuoAttention's (Xiao et al., 2024).

Attention on the facts (fact_attention.py) scores heads one by one; what an answer needs is a SET of heads
whose full KV together reproduces the full cache's answer. A gate g in [0, 1] per KV head mixes, for the
turn's tokens (interlude, question, answer), that head's full attention over the document with its local
attention (sink + window + compensation token: exactly what the compressed cache gives), and the gates are
trained to keep the answer positions' next-token distribution close to the full cache's (KL) under an L1
penalty on the gates. The document's own K/V come from the full prefill (RazorAttention prefills with full
attention, then compresses), so only the turn's few tokens run with gradients: a task costs about one short
forward and backward.

The penalty grows geometrically over the steps, a regularisation path: a head whose gate falls to zero under
a small penalty is needed least. A head's score is the last optimiser step after which its gate was still open,
plus its final gate; the ranking is by score, highest first.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import hf
from .cache import CompressedKVCache, CompressionParams
from .retrieval_tasks import RetrievalTask


@dataclass(frozen=True)
class GateParams:
    steps: int = 80                # optimiser steps, whatever the number of tasks (bench_quality: 150)
    batch: int = 4                 # tasks per step (drawn in shuffled passes over the tasks; bench_quality: 8)
    first_penalty: float = 1e-3    # L1 weight per gate at the first step; it grows geometrically ...
    last_penalty: float = 1.0      # ... to this at the last, where few gates survive
    lr: float = 0.05               # Adam on the gates
    seed: int = 0                  # task order

    def __post_init__(self):
        if self.steps < 10 or self.batch < 1 or not self.lr > 0 or not 0 < self.first_penalty <= self.last_penalty:
            raise ValueError("gate training needs steps >= 10, batch >= 1, lr > 0 and "
                             "0 < first_penalty <= last_penalty")

    def penalty(self, step: int) -> float:
        return self.first_penalty * (self.last_penalty / self.first_penalty) ** (step / (self.steps - 1))


class GateDocument:
    """One task's document as gate training reads it: the full cache for full heads and, per layer, what a
    local head keeps of it, built once by the engine's own compression (`CompressedKVCache.from_full`, every
    head local, a fixed window): local keys and values [1, Hkv, S, D] with the compensation row last, and the
    key bias [S] that weights that row by its count (paper eq. 5)."""

    def __init__(self, full_kv, sink: int, window: int):
        self.keys, self.values = full_kv                       # per layer [1, Hkv, N, D]
        shape = CompressionParams(sink=sink, min_window=window, ratio=1e9)   # 1e9: a fixed window
        cache = CompressedKVCache.from_full(self.keys, self.values, [[] for _ in self.keys], shape)
        self.local = [_with_compensation(layer) for layer in cache.layers]


def _with_compensation(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keys, values = layer.local_keys.clone(), layer.local_values.clone()   # not the buffer's headroom
    bias = torch.zeros(keys.shape[2], dtype=torch.float32, device=keys.device)
    if layer.comp_count:
        keys = torch.cat([keys, layer.comp_keys.to(keys.dtype)], 2)
        values = torch.cat([values, layer.comp_values.to(values.dtype)], 2)
        bias = torch.cat([bias, bias.new_full((1,), math.log(layer.comp_count))])
    return keys, values, bias


class GateContext:
    """What the gated attention reads during one forward: the gates and each batch row's `GateDocument`.
    `alpha` [n_layers, n_kv_heads] are the gates, each within 0..1."""

    def __init__(self, alpha: torch.Tensor):
        self.alpha = alpha
        self.documents: list[GateDocument] = []   # one per batch row
        self.all_full = False                     # True: every head full (the target distribution)

    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float) -> torch.Tensor:
        """query [B, Hq, T, D]; key, value: the turns' own [B, Hkv, T, D] (after RoPE) -> [B, Hq, T, D]."""
        assert query.shape[0] == len(self.documents), (query.shape, len(self.documents))
        gate = self.alpha[layer_idx].repeat_interleave(query.shape[1] // key.shape[1])   # [Hq]
        rows = [self._row(query[b:b + 1], key[b:b + 1], value[b:b + 1], doc, layer_idx, gate, scale)
                for b, doc in enumerate(self.documents)]
        return torch.cat(rows)

    def _row(self, query, key, value, doc: GateDocument, layer_idx: int, gate, scale: float) -> torch.Tensor:
        doc_k, doc_v = doc.keys[layer_idx].to(query.dtype), doc.values[layer_idx].to(query.dtype)
        full = _attend(query, torch.cat([doc_k, key], 2), torch.cat([doc_v, value], 2), None, scale)
        if self.all_full:
            return full
        local_k, local_v, bias = doc.local[layer_idx]
        local = _attend(query, torch.cat([local_k.to(query.dtype), key], 2),
                        torch.cat([local_v.to(query.dtype), value], 2), bias, scale)
        gate = gate[None, :, None, None]
        return gate * full + (1 - gate) * local


def _attend(query, keys, values, prefix_bias, scale: float) -> torch.Tensor:
    """The turn's T queries over a prefix plus the turn itself (causal within the turn).

    query [1, Hq, T, D]; keys, values [1, Hkv, P + T, D]; prefix_bias [P] or None (zeros)."""
    t, total = query.shape[2], keys.shape[2]
    allowed = torch.ones(t, total, dtype=torch.bool, device=query.device).tril(total - t)       # [T, P + T]
    bias = torch.zeros(t, total, dtype=query.dtype, device=query.device)
    if prefix_bias is not None:
        bias[:, :total - t] = prefix_bias
    bias = bias.masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=scale, enable_gqa=True)


def answer_logprobs(model, tasks: list[RetrievalTask], documents: list[GateDocument], ctx: GateContext
                    ) -> list[torch.Tensor]:
    """Per task, [A, V] log-probabilities at the positions that predict its answer's tokens: each turn
    (interlude, question, answer) over its document's cache through `ctx`, the tasks in one batch. Turns are
    right-padded to the longest: causal attention keeps the padding out of every real position."""
    turns = [list(t.interlude) + list(t.question) + list(t.answer) for t in tasks]
    width = max(map(len, turns))
    ids = torch.tensor([turn + [turn[-1]] * (width - len(turn)) for turn in turns])            # [B, T]
    positions = torch.stack([torch.arange(len(t.document), len(t.document) + width) for t in tasks])   # [B, T]
    spans = [range(len(turn) - len(task.answer) - 1, len(turn) - 1) for task, turn in zip(tasks, turns)]
    at = sorted(set().union(*spans))                 # the positions that predict some task's answer tokens
    ctx.documents = list(documents)
    logits = hf.gated_forward(model, ids, positions, ctx, torch.tensor(at))                # [B, len(at), V]
    column = {t: i for i, t in enumerate(at)}
    rows = [b for b, span in enumerate(spans) for _ in span]
    cols = [column[t] for span in spans for t in span]
    picked = torch.log_softmax(logits[rows, cols].float(), dim=-1)       # [sum of answer lengths, V]: one index
    return list(picked.split([len(span) for span in spans]))


Progress = Callable[[int, int, str], None]


def train_gates(model, tasks: list[RetrievalTask], full_kvs: list, n_layers: int, n_kv_heads: int,
                sink: int, window: int, params: GateParams = GateParams(),
                progress: Progress | None = None) -> torch.Tensor:
    """Train the gates on `tasks` -> scores [n_layers, n_kv_heads], higher = needed more (module docstring)."""
    report = progress or (lambda done, total, stage: None)
    alpha = torch.ones(n_layers, n_kv_heads, requires_grad=True)
    ctx = GateContext(alpha)
    documents = [GateDocument(kv, sink, window) for kv in full_kvs]
    targets = _full_targets(model, tasks, documents, ctx, params.batch)
    opt = torch.optim.Adam([alpha], lr=params.lr)
    alive_until = torch.zeros(n_layers, n_kv_heads)   # the last step each gate was open after
    batches = _batches(len(tasks), params)
    for step in range(params.steps):
        batch = next(batches)
        opt.zero_grad()
        got = answer_logprobs(model, [tasks[i] for i in batch], [documents[i] for i in batch], ctx)
        loss = sum(_kl(targets[i], logp) for i, logp in zip(batch, got))
        (loss / len(batch) + params.penalty(step) * alpha.sum()).backward()
        opt.step()
        with torch.no_grad():
            alpha.clamp_(0, 1)        # projected: a gate at 0 or 1 still feels both gradients
            alive_until[alpha > 0] = step + 1
        report(step + 1, params.steps, "training KV-head gates")
    return alive_until + alpha.detach()


def _batches(n_tasks: int, params: GateParams):
    """Batches of task indices, from shuffled passes over the tasks (a pass's tail joins the next pass)."""
    rng, pending = random.Random(params.seed), []
    while True:
        while len(pending) < params.batch:
            order = list(range(n_tasks))
            rng.shuffle(order)
            pending += order
        yield pending[:params.batch]
        del pending[:params.batch]


@torch.no_grad()
def _full_targets(model, tasks, documents, ctx: GateContext, batch: int) -> list[torch.Tensor]:
    ctx.all_full = True
    try:
        return [logp for i in range(0, len(tasks), batch)
                for logp in answer_logprobs(model, tasks[i:i + batch], documents[i:i + batch], ctx)]
    finally:
        ctx.all_full = False


def _kl(target: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(target || logp) over answer positions; both [A, V] log-probabilities."""
    return (target.exp() * (target - logp)).sum(-1).mean()
