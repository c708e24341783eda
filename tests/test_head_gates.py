"""Learned KV-head gates (head_gates.py): the gated forward reproduces the engine's compressed cache exactly at
0/1 gates, and training ranks a planted retrieval head first."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from services.engine import CompressionParams, Engine, HeadMap
from services.engine.evaluation import full_prefill, retrieval_tasks, score_answer
from services.engine.head_gates import GateContext, GateDocument, GateParams, answer_logprobs, train_gates
from tests.engine_models import tiny
from tests.planted_loaded import planted_loaded


def _mean_answer_logprob(logp: torch.Tensor, answer) -> float:
    # logp: [A, V]
    return float(logp.gather(1, torch.tensor(answer)[:, None]).mean())


@pytest.mark.parametrize("n_full", [0, 3, 7])
def test_gates_at_zero_and_one_equal_the_compressed_cache(n_full):
    loaded = tiny()
    fp = loaded.fingerprint
    engine = Engine(loaded)
    heads = random.Random(n_full).sample([(l, h) for l in range(fp.n_layers) for h in range(fp.n_kv_heads)], n_full)
    kv = [[h for h in range(fp.n_kv_heads) if (l, h) in heads] for l in range(fp.n_layers)]
    zeros = [[0.0] * fp.n_heads for _ in range(fp.n_layers)]
    shape = CompressionParams(sink=2, min_window=24, ratio=1e9)
    head_map = HeadMap(fp, zeros, zeros, [], kv, shape, method="test")
    alpha = torch.zeros(fp.n_layers, fp.n_kv_heads)
    for head in heads:
        alpha[head] = 1.0
    ctx = GateContext(alpha)
    tasks = retrieval_tasks("copy", 200, 2, seed=5, vocab=(10, 200))
    tasks += [replace(t, question=t.question[:2]) for t in retrieval_tasks("copy", 120, 2, seed=6, vocab=(10, 200))]
    kvs = [full_prefill(engine, t.document) for t in tasks]
    with torch.no_grad():   # one batch: documents of two lengths, turns of two lengths (right-padded)
        got = answer_logprobs(engine.model, tasks, [GateDocument(kv, shape.sink, shape.min_window) for kv in kvs],
                              ctx)
    for task, kv, logp in zip(tasks, kvs, got):
        expected, _ = score_answer(engine, task, kv, head_map)
        assert _mean_answer_logprob(logp, task.answer) == pytest.approx(expected, abs=1e-4)


def test_all_full_equals_the_full_cache():
    loaded = tiny()
    engine = Engine(loaded)
    ctx = GateContext(torch.zeros(loaded.fingerprint.n_layers, loaded.fingerprint.n_kv_heads))
    ctx.all_full = True
    task = retrieval_tasks("copy", 150, 1, seed=9, vocab=(10, 200))[0]
    full_kv = full_prefill(engine, task.document)
    expected, _ = score_answer(engine, task, full_kv, HeadMap.full(loaded.fingerprint))
    with torch.no_grad():
        logp, = answer_logprobs(engine.model, [task], [GateDocument(full_kv, 2, 8)], ctx)
    assert _mean_answer_logprob(logp, task.answer) == pytest.approx(expected, abs=1e-4)


def test_a_documents_local_view_keeps_sink_window_and_one_weighted_mean():
    keys = torch.arange(10.0).view(1, 1, 10, 1).expand(1, 2, 10, 3).contiguous()   # [1, Hkv, N, D]
    (k, v, bias), = GateDocument(([keys], [keys + 100]), sink=2, window=3).local
    assert sorted(k[0, 0, :-1, 0].tolist()) == [0, 1, 7, 8, 9] and k[0, 0, -1, 0] == 4.0   # 2..6 as their mean
    assert v[0, 1, -1, 0].item() == 104.0
    assert bias.tolist() == pytest.approx([0, 0, 0, 0, 0, torch.log(torch.tensor(5.0)).item()])
    (k, _, bias), = GateDocument(([keys], [keys]), sink=4, window=20).local   # nothing dropped: no extra row
    assert k.shape[2] == 10 and bias.abs().sum() == 0


def test_training_ranks_the_planted_induction_head_first():
    loaded = planted_loaded(copy_output=True, induction_head=(1, 2))
    engine = Engine(loaded)
    tasks = retrieval_tasks("copy", 300, 4, seed=3, vocab=(2, 256), bos=0)
    kvs = [full_prefill(engine, t.document) for t in tasks]
    seen = []
    scores = train_gates(engine.model, tasks, kvs, 2, loaded.fingerprint.n_kv_heads, 2, 16,
                         GateParams(steps=40, batch=4), lambda done, total, stage: seen.append((done, total)))
    assert scores.shape == (2, loaded.fingerprint.n_kv_heads)
    assert divmod(int(scores.argmax()), loaded.fingerprint.n_kv_heads) == (1, 1)   # query head 2 // group 2
    assert seen[-1] == (40, 40)


def test_gate_params():
    params = GateParams(steps=101, first_penalty=0.01, last_penalty=1.0)
    assert params.penalty(0) == pytest.approx(0.01) and params.penalty(100) == pytest.approx(1.0)
    assert params.penalty(50) == pytest.approx(0.1)
    for bad in (dict(steps=5), dict(batch=0), dict(lr=0), dict(first_penalty=0), dict(first_penalty=2.0)):
        with pytest.raises(ValueError, match="gate training"):
            GateParams(**bad)
