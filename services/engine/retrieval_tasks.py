"""Retrieval tasks, generated locally: a document cached first, a question asked in a later turn.

Task FAMILIES, each one retrieval skill, over varied prose from one part of `corpus` (no sentence repeats):
  digits   a 5-digit code stated once                          "The access code for the boathouse is 48213."
  word     an invented name introduced once                    "The harbour cat was named Brindomar."
  multi    four codes for four things; one of them is asked
  turn     a name asked after an intervening turn (a question on another fact of the document, answered,
           is cached between the document and the question)
  edge     a code or a name in the first or last tenth of the document
(and next-token KL on real text, which calibration measures beside these; see calibration.py).
The older single-skill tasks stay: `passkey` (a key stated twice in one repeated filler sentence) and `copy`
(random ids, for models without a tokenizer), with `copy-edge`, its block in the first or last tenth.

Questions are completion-style ("... The access code for the boathouse is"), so the answer is the next
tokens and can be scored teacher-forced (every answer token the argmax) as well as generated greedily.
`chat=True` puts the same words in the model's chat template, as the service sends an Instruct model's turns:
the document is a user message (answered by a fixed acknowledgement), the question the next user message, and
the reply's start ("The access code for the boathouse is") is part of the question's tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

from .chat import encode_chat, encode_chat_turn
from .corpus import filler

FAMILIES = ("digits", "word", "multi", "turn", "edge")

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
PASSKEY_QUESTION = "What is the pass key? The pass key is"
READ_REQUEST = "Read this document; I will ask you about it afterwards.\n\n"   # chat format: the first message
READ_REPLY = "I have read the document."

_THINGS = ("boathouse", "north gate", "archive room", "old mill", "glass tower", "orchard shed", "river lock",
           "clock tower", "wine cellar", "east bridge", "music hall", "coal store", "signal box", "rose garden",
           "chapel door", "garden gate", "tool locker", "map room", "salt barn", "bell tower")
_OWNERS = ("harbour cat", "miller's horse", "captain's ship", "old lighthouse", "village inn", "red balloon",
           "baker's dog", "painted boat", "mountain hut", "tallest oak", "brass telescope", "new ferry")
_SYLLABLES = ("bran", "dor", "mel", "vik", "sa", "tor", "quil", "ren", "ga", "lis", "mo", "zan", "fe", "rud",
              "ka", "nes", "tav", "ol", "pim", "wyn")


@dataclass(frozen=True)
class RetrievalTask:
    document: list[int]      # cached first
    question: list[int]      # asked in a later turn
    answer: list[int]        # the tokens a correct model produces next
    answer_text: str         # what generated text must contain
    depth: float             # where the asked fact sits in the document (0..1)
    kind: str                # the family: "digits" | "word" | ... | "passkey" | "copy"
    interlude: list[int] = ()  # a turn cached between the document and the question (the "turn" family)


@dataclass(frozen=True)
class Fact:
    statement: str           # the sentence placed in the document
    question: str            # asks for it, completion-style: the answer comes next
    answer: str              # with its leading space


def code_fact(thing: str, rng: random.Random) -> Fact:
    code = str(rng.randint(10000, 99999))
    return Fact(f"The access code for the {thing} is {code}.",
                f"What is the access code for the {thing}? The access code for the {thing} is", f" {code}")


def name_fact(owner: str, rng: random.Random) -> Fact:
    name = "".join(rng.sample(_SYLLABLES, 3)).capitalize()
    return Fact(f"The {owner} was named {name}.", f"What was the {owner} named? The {owner} was named",
                f" {name}")


def _document(tokenizer, length: int, facts: list[tuple[float, Fact]], rng: random.Random, part: str) -> str:
    """About `length` tokens of prose with each fact's sentence at its relative depth (between passages)."""
    fill = filler(tokenizer, part)
    fact_tokens = sum(len(tokenizer(" " + f.statement, add_special_tokens=False).input_ids) for _, f in facts)
    chosen = fill.draw(max(1, length - fact_tokens - 4), rng)
    pieces = [fill.passages[i] for i in chosen]
    sizes = [fill.n_tokens[i] + 1 for i in chosen]
    total = sum(sizes)
    for depth, fact in sorted(facts, key=lambda x: x[0], reverse=True):   # deepest first keeps indices valid
        pieces.insert(_boundary(sizes, depth * total), fact.statement)
    return "\n\n".join(pieces)


def _boundary(sizes: list[int], at_tokens: float) -> int:
    """The passage boundary nearest `at_tokens` tokens into the filler."""
    run, best, best_gap = 0, 0, abs(at_tokens)
    for i, size in enumerate(sizes, start=1):
        run += size
        if abs(run - at_tokens) < best_gap:
            best, best_gap = i, abs(run - at_tokens)
    return best


def _task(tokenizer, document: str, fact: Fact, depth: float, kind: str, interlude: Fact | None = None,
          chat: bool = False, asked_as: str = "\n\nQuestion: ") -> RetrievalTask:
    """The task's tokens: completion-style text, or the same words in the model's chat template."""
    enc = lambda text: tokenizer(text, add_special_tokens=False).input_ids   # noqa: E731
    answer = enc(fact.answer)
    if chat:
        doc = encode_chat(tokenizer, [{"role": "user", "content": READ_REQUEST + document}]) + enc(READ_REPLY)
        between = _chat_exchange(tokenizer, interlude.question, interlude.answer + ".") if interlude else []
        spaces = _leading_spaces(tokenizer, answer)
        question, answer = _chat_exchange(tokenizer, fact.question, "") + answer[:spaces], answer[spaces:]
    else:
        doc = tokenizer(document, add_special_tokens=True).input_ids
        between = enc(f"{asked_as}{interlude.question}{interlude.answer}.") if interlude else []
        question = enc(f"{asked_as}{fact.question}")
    return RetrievalTask(doc, question, answer, fact.answer.strip(), depth, kind, tuple(between))


def _leading_spaces(tokenizer, answer: list[int]) -> int:
    """How many of the answer's first tokens are bare whitespace (SmolLM2 writes " 48213" as " ", "4", "8", ...).
    In the chat format they are teacher-forced with the reply's start: the Instruct model would rather go on
    "... is a five-digit code, 48213", and a bare space is not the retrieval being measured."""
    n = 0
    while n < len(answer) - 1 and not tokenizer.decode(answer[n:n + 1]).strip():
        n += 1
    return n


def _chat_exchange(tokenizer, question: str, answer: str) -> list[int]:
    """A completion-style question ("What is X? The X is") as the next user message ("What is X?") and the
    start of the assistant's reply ("The X is"), then `answer`: the words are the completion format's."""
    asked, reply = question.strip().split("? ", 1)
    opened = encode_chat_turn(tokenizer, [{"role": "user", "content": asked + "?"}], None)
    return opened + tokenizer(reply + answer, add_special_tokens=False).input_ids


def make_family_task(family: str, tokenizer, length: int, depth: float, rng: random.Random,
                     part: str = "calibration", chat: bool = False) -> RetrievalTask:
    """One task of `family` about `length` tokens long, its asked fact at `depth` (edge: mapped to a tenth)."""
    if family == "digits":
        fact = code_fact(rng.choice(_THINGS), rng)
        return _task(tokenizer, _document(tokenizer, length, [(depth, fact)], rng, part), fact, depth, family,
                     chat=chat)
    if family == "word":
        fact = name_fact(rng.choice(_OWNERS), rng)
        return _task(tokenizer, _document(tokenizer, length, [(depth, fact)], rng, part), fact, depth, family,
                     chat=chat)
    if family == "multi":
        facts = [code_fact(thing, rng) for thing in rng.sample(_THINGS, 4)]
        depths = [depth] + [rng.uniform(0.1, 0.9) for _ in range(3)]
        doc = _document(tokenizer, length, list(zip(depths, facts)), rng, part)
        return _task(tokenizer, doc, facts[0], depth, family, chat=chat)
    if family == "turn":
        asked, other = name_fact(rng.choice(_OWNERS), rng), code_fact(rng.choice(_THINGS), rng)
        other_depth = rng.uniform(0.1, 0.9)
        doc = _document(tokenizer, length, [(depth, asked), (other_depth, other)], rng, part)
        return _task(tokenizer, doc, asked, depth, family, interlude=other, chat=chat)
    if family == "edge":
        edge_depth = 0.02 + 0.06 * depth if rng.random() < 0.5 else 0.92 + 0.06 * depth
        fact = (code_fact(rng.choice(_THINGS), rng) if rng.random() < 0.5 else name_fact(rng.choice(_OWNERS), rng))
        return _task(tokenizer, _document(tokenizer, length, [(edge_depth, fact)], rng, part), fact, edge_depth,
                     family, chat=chat)
    raise ValueError(f"unknown task family {family!r}; known: {FAMILIES}")


def make_passkey_task(tokenizer, length: int, depth: float, rng: random.Random, chat: bool = False) -> RetrievalTask:
    """A document of about `length` tokens of one repeated filler sentence, a 5-digit key at `depth`."""
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    filler_ids = tokenizer(FILLER, add_special_tokens=False).input_ids
    fixed = len(tokenizer(INTRO + needle, add_special_tokens=True).input_ids)
    n_fill = max(1, (length - fixed) // len(filler_ids))
    before = round(n_fill * depth)
    text = INTRO + FILLER * before + needle + FILLER * (n_fill - before)
    return _task(tokenizer, text, Fact(needle, PASSKEY_QUESTION, f" {key}"), depth, "passkey", chat=chat,
                 asked_as="\n")


def make_copy_task(vocab: tuple[int, int], bos: int, length: int, depth: float,
                   rng: random.Random, block: int = 16, prompt: int = 4) -> RetrievalTask:
    """Random ids with a random block at `depth`; the question repeats the block's start and the answer is
    the rest of it. Needs no tokenizer: an induction (copy) task for any model."""
    needle = rng.sample(range(*vocab), block)
    taken = set(needle)  # the needle must be the only earlier occurrence of its tokens
    filler_ids = [t for t in (rng.randrange(*vocab) for _ in range(2 * length)) if t not in taken]
    filler_ids = filler_ids[:max(0, length - block - 1)]
    at = round(len(filler_ids) * depth)
    document = [bos] + filler_ids[:at] + needle + filler_ids[at:]
    return RetrievalTask(document, needle[:prompt], needle[prompt:], "", depth, "copy")


def retrieval_tasks(kind: str, length: int, n: int, seed: int, tokenizer=None,
                    vocab: tuple[int, int] = (1000, 20000), bos: int = 1,
                    part: str = "calibration", chat: bool = False) -> list[RetrievalTask]:
    """`n` tasks of one family (or "passkey" / "copy") at depths spread evenly over 10%..90%; `chat`: in the
    model's chat template (not for "copy", which has no words)."""
    depths = [0.1 + 0.8 * i / max(1, n - 1) for i in range(n)]
    if kind in ("copy", "copy-edge"):
        if chat:
            raise ValueError(f"{kind!r} tasks are token ids, not words: they have no chat format")
        rng = random.Random(seed)
        if kind == "copy-edge":   # alternately in the first and the last tenth
            depths = [0.02 + 0.06 * d if i % 2 == 0 else 0.92 + 0.06 * d for i, d in enumerate(depths)]
        return [replace(make_copy_task(vocab, bos, length, d, rng), kind=kind) for d in depths]
    if tokenizer is None:
        raise ValueError(f"{kind!r} tasks need a tokenizer; use kind='copy' for models without one")
    if kind == "passkey":
        rng = random.Random(seed)
        return [make_passkey_task(tokenizer, length, d, rng, chat) for d in depths]
    rng = random.Random(f"{kind}-{part}-{length}-{seed}")   # a family's documents differ across lengths too
    return [make_family_task(kind, tokenizer, length, d, rng, part, chat) for d in depths]
