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
from .generation import Engine, SessionState
from .headmap import HeadMap
from .sampling import SamplingParams

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyTask:
    document: list[int]      # BOS + intro + filler with the needle at `depth`
    question: list[int]      # asked in a continued turn
    answer: str              # five digits
    depth: float
    length: int


def make_passkey_task(tokenizer, length: int, depth: float, rng: random.Random) -> PasskeyTask:
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
    return PasskeyTask(document, question, key, depth, len(document))


def passkey_tasks(tokenizer, length: int, n: int, seed: int) -> list[PasskeyTask]:
    """`n` tasks at depths spread evenly over 10%..90%."""
    rng = random.Random(seed)
    depths = [0.1 + 0.8 * i / max(1, n - 1) for i in range(n)]
    return [make_passkey_task(tokenizer, length, d, rng) for d in depths]


@torch.no_grad()
def full_prefill(engine: Engine, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run `ids` once with a full cache -> per-layer keys and values [1, n_kv_heads, N, D]."""
    fp = engine.loaded.fingerprint
    cache = CompressedKVCache([list(range(fp.n_kv_heads))] * fp.n_layers, fp.n_kv_heads, CompressionParams())
    engine.model(torch.tensor([ids], device=engine.model.device), cache=cache, use_cache=True,
                 razor_cache=cache, logits_to_keep=1)
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def session_from_full(engine: Engine, ids: list[int], full_kv, head_map: HeadMap) -> SessionState:
    cache = CompressedKVCache.from_full(*full_kv, head_map.retrieval_kv_heads, head_map.compression)
    return SessionState(list(ids), cache, head_map.version, engine.loaded.fingerprint.id)


def answer_passkey(engine: Engine, task: PasskeyTask, full_kv, head_map: HeadMap) -> tuple[bool, int]:
    """Ask the question over the compressed document -> (correct, KV bytes held)."""
    state = session_from_full(engine, task.document, full_kv, head_map)
    nbytes = state.nbytes()
    result = engine.continue_session(state, task.question, SamplingParams(max_new_tokens=8))
    return task.answer in result.text, nbytes


@torch.no_grad()
def answer_logprob(engine: Engine, task: PasskeyTask, full_kv, head_map: HeadMap) -> float:
    """Mean log-probability of the answer's tokens given the question (teacher forced; a smooth score)."""
    state = session_from_full(engine, task.document, full_kv, head_map)
    answer = engine.tokenizer(" " + task.answer, add_special_tokens=False).input_ids
    ids = torch.tensor([task.question + answer], device=engine.model.device)
    logits = engine.model(ids, cache=state.cache, use_cache=True, razor_cache=state.cache).logits[0]
    logp = torch.log_softmax(logits[len(task.question) - 1: -1].float(), dim=-1)    # [A, V]
    return float(logp.gather(1, torch.tensor(answer, device=logp.device)[:, None]).mean())


@torch.no_grad()
def continuation_kl(engine: Engine, context: list[int], continuation: list[int], full_kv,
                    head_map: HeadMap) -> float:
    """Mean KL(full || compressed) of next-token distributions over a teacher-forced continuation."""
    dists = []
    for hm in (HeadMap.full(engine.loaded.fingerprint, head_map.compression), head_map):
        state = session_from_full(engine, context, full_kv, hm)
        ids = torch.tensor([continuation], device=engine.model.device)
        logits = engine.model(ids, cache=state.cache, use_cache=True, razor_cache=state.cache).logits[0]
        dists.append(torch.log_softmax(logits.float(), dim=-1))
    full, comp = dists
    return float((full.exp() * (full - comp)).sum(-1).mean())


def real_text(tokenizer, n_tokens: int, offset: int = 0) -> list[int]:
    """English prose shipped with every CPython (the pydoc topic texts): real text, no download."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    chars = 8 * (offset + n_tokens)  # plenty: English runs ~4 characters per token
    return tokenizer(text[:chars], add_special_tokens=False).input_ids[offset: offset + n_tokens]
