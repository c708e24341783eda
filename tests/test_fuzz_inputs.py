"""Seeded random requests, many of them malformed, against a real server on loopback (tiny random model, a budget
of a few sessions so that sessions spill and restore): no input may end in INTERNAL or UNKNOWN, and the server
serves a plain turn afterwards. Values sit at the edges a client can reach: 0, -1, int32's ends, NaN, infinities,
subnormal floats (1e-320: above 0 yet 0 in float32, which found two sampling bugs), empty and long strings,
unknown chat roles, exports with a bit flipped or cut short."""
from __future__ import annotations

import random

import grpc
import pytest

from services.api.razorserve.v1 import razorserve_pb2 as pb
from services.api.razorserve.v1 import razorserve_pb2_grpc as pb_grpc

SEEDS = (1, 2)   # both end in INTERNAL with the sampling of 1a52785 (a subnormal top_p or temperature)
ROUNDS = 60   # requests a seed (each a Generate and one other call)
INTS = (0, 1, -1, 7, 2**31 - 1, -2**31, 65536, 65537)
FLOATS = (0.0, -0.0, 0.5, 1.0, -1.0, 10.0, 10.0001, 1e-320, 1e-40, 1e300, float("nan"), float("inf"), float("-inf"))
SMALL = (1e-320, 1e-40, 1e-8)   # above 0, yet 0 (or nearly) in float32, where sampling computes
STRINGS = ("", "a", "\x00", "é" * 10, "x" * 5000, "../../etc", "0" * 32, "user", "<|im_end|>", "a b")
ROLES = ("user", "system", "assistant", "tool", "", "bogus")
FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def _sampling(r: random.Random) -> pb.SamplingParams:
    s = pb.SamplingParams()
    if r.random() < 0.7:
        s.temperature = r.choice(FLOATS + SMALL)
    if r.random() < 0.7:
        s.top_p = r.choice(FLOATS + SMALL)
    if r.random() < 0.5:
        s.top_k = r.choice(INTS)
    if r.random() < 0.5:
        s.seed = r.choice((0, -1, 5, 2**63 - 1, -2**63))
    return s


def _chat(r: random.Random, into: pb.ChatMessages) -> None:
    into.messages.extend(pb.ChatMessage(role=r.choice(ROLES), content=r.choice(STRINGS))
                         for _ in range(r.choice((0, 1, 2, 3))))


def _turn_fields(r: random.Random, request) -> None:
    """What GenerateRequest and ContinueSessionRequest share."""
    if r.random() < 0.6:
        request.max_new_tokens = r.choice((*INTS, 3))
    if r.random() < 0.8:
        request.sampling.CopyFrom(_sampling(r))
    if r.random() < 0.3:
        request.stop.stop_token_ids.extend(r.choice(INTS) for _ in range(r.randint(0, 3)))
    if r.random() < 0.3:
        request.stop.stop_strings.extend(r.choice(STRINGS) for _ in range(r.randint(0, 3)))
    if r.random() < 0.3:
        request.request_id = r.choice(STRINGS)
    if r.random() < 0.3:
        request.top_logprobs = r.choice((*INTS, 20, 21))
    request.logprobs = r.random() < 0.3


def _generate(r: random.Random) -> pb.GenerateRequest:
    if r.random() < 0.3:   # a plain valid turn now and then, so that the session calls have sessions to work on
        return pb.GenerateRequest(prompt=r.choice(STRINGS[1:]), max_new_tokens=r.randint(1, 8))
    request = pb.GenerateRequest()
    if r.random() < 0.45:
        request.prompt = r.choice(STRINGS)
    elif r.random() < 0.8:
        _chat(r, request.chat)
    _turn_fields(r, request)
    if r.random() < 0.3:
        request.session_ttl_s = r.choice((0, 1, 60, 2**32 - 1))
    if r.random() < 0.2:
        request.pin_session = r.random() < 0.5
    if r.random() < 0.3:
        request.keep_session = r.random() < 0.5
    return request


def _continue(r: random.Random, sid: str) -> pb.ContinueSessionRequest:
    request = pb.ContinueSessionRequest(session_id=sid)
    if r.random() < 0.5:
        request.text = r.choice(STRINGS)
    elif r.random() < 0.8:
        _chat(r, request.chat)
    _turn_fields(r, request)
    return request


def _update(r: random.Random, sid: str) -> pb.UpdateSessionRequest:
    request = pb.UpdateSessionRequest(session_id=sid)
    if r.random() < 0.5:
        request.ttl_s = r.choice((0, 1, 2**32 - 1))
    if r.random() < 0.5:
        request.pinned = r.random() < 0.5
    return request


def _damaged(r: random.Random, blob: bytes) -> bytes:
    """An export with one bit flipped, or cut short, or both (or, now and then, left whole)."""
    damaged = bytearray(blob)
    if damaged and r.random() < 0.7:
        damaged[r.randrange(len(damaged))] ^= 1 << r.randrange(8)
    if r.random() < 0.3:
        damaged = damaged[:r.randrange(len(damaged) + 1)]
    return bytes(damaged)


def _outcome(call) -> tuple[grpc.StatusCode | None, object]:
    """(None, the reply, a stream read whole) or (the status code, its details)."""
    try:
        reply = call()
        return None, reply if hasattr(reply, "ByteSize") else list(reply)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


class Fuzzer:
    def __init__(self, stub: pb_grpc.RazorServeStub, seed: int):
        self.stub, self.r, self.sessions, self.faults = stub, random.Random(seed), [], []

    def check(self, what: str, call) -> object:
        code, reply = _outcome(call)
        if code in FAULTS:
            self.faults.append(f"{what}: {code.name}: {reply}")
        return reply if code is None else None

    def session_id(self) -> str:
        return self.r.choice(self.sessions + list(STRINGS)) if self.sessions else self.r.choice(STRINGS)

    def round(self) -> None:
        request = _generate(self.r)
        streamed = self.check(f"Generate {request}", lambda: self.stub.Generate(request, timeout=30))
        if streamed and streamed[0].session_id:
            self.sessions.append(streamed[0].session_id)
        self.other_call(self.session_id())

    def other_call(self, sid: str) -> None:
        r, stub = self.r, self.stub
        calls = {
            "ContinueSession": lambda: stub.ContinueSession(_continue(r, sid), timeout=30),
            "GetSession": lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10),
            "ListSessions": lambda: stub.ListSessions(pb.ListSessionsRequest(
                page_size=r.choice((*INTS, 1000, 1001)), page_token=r.choice(STRINGS)), timeout=10),
            "UpdateSession": lambda: stub.UpdateSession(_update(r, sid), timeout=10),
            "ForkSession": lambda: stub.ForkSession(pb.ForkSessionRequest(session_id=sid), timeout=10),
            "DeleteSession": lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=10),
            "Abort": lambda: stub.Abort(pb.AbortRequest(request_id=r.choice(STRINGS)), timeout=10),
            "GetLoad": lambda: stub.GetLoad(pb.GetLoadRequest(), timeout=10),
        }
        name = r.choice([*calls, "ExportSession"])
        if name == "ExportSession":
            self.export_and_import(sid)
        else:
            self.check(f"{name} {sid!r}", calls[name])

    def export_and_import(self, sid: str) -> None:
        export = self.check(f"ExportSession {sid!r}",
                            lambda: self.stub.ExportSession(pb.ExportSessionRequest(session_id=sid), timeout=10))
        if not export:
            return
        blob = _damaged(self.r, b"".join(m.chunk for m in export))
        parts = [pb.ImportSessionRequest(options=pb.ImportOptions()), pb.ImportSessionRequest(chunk=blob)]
        self.check(f"ImportSession of {len(blob)} bytes", lambda: self.stub.ImportSession(iter(parts), timeout=10))


@pytest.mark.parametrize("seed", SEEDS)
def test_no_request_ends_in_internal_and_the_server_serves_on(start_server, tiny_loaded, seed):
    per_token = 2 * tiny_loaded.fingerprint.n_layers * tiny_loaded.fingerprint.n_kv_heads \
        * tiny_loaded.fingerprint.head_dim * tiny_loaded.dtype.itemsize
    server = start_server(kv_budget_bytes=per_token * 600)   # a few sessions resident; the rest spill
    with grpc.insecure_channel(server.target) as channel:
        fuzzer = Fuzzer(pb_grpc.RazorServeStub(channel), seed)
        for _ in range(ROUNDS):
            fuzzer.round()
        assert fuzzer.faults == [], "\n".join(fuzzer.faults[:5])
        reply = list(fuzzer.stub.Generate(pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=3), timeout=30))
        assert reply[-1].completion.usage.generated_tokens == 3
        assert len(fuzzer.sessions) > 5, "too few requests were valid to reach the session calls"
