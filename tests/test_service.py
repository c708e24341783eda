"""The gRPC service end to end: real server on loopback, real Redis, tiny random-weight model.

Outputs are compared with the engine called in-process with the same head map, so every
difference the service could introduce (session bookkeeping, spill/restore, restart) shows up.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
import torch

from services.engine import Engine, HeadMap, SamplingParams
from services.inference.client import RazorClient
from services.inference.spill import Spill

PROMPT = ("The quick brown fox jumps over the lazy dog near the river bank while the sun sets "
          "slowly behind the distant hills and the birds sing their evening songs")
TURNS = (" Then the fox ran into the forest to find its friends.", " What happened next?")
GREEDY = SamplingParams(max_new_tokens=8)
SAMPLED = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)  # sensitive to any change in logits


def engine_turns(loaded, head_map, prompt=PROMPT, turns=TURNS, params=GREEDY) -> list[list[int]]:
    """The same conversation run in-process on the engine."""
    engine = Engine(loaded, head_map)
    state, first = engine.generate(engine.encode(text=prompt), params)
    outs = [first.token_ids]
    for text in turns:
        outs.append(engine.continue_session(state, engine.encode_turn(state.last_token, text=text), params).token_ids)
    return outs


def service_turns(client, prompt=PROMPT, turns=TURNS, params=GREEDY, between=None) -> tuple[str, list[list[int]]]:
    kwargs = dict(max_new_tokens=params.max_new_tokens, temperature=params.temperature, seed=params.seed)
    reply = client.generate(prompt=prompt, **kwargs)
    outs = [reply.token_ids]
    for text in turns:
        if between:
            between(reply.session_id)
        outs.append(client.continue_session(reply.session_id, text=text, **kwargs).token_ids)
    return reply.session_id, outs


def full_cache_turns(loaded, engine, prompt=PROMPT, turns=TURNS, n=GREEDY.max_new_tokens) -> list[list[int]]:
    """Greedy decoding that re-runs the whole conversation with plain attention at every step."""
    ids, outs = list(engine.encode(text=prompt)), []
    for i in range(len(turns) + 1):
        if i:
            ids += engine.encode_turn(None, text=turns[i - 1])
        new = []
        for _ in range(n):
            with torch.no_grad():
                logits = loaded.model(torch.tensor([ids])).logits[0, -1]
            new.append(int(torch.argmax(logits)))
            ids.append(new[-1])
        outs.append(new)
    return outs


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)
    return info.value


def wait_until(predicate, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_generate_streams_chunks_then_one_completion(start_server, tiny_loaded, tiny_head_map):
    server = start_server()
    with RazorClient(server.target) as client:
        messages = list(client.stream_generate(prompt=PROMPT, max_new_tokens=8, logprobs=True))
    chunks, final = messages[:-1], messages[-1]
    assert len(chunks) == 8 and all(m.HasField("chunk") for m in chunks)
    assert final.HasField("completion") and final.completion.finish_reason == 1  # LENGTH
    assert len({m.session_id for m in messages}) == 1 and messages[0].session_id
    assert all(len(m.chunk.logprobs) == 1 and m.chunk.logprobs[0] <= 0 for m in chunks)
    usage = final.completion.usage
    assert (usage.generated_tokens, usage.cached_tokens) == (8, 0) and usage.prompt_tokens > 20
    assert final.completion.text == "".join(m.chunk.text for m in chunks)
    tokens = [t for m in chunks for t in m.chunk.token_ids]
    assert tokens == engine_turns(tiny_loaded, tiny_head_map, turns=())[0]


def test_three_turns_equal_the_engine_in_process(start_server, tiny_loaded, tiny_head_map):
    server = start_server()
    with RazorClient(server.target) as client:
        sid, outs = service_turns(client)
        session = client.get_session(sid)
    assert outs == engine_turns(tiny_loaded, tiny_head_map)
    assert session.kv_bytes < session.kv_bytes_full, "the conversation should be compressed"
    assert session.head_map_version == tiny_head_map.version and session.location == 1  # DEVICE


def test_all_retrieval_heads_equal_full_cache_generation(start_server, tiny_loaded):
    full = HeadMap.full(tiny_loaded.fingerprint)
    server = start_server(head_map=full)
    with RazorClient(server.target) as client:
        sid, outs = service_turns(client)
        session = client.get_session(sid)   # allocated: the full cache plus the store's bounded headroom
        assert session.kv_bytes == session.kv_bytes_full <= session.kv_bytes_allocated < 1.5 * session.kv_bytes_full
    assert outs == full_cache_turns(tiny_loaded, Engine(tiny_loaded, full))


def test_tiny_budget_spills_and_restores_identically(start_server, tiny_loaded, tiny_head_map, service_redis_url):
    server = start_server(kv_budget_bytes=1)  # every idle session leaves device memory
    spilled = []

    def check_spilled(sid):
        wait_until(lambda: client.get_session(sid).location == 2)  # REDIS
        spilled.append(redis.Redis.from_url(service_redis_url).exists(Spill.key(sid)))

    with RazorClient(server.target) as client:
        sid, outs = service_turns(client, params=SAMPLED, between=check_spilled)
        check_spilled(sid)  # spills happen just after each turn's completion is sent
        memory = client.server_info().memory
    assert spilled == [1, 1, 1]
    assert outs == engine_turns(tiny_loaded, tiny_head_map, params=SAMPLED)
    assert (memory.resident_sessions, memory.spilled_sessions, memory.kv_resident_bytes) == (0, 1, 0)


def test_restart_continues_spilled_session(start_server, tiny_loaded, tiny_head_map):
    expected = engine_turns(tiny_loaded, tiny_head_map, params=SAMPLED)
    first = start_server()
    with RazorClient(first.target) as client:
        reply = client.generate(prompt=PROMPT, max_new_tokens=8, temperature=1.0, seed=7)
    first.stop(1.0)  # graceful: resident sessions spill to Redis
    second = start_server()
    with RazorClient(second.target) as client:
        assert client.get_session(reply.session_id).location == 2  # REDIS, found after restart
        assert [s.session_id for s in client.list_sessions()] == [reply.session_id]
        outs = [reply.token_ids] + [client.continue_session(reply.session_id, text=t, max_new_tokens=8,
                                                            temperature=1.0, seed=7).token_ids for t in TURNS]
    assert outs == expected


def test_shutdown_cancels_in_flight_stream_cleanly_then_restart_continues(start_server, tiny_loaded):
    first = start_server(grace_s=1.0)
    with RazorClient(first.target) as client:
        stream = client.stream_generate(prompt=PROMPT, max_new_tokens=3000)
        sid = next(stream).session_id
        threading.Thread(target=first.stop, daemon=True).start()
        last = list(stream)[-1]
    assert last.completion.finish_reason == 3  # CANCELLED: the stream ended with a completion, not an error
    wait_until(lambda: first._stopped)
    second = start_server()
    with RazorClient(second.target) as client:
        session = client.get_session(sid)
        assert session.location == 2 and not session.busy
        reply = client.continue_session(sid, text=" more", max_new_tokens=4)
    assert reply.generated_tokens == 4 and reply.cached_tokens == session.length - 1


@pytest.mark.parametrize("request_kwargs, code, hint", [
    (dict(prompt=""), "INVALID_ARGUMENT", "prompt is empty"),
    (dict(), "INVALID_ARGUMENT", "send `prompt`"),
    (dict(prompt="hello " * 5000), "INVALID_ARGUMENT", "exceed the model's context"),
    (dict(prompt="hi there", max_new_tokens=4096), "INVALID_ARGUMENT", "lower max_new_tokens"),
    (dict(prompt="hi", max_new_tokens=0), "INVALID_ARGUMENT", "max_new_tokens"),
    (dict(prompt="hi", max_new_tokens=10**9), "INVALID_ARGUMENT", "max_new_tokens"),
    (dict(prompt="hi", temperature=-1.0), "INVALID_ARGUMENT", "temperature"),
    (dict(prompt="hi", temperature=1e9), "INVALID_ARGUMENT", "temperature"),
    (dict(prompt="hi", temperature=float("nan")), "INVALID_ARGUMENT", "temperature"),
    (dict(prompt="hi", top_p=0.0), "INVALID_ARGUMENT", "top_p"),
    (dict(prompt="hi", top_p=1.5), "INVALID_ARGUMENT", "top_p"),
    (dict(prompt="hi", top_k=-3), "INVALID_ARGUMENT", "top_k"),
    (dict(prompt="hi", seed=-1), "INVALID_ARGUMENT", "seed"),
    (dict(prompt="hi", stop_strings=[""]), "INVALID_ARGUMENT", "stop_strings"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "INVALID_ARGUMENT", "role"),
])
def test_bad_generate_requests_get_clear_errors(start_server, request_kwargs, code, hint):
    server = start_server()
    with RazorClient(server.target) as client:
        error = rpc_error(lambda: client.stream_generate(**request_kwargs))
        assert list(client.list_sessions()) == [], "a refused request must not leave a session behind"
    assert error.code().name == code and hint in error.details()


def test_bad_session_requests_get_clear_errors(start_server):
    server = start_server()
    with RazorClient(server.target) as client:
        sid = client.generate(prompt="hello", max_new_tokens=2).session_id
        cases = [
            (lambda: client.stream_continue("0123456789abcdef", text="hi"), "NOT_FOUND", "no session"),
            (lambda: client.stream_continue("", text="hi"), "INVALID_ARGUMENT", "session_id is empty"),
            (lambda: client.stream_continue(sid, text=""), "INVALID_ARGUMENT", "empty"),
            (lambda: client.stream_continue(sid, text="hi", max_new_tokens=4094), "INVALID_ARGUMENT", "holds"),
            (lambda: client.get_session("nope"), "NOT_FOUND", "no session"),
            (lambda: client.delete_session("nope"), "NOT_FOUND", "no session"),
            (lambda: list(client.list_sessions(page_size=-1)), "INVALID_ARGUMENT", "page_size"),
        ]
        for call, code, hint in cases:
            error = rpc_error(call)
            assert (error.code().name, hint in error.details()) == (code, True), error.details()
        assert client.continue_session(sid, text=" still fine", max_new_tokens=2).generated_tokens == 2


def test_session_made_under_another_model_is_refused(start_server, tiny_loaded):
    from services.engine import load_model

    other = load_model("tiny-random:1", device="cpu")
    first = start_server(loaded=other, head_map=HeadMap.full(other.fingerprint))
    with RazorClient(first.target) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=3).session_id
    first.stop(1.0)
    second = start_server()
    with RazorClient(second.target) as client:
        assert list(client.list_sessions()) == [], "another model's sessions are not adopted"
        error = rpc_error(lambda: client.stream_continue(sid, text="hi"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "another model" in error.details()
        kept = client.get_session(sid)
    # Not lost: the session still belongs to the other model's services, and says which model it needs.
    assert kept.location == 2 and kept.model_fingerprint == other.fingerprint.id and not kept.lost_reason


def test_corrupt_spilled_blob_is_refused_and_reported_lost(start_server, service_redis_url):
    server = start_server(kv_budget_bytes=1)
    r = redis.Redis.from_url(service_redis_url)
    with RazorClient(server.target) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=3).session_id
        wait_until(lambda: client.get_session(sid).location == 2)
        chunk = bytearray(r.hget(Spill.key(sid), "c0"))
        chunk[100] ^= 0xFF
        r.hset(Spill.key(sid), "c0", bytes(chunk))
        error = rpc_error(lambda: client.stream_continue(sid, text="hi"))
        assert error.code() == grpc.StatusCode.DATA_LOSS and "corrupt" in error.details()
        assert client.get_session(sid).location == 3 and not r.exists(Spill.key(sid))


def test_second_request_on_busy_session_fails_precondition(start_server):
    server = start_server()
    with RazorClient(server.target) as client:
        stream = client.stream_generate(prompt=PROMPT, max_new_tokens=3000)
        sid = next(stream).session_id
        error = rpc_error(lambda: client.stream_continue(sid, text="hi"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "busy" in error.details()
        assert rpc_error(lambda: client.delete_session(sid)).code() == grpc.StatusCode.FAILED_PRECONDITION
        stream.cancel()
        wait_until(lambda: not client.get_session(sid).busy)
        assert client.delete_session(sid)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_cancellation_leaves_session_consistent(start_server, tiny_loaded, tiny_head_map, how):
    server = start_server()
    with RazorClient(server.target) as client:
        stream = client.stream_generate(prompt=PROMPT, max_new_tokens=4000, timeout_s=1.0 if how == "deadline" else None)
        sid = [next(stream) for _ in range(3)][0].session_id
        if how == "cancel":
            stream.cancel()
        error = rpc_error(lambda: stream)
        assert error.code() == (grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED)
        wait_until(lambda: not client.get_session(sid).busy)
        length = client.get_session(sid).length
        turn = client.continue_session(sid, text=TURNS[0], max_new_tokens=6)
    engine = Engine(tiny_loaded, tiny_head_map)
    prompt_ids = engine.encode(text=PROMPT)
    n_generated = length - len(prompt_ids)
    assert 3 <= n_generated < 4000, "generation stopped early, within a step of the cancel"
    state, _ = engine.generate(prompt_ids, SamplingParams(max_new_tokens=n_generated))
    expected = engine.continue_session(state, engine.encode_turn(state.last_token, text=TURNS[0]), SamplingParams(max_new_tokens=6))
    assert turn.token_ids == expected.token_ids


def test_eight_concurrent_clients_on_different_sessions(start_server, tiny_loaded, tiny_head_map):
    server = start_server()
    prompts = [f"Client number {i} says: " + PROMPT[: 40 + 9 * i] for i in range(8)]

    def conversation(prompt):
        with RazorClient(server.target) as client:
            return service_turns(client, prompt=prompt, turns=TURNS[:1])[1]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(conversation, prompts))
    assert results == [engine_turns(tiny_loaded, tiny_head_map, prompt=p, turns=TURNS[:1]) for p in prompts]


def test_redis_down_keeps_resident_sessions_and_refuses_needed_spills(start_server, tiny_loaded, make_redis):
    own = make_redis().start()
    second_prompt = "A second, longer conversation about foxes, rivers, hills and the evening songs of birds"
    fp = tiny_loaded.fingerprint
    per_token = 2 * fp.n_layers * fp.n_kv_heads * fp.head_dim * 4
    server = start_server(redis_url=own.url, kv_budget_bytes=per_token * 32)  # room for one short session
    try:
        with RazorClient(server.target) as client:
            first = client.generate(prompt="Hello there, my friend", max_new_tokens=8)
            own.stop()
            assert not client.server_info().memory.redis_reachable
            again = client.continue_session(first.session_id, text=" How are you?", max_new_tokens=4)
            assert again.generated_tokens == 4, "resident sessions keep working"
            error = rpc_error(lambda: client.stream_generate(prompt=second_prompt, max_new_tokens=8))
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "Redis is unreachable" in error.details(), \
                "a new session cannot be registered"
            error = rpc_error(lambda: client.stream_generate(prompt=second_prompt, max_new_tokens=8,
                                                             keep_session=False))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Redis is unreachable" in error.details()
            assert client.get_session(first.session_id).location == 1, "nothing was dropped"
            own.start()  # same port: the service reconnects by itself
            second = client.generate(prompt=second_prompt, max_new_tokens=8)
            assert client.get_session(first.session_id).location == 2
            assert client.continue_session(first.session_id, text=" Bye.", max_new_tokens=2).generated_tokens == 2
            assert second.session_id
    finally:
        own.stop()


def test_list_get_delete_sessions_with_paging(start_server):
    server = start_server()
    with RazorClient(server.target) as client:
        ids = {client.generate(prompt=f"session {i}", max_new_tokens=1).session_id for i in range(5)}
        assert not client.generate(prompt="no session", max_new_tokens=1, keep_session=False).session_id
        assert {s.session_id for s in client.list_sessions(page_size=2)} == ids
        victim = sorted(ids)[0]
        assert client.delete_session(victim)
        assert rpc_error(lambda: client.get_session(victim)).code() == grpc.StatusCode.NOT_FOUND
        assert {s.session_id for s in client.list_sessions()} == ids - {victim}


def test_health_reflection_and_server_info(start_server, tiny_head_map):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    server = start_server()
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "razorserve.v1.RazorServe"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    assert "razorserve.v1.RazorServe" in ProtoReflectionDescriptorDatabase(channel).get_services()
    info = RazorClient(server.target).server_info()
    assert info.head_map.version == tiny_head_map.version and info.max_context == 4096
    assert info.device == "cpu" and info.memory.redis_reachable and info.memory.kv_bytes_per_token_full > 0
    channel.close()


def test_profiling_rpcs_without_worker_are_unavailable(start_server):
    server = start_server()
    with RazorClient(server.target) as client:
        for call in (lambda: client.profile_model(""), lambda: client.get_profile_job("x"),
                     lambda: client.list_head_maps()):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "not configured" in error.details()


def test_handler_threads_must_outnumber_the_turns_a_batch_runs():
    """Each streaming turn holds a gRPC handler thread while it waits and runs: with no threads beside them,
    health checks and Abort would queue behind the streams."""
    from services.settings import HANDLER_HEADROOM, Settings
    with pytest.raises(ValueError, match="RAZOR_MAX_WORKERS .16. must be at least RAZOR_MAX_RUNNING .32. "):
        Settings(max_workers=16, max_running=32)
    assert HANDLER_HEADROOM == 8 and Settings().max_workers >= Settings().max_running + 8
    Settings(max_workers=9, max_running=1, step_tokens=64)
    with pytest.raises(ValueError, match="RAZOR_MAX_WORKERS .8. must be at least RAZOR_MAX_RUNNING .1. \\+ 8"):
        Settings(max_workers=8, max_running=1, step_tokens=64)


def test_waiting_turns_hold_handler_threads_too_so_their_number_is_bounded_by_them():
    from services.settings import Settings
    assert Settings().max_turns() == Settings().max_workers - 8          # 32 running + 24 waiting by default
    assert Settings(max_workers=20, max_running=4, max_waiting=3, step_tokens=64).max_turns() == 7
    Settings(max_workers=20, max_running=4, max_waiting=8, step_tokens=64)
    with pytest.raises(ValueError, match="RAZOR_MAX_WAITING .9. leaves too few handler threads"):
        Settings(max_workers=20, max_running=4, max_waiting=9, step_tokens=64)


def test_a_busy_replica_refuses_turns_beyond_its_queue_and_still_answers_health_checks(start_server):
    """One turn runs and one waits (RAZOR_MAX_RUNNING=1, RAZOR_MAX_WAITING=1): a third is RESOURCE_EXHAUSTED at
    once, leaving no session, while health checks are answered; once the load is gone turns are taken again."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = start_server(max_running=1, max_waiting=1, max_workers=10, step_tokens=64)
    with RazorClient(server.target, timeout_s=60) as client:
        blocker = client.stream_generate(prompt=PROMPT, max_new_tokens=3000, keep_session=False)
        next(blocker)
        queued = client.stream_generate(prompt=PROMPT, max_new_tokens=2)
        wait_until(lambda: len(server.runtime.scheduler.waiting) == 1)
        error = rpc_error(lambda: client.generate(prompt=PROMPT, max_new_tokens=2))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "busy" in error.details() and "RAZOR_MAX_WAITING" in error.details()
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        blocker.cancel()
        waited = [m for m in queued]
        assert waited[-1].completion.usage.generated_tokens == 2
        assert [s.session_id for s in client.list_sessions()] == [waited[-1].session_id]   # the refused left none
        assert client.generate(prompt=PROMPT, max_new_tokens=2).generated_tokens == 2


def test_a_turn_is_counted_out_before_its_caller_hears_it_ended(start_server):
    """With room for one turn, a client that sends its next turn the moment the last one ended is never refused:
    the ended turn stops counting before its stream ends."""
    server = start_server(max_running=1, max_workers=9, step_tokens=64)   # max_turns() == 1
    assert server.runtime.max_turns == 1
    with RazorClient(server.target, timeout_s=60) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=1).session_id
        for _ in range(8):
            assert client.continue_session(sid, text=" and", max_new_tokens=1).generated_tokens == 1



def test_a_turn_handed_to_a_stopped_model_loop_is_refused_not_left_waiting(tiny_loaded, tiny_head_map):
    """Shutdown stops the model loop once no turn is left; a handler that submits after that (it was still
    tokenizing) must hear ShuttingDown, or it would wait for ever and keep the process from exiting."""
    from services.engine import Engine, SamplingParams, Scheduler, TurnRequest
    from services.inference.engine_loop import EngineLoop
    from services.inference.errors import ShuttingDown

    engine = Engine(tiny_loaded, tiny_head_map)
    loop, done = EngineLoop(Scheduler(engine)), []
    loop.submit(TurnRequest(engine.new_session(), [5, 6, 7], SamplingParams(max_new_tokens=2), on_done=done.append))
    loop.stop()   # runs the submitted turn to its end first
    assert done and done[0].finish_reason == "length" and not loop.thread.is_alive()
    with pytest.raises(ShuttingDown):
        loop.submit(TurnRequest(engine.new_session(), [5, 6, 7], SamplingParams(max_new_tokens=2)))
