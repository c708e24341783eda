"""Task families and the prose corpus: disjoint parts, no repeated sentence, facts where they are said to be."""
from __future__ import annotations

import random
import re

import pytest

from services.engine import corpus
from services.engine.evaluation import FAMILIES, retrieval_tasks
from services.engine.task_bench import Target
from tests.engine_models import smollm2, tiny

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def test_corpus_parts_are_disjoint_and_never_repeat_a_sentence():
    parts = {p: corpus.passages(p) for p in corpus.PARTS}
    sentences = {p: {s for passage in ps for s in SENTENCE_END.split(passage)} for p, ps in parts.items()}
    for a in corpus.PARTS:
        assert len(parts[a]) >= 200, a                          # enough prose for 8k-token documents
        for b in corpus.PARTS:
            if a < b:
                assert not set(parts[a]) & set(parts[b]), (a, b)
                assert not sentences[a] & sentences[b], (a, b)   # not even one sentence shared
    every = [s for ps in parts.values() for passage in ps for s in SENTENCE_END.split(passage)]
    assert len(every) == len(set(every))
    assert all(corpus.part_of(x) == p for p, ps in parts.items() for x in ps[:50])


def test_corpus_rejects_code():
    assert not corpus._is_prose(">>> import os\n>>> os.getcwd() returns the current directory of the process")
    assert corpus._is_prose("A plain sentence about files and directories. " * 4)
    with pytest.raises(ValueError, match="part"):
        corpus.passages("test")


def test_target_is_per_family_and_length_and_counts_lost_answers():
    full = {"accuracy_by_family": {"digits": [1.0, 0.5], "word": [1.0, 1.0]}}
    ok = {"accuracy_by_family": {"digits": [1.0, 0.5], "word": [1.0, 1.0]},
          "kept_by_family": {"digits": [1.0, 1.0], "word": [1.0, 1.0]}}
    assert Target().met_by(ok, full)
    # same accuracy overall and per cell, but one of the full cache's answers lost (and another gained)
    swapped = {**ok, "kept_by_family": {"digits": [1.0, 0.0], "word": [1.0, 1.0]}}
    assert not Target().met_by(swapped, full)
    one_cell_down = {**ok, "accuracy_by_family": {"digits": [1.0, 0.5], "word": [0.9, 1.0]}}
    assert not Target().met_by(one_cell_down, full)
    assert Target(max_accuracy_drop=0.1, min_kept=0.0).met_by(one_cell_down, full)


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2().tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_family_documents_hold_the_fact_once_in_varied_prose(tokenizer, family):
    tasks = retrieval_tasks(family, 400, 3, seed=5, tokenizer=tokenizer, part="bench")
    for task in tasks:
        text = tokenizer.decode(task.document)
        answer = task.answer_text
        assert text.count(answer) == 1, (family, answer)          # stated once, nowhere else
        assert abs(len(task.document) - 400) < 80
        assert tokenizer.decode(task.answer).strip() == answer
        sentences = [s for s in SENTENCE_END.split(text) if len(s) > 20]
        assert len(sentences) == len(set(sentences))              # no sentence repeats
        fact_at = text.index(answer) / len(text)
        if family == "edge":
            assert fact_at < 0.15 or fact_at > 0.85, fact_at
        else:
            assert abs(fact_at - task.depth) < 0.25, (fact_at, task.depth)
        assert bool(task.interlude) == (family == "turn")
        if family == "turn":                                      # the interlude answers another fact of the text
            assert answer not in tokenizer.decode(task.interlude)
    assert len({t.answer_text for t in tasks}) == len(tasks)


def test_multi_family_states_four_facts_and_asks_one(tokenizer):
    task = retrieval_tasks("multi", 600, 1, seed=3, tokenizer=tokenizer)[0]
    text = tokenizer.decode(task.document)
    assert text.count("The access code for the") == 4
    asked = tokenizer.decode(task.question).split("for the ")[1].split("?")[0]
    assert text.count(f"The access code for the {asked} is{' ' + task.answer_text}.") == 1


def test_tasks_differ_by_corpus_part_and_seed(tokenizer):
    calib = retrieval_tasks("word", 400, 2, seed=1, tokenizer=tokenizer, part="calibration")
    bench = retrieval_tasks("word", 400, 2, seed=1, tokenizer=tokenizer, part="bench")
    again = retrieval_tasks("word", 400, 2, seed=1, tokenizer=tokenizer, part="calibration")
    assert [t.document for t in calib] == [t.document for t in again]          # reproducible
    calib_text = tokenizer.decode(calib[0].document)
    bench_passages = corpus.passages("bench")
    assert not any(p[:80] in calib_text for p in random.Random(0).sample(bench_passages, 100))
    assert calib[0].document != bench[0].document


def test_held_full_caches_take_half_the_bytes_and_come_back_in_the_models_dtype():
    import torch

    from services.engine import Engine, HeadMap
    from services.engine.evaluation import full_prefill, held, session_from_full

    engine = Engine(tiny())
    ids = list(range(5, 69))
    full = full_prefill(engine, ids)
    kept = held(full)
    assert all(t.dtype == torch.bfloat16 for group in kept for t in group)
    assert sum(t.nbytes for g in kept for t in g) * 2 == sum(t.nbytes for g in full for t in g)
    assert held(kept)[0][0] is kept[0][0]                       # 16-bit caches are held as they are
    state = session_from_full(engine, ids, kept, HeadMap.full(engine.loaded.fingerprint))
    keys = state.cache.layers[0].keys
    assert keys.dtype == torch.float32
    assert torch.equal(keys, full[0][0].to(torch.bfloat16).float())   # the rounding, nothing else


def test_answer_rows_score_each_task_under_its_own_map_in_one_batch():
    """One packed batch mixing head maps (and a task with an intervening turn) gives each task what it gets
    alone, teacher-forced, under its own map: the diagnostic bench compares maps on one document this way."""
    from dataclasses import replace

    import torch

    from services.engine import CompressionParams, Engine, HeadMap
    from services.engine.evaluation import answer_rows, full_prefill, score_answer

    engine = Engine(tiny())
    fp = engine.loaded.fingerprint
    zeros = [[0.0] * fp.n_heads for _ in range(fp.n_layers)]
    shape = CompressionParams(sink=2, min_window=16, ratio=1e9, retrieval_bits=8, retrieval_value_bits=4)
    one_head = HeadMap(fp, zeros, zeros, [], [[0]] + [[] for _ in range(fp.n_layers - 1)], shape, method="test")
    maps = [HeadMap.full(fp), one_head, one_head, HeadMap.full(fp)]
    task = retrieval_tasks("copy", 120, 1, seed=3, vocab=(10, 200))[0]
    tasks = [task, task, replace(task, interlude=(11, 12, 13)), replace(task, interlude=(11, 12, 13))]
    kvs = [full_prefill(engine, task.document)] * len(tasks)
    rows = answer_rows(engine, tasks, kvs, maps, batch_size=3)              # two batches, the maps mixed
    alone = [score_answer(engine, t, kv, hm)[0] for t, kv, hm in zip(tasks, kvs, maps)]
    got = [float(row.gather(1, torch.tensor(t.answer)[:, None]).mean()) for row, t in zip(rows, tasks)]
    assert got == pytest.approx(alone, abs=1e-4)
    assert got[0] != pytest.approx(got[1], abs=1e-4)                      # the maps do differ here
    assert all(row.shape == (len(task.answer), engine.dims.vocab_size) for row in rows)


@pytest.mark.parametrize("family", [*FAMILIES, "passkey"])
def test_chat_tasks_are_the_same_words_as_the_service_renders_the_conversation(tokenizer, family):
    """The chat format is the completion format's document, question and answer in the model's chat template:
    the tokens are what the template renders for the whole conversation (document, acknowledgement, the
    intervening exchange, the question and the reply's start), cut where the turns are cached."""
    from services.engine.retrieval_tasks import READ_REPLY, READ_REQUEST

    plain = retrieval_tasks(family, 400, 2, seed=5, tokenizer=tokenizer, part="bench")
    chat = retrieval_tasks(family, 400, 2, seed=5, tokenizer=tokenizer, part="bench", chat=True)
    for p, c in zip(plain, chat):
        document = tokenizer.decode(p.document, skip_special_tokens=True)
        asked, reply = tokenizer.decode(p.question).strip().removeprefix("Question: ").split("? ")
        messages = [{"role": "user", "content": READ_REQUEST + document}, {"role": "assistant", "content": READ_REPLY}]
        if p.interlude:
            other, other_reply = tokenizer.decode(p.interlude).strip().removeprefix("Question: ").split("? ")
            messages += [{"role": "user", "content": other + "?"}, {"role": "assistant", "content": other_reply}]
        rendered = tokenizer.apply_chat_template(messages + [{"role": "user", "content": asked + "?"}],
                                                 tokenize=False, add_generation_prompt=True)
        whole = tokenizer.decode(c.document + list(c.interlude) + c.question + c.answer)
        assert whole == rendered + reply + tokenizer.decode(p.answer)
        assert tokenizer.decode(c.document).endswith("<|im_start|>assistant\n" + READ_REPLY)
        assert tokenizer.decode(c.question).startswith("<|im_end|>")     # the cached reply's turn closes first
        assert c.answer_text == p.answer_text and tokenizer.decode(c.answer).strip() == p.answer_text
        assert tokenizer.decode(c.answer[:1]).strip()                     # no bare space left to score
        assert c.depth == p.depth and len(c.document) - len(p.document) < 60


def test_copy_tasks_have_no_chat_format():
    with pytest.raises(ValueError, match="no chat format"):
        retrieval_tasks("copy", 120, 1, seed=3, vocab=(10, 200), chat=True)
