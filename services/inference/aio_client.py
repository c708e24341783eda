"""The asyncio RazorServe client (grpc.aio): the same methods as ``RazorClient``, awaited or iterated.

    async with AsyncRazorClient("127.0.0.1:50051") as client:
        reply = await client.generate(prompt="Hello", max_new_tokens=32)
        async for msg in client.stream_continue(reply.session_id, text=" Tell me more."):
            ...
        info = await client.server_info()

Streams (``stream_*``) are async iterators and keep the call's ``cancel()``; every other method is awaited.
Failures raise the typed errors of ``client_errors`` (``NotFound``, ``InvalidArgument``, ...), as the blocking
client does.

The methods that only build a request and return ``self._call(...)`` are ``RazorClient``'s own, running over an
aio stub; a method that does more with the reply (collects a stream, pages, picks a field) needs its async
version here (tests/test_async_client.py checks that none is missing).
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from .client import RazorClient, Reply, _affinity, collect, import_requests, pb, pb_grpc
from .client_errors import typed_errors


class TypedAsyncCall:
    """An aio call whose errors are typed: awaited (unary) or iterated (server stream); otherwise the call
    itself (``cancel()``, ``code()``, ...)."""

    def __init__(self, call):
        self._call, self._messages = call, None

    def __await__(self):
        return self._result().__await__()

    async def _result(self):
        with typed_errors():
            return await self._call

    def __aiter__(self) -> "TypedAsyncCall":
        return self

    async def __anext__(self):
        if self._messages is None:
            self._messages = self._call.__aiter__()
        with typed_errors():
            return await self._messages.__anext__()

    def __getattr__(self, name: str):
        return getattr(self._call, name)


class AsyncRazorClient(RazorClient):
    def __init__(self, target: str, token: str = "", credentials: grpc.ChannelCredentials | None = None,
                 timeout_s: float | None = None):
        aio = grpc.aio
        self.channel = aio.secure_channel(target, credentials) if credentials else aio.insecure_channel(target)
        self.stub = pb_grpc.RazorServeStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s

    async def __aenter__(self) -> "AsyncRazorClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __enter__(self):
        raise TypeError("AsyncRazorClient is an async context manager: use `async with`")

    async def close(self) -> None:
        await self.channel.close()

    def _call(self, method, request, timeout_s=None, session_id: str = "") -> TypedAsyncCall:
        metadata = self.metadata + _affinity(session_id)
        return TypedAsyncCall(method(request, metadata=metadata, timeout=timeout_s or self.timeout_s))

    # ---- what does more than return the call ---------------------------------------------------------
    async def generate(self, *args, **kwargs) -> Reply:
        return collect([msg async for msg in self.stream_generate(*args, **kwargs)])

    async def continue_session(self, *args, **kwargs) -> Reply:
        return collect([msg async for msg in self.stream_continue(*args, **kwargs)])

    async def list_sessions(self, page_size: int = 50) -> AsyncIterator[pb.Session]:
        token = ""
        while True:
            page = await self._call(self.stub.ListSessions, pb.ListSessionsRequest(page_size=page_size,
                                                                                   page_token=token))
            for session in page.sessions:
                yield session
            token = page.next_page_token
            if not token:
                return

    async def delete_session(self, session_id: str) -> bool:
        request = pb.DeleteSessionRequest(session_id=session_id)
        return (await self._call(self.stub.DeleteSession, request, session_id=session_id)).deleted

    async def abort(self, request_id: str) -> bool:
        return (await self._call(self.stub.Abort, pb.AbortRequest(request_id=request_id))).found

    async def stream_export(self, session_id: str, timeout_s: float | None = None) -> AsyncIterator[bytes]:
        request = pb.ExportSessionRequest(session_id=session_id)
        async for message in self._call(self.stub.ExportSession, request, timeout_s, session_id=session_id):
            yield message.chunk

    async def export_session(self, session_id: str, timeout_s: float | None = None) -> bytes:
        return b"".join([piece async for piece in self.stream_export(session_id, timeout_s)])

    async def import_session(self, export, size_bytes: int = 0, timeout_s: float | None = None):
        return await self._call(self.stub.ImportSession, import_requests(export, size_bytes), timeout_s)

    async def fork_session(self, session_id: str) -> pb.Session:
        request = pb.ForkSessionRequest(session_id=session_id)
        return (await self._call(self.stub.ForkSession, request, session_id=session_id)).session

    async def list_head_maps(self, fingerprint_id: str = "") -> list[pb.HeadMapVersion]:
        reply = await self._call(self.stub.ListHeadMaps, pb.ListHeadMapsRequest(fingerprint_id=fingerprint_id))
        return list(reply.versions)
