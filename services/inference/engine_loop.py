"""EngineLoop: the one thread that owns the device and steps the scheduler.

Other threads hand it work two ways: turns go to the `Scheduler` (its `submit` is thread-safe), and short
device jobs (the health probe) go through `call`. The loop steps while any turn is running or waiting and
sleeps on an event otherwise; `wake()` is how the I/O thread tells it that room was made for a waiting turn.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

import torch

from services.engine import Scheduler, threads

from .errors import ShuttingDown

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.05   # how long a loop whose waiting turns cannot be admitted yet sleeps before retrying


class EngineLoop:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self._n_threads = torch.get_num_threads()   # the constructing thread's count, before any helper's serial()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._mu = threading.Lock()   # a turn is submitted before `stop` or refused, never lost in between
        self.thread = threading.Thread(target=self._run, name="razor-engine", daemon=True)
        self.thread.start()

    def submit(self, request) -> None:
        """Hand a turn to the scheduler; ShuttingDown once `stop` began (the loop may be gone: nothing would run
        it, and its caller would wait for ever)."""
        with self._mu:
            if self._stop:
                raise ShuttingDown("the service is shutting down; retry on another replica or after restart")
            self.scheduler.submit(request)
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def call(self, fn, *args) -> Future:
        """Run `fn(*args)` on the loop thread between two steps."""
        future: Future = Future()
        self._jobs.put((future, fn, args))
        self.wake()
        return future

    def stop(self) -> None:
        """Stop once no turn is left (callers cancel or drain them first)."""
        with self._mu:
            self._stop = True
        self.wake()
        self.thread.join()

    def _run(self) -> None:
        threads.parallel(self._n_threads)
        while True:
            self._run_jobs()
            if self.scheduler.has_work:
                if not self._step():
                    self._wait(_IDLE_WAIT_S)   # nothing admissible yet: wait for room or a cancel
            elif self._stop:
                return
            else:
                self._wait(None)

    def _step(self) -> int:
        try:
            return self.scheduler.step()
        except Exception:  # noqa: BLE001 - the scheduler fails the turns it could; the loop must live on
            log.exception("scheduler step failed")
            return 0

    def _wait(self, timeout: float | None) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def _run_jobs(self) -> None:
        while True:
            try:
                future, fn, args = self._jobs.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
