"""One OpenMP team per process, the model loop's (services/engine/threads.py).

libgomp keeps a team of worker threads for every thread that ran parallel torch ops; a second team throttles the
spinning of all of them (measured: a bfloat16 token on the model loop 36 -> 62 ms). The checks count the process's
threads, which is where a team shows: its workers live as long as the thread that made them.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from services.engine import threads

TEAMS_SCRIPT = textwrap.dedent("""
    import os, time, torch
    from services.engine import threads
    torch.set_num_threads(2)
    def n_threads(): return len(os.listdir("/proc/self/task"))
    def settled(): # an exited thread's workers leave a moment after it
        for _ in range(100):
            time.sleep(0.05)
            if n_threads() == before: break
        return n_threads()
    def parallel_work(): return torch.ones(8_000_000).mul(2).sum().item()   # far above torch's grain size
    before = n_threads()
    threads.in_passing_thread(parallel_work)
    passing = settled()
    parallel_work()                                                       # on this (main) thread
    time.sleep(0.5)                                                       # a team stays: this thread lives
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


def test_each_thread_keeps_its_own_count_whatever_another_thread_sets_later():
    """torch gives a thread the count of the last `set_num_threads` of any thread when it first runs a parallel op;
    `parallel` and `serial` fix the count for their own thread at once (without that, the loop read 1 here)."""
    loop_set, helper_set = threading.Event(), threading.Event()
    counts = {}

    def loop():
        threads.parallel(2)
        loop_set.set()
        helper_set.wait(10)
        counts["loop"] = torch.get_num_threads()

    def helper():
        loop_set.wait(10)
        threads.serial()
        helper_set.set()
        counts["helper"] = torch.get_num_threads()

    workers = [threading.Thread(target=loop), threading.Thread(target=helper)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert counts == {"loop": 2, "helper": 1}


def test_parallel_refuses_a_thread_count_below_one():
    with pytest.raises(ValueError, match="n_threads must be >= 1"):
        threads.parallel(0)


def test_io_and_handler_threads_run_serial_and_the_model_loop_keeps_the_process_count(start_server):
    """The I/O thread (spill, restore) and the gRPC handlers (an import's tensors) run torch on one intra-op thread,
    and their `serial()` does not decide the model loop's count: the count of the thread that built the runtime."""
    server = start_server()
    runtime = server.runtime
    assert runtime.io.submit(torch.get_num_threads).result(timeout=10) == 1
    assert server.handlers.submit(torch.get_num_threads).result(timeout=10) == 1
    assert runtime.loop.call(torch.get_num_threads).result(timeout=10) == torch.get_num_threads()
