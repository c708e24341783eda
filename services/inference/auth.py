"""API-key auth with tenants, the loopback rule, and TLS, for the gRPC service; server side and client side.

Server: ``server_interceptors(settings)`` rejects calls without ``authorization: Bearer <key>`` metadata naming
one of the configured API keys (``Settings.api_key_tenants``: RAZOR_AUTH_TOKEN, RAZOR_API_KEYS,
RAZOR_API_KEYS_FILE) with UNAUTHENTICATED, and hands the handler a context that knows the key's tenant:
``tenant_of(context)``. With no keys there is no interceptor and every caller is tenant "" (one shared space).
The standard health service (``grpc.health.v1.Health``) stays open on purpose: load balancers, Docker and the
local stack probe liveness without holding a key, and health reveals nothing but SERVING / NOT_SERVING.
Everything else, server reflection included, needs a key.
``check_bind(settings)`` refuses to serve without keys on a non-loopback address unless
RAZOR_ALLOW_UNAUTHENTICATED says so. ``server_credentials(settings)`` gives TLS credentials when a
certificate and key are set.

Client: ``open_channel(target, token=..., tls=..., ca_cert=...)`` attaches the key to every call
(an interceptor, so it works over plaintext loopback too, where gRPC call credentials refuse).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from pathlib import Path

import grpc

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"
_BEARER = "bearer "


def _read_pem(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path!r}: {exc.strerror}") from exc


def _bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith(_BEARER):
            return value[len(_BEARER):].strip()
    return None


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails every call with UNAUTHENTICATED."""

    def abort(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return _replace_behavior(handler, lambda _behavior: abort)


def _replace_behavior(handler: grpc.RpcMethodHandler, wrap) -> grpc.RpcMethodHandler:
    """``handler`` with its one behavior replaced by ``wrap(behavior)``."""
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, kind)
        if behavior is not None:
            return handler._replace(**{kind: wrap(behavior)})
    raise ValueError(f"handler {handler!r} has no behavior")


class _TenantContext:
    """The servicer context of an authenticated call, plus the caller's tenant (read by ``tenant_of``)."""

    def __init__(self, context, tenant: str):
        self._context, self.razor_tenant = context, tenant

    def __getattr__(self, name: str):
        return getattr(self._context, name)


def tenant_of(context) -> str:
    """The tenant whose API key authenticated this call; "" when the server runs without keys."""
    return getattr(context, "razor_tenant", "")


def _digest(key: str) -> bytes:
    # Compare fixed-length digests, so the time taken says nothing about the keys' lengths either.
    return hashlib.sha256(key.encode()).digest()


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Lets a call through only with ``authorization: Bearer <key>`` for a configured key, and tells its handler
    the key's tenant; health checks stay open."""

    def __init__(self, tenant_of_key: Mapping[str, str]):
        if not tenant_of_key or not all(tenant_of_key) or not all(tenant_of_key.values()):
            raise ValueError("ApiKeyInterceptor needs at least one key, each non-empty with a non-empty tenant")
        self._tenants = [(_digest(key), tenant) for key, tenant in tenant_of_key.items()]

    def tenant(self, given: str) -> str | None:
        """The tenant of key ``given``, or None. Compares with every key, in constant time each."""
        digest, found = _digest(given), None
        for key_digest, tenant in self._tenants:
            if hmac.compare_digest(digest, key_digest):
                found = tenant
        return found

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_SERVICE_PREFIX):
            return handler
        given = _bearer_token(handler_call_details.invocation_metadata)
        if given is None:
            return _abort_handler(handler, "missing credentials: send metadata 'authorization: Bearer <key>' "
                                           "with one of the server's API keys (RAZOR_API_KEYS, RAZOR_API_KEYS_FILE "
                                           "or RAZOR_AUTH_TOKEN)")
        tenant = self.tenant(given)
        if tenant is None:
            return _abort_handler(handler, "invalid bearer token: it is none of the server's API keys "
                                           "(RAZOR_API_KEYS, RAZOR_API_KEYS_FILE, RAZOR_AUTH_TOKEN)")
        return _replace_behavior(handler, lambda behavior: _as_tenant(behavior, tenant))


def _as_tenant(behavior, tenant: str):
    return lambda request, context: behavior(request, _TenantContext(context, tenant))


def server_interceptors(settings) -> list[grpc.ServerInterceptor]:
    """Auth interceptors for ``settings``: one API-key check when any key is configured."""
    keys = settings.api_key_tenants()
    return [ApiKeyInterceptor(keys)] if keys else []


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: localhost, 127.0.0.0/8, ::1."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # a host name may resolve anywhere


class InsecureBind(ValueError):
    """The server would take unauthenticated calls from other machines."""


def check_bind(settings) -> None:
    """Refuse to serve without API keys on a non-loopback address, unless explicitly allowed."""
    if settings.api_key_tenants() or settings.allow_unauthenticated or is_loopback(settings.host):
        return
    raise InsecureBind(
        f"refusing to serve without authentication on RAZOR_HOST={settings.host!r}, which other machines can "
        "reach: set API keys (RAZOR_API_KEYS=tenant:key,... or RAZOR_API_KEYS_FILE or RAZOR_AUTH_TOKEN), or bind "
        "127.0.0.1, or set RAZOR_ALLOW_UNAUTHENTICATED=true if something in front of the service authenticates")


def server_credentials(settings) -> grpc.ServerCredentials | None:
    """TLS server credentials from ``tls_cert`` / ``tls_key`` PEM files, or None for plaintext."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    key = _read_pem(settings.tls_key, "TLS private key (RAZOR_TLS_KEY)")
    cert = _read_pem(settings.tls_cert, "TLS certificate (RAZOR_TLS_CERT)")
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


def server_name_options(server_name: str) -> list[tuple[str, object]] | None:
    """Channel options that verify the server's certificate for `server_name` rather than the target's address."""
    return [("grpc.ssl_target_name_override", server_name)] if server_name else None


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
