"""Request ids, Abort and top-N logprobs (issue 16, items 1 and 2) over real gRPC servers on loopback, one real
Redis and the tiny random-weight model.

Abort is checked against the model loop's own progress (a turn must stop within one step of the Abort call
returning), and an aborted session against the engine replaying it in-process (it continues exactly as a session
whose first turn generated as many tokens). Top-N logprobs are checked against log_softmax over the logits the
engine computes step by step in-process for the same tokens.
"""
from __future__ import annotations

import json
import re
import threading
import time

import grpc
import pytest
import redis
import torch

from services.engine import Engine, SamplingParams, forward
from services.inference.client import RazorClient
from services.inference.requests import RequestNotFound, RequestRegistry, request_key
from tests.test_service import rpc_error
from tests.test_service_cli import cli

PROMPT = "The fox walked along the river until it reached the old mill, and"
TURN = " What did the fox find there?"
CANCELLED, LENGTH = 3, 1   # FinishReason
KEY_A, KEY_B = "alice-key", "bob-key"


class Progress:
    """Slows the server's model loop to `step_s` per step (so a test can act between steps) and records how many
    tokens its running turns had generated after each step."""

    def __init__(self, server, step_s: float):
        self.scheduler, self.tokens = server.runtime.scheduler, 0
        step = self.scheduler.step

        def slow_step() -> int:
            time.sleep(step_s)
            ran = step()
            self.tokens = max([self.tokens, *(len(t.generated) for t in list(self.scheduler.running))])
            return ran
        self.scheduler.step = slow_step   # the loop looks the method up on every step


def read_chunks(stream, n: int) -> list:
    return [next(stream) for _ in range(n)]


def control(loaded, head_map, first_tokens: int, turn_tokens: int) -> tuple[list[int], list[int]]:
    """The engine alone: a first turn of `first_tokens` greedy tokens, then TURN."""
    engine = Engine(loaded, head_map)
    state, first = engine.generate(engine.encode(text=PROMPT), SamplingParams(max_new_tokens=first_tokens))
    ids = engine.encode_turn(state.last_token, text=TURN)
    return first.token_ids, engine.continue_session(state, ids, SamplingParams(max_new_tokens=turn_tokens)).token_ids


def abort_mid_stream(streaming: RazorClient, aborting: RazorClient, progress: Progress, request_id: str):
    """Start a long turn on `streaming`, abort it from `aborting` after a few tokens -> (the responses, the tokens
    the model loop had generated when Abort returned)."""
    stream = streaming.stream_generate(prompt=PROMPT, max_new_tokens=200, request_id=request_id)
    head = read_chunks(stream, 3)
    assert aborting.abort(request_id) is True
    at_abort = progress.tokens
    return head + list(stream), at_abort


def assert_stopped_within_one_step(responses, at_abort: int, request_id: str, hops: int = 0) -> int:
    """`hops`: steps the abort may spend on its way to another replica (pub/sub is asynchronous)."""
    final = responses[-1].completion
    assert final.finish_reason == CANCELLED
    assert final.usage.generated_tokens <= at_abort + 1 + hops, "the turn ran on for more than one step after Abort"
    assert {r.request_id for r in responses} == {request_id}, "every message names the request"
    assert len(responses) - 1 == final.usage.generated_tokens, "every generated token was streamed"
    return final.usage.generated_tokens


def test_abort_from_a_second_connection_stops_the_turn_and_the_session_continues_like_its_control(
        start_server, tiny_loaded, tiny_head_map):
    server = start_server()
    progress = Progress(server, step_s=0.05)
    with RazorClient(server.target) as streaming, RazorClient(server.target) as aborting:
        responses, at_abort = abort_mid_stream(streaming, aborting, progress, "turn-1")
        generated = assert_stopped_within_one_step(responses, at_abort, "turn-1")
        error = rpc_error(lambda: aborting.abort("turn-1"))
        assert error.code() == grpc.StatusCode.NOT_FOUND, "an ended turn's id is unknown again"
        sid = responses[0].session_id
        # The id is free as soon as the client saw the end: the next turn may reuse it.
        more = streaming.continue_session(sid, text=TURN, max_new_tokens=6, request_id="turn-1")
    first, second = control(tiny_loaded, tiny_head_map, generated, 6)
    assert [t for r in responses[:-1] for t in r.chunk.token_ids] == first
    assert more.token_ids == second and more.finish_reason == "length" and more.request_id == "turn-1"


class SlowToForget:
    """The registry's Redis client, with the I/O thread's delete of an ended turn's id taking `delay_s`."""

    def __init__(self, client, delay_s: float):
        self._client, self._delay_s = client, delay_s

    def __getattr__(self, name):
        return getattr(self._client, name)

    def eval(self, *args):
        if threading.current_thread().name.startswith("razor-io"):
            time.sleep(self._delay_s)
        return self._client.eval(*args)


def test_an_ended_turns_id_is_not_found_while_the_io_thread_is_still_deleting_it(start_server):
    """The model loop asks the I/O thread to forget an ended turn's id (for a stream nobody reads), and the stream
    forgets it too before its client hears the end. Here the I/O thread gets there first and is slow to delete the
    Redis key: the stream must wait for it, or an Abort sent after the end finds the key and answers "found"."""
    server = start_server()
    registry = server.runtime.requests
    registry.client = SlowToForget(registry.client, delay_s=0.5)
    unregister = registry.unregister

    def late_on_handler_threads(*args):
        if not threading.current_thread().name.startswith("razor-io"):
            time.sleep(0.1)   # the I/O thread takes the id first
        unregister(*args)
    registry.unregister = late_on_handler_threads
    with RazorClient(server.target) as client:
        stream = client.stream_generate(prompt=PROMPT, max_new_tokens=200, request_id="slow-1")
        read_chunks(stream, 1)
        assert client.abort("slow-1") is True
        assert list(stream)[-1].completion.finish_reason == CANCELLED
        error = rpc_error(lambda: client.abort("slow-1"))
        assert error.code() == grpc.StatusCode.NOT_FOUND, "the client saw the end: its id is unknown again"
        assert client.generate(prompt=PROMPT, max_new_tokens=2, request_id="slow-1").request_id == "slow-1"


def test_an_abort_while_an_ended_turns_id_is_being_deleted_is_not_found(service_redis_url):
    registry = RequestRegistry(SlowToForget(redis.Redis.from_url(service_redis_url), delay_s=0.5), "replica-a")
    cancel = threading.Event()
    registry.register("alice", "ending-1", cancel)
    forget = threading.Thread(target=registry.unregister, args=("alice", "ending-1", cancel), name="razor-io-0")
    forget.start()
    time.sleep(0.1)   # the delete is under way
    with pytest.raises(RequestNotFound):
        registry.abort("alice", "ending-1")
    assert not cancel.is_set(), "an ended turn is not cancelled"
    forget.join()
    assert registry.client.get(request_key("alice", "ending-1")) is None
    with pytest.raises(RequestNotFound):
        registry.abort("alice", "ending-1")


@pytest.mark.parametrize("store", ["redis", "redis cluster"])
def test_abort_reaches_a_turn_running_on_another_replica(store, request, start_server, tiny_loaded, tiny_head_map):
    where = {}
    if store == "redis cluster":   # the registry key and the channel go through the sessions' Redis
        where = dict(sessions_redis_url=request.getfixturevalue("redis_cluster").url, sessions_redis_cluster=True)
    a, b = start_server(replica_id="a", **where), start_server(replica_id="b", **where)
    progress = Progress(a, step_s=0.1)
    with RazorClient(a.target) as on_a, RazorClient(b.target) as on_b:
        stream = on_a.stream_generate(prompt=PROMPT, max_new_tokens=200, request_id="far-1")
        head = read_chunks(stream, 3)
        duplicate = rpc_error(lambda: on_b.generate(prompt="Another turn", max_new_tokens=2, request_id="far-1"))
        assert duplicate.code() == grpc.StatusCode.ALREADY_EXISTS, "the id runs on replica a"
        assert on_b.abort("far-1") is True
        at_abort = progress.tokens
        responses = head + list(stream)
        # A 0.1 s step leaves the published abort ample time to arrive; one step more covers a loaded machine.
        generated = assert_stopped_within_one_step(responses, at_abort, "far-1", hops=1)
        more = on_b.continue_session(responses[0].session_id, text=TURN, max_new_tokens=6)
    first, second = control(tiny_loaded, tiny_head_map, generated, 6)
    assert [t for r in responses[:-1] for t in r.chunk.token_ids] == first
    assert more.token_ids == second


def test_abort_by_another_tenant_or_of_an_unknown_id_is_not_found(start_server):
    server = start_server(api_keys=f"alice:{KEY_A},bob:{KEY_B}")
    Progress(server, step_s=0.03)
    with RazorClient(server.target, token=KEY_A) as alice, RazorClient(server.target, token=KEY_B) as bob:
        stream = alice.stream_generate(prompt=PROMPT, max_new_tokens=20, request_id="shared-1")
        head = read_chunks(stream, 1)
        foreign = rpc_error(lambda: bob.abort("shared-1"))
        unknown = rpc_error(lambda: bob.abort("never-sent"))
        assert foreign.code() == unknown.code() == grpc.StatusCode.NOT_FOUND
        assert foreign.details() == unknown.details(), "another tenant's id looks exactly like an unknown one"
        # Ids are per tenant: bob may run a turn under the same id meanwhile.
        assert bob.generate(prompt="Bob's turn", max_new_tokens=2, request_id="shared-1").finish_reason == "length"
        responses = head + list(stream)
        assert responses[-1].completion.finish_reason == LENGTH and len(responses) == 21, "alice's turn ran on"
        assert rpc_error(lambda: alice.abort("unknown-2")).code() == grpc.StatusCode.NOT_FOUND


def test_the_server_assigns_a_request_id_when_the_client_sends_none(start_server):
    server = start_server()
    with RazorClient(server.target) as client:
        first = list(client.stream_generate(prompt=PROMPT, max_new_tokens=3))
        second = client.continue_session(first[0].session_id, text=TURN, max_new_tokens=2)
    ids = {r.request_id for r in first}
    assert len(ids) == 1 and re.fullmatch(r"[0-9a-f]{32}", ids.pop())
    assert re.fullmatch(r"[0-9a-f]{32}", second.request_id) and second.request_id != first[0].request_id


def test_bad_request_ids_are_invalid_argument_and_never_echoed(start_server):
    server = start_server()
    too_long = "x" * 100 + "END-OF-A-VERY-LONG-ID" + "y" * 100
    with RazorClient(server.target) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=2, request_id="a" * 128).session_id   # the longest
        calls = {"Generate": lambda rid: client.generate(prompt=PROMPT, max_new_tokens=2, request_id=rid),
                 "ContinueSession": lambda rid: client.continue_session(sid, text=TURN, max_new_tokens=2,
                                                                        request_id=rid),
                 "Abort": client.abort}
        for name, call in calls.items():
            for bad in (too_long, "a" * 129, "has space", "tab\there", "caf\u00e9", "semi;colon"):
                error = rpc_error(lambda: call(bad))
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, bad)
                assert "request_id" in error.details() and bad not in error.details(), (name, bad)
        assert "empty" in rpc_error(lambda: client.abort("")).details()
        assert client.get_session(sid).length > 0, "refused turns left the session as it was"


def reference_top_logprobs(loaded, head_map, turns: list[tuple[list[int], list[int]]], k: int):
    """Per generated token: (the k most likely token ids, their log-probabilities, the logprob of each token
    actually generated) from log_softmax over the logits of the engine run step by step in-process.
    `turns`: (the tokens each turn feeds, the tokens the service generated in it)."""
    engine = Engine(loaded, head_map)
    cache, pending, out = engine.new_cache(head_map), [], []
    for fed, generated in turns:
        feed = pending + fed
        for token in generated:
            logp = torch.log_softmax(forward(engine.model, feed, cache).float(), dim=-1)   # [V]
            top = torch.topk(logp, k)
            out.append((top.indices.tolist(), top.values.tolist(), float(logp[token])))
            feed = [token]
        pending = feed   # the last sampled token is fed with the next turn
    return out


def assert_top_logprobs(reply, reference, k: int) -> None:
    assert len(reply.top_logprobs) == len(reply.token_ids) == len(reference)
    for candidates, logprob, (ids, values, own) in zip(reply.top_logprobs, reply.logprobs, reference):
        assert len(candidates) == k
        assert [c.token_id for c in candidates] == ids
        assert [c.logprob for c in candidates] == pytest.approx(values, abs=1e-5)
        assert logprob == pytest.approx(own, abs=1e-5)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.7, "top_k": 50, "seed": 7}], ids=["greedy", "sampled"])
def test_top_logprobs_equal_log_softmax_over_the_models_logits(start_server, tiny_loaded, tiny_head_map, sampling):
    """Raw model distribution, whatever the sampling settings: temperature, top_k and top_p change which token is
    drawn, never the reported log-probabilities."""
    server = start_server()
    engine = Engine(tiny_loaded, tiny_head_map)
    with RazorClient(server.target) as client:
        first = client.generate(prompt=PROMPT, max_new_tokens=6, logprobs=True, top_logprobs=5, **sampling)
        second = client.continue_session(first.session_id, text=TURN, max_new_tokens=4, logprobs=True,
                                         top_logprobs=3, **sampling)
        plain = client.generate(prompt=PROMPT, max_new_tokens=3)
    prompt_ids = engine.encode(text=PROMPT)
    turn_ids = engine.encode_turn(first.token_ids[-1], text=TURN)
    for reply, k in ((first, 5), (second, 3)):
        reference = reference_top_logprobs(tiny_loaded, tiny_head_map,
                                           [(prompt_ids, first.token_ids), (turn_ids, second.token_ids)], k)
        assert_top_logprobs(reply, reference[:6] if reply is first else reference[6:], k)
    assert all(c.text == engine.tokenizer.decode([c.token_id]) for top in first.top_logprobs for c in top)
    assert plain.top_logprobs == [], "none unless asked for"


def test_top_logprobs_are_per_request_inside_one_batch(start_server):
    server = start_server()
    Progress(server, step_s=0.02)   # the turns overlap: they decode in the same steps
    replies: dict[int, object] = {}
    with RazorClient(server.target) as client:
        def run(k: int) -> None:
            replies[k] = client.generate(prompt=f"{PROMPT} ({k})", max_new_tokens=8, top_logprobs=k)
        threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1, 7, 20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(replies) == [0, 1, 7, 20], "a thread's call failed"   # else the loop below checks fewer
    for k, reply in replies.items():
        assert len(reply.token_ids) == 8 and [len(top) for top in reply.top_logprobs] == ([k] * 8 if k else [])
        for token, top in zip(reply.token_ids, reply.top_logprobs):
            assert top[0].token_id == token, "greedy draws the most likely token"
            assert [c.logprob for c in top] == sorted((c.logprob for c in top), reverse=True)


def test_bad_top_logprobs_are_invalid_argument(start_server):
    server = start_server()
    with RazorClient(server.target) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=2, top_logprobs=20).session_id
        for k in (21, -1, 1000):
            for call in (lambda: client.generate(prompt=PROMPT, max_new_tokens=2, top_logprobs=k),
                         lambda: client.continue_session(sid, text=TURN, max_new_tokens=2, top_logprobs=k)):
                error = rpc_error(call)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_logprobs" in error.details()


def test_cli_request_id_top_logprobs_and_abort(start_server):
    target = start_server().target
    out = cli(target, "generate", PROMPT, "--max-new-tokens", "3", "--request-id", "cli-1", "--top-logprobs", "2",
              "--json")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["request_id"] == "cli-1" and [len(top) for top in reply["top_logprobs"]] == [2, 2, 2]
    missing = cli(target, "abort", "cli-1")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
