"""Several replicas behind the real gRPC proxy, and the drain a proxy relies on.

Two real RazorServe servers (``build_server``, the tiny random model, one real Redis) listen on
loopback ports behind the system's ``nginx`` binary, run with the configuration docker-compose.yml
uses (deploy/nginx/*.template, rendered by ``services.proxy``). Which replica served a call is read
from the proxy's access log (``upstream=``), so nothing in the servers is instrumented. The tests
check routing only: whether a replica can serve a session another one holds is the sessions' own
business (tests/test_sessions.py and friends).

The drain tests need no proxy: health turns NOT_SERVING while a stream is still running.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import proxy
from services.api.razorserve.v1 import razorserve_pb2 as pb
from services.api.razorserve.v1 import razorserve_pb2_grpc as pb_grpc
from services.inference.client import AFFINITY_HEADER, RazorClient

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
TOKEN = "lb-test-token"


@pytest.fixture(scope="module")
def nginx() -> str:
    binary = proxy.nginx_binary()
    if binary is None:
        pytest.skip(f"the gRPC proxy nginx is not installed; {proxy.INSTALL_HINT}")
    return binary


class Proxy:
    """The real nginx in the foreground, on a free loopback port, in front of ``upstreams``."""

    def __init__(self, binary: str, upstreams: list[str], runtime_dir: Path):
        self.config = proxy.ProxyConfig(f"127.0.0.1:{free_port()}", tuple(upstreams), runtime_dir)
        self.target = self.config.listen
        self._stderr = open(runtime_dir.parent / "nginx.stderr", "wb")
        self.proc = subprocess.Popen(proxy.proxy_argv(self.config, binary), stdout=subprocess.DEVNULL,
                                     stderr=self._stderr, start_new_session=True)
        self._wait_listening()

    def _wait_listening(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"nginx exited with {self.proc.returncode}: {self.stderr()}"
            try:
                host, port = self.config.listen.rsplit(":", 1)
                socket.create_connection((host, int(port)), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"nginx did not listen on {self.target} within {timeout_s:.0f} s: {self.stderr()}")

    def stderr(self) -> str:
        return (self.config.runtime_dir.parent / "nginx.stderr").read_text(errors="replace")

    def route(self, method: str, call) -> tuple[grpc.StatusCode, str]:
        """Make one call of RPC ``method``; its status and the replica that served it, from the line nginx
        logs as it finishes the call (a moment after the client has its reply, so wait for it)."""
        before = len(self.log_lines(method))
        code = _code(call)
        deadline = time.monotonic() + 5.0
        while len(lines := self.log_lines(method)) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(lines) == before + 1, f"the proxy logged {len(lines) - before} calls of {method}, not 1"
        return code, _served_by(lines[-1])

    def log_lines(self, method: str) -> list[str]:
        path, marker = self.config.access_log, f"/{method} HTTP/"
        return [line for line in path.read_text().splitlines() if marker in line] if path.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful, as the stack stops it
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._stderr.close()


@pytest.fixture
def replicas(start_server):
    """Two real servers on one Redis, with auth on as the compose file has it."""
    return [start_server(auth_token=TOKEN), start_server(auth_token=TOKEN)]


@pytest.fixture
def lb(nginx, replicas, tmp_path):
    front = Proxy(nginx, [server.target for server in replicas], tmp_path / "proxy")
    yield front
    front.stop()


def _served_by(log_line: str) -> str:
    """The replica that answered a call: the last address nginx tried (earlier ones refused it)."""
    tried = re.search(r"upstream=(.*?) seconds=", log_line).group(1)
    return tried.split(", ")[-1]


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _code(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


# ---- the pieces, without nginx ---------------------------------------------------------------------
def test_render_fills_proxy_placeholders_and_leaves_nginx_variables():
    text = "hash $http_x_razor_session consistent; listen ${PROXY_LISTEN} http2; $remote_addr"
    assert proxy.render(text, {"PROXY_LISTEN": "127.0.0.1:1234"}) == \
        "hash $http_x_razor_session consistent; listen 127.0.0.1:1234 http2; $remote_addr"
    with pytest.raises(ValueError, match="PROXY_LISTEN"):
        proxy.render(text, {})


def test_proxy_config_refuses_what_nginx_could_not_use(tmp_path):
    with pytest.raises(ValueError, match="at least one replica"):
        proxy.ProxyConfig("127.0.0.1:1234", (), tmp_path)
    with pytest.raises(ValueError, match="host:port"):
        proxy.ProxyConfig("127.0.0.1:1234", ("127.0.0.1:1; evil",), tmp_path)


def test_the_client_names_the_session_in_the_affinity_header():
    from services.inference.client import _affinity

    assert _affinity("0123abcd") == ((AFFINITY_HEADER, "0123abcd"),)
    assert _affinity("") == () and _affinity("caf\u00e9") == () and _affinity("x" * 257) == ()


# ---- routing ----------------------------------------------------------------------------------------
GET, CONTINUE, GENERATE = "razorserve.v1.RazorServe/GetSession", "razorserve.v1.RazorServe/ContinueSession", \
    "razorserve.v1.RazorServe/Generate"


def test_every_call_naming_a_session_goes_to_one_replica(lb, replicas):
    with RazorClient(lb.target, token=TOKEN, timeout_s=30) as client:
        sessions = [client.generate(prompt=f"Story {i}:", max_new_tokens=2).session_id for i in range(6)]
        for sid in sessions:  # whether the call succeeds is the sessions' business; the route is the proxy's
            routes = {lb.route(CONTINUE, lambda: client.continue_session(sid, text=" More.", max_new_tokens=2))[1],
                      lb.route(GET, lambda: client.get_session(sid))[1],
                      lb.route(GET, lambda: client.get_session(sid))[1]}
            assert len(routes) == 1, f"session {sid} was served by {routes}"

        # The key is the session id: many ids share the load, each staying on its replica.
        ids = [uuid.uuid4().hex for _ in range(32)]
        first = {sid: lb.route(GET, lambda: client.get_session(sid)) for sid in ids}
        again = {sid: lb.route(GET, lambda: client.get_session(sid)) for sid in reversed(ids)}  # no round-robin
        assert again == first                                                                # could match this
        assert {code for code, _ in first.values()} == {grpc.StatusCode.NOT_FOUND}
        assert {replica for _, replica in first.values()} == {server.target for server in replicas}


def test_calls_without_the_affinity_header_spread_over_both_replicas(lb, replicas):
    with RazorClient(lb.target, token=TOKEN, timeout_s=30) as client:
        # New sessions carry no header.
        routes = {lb.route(GENERATE, lambda: client.generate(prompt=f"Hello {i}", max_new_tokens=1))[1]
                  for i in range(4)}
        assert routes == {server.target for server in replicas}

    # The same session id without the header is routed like any new call: round-robin.
    sid, token = uuid.uuid4().hex, ("authorization", f"Bearer {TOKEN}")
    with grpc.insecure_channel(lb.target) as channel:
        stub = pb_grpc.RazorServeStub(channel)
        request = pb.GetSessionRequest(session_id=sid)
        plain = [lb.route(GET, lambda: stub.GetSession(request, timeout=10, metadata=(token,))) for _ in range(4)]
        assert {replica for _, replica in plain} == {server.target for server in replicas}
        pinned_metadata = (token, (AFFINITY_HEADER, sid))
        pinned = [lb.route(GET, lambda: stub.GetSession(request, timeout=10, metadata=pinned_metadata))
                  for _ in range(4)]
        assert len({replica for _, replica in pinned}) == 1


def test_auth_passes_through_the_proxy_and_health_stays_open(lb):
    assert _health(lb.target) == SERVING  # no token: health is open, for load balancers
    with RazorClient(lb.target, timeout_s=10) as anonymous:
        assert _code(anonymous.server_info) == grpc.StatusCode.UNAUTHENTICATED
    with RazorClient(lb.target, token="wrong", timeout_s=10) as wrong:
        assert _code(wrong.server_info) == grpc.StatusCode.UNAUTHENTICATED
    with RazorClient(lb.target, token=TOKEN, timeout_s=10) as client:
        assert client.server_info().model_ref


def test_health_through_the_proxy_follows_the_replicas(lb, replicas):
    assert _health(lb.target) == SERVING
    ids = [uuid.uuid4().hex for _ in range(16)]
    replicas[0].stop(0)  # refuses connections now: the proxy skips it
    with RazorClient(lb.target, token=TOKEN, timeout_s=10) as client:
        routes = {lb.route(GET, lambda: client.get_session(sid)) for sid in ids}  # its sessions' ids included
    assert routes == {(grpc.StatusCode.NOT_FOUND, replicas[1].target)}
    assert _health(lb.target) == SERVING

    replicas[1].stop(0)
    with pytest.raises(grpc.RpcError) as err:
        _health(lb.target)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the proxy's 502: retryable, not INTERNAL


def test_the_compose_proxy_settings_pass_nginx_config_check(nginx, tmp_path):
    """docker-compose.yml's PROXY_* values on the same templates, checked by the real nginx. Only what
    needs Docker changes: the replicas' names (nginx >= 1.27.3 `resolve`) and the runtime paths."""
    env = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["proxy"]["environment"]
    values = {k: str(v) for k, v in env.items() if k.startswith("PROXY_")}
    values.update(PROXY_UPSTREAM_SERVERS=f"server 127.0.0.1:{free_port()}; server 127.0.0.1:{free_port()};",
                  PROXY_RUNTIME_DIR=str(tmp_path), PROXY_CONF_DIR=str(tmp_path))
    for name in (proxy.MAIN_TEMPLATE, proxy.SITE_TEMPLATE):
        text = proxy.render((proxy.TEMPLATE_DIR / name).read_text(), values)
        (tmp_path / name.removesuffix(".template")).write_text(text)
    done = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(tmp_path / "nginx.conf")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


# ---- drain ----------------------------------------------------------------------------------------------
class Watch:
    """A health Watch stream read on a thread: (seconds since start, status or how it ended)."""

    def __init__(self, target: str):
        self.channel = grpc.insecure_channel(target)
        self.stream = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest())
        self.t0, self.seen = time.monotonic(), []
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for reply in self.stream:
                self.seen.append((time.monotonic(), reply.status))
            self.seen.append((time.monotonic(), grpc.StatusCode.OK))
        except grpc.RpcError as exc:
            self.seen.append((time.monotonic(), exc.code()))
        finally:
            self.ended.set()

    def wait_for(self, status, timeout_s: float = 10.0) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, seen in self.seen:
                if seen == status:
                    return at
            time.sleep(0.01)
        pytest.fail(f"the health Watch stream never sent {status}: {self.seen}")

    def close(self) -> None:
        self.channel.close()


def test_health_is_not_serving_as_soon_as_a_drain_starts_while_streams_go_on(start_server):
    server = start_server(drain_delay_s=3.0, grace_s=4.0)
    watch = Watch(server.target)
    watch.wait_for(SERVING)
    with RazorClient(server.target, timeout_s=120) as client:
        stream = client.stream_generate(prompt="Once upon a time", max_new_tokens=3900)  # ~the whole context
        assert next(stream).HasField("chunk")
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        watch.wait_for(NOT_SERVING, timeout_s=2.0)
        assert _health(server.target) == NOT_SERVING  # Check too, while the server still takes calls
        assert client.server_info().model_ref
        observed = time.monotonic()
        after = [(time.monotonic(), msg) for msg in stream]  # the stream in flight goes on, then ends
        stopping.join(timeout=60)
    assert not stopping.is_alive()
    assert after and after[-1][0] > observed and after[-1][1].HasField("completion")
    assert sum(msg.HasField("chunk") for _, msg in after) > 0, "no token reached the client after NOT_SERVING"
    assert after[-1][1].completion.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_CANCELLED)
    assert watch.ended.wait(5)
    with pytest.raises(grpc.RpcError) as err:  # stopped: connections are refused, a proxy moves on
        _health(server.target)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    watch.close()


def test_an_open_health_watch_does_not_hold_the_stop_for_the_grace_period(start_server):
    server = start_server(grace_s=8.0)
    watch = Watch(server.target)
    watch.wait_for(SERVING)
    began = time.monotonic()
    server.stop()
    assert time.monotonic() - began < 4.0, "the stop waited for the Watch stream to time out"
    assert watch.ended.wait(5)
    assert [status for _, status in watch.seen] == [SERVING, NOT_SERVING, grpc.StatusCode.OK]
    watch.close()
