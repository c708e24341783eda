"""A turn that fails or ends before the scheduler started it leaves its session as it was.

A real gRPC server on loopback with real Redis and the tiny model. Bad chat input (a template's own
`raise_exception`) is INVALID_ARGUMENT; any failure before the turn started (while encoding, at admission) only
releases a continued session, while a failure mid-turn still marks it lost; a restore that fails after its turn
was cancelled leaves nothing behind; a Generate cancelled (or aborted) while queued leaves no session, and names
none.
"""
from __future__ import annotations

import gc
import threading
import weakref

import grpc
import pytest
import torch

from services.engine import Engine, SamplingParams, hf
from services.inference.client import RazorClient, collect
from services.inference.errors import StoreUnavailable
from tests.test_abort_logprobs import PROMPT, TURN
from tests.test_service import rpc_error, wait_until

Code = grpc.StatusCode
SPILLED, LOST = 2, 3   # SessionLocation
# Mistral / Llama-2 style: the template itself refuses roles that do not alternate.
ALTERNATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
             "{% endif %}{% endfor %}")
USER = {"role": "user", "content": "Where did the fox go?"}
# The turn after a failure is sampled with a fixed seed (as tests/test_service.py's SAMPLED) and its logprobs are
# compared: the tiny random model's greedy tokens barely depend on its attention, so a cache the failure damaged
# could still match greedily.
SAMPLING = dict(temperature=1.0, seed=7, logprobs=True)
LOGPROB_ATOL = 1e-4   # tests/test_engine_batching.py's


def sampled_control(loaded, head_map, first_tokens: int, turn_tokens: int) -> tuple[list[int], list[float]]:
    """The engine alone: a first turn of `first_tokens` greedy tokens, then TURN sampled -> its (tokens, logprobs)."""
    engine = Engine(loaded, head_map)
    state, _ = engine.generate(engine.encode(text=PROMPT), SamplingParams(max_new_tokens=first_tokens))
    logprobs: list[float] = []
    result = engine.continue_session(state, engine.encode_turn(state.last_token, text=TURN),
                                     SamplingParams(max_new_tokens=turn_tokens, **SAMPLING),
                                     lambda event: logprobs.append(event.logprob))
    return result.token_ids, logprobs


def assert_like_control(reply, control: tuple[list[int], list[float]]) -> None:
    tokens, logprobs = control
    assert reply.token_ids == tokens
    torch.testing.assert_close(torch.tensor(reply.logprobs), torch.tensor(logprobs, dtype=torch.float32),
                               atol=LOGPROB_ATOL, rtol=0)


def test_a_chat_template_refusal_is_invalid_argument_and_the_session_continues(monkeypatch, start_server,
                                                                                 tiny_loaded):
    monkeypatch.setattr(tiny_loaded.tokenizer, "chat_template", ALTERNATE + tiny_loaded.tokenizer.chat_template)
    server = start_server()
    with RazorClient(server.target) as client:
        sid = client.generate(messages=[USER], max_new_tokens=3).session_id
        for call in (lambda: client.stream_continue(sid, messages=[USER, USER], max_new_tokens=3),
                     lambda: client.stream_generate(messages=[{"role": "assistant", "content": "hi"}])):
            error = rpc_error(call)
            assert error.code() == Code.INVALID_ARGUMENT, error.details()
            assert "chat template refused" in error.details() and "roles must alternate" in error.details()
        session = client.get_session(sid)
        assert session.location != LOST and not session.lost_reason and not session.busy
        assert [s.session_id for s in client.list_sessions()] == [sid], "a refused Generate left a session"
        assert client.continue_session(sid, messages=[USER], max_new_tokens=3).generated_tokens == 3


@pytest.mark.parametrize("where", ["encoding", "admission"])
def test_an_unexpected_failure_before_the_turn_started_leaves_the_session_as_it_was(where, monkeypatch,
                                                                                      start_server, tiny_loaded,
                                                                                      tiny_head_map):
    server = start_server()
    runtime = server.runtime
    target, name = (runtime.engine, "encode_turn") if where == "encoding" else (runtime.admission, "admit")

    def broken(*args, **kwargs):
        monkeypatch.undo()   # once
        raise RuntimeError(f"a bug in {where}")
    with RazorClient(server.target) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=3).session_id
        length = client.get_session(sid).length
        monkeypatch.setattr(target, name, broken)
        assert rpc_error(lambda: client.stream_continue(sid, text=TURN, max_new_tokens=4)).code() == Code.INTERNAL
        wait_until(lambda: not client.get_session(sid).busy)
        assert not client.get_session(sid).lost_reason
        assert client.get_session(sid).length == length, "the failed turn added nothing to the session"
        more = client.continue_session(sid, text=TURN, max_new_tokens=4, **SAMPLING)
    assert_like_control(more, sampled_control(tiny_loaded, tiny_head_map, 3, 4))


def test_a_failure_after_the_turn_started_still_marks_the_session_lost(monkeypatch, start_server):
    server = start_server()

    def broken(*args, **kwargs):
        raise RuntimeError("the device failed mid-step")
    with RazorClient(server.target) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=3).session_id
        monkeypatch.setattr(hf, "forward_step", broken)
        assert rpc_error(lambda: client.stream_continue(sid, text=TURN, max_new_tokens=4)).code() == Code.INTERNAL
        monkeypatch.undo()
        wait_until(lambda: client.get_session(sid).location == LOST)
        assert "interrupted a turn" in client.get_session(sid).lost_reason


class LateRestoreError(StoreUnavailable):
    """A restore's failure (a subclass so that a weak reference can watch it)."""


def test_a_restore_failing_after_its_turn_was_cancelled_is_not_kept(monkeypatch, start_server, tiny_loaded,
                                                                    tiny_head_map):
    server = start_server(kv_budget_bytes=1)   # every idle session is spilled
    runtime = server.runtime
    entered, fail, raised = threading.Event(), threading.Event(), []

    def failing_load(sid, make_room):
        entered.set()
        fail.wait(30)
        error = LateRestoreError("Redis went away while restoring")
        raised.append(weakref.ref(error))
        raise error
    with RazorClient(server.target, timeout_s=60) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=3).session_id
        wait_until(lambda: client.get_session(sid).location == SPILLED)
        length = client.get_session(sid).length
        monkeypatch.setattr(runtime.store, "load", failing_load)
        stream = client.stream_continue(sid, text=TURN, max_new_tokens=4)
        assert entered.wait(30), "the turn never asked for its session's restore"
        stream.cancel()
        assert rpc_error(lambda: list(stream)).code() == Code.CANCELLED
        assert runtime.wait_idle(30), "the cancelled turn never ended"
        monkeypatch.undo()
        fail.set()   # only now does the restore fail: its turn has already ended
        runtime.io.submit(lambda: None).result(timeout=30)   # the I/O thread is done with the restore job
        gc.collect()
        assert raised and raised[0]() is None, "a finished turn's restore error is still held"
        assert client.get_session(sid).length == length, "the cancelled turn added nothing to the session"
        more = client.continue_session(sid, text=TURN, max_new_tokens=4, **SAMPLING)
    assert_like_control(more, sampled_control(tiny_loaded, tiny_head_map, 3, 4))


def test_a_generate_cancelled_before_admission_leaves_no_session(start_server):
    server = start_server(max_running=1, step_tokens=64, max_sessions=1)
    runtime = server.runtime
    with RazorClient(server.target, timeout_s=60) as client:
        blocker = client.stream_generate(prompt=PROMPT, max_new_tokens=3000, keep_session=False)
        next(blocker)   # the one running slot is taken
        queued = client.stream_generate(prompt=PROMPT, max_new_tokens=3)
        wait_until(lambda: len(runtime.scheduler.waiting) == 1)
        queued.cancel()
        assert rpc_error(lambda: list(queued)).code() == Code.CANCELLED
        wait_until(lambda: not runtime.scheduler.waiting)   # dropped while the blocker still runs
        blocker.cancel()
        assert runtime.wait_idle(30)
        runtime.io.submit(lambda: None).result(timeout=30)   # the discard's Redis part has run
        assert list(client.list_sessions()) == [] and runtime.store.owned() == []
        # The one session max_sessions allows is still free.
        assert client.generate(prompt=PROMPT, max_new_tokens=2).generated_tokens == 2


def test_a_generate_aborted_while_queued_names_no_session(start_server):
    """Aborted from another connection before it started, a Generate's stream ends with a cancelled completion
    that names no session: the new session was discarded, and continuing it would be NOT_FOUND."""
    server = start_server(max_running=1, step_tokens=64)
    runtime = server.runtime
    with RazorClient(server.target, timeout_s=60) as client, RazorClient(server.target, timeout_s=60) as other:
        blocker = client.stream_generate(prompt=PROMPT, max_new_tokens=3000, keep_session=False)
        next(blocker)   # the one running slot is taken
        queued = client.stream_generate(prompt=PROMPT, max_new_tokens=3, request_id="queued-turn")
        wait_until(lambda: len(runtime.scheduler.waiting) == 1)
        assert other.abort("queued-turn")
        reply = collect(queued)
        assert reply.finish_reason == "cancelled" and reply.generated_tokens == 0
        assert reply.session_id == "" and reply.request_id == "queued-turn"
        blocker.cancel()
        assert runtime.wait_idle(30)
        runtime.io.submit(lambda: None).result(timeout=30)
        assert list(client.list_sessions()) == []
