"""The service under load: many streams decode together inside a KV budget made for fewer.

A real gRPC server on loopback with real Redis and the tiny GQA model. A watcher thread samples the runtime
while 32 clients hold two-turn conversations: the device bytes of resident caches never exceed the budget,
a session decoding in the running batch is never spilled, and every conversation equals the same conversation
run alone in-process on the engine.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from services.engine import Engine, SamplingParams
from services.inference.client import RazorClient

N_CLIENTS = 32
NEW_TOKENS = 6
REDIS = 2   # SessionLocation
# As tests/test_service.py's SAMPLED: the tiny random model's greedy tokens barely depend on its attention, so a
# turn compared with its control after a cancellation is sampled, and its logprobs compared too.
SAMPLING = dict(temperature=1.0, seed=7, logprobs=True)
LOGPROB_ATOL = 1e-4   # tests/test_engine_batching.py's


def prompt(i: int) -> str:
    return f"Conversation {i}: " + " ".join(["fox", "river", "hill", "bird", "song"][j % 5] for j in range(8 + 3 * i))


def turn(i: int) -> str:
    return f" And then, number {i}, what happened?"


def alone(loaded, head_map, i: int) -> list[list[int]]:
    engine, params = Engine(loaded, head_map), SamplingParams(max_new_tokens=NEW_TOKENS)
    state, first = engine.generate(engine.encode(text=prompt(i)), params)
    second = engine.continue_session(state, engine.encode_turn(state.last_token, text=turn(i)), params)
    return [first.token_ids, second.token_ids]


class Watcher(threading.Thread):
    """Samples resident device bytes and the running batch until stopped; records every violation."""

    def __init__(self, runtime):
        super().__init__(daemon=True)
        self.runtime, self.stop_flag, self.violations = runtime, threading.Event(), []
        self.max_running = self.max_resident = 0

    def run(self) -> None:
        store = self.runtime.store
        while not self.stop_flag.is_set():
            running = [t.request for t in list(self.runtime.scheduler.running)]
            entries = {e.session_id: e for e in store.owned()}
            # Every cache on the device: resident sessions' and running turns' (a new session joins the store
            # only when its first turn ends).
            states = [store.resident_state(sid) for sid in entries] + [r.state for r in running]
            resident = sum(s.nbytes() for s in {id(s): s for s in states if s is not None}.values())
            self.max_resident = max(self.max_resident, resident)
            if resident > store.budget_bytes:
                self.violations.append(f"resident {resident} > budget {store.budget_bytes}")
            self.max_running = max(self.max_running, len(running))
            for request in running:
                entry = entries.get(request.tag)
                if entry is not None and entry.location != "device":
                    self.violations.append(f"session {request.tag} was spilled while it decoded")
            time.sleep(0.002)


def converse(target: str, i: int) -> list[list[int]]:
    with RazorClient(target, timeout_s=300) as client:
        first = client.generate(prompt=prompt(i), max_new_tokens=NEW_TOKENS)
        second = client.continue_session(first.session_id, text=turn(i), max_new_tokens=NEW_TOKENS)
    return [first.token_ids, second.token_ids]


def test_32_streams_within_a_budget_for_fewer_equal_their_sequential_controls(start_server, tiny_loaded,
                                                                               tiny_head_map):
    fp = tiny_loaded.fingerprint
    per_session = 2 * fp.n_layers * fp.n_kv_heads * fp.head_dim * 4 * 160   # ~160 tokens of full cache each
    server = start_server(kv_budget_bytes=8 * per_session, max_workers=N_CLIENTS + 8, max_running=32)
    watcher = Watcher(server.runtime)
    watcher.start()
    try:
        with ThreadPoolExecutor(N_CLIENTS) as pool:
            outs = list(pool.map(lambda i: converse(server.target, i), range(N_CLIENTS)))
    finally:
        watcher.stop_flag.set()
        watcher.join()
    assert watcher.violations == []
    assert watcher.max_running > 1, "turns never ran together"
    assert watcher.max_resident > 0.5 * 8 * per_session, "the budget was meant to be the constraint"
    _, resident, spilled = server.runtime.store.usage()
    assert spilled > 0, "the budget was meant to force spills"
    for i, out in enumerate(outs):
        assert out == alone(tiny_loaded, tiny_head_map, i), f"conversation {i} differs from its control"


def test_oversized_input_is_refused_before_tokenizing_and_others_keep_streaming(start_server):
    server = start_server(max_input_chars=2_000)
    with RazorClient(server.target) as client:
        stream = client.stream_generate(prompt=prompt(1), max_new_tokens=40)
        first = next(stream)
        with pytest.raises(grpc.RpcError) as info:
            client.generate(prompt="x" * 2_001, max_new_tokens=4)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "2001 characters" in info.value.details()
        rest = list(stream)
    assert first.session_id and rest[-1].HasField("completion") and rest[-1].completion.usage.generated_tokens == 40


def wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def sampled_second_turn(loaded, head_map, i: int) -> tuple[list[int], list[float]]:
    """The engine alone: conversation i's greedy first turn, then its second turn sampled -> (tokens, logprobs)."""
    engine = Engine(loaded, head_map)
    state, _ = engine.generate(engine.encode(text=prompt(i)), SamplingParams(max_new_tokens=NEW_TOKENS))
    logprobs: list[float] = []
    result = engine.continue_session(state, engine.encode_turn(state.last_token, text=turn(i)),
                                     SamplingParams(max_new_tokens=NEW_TOKENS, **SAMPLING),
                                     lambda event: logprobs.append(event.logprob))
    return result.token_ids, logprobs


def test_cancelling_a_queued_turn_of_a_spilled_session_leaves_it_intact(start_server, tiny_loaded, tiny_head_map):
    """A continued turn cancelled while it waits (its session still in Redis) ends cleanly; the session then
    continues exactly as its control does."""
    server = start_server(kv_budget_bytes=1, max_running=1, step_tokens=64)   # one turn at a time, all spilled
    scheduler = server.runtime.scheduler
    with RazorClient(server.target, timeout_s=120) as client:
        sid = client.generate(prompt=prompt(3), max_new_tokens=NEW_TOKENS).session_id
        wait_until(lambda: client.get_session(sid).location == REDIS)   # spilled once its turn ended
        length = client.get_session(sid).length
        blocker = client.stream_generate(prompt=prompt(4), max_new_tokens=300, keep_session=False)
        next(blocker)                                          # the one running slot is taken
        assert client.get_session(sid).location == REDIS and not scheduler.waiting
        queued = client.stream_continue(sid, text=turn(3), max_new_tokens=NEW_TOKENS)
        wait_until(lambda: [r.tag for r in list(scheduler.waiting)] == [sid])   # really queued behind the blocker
        assert sid not in [t.request.tag for t in list(scheduler.running)]
        queued.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(queued)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        wait_until(lambda: not scheduler.waiting)              # dropped while the blocker still runs
        blocker.cancel()
        wait_until(lambda: not client.get_session(sid).busy)
        session = client.get_session(sid)
        assert session.length == length and not session.lost_reason, "the cancelled turn left the session as it was"
        second = client.continue_session(sid, text=turn(3), max_new_tokens=NEW_TOKENS, **SAMPLING)
    tokens, logprobs = sampled_second_turn(tiny_loaded, tiny_head_map, 3)
    assert second.token_ids == tokens
    torch.testing.assert_close(torch.tensor(second.logprobs), torch.tensor(logprobs, dtype=torch.float32),
                               atol=LOGPROB_ATOL, rtol=0)
