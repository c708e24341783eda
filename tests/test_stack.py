"""The local stack end to end, started the way `make run` starts it.

``python -m services.stack --workdir <tmp> --port <free>`` runs as a subprocess with its embedded
Redis, the real Celery profiling worker and the real gRPC service. The test waits for health,
runs Generate and ContinueSession through the CLI, runs a ProfileModel job to completion, stops
the stack with SIGINT (Ctrl-C) and checks the exit was clean. A second start on the same workdir
(no worker) then continues the session spilled at the first shutdown: the embedded Redis kept it.

With ``--replicas 2`` the same command starts two services behind the nginx proxy (skipped when
nginx is not installed); routing itself is tests/test_loadbalancer.py's.

The service runs the tiny random model (``RAZOR_MODEL=tiny-random``; set RAZOR_STACK_TEST_MODEL
to use another) so the test stays fast on two CPU cores; `make run` uses the embedded SmolLM2.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.inference.client import RazorClient
from services.api.razorserve.v1 import razorserve_pb2 as pb

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = os.environ.get("RAZOR_STACK_TEST_MODEL", "tiny-random")
READY_TIMEOUT_S = 600.0   # cold imports of torch/transformers/celery on a busy 2-core machine
STOP_TIMEOUT_S = 180.0


class Stack:
    """One `python -m services.stack` process with its output in a log file."""

    def __init__(self, workdir: Path, port: int, *extra: str):
        self.target = f"127.0.0.1:{port}"
        self.log_path = workdir / f"stack-{port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAZOR_") and k != "REDIS_URL"}
        env.update(RAZOR_MODEL=MODEL, RAZOR_LOG_JSON="false", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.stack", "--workdir", str(workdir), "--port", str(port), *extra],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_healthy(self) -> None:
        """Wait as a person does, for the stack's ready banner (printed once every replica and the proxy are
        SERVING), then check health. Polling the proxy earlier would fail on replicas still loading, and nginx
        then sets those replicas aside for its fail_timeout, skewing which replica serves what."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"stack exited with {self.proc.returncode}:\n{self.log()}"
            if "RazorServe is ready on" in self.log():
                with grpc.insecure_channel(self.target) as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, self.log()
                return
            time.sleep(0.5)
        pytest.fail(f"stack not healthy within {READY_TIMEOUT_S:.0f} s:\n{self.log()}")

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the stack; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"stack did not stop within {STOP_TIMEOUT_S:.0f} s of SIGINT:\n{self.log()}")
        finally:
            self._log.close()


@pytest.fixture
def stack_factory(tmp_path):
    started: list[Stack] = []

    def start(*extra: str) -> Stack:
        stack = Stack(tmp_path, free_port(), *extra)
        started.append(stack)
        stack.wait_healthy()
        return stack

    yield start
    for stack in started:  # a failed test still leaves nothing running
        if stack.proc.poll() is None:
            stack.interrupt()


def cli(target: str, *args: str) -> dict:
    """Run the CLI with --json and return its JSON output."""
    done = subprocess.run([sys.executable, "-m", "services.inference.cli", "--target", target, "--timeout", "300",
                           *args, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"cli {args} failed: {done.stderr}"
    return json.loads(done.stdout)


def run_profile_job(target: str) -> pb.ProfileJob:
    with RazorClient(target, timeout_s=30) as client:
        job = client.profile_model(MODEL, seq_len=32, repeats=2, n_samples=1, calibrate=False)
        deadline = time.monotonic() + 300
        while job.state not in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED) and time.monotonic() < deadline:
            time.sleep(1.0)
            job = client.get_profile_job(job.job_id)
    return job


def test_stack_serves_profiles_and_stops_cleanly(stack_factory, tmp_path):
    stack = stack_factory()
    first = cli(stack.target, "generate", "The capital of France is", "--max-new-tokens", "8")
    assert first["session_id"] and first["generated_tokens"] == 8 and first["finish_reason"] == "length"
    second = cli(stack.target, "continue", first["session_id"], " And of Italy?", "--max-new-tokens", "6")
    assert second["session_id"] == first["session_id"]
    assert second["cached_tokens"] >= first["prompt_tokens"] + first["generated_tokens"] - 1  # history not re-run

    job = run_profile_job(stack.target)
    assert job.state == pb.JOB_STATE_SUCCEEDED, f"profiling job ended {job}:\n{stack.log()}"
    assert job.head_map_version

    assert stack.interrupt() == 0, stack.log()
    log = stack.log()
    assert "RazorServe is ready on" in log and "grpcurl -plaintext" in log
    assert log.index("stopping service") < log.index("stopping worker") < log.index("stopping redis")
    assert (tmp_path / "redis" / "dump.rdb").exists(), "embedded Redis did not save on shutdown"

    # Restart on the same workdir: the session spilled at shutdown is continued from Redis.
    again = stack_factory("--no-worker")
    third = cli(again.target, "continue", first["session_id"], " And of Spain?", "--max-new-tokens", "4")
    assert third["session_id"] == first["session_id"] and third["generated_tokens"] == 4
    assert again.interrupt() == 0, again.log()


def test_embedded_redis_requires_the_configured_password(tmp_path):
    import threading

    import redis

    from services.stack import start_embedded_redis

    child, url = start_embedded_redis(tmp_path, "pw-123", dict(os.environ))
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        assert redis.Redis.from_url(url, password="pw-123", socket_connect_timeout=2).ping()
    finally:
        assert child.stop(30, threading.Event()) == 0


def test_stack_options_and_check_report_problems(tmp_path):
    from services.stack import StackOptions, main

    with pytest.raises(ValueError, match="--port"):
        StackOptions(70000, "", True, tmp_path, 10)
    with pytest.raises(ValueError, match="--redis-url"):
        StackOptions(50051, "http://nope", True, tmp_path, 10)
    assert main(["--check", "--port", str(free_port())]) == 1  # nothing listens there


def test_stack_runs_replicas_behind_the_proxy_and_stops_them_together(stack_factory, tmp_path):
    from services import proxy

    if proxy.nginx_binary() is None:
        pytest.skip(f"the gRPC proxy nginx is not installed; {proxy.INSTALL_HINT}")
    stack = stack_factory("--replicas", "2", "--no-worker")
    for index in range(4):  # new sessions: round-robin over the replicas
        reply = cli(stack.target, "generate", f"Tale {index}:", "--max-new-tokens", "2")
        assert reply["session_id"] and reply["generated_tokens"] == 2
    with RazorClient(stack.target, timeout_s=30) as client:
        assert client.server_info().model_ref == MODEL
    access_log = (tmp_path / "proxy" / "access.log").read_text()
    served = {line.split("upstream=")[1].split()[0] for line in access_log.splitlines() if "/Generate " in line}
    assert len(served) == 2, access_log

    assert stack.interrupt() == 0, stack.log()
    log = stack.log()
    assert "2 replicas behind the nginx proxy" in log
    front = max(log.index(f"stopping {name}") for name in ("service-1", "service-2", "proxy"))
    assert front < log.index("stopping redis")


def test_stack_refuses_replicas_it_cannot_run(tmp_path, monkeypatch):
    from services import proxy
    from services.settings import Settings
    from services.stack import StackOptions, _check_replicas

    with pytest.raises(ValueError, match="--replicas 0"):
        StackOptions(50051, "", True, tmp_path, 10, replicas=0)
    options = StackOptions(50051, "", True, tmp_path, 10, replicas=2)
    with pytest.raises(ValueError, match="plaintext"):
        _check_replicas(options, Settings(tls_cert="cert.pem", tls_key="key.pem"))
    monkeypatch.setattr(proxy, "nginx_binary", lambda: None)
    with pytest.raises(RuntimeError, match="apt-get install nginx"):
        _check_replicas(options, Settings())
    _check_replicas(StackOptions(50051, "", True, tmp_path, 10), Settings())  # one replica needs no proxy
    # The replicas bind loopback, but the proxy publishes them: no API keys on a public host is refused, as it
    # is for one replica.
    from services.inference.auth import InsecureBind
    with pytest.raises(InsecureBind, match="RAZOR_HOST='0.0.0.0'"):
        _check_replicas(options, Settings(host="0.0.0.0", auth_token="", api_keys="", api_keys_file=""))
    with pytest.raises(RuntimeError, match="apt-get install nginx"):   # with a key, on to the next check
        _check_replicas(options, Settings(host="0.0.0.0", auth_token="a-long-enough-token-1234"))
