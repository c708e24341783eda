"""Typed client errors: one class per gRPC status, raised by the clients instead of a bare grpc.RpcError.

Each is still a grpc.RpcError with the call's ``code()``, ``details()`` (the server's message, which says what to
fix) and ``trailing_metadata()``, so code that catches grpc.RpcError keeps working::

    from services.inference import client_errors as errors

    try:
        client.continue_session(session_id, text=" and then?")
    except errors.NotFound:        # deleted, expired, or another tenant's
        ...
    except errors.Unavailable:     # Redis or the service is down, or it is shutting down: retry later
        ...

``RazorClient`` raises them from unary calls at once and from streams as they are read; ``AsyncRazorClient``
(`aio_client`) likewise when awaited or iterated.
"""
from __future__ import annotations

from contextlib import contextmanager

import grpc

Code = grpc.StatusCode


class RazorError(grpc.RpcError):
    """A call failed with a gRPC status; ``code()``, ``details()`` and ``trailing_metadata()`` as on grpc.RpcError."""

    status = Code.UNKNOWN   # the status this class stands for

    def __init__(self, code: grpc.StatusCode, details: str, call: grpc.RpcError | None = None):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._call = code, details, call

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    # Asked of the failed call only when wanted: a call this client cancelled may never have them, and grpc's
    # blocking stream waits for them.
    def trailing_metadata(self):
        return self._call.trailing_metadata() if self._call is not None else None

    def debug_error_string(self) -> str:
        return self._call.debug_error_string() if self._call is not None else ""


class Cancelled(RazorError):
    """The call was cancelled (by this client, or the request was before its turn started)."""
    status = Code.CANCELLED


class Unknown(RazorError):
    status = Code.UNKNOWN


class InvalidArgument(RazorError):
    """The request is malformed; the message names the field and what to fix. Retrying it as is cannot help."""
    status = Code.INVALID_ARGUMENT


class DeadlineExceeded(RazorError):
    status = Code.DEADLINE_EXCEEDED


class NotFound(RazorError):
    """No such session or profiling job (or one of another tenant)."""
    status = Code.NOT_FOUND


class AlreadyExists(RazorError):
    status = Code.ALREADY_EXISTS


class PermissionDenied(RazorError):
    status = Code.PERMISSION_DENIED


class ResourceExhausted(RazorError):
    """The service is full: its session limit, or a KV budget it cannot spill from while Redis is down."""
    status = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(RazorError):
    """The session is busy with another stream, or was made under another model; see the message."""
    status = Code.FAILED_PRECONDITION


class Aborted(RazorError):
    """A concurrent change won; retry."""
    status = Code.ABORTED


class OutOfRange(RazorError):
    status = Code.OUT_OF_RANGE


class Unimplemented(RazorError):
    """The server does not have this RPC (an older version)."""
    status = Code.UNIMPLEMENTED


class Internal(RazorError):
    """A bug in the service; the message names an incident id to find in its log."""
    status = Code.INTERNAL


class Unavailable(RazorError):
    """The service or its Redis cannot be reached, or the service is shutting down; retry later."""
    status = Code.UNAVAILABLE


class DataLoss(RazorError):
    """The session's stored copy is corrupt or unverifiable; it cannot be continued."""
    status = Code.DATA_LOSS


class Unauthenticated(RazorError):
    """No API key, or one the service does not know: pass it as the client's ``token``."""
    status = Code.UNAUTHENTICATED


_BY_STATUS = {cls.status: cls for cls in RazorError.__subclasses__()}


def typed(exc: grpc.RpcError) -> RazorError:
    """The typed error for a failed call (itself when it already is one)."""
    if isinstance(exc, RazorError):
        return exc
    if not callable(getattr(exc, "code", None)):   # a bare grpc.RpcError (e.g. from an interceptor)
        return RazorError(Code.UNKNOWN, str(exc))
    code = exc.code()
    return _BY_STATUS.get(code, RazorError)(code, exc.details() or "", exc)


@contextmanager
def typed_errors():
    """Re-raise a grpc.RpcError as its typed error (the original as its ``__cause__``)."""
    try:
        yield
    except RazorError:
        raise
    except grpc.RpcError as exc:
        raise typed(exc) from exc


class TypedStream:
    """A server stream of the blocking client whose errors are typed; otherwise the grpc call itself
    (``cancel()``, ``code()``, ...)."""

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> "TypedStream":
        return self

    def __next__(self):
        with typed_errors():
            return next(self._call)

    def __getattr__(self, name: str):
        return getattr(self._call, name)
