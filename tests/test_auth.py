"""Bearer-token auth and TLS on a real gRPC server over loopback.

The server carries the standard health service (left open by design), server reflection
(a stream-stream RPC) and a tiny unary echo method, so every handler kind the interceptor
rewrites is exercised.
"""
from __future__ import annotations

import shutil
import subprocess
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from services.inference.auth import bind, open_channel, server_credentials, server_interceptors
from services.settings import Settings

TOKEN = "s3cret-token"
ECHO = "/test.Echo/Echo"


def _echo_handler() -> grpc.GenericRpcHandler:
    echo = grpc.unary_unary_rpc_method_handler(lambda request, _ctx: request)  # raw bytes in and out
    return grpc.method_handlers_generic_handler("test.Echo", {"Echo": echo})


def _start(settings: Settings) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=server_interceptors(settings))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    reflection.enable_server_reflection([reflection.SERVICE_NAME, "test.Echo"], server)
    server.add_generic_rpc_handlers((_echo_handler(),))
    port = bind(server, "127.0.0.1:0", settings)
    server.start()
    return server, port


@pytest.fixture
def auth_server():
    server, port = _start(Settings(auth_token=TOKEN))
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def _echo(channel: grpc.Channel, payload: bytes = b"ping") -> bytes:
    return channel.unary_unary(ECHO)(payload, timeout=5)


def _list_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    return [s.name for s in responses[0].list_services_response.service]


def test_no_token_is_unauthenticated(auth_server):
    with grpc.insecure_channel(auth_server) as channel:
        with pytest.raises(grpc.RpcError) as err:
            _echo(channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in err.value.details()


def test_wrong_token_is_unauthenticated(auth_server):
    with open_channel(auth_server, token="not-the-token") as channel:
        with pytest.raises(grpc.RpcError) as err:
            _echo(channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "invalid bearer token" in err.value.details()


def test_malformed_header_is_unauthenticated(auth_server):
    with grpc.insecure_channel(auth_server) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(ECHO)(b"x", timeout=5, metadata=[("authorization", TOKEN)])  # no "Bearer "
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_right_token_is_accepted(auth_server):
    with open_channel(auth_server, token=TOKEN) as channel:
        assert _echo(channel, b"hello") == b"hello"
        assert "test.Echo" in _list_services(channel)


def test_streaming_rpc_needs_the_token(auth_server):
    with grpc.insecure_channel(auth_server) as channel:
        with pytest.raises(grpc.RpcError) as err:
            _list_services(channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_stays_open_without_token(auth_server):
    with grpc.insecure_channel(auth_server) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_no_auth_configured_means_open():
    assert server_interceptors(Settings(auth_token="")) == []
    server, port = _start(Settings(auth_token=""))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert _echo(channel) == b"ping"
    finally:
        server.stop(grace=None)


def test_unreadable_tls_files_give_a_clear_error(tmp_path):
    settings = Settings(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match="cannot read TLS"):
        server_credentials(settings)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_tls_with_token(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    server, port = _start(Settings(auth_token=TOKEN, tls_cert=str(cert), tls_key=str(key)))
    try:
        with open_channel(f"127.0.0.1:{port}", token=TOKEN, ca_cert=str(cert)) as channel:
            assert _echo(channel, b"secure") == b"secure"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:  # plaintext client on a TLS port
            with pytest.raises(grpc.RpcError) as err:
                _echo(plain)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=None)
