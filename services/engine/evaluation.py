"""Synthetic retrieval tasks and quality measures over compressed caches (for benchmarks and calibration).

Everything is generated on the fly (retrieval_tasks.py, corpus.py); nothing is downloaded. A document is
prefilled ONCE with full attention; every compressed variant is derived from that full cache
(`CompressedKVCache.from_full`), which is exactly what prefilling with that head map would give, and the
question is asked in a continued turn so the answer comes from the compressed cache.
"""
from __future__ import annotations

import torch

from .cache import CompressedKVCache, CompressionParams
from . import hf
from .batch import StepBatch
from .generation import Engine, SessionState, forward, forward_all
from .headmap import HeadMap
from .retrieval_tasks import (FAMILIES, RetrievalTask, make_copy_task, make_family_task,  # noqa: F401 (re-exported)
                              make_passkey_task, retrieval_tasks)
from .sampling import SamplingParams


@torch.no_grad()
def full_prefill(engine: Engine, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run `ids` once with a full cache -> per-layer keys and values [1, n_kv_heads, N, D]."""
    fp = engine.loaded.fingerprint
    cache = CompressedKVCache([list(range(fp.n_kv_heads))] * fp.n_layers, fp.n_kv_heads, CompressionParams())
    forward(engine.model, ids, cache)
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def held(full_kv) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A float32 full cache as bfloat16, for benches that hold many documents' caches at once (half the
    memory); `session_from_full` casts it back. Rounding every key and value to bfloat16 changed none of 800
    answers of the quality bench (docs/benchmarks.md §3.2: the noise-floor row)."""
    keys, values = full_kv
    if keys[0].dtype != torch.float32:
        return keys, values   # already 16-bit: bfloat16 would lose float16's mantissa bits
    return [k.to(torch.bfloat16) for k in keys], [v.to(torch.bfloat16) for v in values]


def session_from_full(engine: Engine, ids: list[int], full_kv, head_map: HeadMap) -> SessionState:
    dtype = engine.loaded.dtype
    keys, values = ([t.to(dtype) for t in group] for group in full_kv)   # no copy when already in `dtype`
    cache = CompressedKVCache.from_full(keys, values, head_map.retrieval_kv_heads, head_map.compression)
    return SessionState(list(ids), cache, head_map.version, engine.loaded.fingerprint.id)


def _with_interlude(engine: Engine, task: RetrievalTask, state: SessionState) -> SessionState:
    """Cache the task's intervening turn (if any) as its own step: it is compressed before the question."""
    if task.interlude:
        forward(engine.model, list(task.interlude), state.cache)
        state.token_ids.extend(task.interlude)
    return state


def answer_generated(engine: Engine, task: RetrievalTask, full_kv, head_map: HeadMap) -> tuple[bool, int]:
    """Greedy generation over the compressed document -> (answer found, KV bytes held by the document)."""
    state = session_from_full(engine, task.document, full_kv, head_map)
    nbytes = state.stored_nbytes()
    _with_interlude(engine, task, state)
    result = engine.continue_session(state, task.question, SamplingParams(max_new_tokens=len(task.answer) + 3))
    if task.answer_text:
        return task.answer_text in result.text, nbytes
    return result.token_ids[:len(task.answer)] == task.answer, nbytes


@torch.no_grad()
def score_answer(engine: Engine, task: RetrievalTask, full_kv, head_map: HeadMap) -> tuple[float, bool]:
    """Teacher-forced question + answer in one forward -> (mean answer log-prob, every answer token argmax)."""
    state = _with_interlude(engine, task, session_from_full(engine, task.document, full_kv, head_map))
    logits = forward_all(engine.model, task.question + task.answer, state.cache)            # [Q + A, V]
    logp = torch.log_softmax(logits[len(task.question) - 1: -1].float(), dim=-1)            # [A, V]
    return _scored(logp, task.answer)


@torch.no_grad()
def score_answers(engine: Engine, tasks: list[RetrievalTask], full_kvs: list, head_map: HeadMap,
                  batch_size: int = 16) -> list[tuple[float, bool]]:
    """`score_answer` for many tasks, `batch_size` at a time in one packed forward each (the same numbers:
    every task attends only to its own cache; the projections and MLPs run once for the whole batch)."""
    rows = answer_rows(engine, tasks, full_kvs, [head_map] * len(tasks), batch_size)
    return [_scored(row, t.answer) for row, t in zip(rows, tasks)]


def _scored(logp: torch.Tensor, answer: list[int]) -> tuple[float, bool]:
    """[A, V] log-probs predicting the answer -> (mean answer log-prob, every answer token the argmax)."""
    target = torch.tensor(answer, device=logp.device)                                  # [A]
    return float(logp.gather(1, target[:, None]).mean()), bool((logp.argmax(-1) == target).all())


@torch.no_grad()
def answer_rows(engine: Engine, tasks: list[RetrievalTask], full_kvs: list, head_maps: list[HeadMap],
                batch_size: int = 16) -> list[torch.Tensor]:
    """Per task, the log-probs [A, V] predicting its answer tokens (teacher-forced) over its document's
    cache compressed by its own head map, `batch_size` tasks in one packed forward."""
    out = []
    for i in range(0, len(tasks), batch_size):
        span = slice(i, i + batch_size)
        out += _answer_batch(engine, tasks[span], full_kvs[span], head_maps[span])
    return out


def _answer_batch(engine: Engine, tasks: list, full_kvs: list, head_maps: list) -> list[torch.Tensor]:
    caches = [session_from_full(engine, t.document, kv, hm).cache for t, kv, hm in zip(tasks, full_kvs, head_maps)]
    with_interlude = [(c, list(t.interlude)) for t, c in zip(tasks, caches) if t.interlude]
    if with_interlude:   # cached (and compressed) in a step of its own, before the question
        _packed_forward(engine, with_interlude, None)
    turns = [(c, t.question + t.answer) for t, c in zip(tasks, caches)]
    # The logits that predict each answer token: the positions from the question's last token on.
    at, start = [], 0
    for t in tasks:
        at += range(start + len(t.question) - 1, start + len(t.question) + len(t.answer) - 1)
        start += len(t.question) + len(t.answer)
    logp = torch.log_softmax(_packed_forward(engine, turns, at).float(), dim=-1)          # [sum A, V]
    return list(logp.split([len(t.answer) for t in tasks]))


def _packed_forward(engine: Engine, segments: list[tuple], logits_at: list[int] | None) -> torch.Tensor:
    batch = StepBatch(segments, engine.device)
    at = None if logits_at is None else torch.tensor(logits_at, device=engine.device)
    logits = hf.forward_step(engine.model, batch.input_ids(), batch.position_ids(), batch,
                             at if at is not None else torch.tensor([batch.n_tokens - 1], device=engine.device))
    batch.compress()
    return logits


@torch.no_grad()
def continuation_logprobs(engine: Engine, context: list[int], continuation: list[int], full_kv,
                          head_map: HeadMap) -> torch.Tensor:
    """Next-token log-probabilities [T, V] over a teacher-forced continuation of a cached context."""
    state = session_from_full(engine, context, full_kv, head_map)
    logits = forward_all(engine.model, continuation, state.cache)                            # [T, V]
    return torch.log_softmax(logits.float(), dim=-1)


def kl_divergence(full: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(full || other) of two [T, V] log-probability tensors."""
    return float((full.exp() * (full - other)).sum(-1).mean())


def continuation_kl(engine: Engine, context: list[int], continuation: list[int], full_kv,
                    head_map: HeadMap) -> float:
    """Mean KL(full || compressed) of next-token distributions over a teacher-forced continuation."""
    full = continuation_logprobs(engine, context, continuation, full_kv,
                                 HeadMap.full(engine.loaded.fingerprint, head_map.compression))
    return kl_divergence(full, continuation_logprobs(engine, context, continuation, full_kv, head_map))


def real_text(tokenizer, n_tokens: int, offset: int = 0) -> list[int]:
    """English prose shipped with every CPython (the pydoc topic texts): real text, no download."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    chars = 8 * (offset + n_tokens)  # plenty: English runs ~4 characters per token
    return tokenizer(text[:chars], add_special_tokens=False).input_ids[offset: offset + n_tokens]
