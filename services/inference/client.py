"""A small RazorServe client (grpc + generated code only; no torch).

    with RazorClient("127.0.0.1:50051") as client:
        reply = client.generate(prompt="Hello", max_new_tokens=32)
        more = client.continue_session(reply.session_id, text=" Tell me more.")

``generate``/``continue_session`` collect a whole turn; ``stream_generate``/``stream_continue``
yield the raw ``GenerateResponse`` messages as they arrive. A turn may carry a ``request_id`` (else the server
assigns one; every message names it), which ``abort(request_id)`` stops from any connection of the tenant;
``top_logprobs=k`` returns the k most likely tokens at each generated position. ``export_session`` /
``import_session`` move a session between deployments; ``fork_session`` copies one; ``update_session`` sets its
TTL or pins it; ``get_load`` reports a replica's load. A failed call raises the typed error of its status
(``client_errors``: ``NotFound``, ``InvalidArgument``, ``Unavailable``, ...; each a grpc.RpcError).
``aio_client.AsyncRazorClient`` is the asyncio variant.

Every call that names a session carries its id in the ``x-razor-session`` metadata
(``AFFINITY_HEADER``): a proxy in front of several replicas hashes it to keep one session on one
replica (deploy/nginx). New sessions carry none and may start on any replica.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc

from services.api import require_generated

require_generated()
from services.api.razorserve.v1 import razorserve_pb2 as pb  # noqa: E402
from services.api.razorserve.v1 import razorserve_pb2_grpc as pb_grpc  # noqa: E402

AFFINITY_HEADER = "x-razor-session"
_AFFINITY_MAX_CHARS = 256   # far above a real id, far below a proxy's header limit
IMPORT_CHUNK_BYTES = 2 * 2**20   # bytes per ImportSession message (the server takes up to gRPC's 4 MiB)
from . import client_errors as errors  # noqa: E402,F401 - `client.errors.NotFound`, ...
from .client_errors import TypedStream, typed_errors  # noqa: E402

FINISH_NAMES = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop",
                pb.FINISH_REASON_CANCELLED: "cancelled"}


class Candidate(NamedTuple):
    """One of the top_logprobs most likely tokens at a generated position."""

    token_id: int
    logprob: float
    text: str


@dataclass
class Reply:
    """One finished turn, assembled from its stream."""

    session_id: str = ""
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[Candidate]] = field(default_factory=list)   # one list per token, most likely first
    finish_reason: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0


def collect(stream) -> Reply:
    reply, pieces = Reply(), []
    for msg in stream:
        reply.session_id, reply.request_id = msg.session_id, msg.request_id
        if msg.HasField("chunk"):
            pieces.append(msg.chunk.text)
            reply.token_ids += list(msg.chunk.token_ids)
            reply.logprobs += list(msg.chunk.logprobs)
            reply.top_logprobs += [[Candidate(c.token_id, c.logprob, c.text) for c in top.candidates]
                                   for top in msg.chunk.top_logprobs]
        else:
            c = msg.completion
            reply.text, reply.finish_reason = c.text, FINISH_NAMES.get(c.finish_reason, "")
            reply.prompt_tokens, reply.generated_tokens = c.usage.prompt_tokens, c.usage.generated_tokens
            reply.cached_tokens = c.usage.cached_tokens
    reply.text = reply.text or "".join(pieces)
    return reply


def _options(request, sampling: dict, max_new_tokens, stop_strings, stop_token_ids, logprobs,
             request_id: str, top_logprobs: int) -> None:
    for name, value in sampling.items():
        if value is not None:
            setattr(request.sampling, name, value)
    if max_new_tokens is not None:
        request.max_new_tokens = max_new_tokens
    request.stop.stop_strings.extend(stop_strings)
    request.stop.stop_token_ids.extend(stop_token_ids)
    request.logprobs = logprobs
    request.request_id, request.top_logprobs = request_id, top_logprobs


def import_requests(export: bytes | Iterable[bytes], size_bytes: int = 0) -> Iterator[pb.ImportSessionRequest]:
    """An ImportSession stream: the options, then the export's bytes in messages of IMPORT_CHUNK_BYTES."""
    if isinstance(export, (bytes, bytearray, memoryview)):
        export, size_bytes = [bytes(export)], size_bytes or len(export)
    yield pb.ImportSessionRequest(options=pb.ImportOptions(size_bytes=size_bytes))
    for piece in export:
        for start in range(0, len(piece), IMPORT_CHUNK_BYTES):
            yield pb.ImportSessionRequest(chunk=piece[start:start + IMPORT_CHUNK_BYTES])


def _affinity(session_id: str) -> tuple[tuple[str, str], ...]:
    """The routing metadata for a call on ``session_id``; none for an id no header can carry (the
    call then goes to any replica, which answers for the id itself)."""
    if 0 < len(session_id) <= _AFFINITY_MAX_CHARS and session_id.isascii() and session_id.isprintable():
        return ((AFFINITY_HEADER, session_id),)
    return ()


def _chat(messages) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


class RazorClient:
    def __init__(self, target: str, token: str = "", credentials: grpc.ChannelCredentials | None = None,
                 timeout_s: float | None = None, options: list[tuple[str, object]] | None = None):
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.RazorServeStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s

    def __enter__(self) -> "RazorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout_s=None, session_id: str = ""):
        """Every RPC goes through here: failures raise typed errors (a stream's as it is read)."""
        with typed_errors():
            result = method(request, metadata=self.metadata + _affinity(session_id),
                            timeout=timeout_s or self.timeout_s)
        return TypedStream(result) if isinstance(result, grpc.Call) else result

    # ---- turns -----------------------------------------------------------------------------
    def stream_generate(self, prompt: str | None = None, messages: list[dict] | None = None, *,
                        max_new_tokens: int | None = None, temperature: float | None = None,
                        top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                        stop_strings=(), stop_token_ids=(), logprobs: bool = False, keep_session: bool = True,
                        request_id: str = "", top_logprobs: int = 0,
                        timeout_s: float | None = None) -> Iterator[pb.GenerateResponse]:
        request = pb.GenerateRequest(keep_session=keep_session)
        if messages is not None:
            request.chat.CopyFrom(_chat(messages))
        elif prompt is not None:
            request.prompt = prompt
        _options(request, dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
                 max_new_tokens, stop_strings, stop_token_ids, logprobs, request_id, top_logprobs)
        return self._call(self.stub.Generate, request, timeout_s)

    def stream_continue(self, session_id: str, text: str | None = None, messages: list[dict] | None = None, *,
                        max_new_tokens: int | None = None, temperature: float | None = None,
                        top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                        stop_strings=(), stop_token_ids=(), logprobs: bool = False,
                        request_id: str = "", top_logprobs: int = 0,
                        timeout_s: float | None = None) -> Iterator[pb.GenerateResponse]:
        request = pb.ContinueSessionRequest(session_id=session_id)
        if messages is not None:
            request.chat.CopyFrom(_chat(messages))
        elif text is not None:
            request.text = text
        _options(request, dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
                 max_new_tokens, stop_strings, stop_token_ids, logprobs, request_id, top_logprobs)
        return self._call(self.stub.ContinueSession, request, timeout_s, session_id=session_id)

    def generate(self, *args, **kwargs) -> Reply:
        return collect(self.stream_generate(*args, **kwargs))

    def continue_session(self, *args, **kwargs) -> Reply:
        return collect(self.stream_continue(*args, **kwargs))

    def abort(self, request_id: str) -> bool:
        """Stop the running turn `request_id` of this client's tenant (its stream ends with finish reason
        "cancelled"); raises grpc.RpcError NOT_FOUND when no such turn runs."""
        return self._call(self.stub.Abort, pb.AbortRequest(request_id=request_id)).found

    # ---- sessions and server -------------------------------------------------------------------
    def get_session(self, session_id: str) -> pb.Session:
        return self._call(self.stub.GetSession, pb.GetSessionRequest(session_id=session_id), session_id=session_id)

    def list_sessions(self, page_size: int = 50) -> Iterator[pb.Session]:
        token = ""
        while True:
            page = self._call(self.stub.ListSessions, pb.ListSessionsRequest(page_size=page_size, page_token=token))
            yield from page.sessions
            token = page.next_page_token
            if not token:
                return

    def delete_session(self, session_id: str) -> bool:
        request = pb.DeleteSessionRequest(session_id=session_id)
        return self._call(self.stub.DeleteSession, request, session_id=session_id).deleted

    def server_info(self) -> pb.ServerInfo:
        return self._call(self.stub.GetServerInfo, pb.GetServerInfoRequest())

    def update_session(self, session_id: str, ttl_s: int | None = None, pinned: bool | None = None) -> pb.Session:
        request = pb.UpdateSessionRequest(session_id=session_id, ttl_s=ttl_s, pinned=pinned)
        return self._call(self.stub.UpdateSession, request, session_id=session_id)

    def get_load(self) -> pb.Load:
        return self._call(self.stub.GetLoad, pb.GetLoadRequest())
    # ---- export, import and fork -------------------------------------------------------------
    def stream_export(self, session_id: str, timeout_s: float | None = None) -> Iterator[bytes]:
        """The export of a session, piece by piece (write them to a file in order)."""
        request = pb.ExportSessionRequest(session_id=session_id)
        for message in self._call(self.stub.ExportSession, request, timeout_s, session_id=session_id):
            yield message.chunk

    def export_session(self, session_id: str, timeout_s: float | None = None) -> bytes:
        return b"".join(self.stream_export(session_id, timeout_s))

    def import_session(self, export: bytes | Iterable[bytes], size_bytes: int = 0,
                       timeout_s: float | None = None) -> pb.ImportSessionResponse:
        """Import an export (bytes, or pieces of it in order) as a new session; ``.session.session_id`` is its id."""
        return self._call(self.stub.ImportSession, import_requests(export, size_bytes), timeout_s)

    def fork_session(self, session_id: str) -> pb.Session:
        """A copy of the session under a new id; both continue independently."""
        request = pb.ForkSessionRequest(session_id=session_id)
        return self._call(self.stub.ForkSession, request, session_id=session_id).session

    # ---- profiling -------------------------------------------------------------------------
    def profile_model(self, model_ref: str = "", **params) -> pb.ProfileJob:
        return self._call(self.stub.ProfileModel,
                          pb.ProfileModelRequest(model_ref=model_ref, params=pb.ProfileParams(**params)))

    def get_profile_job(self, job_id: str) -> pb.ProfileJob:
        return self._call(self.stub.GetProfileJob, pb.GetProfileJobRequest(job_id=job_id))

    def list_head_maps(self, fingerprint_id: str = "") -> list[pb.HeadMapVersion]:
        return list(self._call(self.stub.ListHeadMaps, pb.ListHeadMapsRequest(fingerprint_id=fingerprint_id)).versions)
