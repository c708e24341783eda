"""Synthetic retrieval tasks and quality measures over compressed caches (for benchmarks and calibration).

Everything is generated on the fly; nothing is downloaded. A passkey document is prefilled ONCE with full
attention; every compressed variant is derived from that full cache (`CompressedKVCache.from_full`), which is
exactly what prefilling with that head map would give, and the question is asked in a continued turn so the
answer comes from the compressed cache.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .cache import CompressedKVCache, CompressionParams
from .generation import Engine, SessionState, forward, forward_all
from .headmap import HeadMap
from .sampling import SamplingParams

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class RetrievalTask:
    document: list[int]      # cached first
    question: list[int]      # asked in a continued turn
    answer: list[int]        # the tokens a correct model produces next
    answer_text: str         # what generated text must contain (passkey)
    depth: float             # where the needle sits in the document
    kind: str                # "passkey" | "copy"


def make_passkey_task(tokenizer, length: int, depth: float, rng: random.Random) -> RetrievalTask:
    """A document of about `length` tokens with a random 5-digit key at relative `depth`."""
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    filler_ids = tokenizer(FILLER, add_special_tokens=False).input_ids
    fixed = len(tokenizer(INTRO + needle, add_special_tokens=True).input_ids)
    n_fill = max(1, (length - fixed) // len(filler_ids))
    before = round(n_fill * depth)
    text = INTRO + FILLER * before + needle + FILLER * (n_fill - before)
    document = tokenizer(text, add_special_tokens=True).input_ids
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    answer = tokenizer(" " + key, add_special_tokens=False).input_ids
    return RetrievalTask(document, question, answer, key, depth, "passkey")


def make_copy_task(vocab: tuple[int, int], bos: int, length: int, depth: float,
                   rng: random.Random, block: int = 16, prompt: int = 4) -> RetrievalTask:
    """Random ids with a random block at `depth`; the question repeats the block's start and the answer is
    the rest of it. Needs no tokenizer: an induction (copy) task for any model."""
    needle = rng.sample(range(*vocab), block)
    taken = set(needle)  # the needle must be the only earlier occurrence of its tokens
    filler = [t for t in (rng.randrange(*vocab) for _ in range(2 * length)) if t not in taken]
    filler = filler[:max(0, length - block - 1)]
    at = round(len(filler) * depth)
    document = [bos] + filler[:at] + needle + filler[at:]
    return RetrievalTask(document, needle[:prompt], needle[prompt:], "", depth, "copy")


def retrieval_tasks(kind: str, length: int, n: int, seed: int, tokenizer=None,
                    vocab: tuple[int, int] = (1000, 20000), bos: int = 1) -> list[RetrievalTask]:
    """`n` tasks at depths spread evenly over 10%..90%."""
    rng = random.Random(seed)
    depths = [0.1 + 0.8 * i / max(1, n - 1) for i in range(n)]
    if kind == "passkey":
        if tokenizer is None:
            raise ValueError("passkey tasks need a tokenizer; use kind='copy' for models without one")
        return [make_passkey_task(tokenizer, length, d, rng) for d in depths]
    if kind == "copy":
        return [make_copy_task(vocab, bos, length, d, rng) for d in depths]
    raise ValueError(f"unknown task kind {kind!r}; use 'passkey' or 'copy'")


@torch.no_grad()
def full_prefill(engine: Engine, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run `ids` once with a full cache -> per-layer keys and values [1, n_kv_heads, N, D]."""
    fp = engine.loaded.fingerprint
    cache = CompressedKVCache([list(range(fp.n_kv_heads))] * fp.n_layers, fp.n_kv_heads, CompressionParams())
    forward(engine.model, ids, cache)
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def session_from_full(engine: Engine, ids: list[int], full_kv, head_map: HeadMap) -> SessionState:
    cache = CompressedKVCache.from_full(*full_kv, head_map.retrieval_kv_heads, head_map.compression)
    return SessionState(list(ids), cache, head_map.version, engine.loaded.fingerprint.id)


def answer_generated(engine: Engine, task: RetrievalTask, full_kv, head_map: HeadMap) -> tuple[bool, int]:
    """Greedy generation over the compressed document -> (answer found, KV bytes held)."""
    state = session_from_full(engine, task.document, full_kv, head_map)
    nbytes = state.stored_nbytes()
    result = engine.continue_session(state, task.question, SamplingParams(max_new_tokens=len(task.answer) + 3))
    if task.answer_text:
        return task.answer_text in result.text, nbytes
    return result.token_ids[:len(task.answer)] == task.answer, nbytes


@torch.no_grad()
def score_answer(engine: Engine, task: RetrievalTask, full_kv, head_map: HeadMap) -> tuple[float, bool]:
    """Teacher-forced question + answer in one forward -> (mean answer log-prob, every answer token argmax)."""
    state = session_from_full(engine, task.document, full_kv, head_map)
    logits = forward_all(engine.model, task.question + task.answer, state.cache)            # [Q + A, V]
    logp = torch.log_softmax(logits[len(task.question) - 1: -1].float(), dim=-1)    # [A, V]
    answer = torch.tensor(task.answer, device=logp.device)
    return float(logp.gather(1, answer[:, None]).mean()), bool((logp.argmax(-1) == answer).all())


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
