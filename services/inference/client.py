"""A small RazorServe client (grpc + generated code only; no torch).

    with RazorClient("127.0.0.1:50051") as client:
        reply = client.generate(prompt="Hello", max_new_tokens=32)
        more = client.continue_session(reply.session_id, text=" Tell me more.")

``generate``/``continue_session`` collect a whole turn; ``stream_generate``/``stream_continue``
yield the raw ``GenerateResponse`` messages as they arrive. A failed call raises the typed error of its
status (``client_errors``: ``NotFound``, ``InvalidArgument``, ``Unavailable``, ...; each a grpc.RpcError).
``aio_client.AsyncRazorClient`` is the asyncio variant.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from services.api import require_generated

require_generated()
from services.api.razorserve.v1 import razorserve_pb2 as pb  # noqa: E402
from services.api.razorserve.v1 import razorserve_pb2_grpc as pb_grpc  # noqa: E402

from . import client_errors as errors  # noqa: E402,F401 - `client.errors.NotFound`, ...
from .client_errors import TypedStream, typed_errors  # noqa: E402

FINISH_NAMES = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop",
                pb.FINISH_REASON_CANCELLED: "cancelled"}


@dataclass
class Reply:
    """One finished turn, assembled from its stream."""

    session_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0


def collect(stream) -> Reply:
    reply, pieces = Reply(), []
    for msg in stream:
        reply.session_id = msg.session_id
        if msg.HasField("chunk"):
            pieces.append(msg.chunk.text)
            reply.token_ids += list(msg.chunk.token_ids)
            reply.logprobs += list(msg.chunk.logprobs)
        else:
            c = msg.completion
            reply.text, reply.finish_reason = c.text, FINISH_NAMES.get(c.finish_reason, "")
            reply.prompt_tokens, reply.generated_tokens = c.usage.prompt_tokens, c.usage.generated_tokens
            reply.cached_tokens = c.usage.cached_tokens
    reply.text = reply.text or "".join(pieces)
    return reply


def _options(request, sampling: dict, max_new_tokens, stop_strings, stop_token_ids, logprobs) -> None:
    for name, value in sampling.items():
        if value is not None:
            setattr(request.sampling, name, value)
    if max_new_tokens is not None:
        request.max_new_tokens = max_new_tokens
    request.stop.stop_strings.extend(stop_strings)
    request.stop.stop_token_ids.extend(stop_token_ids)
    request.logprobs = logprobs


def _chat(messages) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


class RazorClient:
    def __init__(self, target: str, token: str = "", credentials: grpc.ChannelCredentials | None = None,
                 timeout_s: float | None = None):
        self.channel = (grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target))
        self.stub = pb_grpc.RazorServeStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s

    def __enter__(self) -> "RazorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout_s=None):
        """Every RPC goes through here: failures raise typed errors (a stream's as it is read)."""
        with typed_errors():
            result = method(request, metadata=self.metadata, timeout=timeout_s or self.timeout_s)
        return TypedStream(result) if isinstance(result, grpc.Call) else result

    # ---- turns -----------------------------------------------------------------------------
    def stream_generate(self, prompt: str | None = None, messages: list[dict] | None = None, *,
                        max_new_tokens: int | None = None, temperature: float | None = None,
                        top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                        stop_strings=(), stop_token_ids=(), logprobs: bool = False, keep_session: bool = True,
                        timeout_s: float | None = None) -> Iterator[pb.GenerateResponse]:
        request = pb.GenerateRequest(keep_session=keep_session)
        if messages is not None:
            request.chat.CopyFrom(_chat(messages))
        elif prompt is not None:
            request.prompt = prompt
        _options(request, dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
                 max_new_tokens, stop_strings, stop_token_ids, logprobs)
        return self._call(self.stub.Generate, request, timeout_s)

    def stream_continue(self, session_id: str, text: str | None = None, messages: list[dict] | None = None, *,
                        max_new_tokens: int | None = None, temperature: float | None = None,
                        top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                        stop_strings=(), stop_token_ids=(), logprobs: bool = False,
                        timeout_s: float | None = None) -> Iterator[pb.GenerateResponse]:
        request = pb.ContinueSessionRequest(session_id=session_id)
        if messages is not None:
            request.chat.CopyFrom(_chat(messages))
        elif text is not None:
            request.text = text
        _options(request, dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
                 max_new_tokens, stop_strings, stop_token_ids, logprobs)
        return self._call(self.stub.ContinueSession, request, timeout_s)

    def generate(self, *args, **kwargs) -> Reply:
        return collect(self.stream_generate(*args, **kwargs))

    def continue_session(self, *args, **kwargs) -> Reply:
        return collect(self.stream_continue(*args, **kwargs))

    # ---- sessions and server -------------------------------------------------------------------
    def get_session(self, session_id: str) -> pb.Session:
        return self._call(self.stub.GetSession, pb.GetSessionRequest(session_id=session_id))

    def list_sessions(self, page_size: int = 50) -> Iterator[pb.Session]:
        token = ""
        while True:
            page = self._call(self.stub.ListSessions, pb.ListSessionsRequest(page_size=page_size, page_token=token))
            yield from page.sessions
            token = page.next_page_token
            if not token:
                return

    def delete_session(self, session_id: str) -> bool:
        return self._call(self.stub.DeleteSession, pb.DeleteSessionRequest(session_id=session_id)).deleted

    def server_info(self) -> pb.ServerInfo:
        return self._call(self.stub.GetServerInfo, pb.GetServerInfoRequest())

    # ---- profiling -------------------------------------------------------------------------
    def profile_model(self, model_ref: str = "", **params) -> pb.ProfileJob:
        return self._call(self.stub.ProfileModel,
                          pb.ProfileModelRequest(model_ref=model_ref, params=pb.ProfileParams(**params)))

    def get_profile_job(self, job_id: str) -> pb.ProfileJob:
        return self._call(self.stub.GetProfileJob, pb.GetProfileJobRequest(job_id=job_id))

    def list_head_maps(self, fingerprint_id: str = "") -> list[pb.HeadMapVersion]:
        return list(self._call(self.stub.ListHeadMaps, pb.ListHeadMapsRequest(fingerprint_id=fingerprint_id)).versions)
