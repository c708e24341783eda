"""API-key auth, tenants and TLS on a real gRPC server over loopback.

The server carries the standard health service (left open by design), server reflection
(a stream-stream RPC), a tiny unary echo method and two "whoami" methods (unary and server-streaming)
that answer the caller's tenant, so every handler kind the interceptor rewrites is exercised.
"""
from __future__ import annotations

import shutil
import subprocess
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from services import stack
from services.inference.auth import (ApiKeyInterceptor, InsecureBind, bind, check_bind, is_loopback, open_channel,
                                     server_credentials, server_interceptors, tenant_of)
from services.settings import Settings

TOKEN = "s3cret-token"
ECHO = "/test.Echo/Echo"
KEYS = "alice:key-of-alice,bob:key-of-bob,alice:alice-rotated"


def _echo_handler() -> grpc.GenericRpcHandler:
    echo = grpc.unary_unary_rpc_method_handler(lambda request, _ctx: request)  # raw bytes in and out
    whoami = grpc.unary_unary_rpc_method_handler(lambda _request, ctx: tenant_of(ctx).encode())
    whoami_stream = grpc.unary_stream_rpc_method_handler(lambda _request, ctx: iter([tenant_of(ctx).encode()] * 2))
    return grpc.method_handlers_generic_handler("test.Echo", {"Echo": echo, "WhoAmI": whoami,
                                                              "WhoAmIStream": whoami_stream})


def _whoami(channel: grpc.Channel) -> tuple[str, list[str]]:
    unary = channel.unary_unary("/test.Echo/WhoAmI")(b"", timeout=5).decode()
    stream = [m.decode() for m in channel.unary_stream("/test.Echo/WhoAmIStream")(b"", timeout=5)]
    return unary, stream


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
    assert "invalid bearer token" in err.value.details() and "not-the-token" not in err.value.details()


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
        assert stack.health_status(f"127.0.0.1:{port}", Settings(tls_cert=str(cert), tls_key=str(key))) == 1, \
            "a self-signed certificate naming 127.0.0.1 needs nothing more"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:  # plaintext client on a TLS port
            with pytest.raises(grpc.RpcError) as err:
                _echo(plain)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=None)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca_signed_cert(tmp_path, name: str) -> tuple[str, str, str]:
    """(CA certificate, leaf certificate, leaf key) PEM paths: a leaf issued by a CA for the DNS name `name` only,
    as a production certificate is (not self-signed, and naming no loopback address)."""
    ca, ca_key, csr = tmp_path / "ca.pem", tmp_path / "ca.key", tmp_path / "leaf.csr"
    cert, key, ext = tmp_path / "leaf.pem", tmp_path / "leaf.key", tmp_path / "leaf.ext"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=Test CA",
             "-keyout", str(ca_key), "-out", str(ca))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
    ext.write_text(f"subjectAltName=DNS:{name}\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "1",
             "-extfile", str(ext), "-out", str(cert))
    return str(ca), str(cert), str(key)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_the_health_probe_verifies_a_ca_signed_certificate_once_told_its_ca_and_name(tmp_path, monkeypatch, capsys):
    ca, cert, key = _ca_signed_cert(tmp_path, "razor.internal")
    server, port = _start(Settings(tls_cert=cert, tls_key=key))
    for variable in ("RAZOR_TLS_CA_CERT", "RAZOR_TLS_SERVER_NAME", "RAZOR_AUTH_TOKEN", "RAZOR_API_KEYS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("RAZOR_TLS_CERT", cert)
    monkeypatch.setenv("RAZOR_TLS_KEY", key)
    try:
        assert stack.main(["--check", "--port", str(port)]) == 1   # the leaf as its own root, for 127.0.0.1
        hint = capsys.readouterr().err
        assert "unhealthy: UNAVAILABLE" in hint and "RAZOR_TLS_CA_CERT" in hint and "RAZOR_TLS_SERVER_NAME" in hint
        monkeypatch.setenv("RAZOR_TLS_CA_CERT", ca)
        assert stack.main(["--check", "--port", str(port)]) == 1, "the certificate does not name 127.0.0.1"
        monkeypatch.setenv("RAZOR_TLS_SERVER_NAME", "razor.internal")
        assert stack.main(["--check", "--port", str(port)]) == 0
        monkeypatch.setenv("RAZOR_TLS_SERVER_NAME", "other.internal")
        assert stack.main(["--check", "--port", str(port)]) == 1, "a name the certificate lacks is refused"
    finally:
        server.stop(grace=None)


def test_tls_ca_or_name_without_a_certificate_is_refused():
    with pytest.raises(ValueError, match="RAZOR_TLS_CA_CERT and RAZOR_TLS_SERVER_NAME describe RAZOR_TLS_CERT"):
        Settings(tls_ca_cert="ca.pem")
    with pytest.raises(ValueError, match="describe RAZOR_TLS_CERT"):
        Settings(tls_server_name="razor.internal")


@pytest.fixture
def keys_server():
    server, port = _start(Settings(api_keys=KEYS, auth_token=TOKEN))
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.mark.parametrize("key, tenant", [("key-of-alice", "alice"), ("alice-rotated", "alice"),
                                         ("key-of-bob", "bob"), (TOKEN, "default")])
def test_each_key_reaches_handlers_as_its_tenant(keys_server, key, tenant):
    with open_channel(keys_server, token=key) as channel:
        assert _whoami(channel) == (tenant, [tenant, tenant])


@pytest.mark.parametrize("key", ["key-of-alice-", "key-of-alic", "", "KEY-OF-ALICE", "key-of-bob,key-of-alice"])
def test_near_miss_keys_are_unauthenticated(keys_server, key):
    with grpc.insecure_channel(keys_server) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/test.Echo/WhoAmI")(b"", timeout=5, metadata=[("authorization", f"Bearer {key}")])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_without_keys_everyone_is_the_empty_tenant():
    server, port = _start(Settings(auth_token="", api_keys=""))
    try:
        with open_channel(f"127.0.0.1:{port}", token="anything") as channel:
            assert _whoami(channel) == ("", ["", ""])
    finally:
        server.stop(grace=None)


def test_interceptor_refuses_an_empty_table():
    for table in ({}, {"": "alice"}, {"key": ""}):
        with pytest.raises(ValueError):
            ApiKeyInterceptor(table)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True),
                                            ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("::", False),
                                            ("10.0.0.5", False), ("example.internal", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_check_bind_needs_keys_or_consent_off_loopback():
    check_bind(Settings(host="127.0.0.1"))
    check_bind(Settings(host="0.0.0.0", api_keys="alice:k"))
    check_bind(Settings(host="0.0.0.0", auth_token="k"))
    check_bind(Settings(host="0.0.0.0", allow_unauthenticated=True))
    with pytest.raises(InsecureBind, match="RAZOR_API_KEYS.*RAZOR_ALLOW_UNAUTHENTICATED=true"):
        check_bind(Settings(host="0.0.0.0"))
