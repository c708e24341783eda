"""The asyncio client (`aio_client.AsyncRazorClient`) and typed client errors, over a real server on loopback.

The async client streams and continues a session with the same tokens as the blocking one, pages, reads and deletes
sessions; each failure is its status's typed error (still a grpc.RpcError with the call's code and details), from
awaited calls and from streams alike. A guard checks that every blocking method that does more than return its call
has an async version.
"""
from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap

import grpc
import pytest

from services.inference import client_errors as errors
from services.inference.aio_client import AsyncRazorClient
from services.inference.client import RazorClient

KEY = "alice-key-1"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


async def _awaited(call) -> errors.RazorError:
    with pytest.raises(errors.RazorError) as info:
        await call
    return info.value


async def _read(stream) -> errors.RazorError:
    with pytest.raises(errors.RazorError) as info:
        [msg async for msg in stream]
    return info.value


def test_async_client_streams_continues_and_manages_sessions_like_the_blocking_one(start_server):
    server = start_server(api_keys=f"alice:{KEY}")
    with RazorClient(server.target, token=KEY) as blocking:
        control = blocking.generate(prompt=PROMPT, max_new_tokens=6)
        control_more = blocking.continue_session(control.session_id, text=" And then?", max_new_tokens=4)
        control_length = blocking.get_session(control.session_id).length

    async def run():
        async with AsyncRazorClient(server.target, token=KEY) as client:
            messages = [msg async for msg in client.stream_generate(prompt=PROMPT, max_new_tokens=6)]
            sid = messages[0].session_id
            assert [m.HasField("chunk") for m in messages] == [True] * 6 + [False], messages
            assert [t for m in messages[:-1] for t in m.chunk.token_ids] == control.token_ids
            more = await client.continue_session(sid, text=" And then?", max_new_tokens=4)
            assert (more.token_ids, more.cached_tokens) == (control_more.token_ids, control_more.cached_tokens)
            assert (await client.get_session(sid)).length == control_length
            listed = [s.session_id async for s in client.list_sessions(page_size=1)]   # one page per session
            assert sorted(listed) == sorted([sid, control.session_id])
            assert (await client.server_info()).max_context == server.runtime.loaded.max_context
            unconfigured = await _awaited(client.list_head_maps())   # this server has no head-map store
            assert type(unconfigured) is errors.Unavailable and "not configured" in unconfigured.details()
            assert await client.delete_session(sid) is True
            assert [s.session_id async for s in client.list_sessions()] == [control.session_id]

    asyncio.run(run())


def test_failures_raise_typed_errors_from_calls_and_streams(start_server):
    server = start_server(api_keys=f"alice:{KEY}")

    async def run():
        async with AsyncRazorClient(server.target, token=KEY) as client:
            missing = await _awaited(client.get_session("0" * 32))
            assert type(missing) is errors.NotFound and missing.code() == grpc.StatusCode.NOT_FOUND
            assert "no session" in missing.details() and isinstance(missing, grpc.RpcError)
            assert type(await _awaited(client.delete_session("0" * 32))) is errors.NotFound
            empty = await _read(client.stream_generate(prompt=""))   # raised while the stream is read
            assert type(empty) is errors.InvalidArgument and "prompt is empty" in empty.details()
            assert type(await _awaited(client.generate(prompt="hi", top_p=2.0))) is errors.InvalidArgument
            assert type(await _awaited(client.get_profile_job("f" * 32))) is errors.Unavailable   # no worker here

            busy = client.stream_generate(prompt=PROMPT, max_new_tokens=3000)
            busy_sid = (await busy.__anext__()).session_id
            refused = await _awaited(client.continue_session(busy_sid, text="hi"))
            assert type(refused) is errors.FailedPrecondition and "busy" in refused.details()
            assert busy.cancel()   # the call's own methods stay reachable
            with pytest.raises(asyncio.CancelledError):   # as grpc.aio reads a stream this client cancelled
                await busy.__anext__()
        async with AsyncRazorClient(server.target) as anonymous:   # no API key
            assert type(await _awaited(anonymous.server_info())) is errors.Unauthenticated
            with pytest.raises(TypeError, match="async with"):
                with anonymous:
                    pass

    asyncio.run(run())
    with RazorClient(server.target, token=KEY) as blocking:   # the blocking client raises the same classes
        with pytest.raises(errors.NotFound) as missing:
            blocking.get_session("0" * 32)
        assert missing.value.trailing_metadata() is not None and "NOT_FOUND" in missing.value.debug_error_string()
        with pytest.raises(errors.InvalidArgument, match="prompt is empty"):
            list(blocking.stream_generate(prompt=""))


def _only_returns_its_call(method) -> bool:
    """True when a method's body builds a request and returns ``self._call(...)`` unchanged (so it works over an
    aio stub as it is); anything else (loops, yields, a field of the reply) needs an async version."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    body = tree.body[0].body
    last = body[-1]
    returns_call = (isinstance(last, ast.Return) and isinstance(last.value, ast.Call)
                    and isinstance(last.value.func, ast.Attribute) and last.value.func.attr == "_call")
    loops = any(isinstance(node, (ast.For, ast.While, ast.Yield, ast.YieldFrom)) for node in ast.walk(tree))
    return returns_call and not loops


def test_every_blocking_method_that_does_more_than_return_its_call_has_an_async_version():
    public = {name: member for name, member in vars(RazorClient).items()
              if inspect.isfunction(member) and not name.startswith("_") and name != "close"}
    needs_async = {name for name, member in public.items() if not _only_returns_its_call(member)}
    assert {"generate", "list_sessions", "delete_session"} <= needs_async, "the guard itself is broken"
    missing = {name for name in needs_async if name not in vars(AsyncRazorClient)}
    assert not missing, f"give AsyncRazorClient an async version of {sorted(missing)}"
    for name in needs_async:
        member = vars(AsyncRazorClient)[name]
        assert inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member), name


def test_async_client_exports_imports_forks_and_aborts(start_server):
    server = start_server()

    async def run():
        async with AsyncRazorClient(server.target) as client:
            reply = await client.generate(prompt=PROMPT, max_new_tokens=3)
            blob = await client.export_session(reply.session_id)
            imported = (await client.import_session(blob)).session
            forked = await client.fork_session(reply.session_id)
            lengths = {(await client.get_session(s)).length for s in (imported.session_id, forked.session_id)}
            assert lengths == {(await client.get_session(reply.session_id)).length}
            stream = client.stream_generate(prompt=PROMPT, max_new_tokens=300, keep_session=False,
                                            request_id="async-abort")
            first = await stream.__anext__()
            assert first.request_id == "async-abort" and await client.abort("async-abort")
            rest = [msg async for msg in stream]
            assert rest[-1].completion.finish_reason == 3   # FINISH_REASON_CANCELLED
            assert isinstance(await _awaited(client.abort("async-abort")), errors.NotFound)
    asyncio.run(run())
