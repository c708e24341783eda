"""Status codes by explicit class: bad inputs and a broken Redis through a real server, and the table itself.

Every client or environment fault has its own code with a message that says what to fix; only a bug (an
exception no row of `servicer._STATUS` names, a bare ValueError or KeyError included) answers INTERNAL. Bad
requests are refused by `validation` alone, word for word, before the engine's own checks could see them; the
client raises each status as its typed error.
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
from services.engine import SamplingParams
from services.engine.chat import check_messages
from services.inference import client_errors, errors, servicer, validation
from services.inference.client import RazorClient
from services.inference.profile_jobs import BrokerUnavailable, ProfileJobs
from services.inference.runtime import FixedHeadMaps
from services.inference.server import build_server
from services.inference.spill import SpillUnavailable
from services.settings import Settings
from tests.test_service import rpc_error

Code = grpc.StatusCode
MAX_CHARS = 25_000


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
    ("temperature past the documented 10", lambda c, s: c.stream_generate(prompt="hi", temperature=10.01),
     Code.INVALID_ARGUMENT, "temperature must be within 0..10"),
    ("max_new_tokens past the limit", lambda c, s: c.stream_generate(prompt="hi", max_new_tokens=65_537),
     Code.INVALID_ARGUMENT, "max_new_tokens must be within 1..65536"),
    ("stop token outside the vocabulary", lambda c, s: c.stream_generate(prompt="hi", stop_token_ids=[49_152]),
     Code.INVALID_ARGUMENT, "stop_token_ids[0]"),
    ("too many stop strings", lambda c, s: c.stream_generate(prompt="hi", stop_strings=["a"] * 33),
     Code.INVALID_ARGUMENT, "at most 32 stop_strings"),
    ("over-long stop string", lambda c, s: c.stream_generate(prompt="hi", stop_strings=["x" * 257]),
     Code.INVALID_ARGUMENT, "stop_strings[0] has 257 characters"),
    ("chat without messages", lambda c, s: c.stream_generate(messages=[]), Code.INVALID_ARGUMENT, "no messages"),
    ("chat of too many messages", lambda c, s: c.stream_generate(messages=[{"role": "user", "content": ""}] * 1025),
     Code.INVALID_ARGUMENT, "at most 1024"),
    ("continue, no input", lambda c, s: c.stream_continue(s), Code.INVALID_ARGUMENT, "send `text`"),
    ("continue, over-long id", lambda c, s: c.stream_continue("a" * 10_000, text="hi"), Code.INVALID_ARGUMENT,
     "session_id must be 1 to 64"),
    ("get, over-long id", lambda c, s: c.get_session("a" * 65), Code.INVALID_ARGUMENT, "(got 65 characters)"),
    ("delete, id with a path", lambda c, s: c.delete_session("../" + s), Code.INVALID_ARGUMENT, "session_id"),
    ("head maps, bad fingerprint id", lambda c, s: c.list_head_maps("x" * 129), Code.INVALID_ARGUMENT,
     "fingerprint_id"),
    ("job, over-long id", lambda c, s: c.get_profile_job("f" * 65), Code.INVALID_ARGUMENT, "job_id must be"),
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
            assert type(error).status == code and isinstance(error, client_errors.RazorError), (case, type(error))
            assert "a" * 65 not in error.details() and "x" * 129 not in error.details(), f"{case}: echoed the id"
        assert [s.session_id for s in client.list_sessions()] == [sid], "a refused request left a session behind"
        assert client.continue_session(sid, text=" still fine", max_new_tokens=2).generated_tokens == 2
        busy = client.stream_generate(prompt="A long answer", max_new_tokens=3000)
        busy_sid = next(busy).session_id
        for call in (lambda: client.stream_continue(busy_sid, text="hi"), lambda: client.delete_session(busy_sid)):
            assert rpc_error(call).code() == Code.FAILED_PRECONDITION
        busy.cancel()


def _generate(**fields) -> pb.GenerateRequest:
    sampling = {k: fields.pop(k) for k in ("temperature", "top_p", "top_k", "seed") if k in fields}
    return pb.GenerateRequest(sampling=pb.SamplingParams(**sampling), **fields)


LONG_ID = "9" * 4096
GENERATE, CONTINUE = validation.check_generate, validation.check_continue
SESSION_ID = lambda r, _: validation.check_session_id(r.session_id)   # noqa: E731
RAW_REQUESTS = [   # (rpc, request, check(request, limits)): the server answers with exactly the check's message
    ("Generate", _generate(prompt="hi", temperature=float("inf")), GENERATE),
    ("Generate", _generate(prompt="hi", top_p=float("nan")), GENERATE),
    ("Generate", _generate(prompt="hi", stop=pb.StopConditions(stop_token_ids=[-1])), GENERATE),
    ("Generate", _generate(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="r" * 500, content="hi")])), GENERATE),
    ("Generate", _generate(prompt="x" * (MAX_CHARS + 1)), GENERATE),
    ("ContinueSession", pb.ContinueSessionRequest(session_id=LONG_ID, text="hi"), CONTINUE),
    ("ContinueSession", pb.ContinueSessionRequest(session_id="0" * 32, text=""), CONTINUE),
    ("GetSession", pb.GetSessionRequest(session_id=LONG_ID), SESSION_ID),
    ("GetSession", pb.GetSessionRequest(session_id="ab\ncd"), SESSION_ID),
    ("DeleteSession", pb.DeleteSessionRequest(session_id="é" * 8), SESSION_ID),
    ("ListSessions", pb.ListSessionsRequest(page_token="(" + "0" * 31), lambda r, _: validation.check_list_sessions(r)),
    ("ListSessions", pb.ListSessionsRequest(page_token=LONG_ID), lambda r, _: validation.check_list_sessions(r)),
    ("GetProfileJob", pb.GetProfileJobRequest(job_id=LONG_ID), lambda r, _: validation.check_job_id(r.job_id)),
    ("ListHeadMaps", pb.ListHeadMapsRequest(fingerprint_id="a/b"),
     lambda r, _: validation.check_fingerprint_id(r.fingerprint_id)),
]


def _refusal(check, request, limits: validation.Limits) -> str:
    with pytest.raises(errors.InvalidArgument) as info:
        check(request, limits)
    return str(info.value)


def test_bad_fields_are_refused_by_validation_word_for_word_and_never_echo_ids(serve, service_redis_url):
    server = serve(service_redis_url)
    limits = server.runtime.limits
    with RazorClient(server.target) as client:
        for rpc, request, check in RAW_REQUESTS:
            error = rpc_error(lambda: client._call(getattr(client.stub, rpc), request))
            assert isinstance(error, client_errors.InvalidArgument), (rpc, request, error)
            assert error.details() == _refusal(check, request, limits), (rpc, error.details())
            assert LONG_ID not in error.details() and "r" * 500 not in error.details(), error.details()
        assert list(client.list_sessions()) == []
        # The bounds are inclusive, as documented: temperature 10 and 32 stop strings of 256 characters run.
        reply = client.generate(prompt="hi", max_new_tokens=1, temperature=10.0, seed=1,
                                stop_strings=["s" * 256] * 32, stop_token_ids=list(range(32)))
        assert reply.generated_tokens == 1 and reply.finish_reason in ("length", "stop"), reply


# ---- validation covers the engine's own checks ----------------------------------------------------------
LIMITS = validation.Limits(max_context=4096, max_input_chars=1000, vocab_size=100, chat_template=True)
FIELD_VALUES = {   # around each bound the engine checks
    "temperature": [-1e-9, 0.0, 1.0, 10.0, 10.0 + 1e-9, float("inf"), float("nan")],
    "top_p": [0.0, 1e-9, 0.5, 1.0, 1.0 + 1e-9, float("nan")],
    "top_k": [-1, 0, 50],
    "seed": [-1, 0, 2**63 - 1],
    "max_new_tokens": [-1, 0, 1, 65_536, 65_537],
    "stop_strings": [[""], ["x"], ["x" * 256]],
    "stop_token_ids": [[-1], [0], [99], [100]],
}


def _request_with(field: str, value) -> pb.GenerateRequest:
    if field in ("stop_strings", "stop_token_ids"):
        return _generate(prompt="hi", stop=pb.StopConditions(**{field: value}))
    return _generate(prompt="hi", **{field: value})


@pytest.mark.parametrize("field", FIELD_VALUES)
def test_validation_refuses_everything_the_engine_would(field):
    for value in FIELD_VALUES[field]:
        request = _request_with(field, value)
        try:
            validation.check_generate(request, LIMITS)
        except errors.InvalidArgument:
            continue
        # Accepted by validation: the engine must accept it too (else the service would reach its check).
        params = servicer.sampling_params(request)
        assert isinstance(params, SamplingParams), (field, value)
        assert all(0 <= t < LIMITS.vocab_size for t in params.stop_token_ids), (field, value)


@pytest.mark.parametrize("role", ["system", "user", "assistant", "tool", "robot", "", "User"])
def test_validation_accepts_exactly_the_roles_the_engine_accepts(role):
    request = _generate(chat=pb.ChatMessages(messages=[pb.ChatMessage(role=role, content="hi")]))
    try:
        check_messages([{"role": role, "content": "hi"}])
        engine_accepts = True
    except ValueError:
        engine_accepts = False
    try:
        validation.check_generate(request, LIMITS)
        accepted = True
    except errors.InvalidArgument:
        accepted = False
    assert accepted == engine_accepts, role


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
