"""Bearer-token auth and TLS for the gRPC service, server side and client side.

Server: ``server_interceptors(settings)`` rejects calls without ``authorization: Bearer <token>``
metadata with UNAUTHENTICATED when ``settings.auth_token`` is set. The standard health service
(``grpc.health.v1.Health``) stays open on purpose: load balancers, Docker and the local stack
probe liveness without holding the secret, and health reveals nothing but SERVING / NOT_SERVING.
Everything else, server reflection included, needs the token.
``server_credentials(settings)`` gives TLS credentials when a certificate and key are set.

Client: ``open_channel(target, token=..., tls=..., ca_cert=...)`` attaches the token to every call
(an interceptor, so it works over plaintext loopback too, where gRPC call credentials refuse).
"""
from __future__ import annotations

import hmac
from pathlib import Path

import grpc

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"
_BEARER = "bearer "


def _read_pem(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path!r}: {exc.strerror}; check RAZOR_TLS_CERT / RAZOR_TLS_KEY") from exc


def _bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith(_BEARER):
            return value[len(_BEARER):].strip()
    return None


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails every call with UNAUTHENTICATED."""

    def abort(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort, **kwargs)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Lets a call through only with ``authorization: Bearer <token>``; health checks stay open."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._token = token.encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_SERVICE_PREFIX):
            return handler
        given = _bearer_token(handler_call_details.invocation_metadata)
        if given is None:
            return _abort_handler(handler, "missing credentials: send metadata 'authorization: Bearer <token>' "
                                           "(the token the server has in RAZOR_AUTH_TOKEN)")
        if not hmac.compare_digest(given.encode(), self._token):
            return _abort_handler(handler, "invalid bearer token: it does not match the server's RAZOR_AUTH_TOKEN")
        return handler


def server_interceptors(settings) -> list[grpc.ServerInterceptor]:
    """Auth interceptors for ``settings``: one bearer-token check when ``auth_token`` is set."""
    return [BearerTokenInterceptor(settings.auth_token)] if settings.auth_token else []


def server_credentials(settings) -> grpc.ServerCredentials | None:
    """TLS server credentials from ``tls_cert`` / ``tls_key`` PEM files, or None for plaintext."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    key = _read_pem(settings.tls_key, "TLS private key")
    cert = _read_pem(settings.tls_cert, "TLS certificate")
    return grpc.ssl_server_credentials([(key, cert)])


def bind(server: grpc.Server, address: str, settings) -> int:
    """Bind ``server`` to ``address`` with TLS when configured; returns the bound port."""
    credentials = server_credentials(settings)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


# --- client side --------------------------------------------------------------------------

def auth_metadata(token: str) -> list[tuple[str, str]]:
    """The call metadata that carries ``token`` (empty list when there is no token)."""
    return [("authorization", f"Bearer {token}")] if token else []


def channel_credentials(ca_cert: str = "") -> grpc.ChannelCredentials:
    """TLS channel credentials trusting ``ca_cert`` (a PEM file; empty = the system roots)."""
    roots = _read_pem(ca_cert, "CA certificate") if ca_cert else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


class _MetadataClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the bearer token) to every call made on a channel."""

    def __init__(self, metadata: list[tuple[str, str]]):
        self._metadata = metadata

    def _details(self, details):
        merged = list(details.metadata or []) + self._metadata
        return details._replace(metadata=merged) if hasattr(details, "_replace") else _Details(details, merged)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    """ClientCallDetails with replaced metadata (grpc's own object is not a namedtuple)."""

    def __init__(self, base, metadata):
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def open_channel(target: str, *, token: str = "", tls: bool = False, ca_cert: str = "",
                 options: list[tuple[str, object]] | None = None) -> grpc.Channel:
    """A channel to ``target``: TLS when ``tls`` or ``ca_cert``; every call carries ``token``."""
    if tls or ca_cert:
        channel = grpc.secure_channel(target, channel_credentials(ca_cert), options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if token:
        channel = grpc.intercept_channel(channel, _MetadataClientInterceptor(auth_metadata(token)))
    return channel
