"""Status codes by explicit class: bad inputs and a broken Redis through a real server, and the table itself.

Every client or environment fault has its own code with a message that says what to fix; only a bug (an
exception no row of `servicer._STATUS` names, a bare ValueError or KeyError included) answers INTERNAL.
"""
from __future__ import annotations

import time

import grpc
import pytest
import redis
import redis.exceptions as redis_errors

from services.api.razorserve.v1 import razorserve_pb2 as pb
from services.engine.errors import ContextLengthError, InvalidRequest, SessionMismatchError
from services.headmap_store import HeadMapStore
from services.inference import errors, servicer
from services.inference.client import RazorClient
from services.inference.profile_jobs import BrokerUnavailable, ProfileJobs
from services.inference.runtime import FixedHeadMaps
from services.inference.server import build_server
from services.inference.spill import SpillUnavailable
from services.settings import Settings

Code = grpc.StatusCode
MAX_CHARS = 25_000


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)
    return info.value


@pytest.fixture
def serve(tiny_loaded, tiny_head_map):
    """serve(redis_url, **settings) -> a started server whose sessions, profiling jobs and head maps all use
    that Redis (no worker runs: jobs are only submitted and looked up)."""
    servers = []

    def start(url: str, **overrides):
        fields = dict(host="127.0.0.1", port=0, redis_url=url, grace_s=1.0, auth_token="", tls_cert="",
                      tls_key="", metrics_port=0, max_input_chars=MAX_CHARS)
        server = build_server(Settings(**(fields | overrides)), loaded=tiny_loaded,
                              head_maps=FixedHeadMaps(tiny_head_map), jobs=ProfileJobs(url),
                              head_map_store=HeadMapStore(redis.Redis.from_url(url, socket_timeout=2)))
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop(0)


BAD_INPUTS = [   # (case, call(client, id of a live session), code, a word of the message)
    ("empty prompt", lambda c, s: c.stream_generate(prompt=""), Code.INVALID_ARGUMENT, "prompt is empty"),
    ("no input", lambda c, s: c.stream_generate(), Code.INVALID_ARGUMENT, "send `prompt`"),
    ("input over the character limit", lambda c, s: c.stream_generate(prompt="x" * (MAX_CHARS + 1)),
     Code.INVALID_ARGUMENT, f"{MAX_CHARS + 1} characters"),
    ("prompt past the context", lambda c, s: c.stream_generate(prompt="hello " * 4000), Code.INVALID_ARGUMENT,
     "exceed the model's context"),
    ("zero max_new_tokens", lambda c, s: c.stream_generate(prompt="hi", max_new_tokens=0), Code.INVALID_ARGUMENT,
     "max_new_tokens"),
    ("NaN temperature", lambda c, s: c.stream_generate(prompt="hi", temperature=float("nan")),
     Code.INVALID_ARGUMENT, "temperature"),
    ("top_p of 0", lambda c, s: c.stream_generate(prompt="hi", top_p=0.0), Code.INVALID_ARGUMENT, "top_p"),
    ("negative top_k", lambda c, s: c.stream_generate(prompt="hi", top_k=-1), Code.INVALID_ARGUMENT, "top_k"),
    ("negative seed", lambda c, s: c.stream_generate(prompt="hi", seed=-1), Code.INVALID_ARGUMENT, "seed"),
    ("empty stop string", lambda c, s: c.stream_generate(prompt="hi", stop_strings=[""]), Code.INVALID_ARGUMENT,
     "stop_strings"),
    ("unknown chat role", lambda c, s: c.stream_generate(messages=[{"role": "robot", "content": "hi"}]),
     Code.INVALID_ARGUMENT, "role"),
    ("empty session id", lambda c, s: c.stream_continue("", text="hi"), Code.INVALID_ARGUMENT, "session_id"),
    ("unknown session", lambda c, s: c.stream_continue("0" * 32, text="hi"), Code.NOT_FOUND, "no session"),
    ("empty turn", lambda c, s: c.stream_continue(s, text=""), Code.INVALID_ARGUMENT, "empty"),
    ("turn past the context", lambda c, s: c.stream_continue(s, text="hi", max_new_tokens=4094),
     Code.INVALID_ARGUMENT, "holds"),
    ("get, empty id", lambda c, s: c.get_session(""), Code.INVALID_ARGUMENT, "session_id"),
    ("get, unknown id", lambda c, s: c.get_session("0" * 32), Code.NOT_FOUND, "no session"),
    ("delete, unknown id", lambda c, s: c.delete_session("0" * 32), Code.NOT_FOUND, "no session"),
    ("negative page size", lambda c, s: list(c.list_sessions(page_size=-1)), Code.INVALID_ARGUMENT, "page_size"),
    ("page size over the limit", lambda c, s: list(c.list_sessions(page_size=1001)), Code.INVALID_ARGUMENT,
     "page_size"),
    ("profiling, bad parameter", lambda c, s: c.profile_model("tiny-random", seq_len=0), Code.INVALID_ARGUMENT,
     "seq_len"),
    ("profiling, too few repeats", lambda c, s: c.profile_model("tiny-random", repeats=1), Code.INVALID_ARGUMENT,
     "repeats"),
    ("job, empty id", lambda c, s: c.get_profile_job(""), Code.INVALID_ARGUMENT, "job_id"),
    ("job, unknown id", lambda c, s: c.get_profile_job("f" * 32), Code.NOT_FOUND, "no profiling job"),
]


def test_bad_inputs_get_their_codes(serve, service_redis_url):
    server = serve(service_redis_url)
    with RazorClient(server.target) as client:
        sid = client.generate(prompt="A short conversation", max_new_tokens=2).session_id
        for case, call, code, hint in BAD_INPUTS:
            error = rpc_error(lambda: call(client, sid))
            assert (error.code(), hint in error.details()) == (code, True), (case, error.code(), error.details())
        assert client.continue_session(sid, text=" still fine", max_new_tokens=2).generated_tokens == 2
        busy = client.stream_generate(prompt="A long answer", max_new_tokens=3000)
        busy_sid = next(busy).session_id
        for call in (lambda: client.stream_continue(busy_sid, text="hi"), lambda: client.delete_session(busy_sid)):
            assert rpc_error(call).code() == Code.FAILED_PRECONDITION
        busy.cancel()


def test_redis_down_is_unavailable_for_every_rpc_that_needs_it(serve, make_redis):
    own = make_redis().start()
    try:
        server = serve(own.url, kv_budget_bytes=1)
        with RazorClient(server.target) as client:
            sid = client.generate(prompt="A conversation to spill", max_new_tokens=2).session_id
            deadline = time.monotonic() + 30
            while client.get_session(sid).location != pb.SESSION_LOCATION_REDIS:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            own.stop()
            cases = [
                ("continue a spilled session", lambda: client.stream_continue(sid, text="hi"), "unreachable"),
                ("get an unknown session", lambda: client.get_session("0" * 32), "unreachable"),
                ("delete an unknown session", lambda: client.delete_session("0" * 32), "Redis"),
                ("list head maps", lambda: client.list_head_maps(), "Redis"),
                ("queue a profiling job", lambda: client.profile_model("tiny-random", seq_len=64), "Redis"),
                ("look up a profiling job", lambda: client.get_profile_job("f" * 32), "Redis"),
            ]
            for case, call, hint in cases:
                error = rpc_error(call)
                assert (error.code(), hint in error.details()) == (Code.UNAVAILABLE, True), (case, error.details())
            assert client.server_info().memory.redis_reachable is False
    finally:
        own.stop()


# ---- the table itself -------------------------------------------------------------------------------
@pytest.mark.parametrize("exc, code", [
    (errors.InvalidArgument("x"), Code.INVALID_ARGUMENT),
    (InvalidRequest("x"), Code.INVALID_ARGUMENT),
    (ContextLengthError("x"), Code.INVALID_ARGUMENT),
    (SessionMismatchError("x"), Code.FAILED_PRECONDITION),
    (errors.SessionBusy("x"), Code.FAILED_PRECONDITION),
    (errors.SessionModelMismatch("x"), Code.FAILED_PRECONDITION),
    (errors.SessionNotFound("x"), Code.NOT_FOUND),
    (errors.NotFound("x"), Code.NOT_FOUND),
    (errors.SessionLost("x"), Code.DATA_LOSS),
    (errors.BudgetExhausted("x"), Code.RESOURCE_EXHAUSTED),
    (errors.StoreUnavailable("x"), Code.UNAVAILABLE),
    (SpillUnavailable("x"), Code.UNAVAILABLE),
    (BrokerUnavailable("x"), Code.UNAVAILABLE),
    (errors.Cancelled("x"), Code.CANCELLED),
    (redis_errors.ConnectionError("refused"), Code.UNAVAILABLE),
    (redis_errors.AuthenticationError("bad password"), Code.UNAVAILABLE),
    (redis_errors.BusyLoadingError("loading"), Code.UNAVAILABLE),
    (redis_errors.TimeoutError("slow"), Code.UNAVAILABLE),
    (redis_errors.ReadOnlyError("replica"), Code.UNAVAILABLE),
    (redis_errors.ClusterDownError("down"), Code.UNAVAILABLE),
    (redis_errors.TryAgainError("resharding"), Code.UNAVAILABLE),
    (redis_errors.OutOfMemoryError("OOM command not allowed"), Code.RESOURCE_EXHAUSTED),
    (redis_errors.WatchError("changed"), Code.ABORTED),
    (ValueError("a bug"), Code.INTERNAL),
    (KeyError("a bug"), Code.INTERNAL),
    (redis_errors.ResponseError("WRONGTYPE"), Code.INTERNAL),
])
def test_each_class_maps_to_its_code(exc, code):
    got, message = servicer.status_for(exc)
    assert got == code, (exc, got)
    # A bug's details name only an incident id (the trace is in the log); a client fault says what happened.
    assert ("incident" in message, str(exc) in message) == ((True, False) if code == Code.INTERNAL else (False, True))


def test_no_row_picks_a_code_by_a_base_class():
    bases = {Exception, ValueError, KeyError, LookupError, RuntimeError, OSError, redis_errors.RedisError,
             redis_errors.ResponseError}
    assert not bases & {row[0] for row in servicer._STATUS}
