"""One OpenMP team per process, the model loop's (services/engine/threads.py).

libgomp keeps a team of worker threads for every thread that ran parallel torch ops; a second team throttles the
spinning of all of them (measured: a bfloat16 token on the model loop 36 -> 62 ms). The checks count the process's
threads, which is where a team shows: its workers live as long as the thread that made them.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from services.engine import threads

TEAMS_SCRIPT = textwrap.dedent("""
    import os, torch
    from services.engine import threads
    torch.set_num_threads(2)
    def n_threads(): return len(os.listdir("/proc/self/task"))
    def parallel_work(): return torch.ones(8_000_000).mul(2).sum().item()   # far above torch's grain size
    before = n_threads()
    threads.in_passing_thread(parallel_work)
    passing = n_threads()
    parallel_work()                                                       # on this (main) thread
    print(before, passing, n_threads())
""")


def test_work_on_a_passing_thread_leaves_no_team_behind_while_work_on_the_caller_does():
    """Parallel work on the caller's thread leaves an OpenMP worker behind (so the check can see a team); the same
    work through `in_passing_thread` leaves none. A fresh interpreter, so no earlier test's team is counted."""
    out = subprocess.run([sys.executable, "-c", TEAMS_SCRIPT], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    before, after_passing, after_caller = map(int, out)
    assert after_passing == before
    assert after_caller > after_passing


def test_in_passing_thread_returns_the_value_and_reraises_the_error():
    assert threads.in_passing_thread(lambda: 41 + 1) == 42
    with pytest.raises(KeyError, match="missing"):
        threads.in_passing_thread(lambda: {}["missing"])


def test_parallel_refuses_a_thread_count_below_one():
    with pytest.raises(ValueError, match="n_threads must be >= 1"):
        threads.parallel(0)


def test_the_io_thread_runs_serial_and_the_model_loop_keeps_the_process_count(start_server):
    """The I/O thread (spill, restore) runs torch on one intra-op thread, and its `serial()` does not decide the
    model loop's count, which is the count of the thread that built the runtime."""
    server = start_server()
    runtime = server.runtime
    assert runtime.io.submit(torch.get_num_threads).result(timeout=10) == 1
    assert runtime.loop.call(torch.get_num_threads).result(timeout=10) == torch.get_num_threads()
