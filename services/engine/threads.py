"""Intra-op threads: the model loop's thread should be the only one in the process with an OpenMP team.

torch's CPU build parallelises with GNU OpenMP (libgomp). Every thread that enters a parallel region gets a team
of its own, kept while that thread lives; once the teams of a process hold more threads than there are CPUs,
libgomp stops spinning between regions, and each of the thousands of parallel regions of a forward then waits on
a futex wake-up. Measured on a 2-core Xeon (bench numbers in docs/benchmarks.md §4): SmolLM2 in bfloat16, one
token on the model loop's thread, 36 ms alone and 62 ms once the main thread had cast the weights with 2 threads.
So: work that runs before the loop (loading, casting) runs on a passing thread whose team dies with it, helper
threads that touch tensors (spill, restore) run with one intra-op thread, and the loop's thread states its count.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T]) -> T:
    """`fn()` on a new thread that exits afterwards, taking its OpenMP team with it; its exception re-raised."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="razor-passing")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def serial() -> None:
    """Run this thread's torch ops on one intra-op thread (no OpenMP team): for helper threads. Call it first."""
    _set_for_this_thread(1)


def parallel(n_threads: int) -> None:
    """Give this thread `n_threads` intra-op threads (the model loop's thread calls it first, so a helper thread's
    `serial()` never decides the loop's count)."""
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    _set_for_this_thread(n_threads)


def _set_for_this_thread(n_threads: int) -> None:
    # torch sets a thread's count lazily, from the last `set_num_threads` of ANY thread, at its first parallel op;
    # reading the count does that now, so another thread's later call cannot overwrite ours.
    torch.get_num_threads()
    torch.set_num_threads(n_threads)
