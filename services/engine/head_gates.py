"""Which KV heads the answers need, learned: one gate per KV head, trained like DuoAttention's (Xiao et al., 2024).

Attention on the facts (fact_attention.py) scores heads one by one; what an answer needs is a SET of heads
whose full KV together reproduces the full cache's answer. A gate g in [0, 1] per KV head mixes, for the
turn's tokens (interlude, question, answer), that head's full attention over the document with its local
attention (sink + window + compensation token: exactly what the compressed cache gives), and the gates are
trained to keep the answer positions' next-token distribution close to the full cache's (KL) under an L1
penalty on the gates. The document's own K/V come from the full prefill (RazorAttention prefills with full
attention, then compresses), so only the turn's few tokens run with gradients: a task costs about one short
forward and backward.

The penalty doubles every tenth of the steps, a regularisation path: a head whose gate falls to zero under a
small penalty is needed least. A head's score is the optimiser step at which its gate first reached zero (never: the number
of steps), plus its final gate; the ranking is by score, highest first.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import hf
from .retrieval_tasks import RetrievalTask


@dataclass(frozen=True)
class GateParams:
    steps: int = 150               # optimiser steps, whatever the number of tasks
    batch: int = 8                 # tasks per step (drawn in shuffled passes over the tasks)
    final_penalty: float = 0.4     # L1 weight per 10 gates over the last tenth of the steps
    lr: float = 0.05               # Adam on the gates
    seed: int = 0                  # task order

    def __post_init__(self):
        if self.steps < 10 or self.batch < 1 or not self.lr > 0 or not self.final_penalty > 0:
            raise ValueError("gate training needs steps >= 10, batch >= 1, lr > 0 and final_penalty > 0")

    def penalty(self, step: int) -> float:
        """Halved for every tenth of the steps still to come: 0.4 / 512 at the start, 0.4 at the end."""
        return self.final_penalty * 2.0 ** (step * 10 // self.steps - 9)


class GateContext:
    """What the gated attention reads during one task's forward: the gates, the document's full K/V, the
    local heads' shape. `alpha` [n_layers, n_kv_heads] are the raw gates (clamped to 0..1 where used)."""

    def __init__(self, alpha: torch.Tensor, sink: int, window: int):
        self.alpha, self.sink, self.window = alpha, sink, window
        self.keys: list[torch.Tensor] = []     # per layer [1, Hkv, N, D]: the document's full cache
        self.values: list[torch.Tensor] = []
        self.all_full = False                  # True: every head full (the target distribution)

    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float) -> torch.Tensor:
        """query [1, Hq, T, D]; key, value: the turn's own [1, Hkv, T, D] (after RoPE) -> [1, Hq, T, D]."""
        doc_k, doc_v = self.keys[layer_idx].to(query.dtype), self.values[layer_idx].to(query.dtype)
        full = _attend(query, torch.cat([doc_k, key], 2), torch.cat([doc_v, value], 2), None, scale)
        if self.all_full:
            return full
        local_k, local_v, bias = local_view(doc_k, doc_v, self.sink, self.window)
        local = _attend(query, torch.cat([local_k, key], 2), torch.cat([local_v, value], 2), bias, scale)
        gate = self.alpha[layer_idx].clamp(0, 1).repeat_interleave(query.shape[1] // key.shape[1])   # [Hq]
        gate = gate[None, :, None, None]
        return gate * full + (1 - gate) * local


def local_view(keys: torch.Tensor, values: torch.Tensor, sink: int, window: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A local head's view of an N-token document, as `CompressedKVCache.from_full` keeps it: the first `sink`
    tokens, the last `window`, and the mean of the rest as one compensation row weighted by its count (paper
    eq. 4-5). keys, values [1, Hkv, N, D] -> keys, values [1, Hkv, S, D] and a key bias [S]."""
    n = keys.shape[2]
    sink = min(sink, n)
    window = min(window, n - sink)
    dropped = n - sink - window
    rows = [slice(0, sink), slice(n - window, n)]
    k = [keys[:, :, r] for r in rows]
    v = [values[:, :, r] for r in rows]
    bias = [keys.new_zeros(sink + window)]
    if dropped > 0:
        k.append(keys[:, :, sink:n - window].mean(2, keepdim=True))
        v.append(values[:, :, sink:n - window].mean(2, keepdim=True))
        bias.append(keys.new_full((1,), math.log(dropped)))
    return torch.cat(k, 2), torch.cat(v, 2), torch.cat(bias)


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


def answer_logprobs(model, task: RetrievalTask, full_kv, ctx: GateContext) -> torch.Tensor:
    """[A, V] log-probabilities at the positions that predict the answer's tokens, the turn (interlude,
    question, answer) run over the document's cache through `ctx`."""
    ctx.keys, ctx.values = full_kv
    ids = list(task.interlude) + list(task.question) + list(task.answer)
    start = len(task.document)
    logits = hf.gated_forward(model, torch.tensor([ids]), torch.arange(start, start + len(ids))[None], ctx)
    first = len(ids) - len(task.answer) - 1                                    # predicts the first answer token
    return torch.log_softmax(logits[0, first:len(ids) - 1].float(), dim=-1)


Progress = Callable[[int, int, str], None]


def train_gates(model, tasks: list[RetrievalTask], full_kvs: list, n_layers: int, n_kv_heads: int,
                sink: int, window: int, params: GateParams = GateParams(),
                progress: Progress | None = None) -> torch.Tensor:
    """Train the gates on `tasks` -> scores [n_layers, n_kv_heads], higher = needed more (module docstring)."""
    report = progress or (lambda done, total, stage: None)
    alpha = torch.ones(n_layers, n_kv_heads, requires_grad=True)
    ctx = GateContext(alpha, sink, window)
    targets = _full_targets(model, tasks, full_kvs, ctx)
    opt = torch.optim.Adam([alpha], lr=params.lr)
    zero_at = torch.full((n_layers, n_kv_heads), float(params.steps))
    batches = _batches(len(tasks), params)
    for step in range(params.steps):
        batch = next(batches)
        opt.zero_grad()
        loss = sum(_kl(targets[i], answer_logprobs(model, tasks[i], full_kvs[i], ctx)) for i in batch)
        (loss / len(batch) + params.penalty(step) * alpha.clamp(0, 1).sum() / 10).backward()
        opt.step()
        with torch.no_grad():
            alpha.clamp_(-0.2, 1.2)   # a little room either side, so a gate can cross back
            zero_at[(alpha < 0) & (zero_at == params.steps)] = step
        report(step + 1, params.steps, "training KV-head gates")
    return zero_at + alpha.detach().clamp(0, 1)


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
def _full_targets(model, tasks, full_kvs, ctx: GateContext) -> list[torch.Tensor]:
    ctx.all_full = True
    try:
        return [answer_logprobs(model, t, kv, ctx) for t, kv in zip(tasks, full_kvs)]
    finally:
        ctx.all_full = False


def _kl(target: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(target || logp) over answer positions; both [A, V] log-probabilities."""
    return (target.exp() * (target - logp)).sum(-1).mean()
