"""A worker killed outright (kill -9 of its whole process group: main process and pool child) mid-job.

The broker would redeliver the job only after its visibility timeout (set to an hour here, as in production);
the job's lease lapses within seconds instead, and a live worker's watchdog re-queues it.
Its own Redis database and workers, so the module-wide worker of test_worker.py cannot take the job.
"""
from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest
import redis

from conftest import flushed_db
from services.inference.profile_jobs import ProfileJobs
from test_worker import SLOW, finished, start_worker, stop_worker, wait_for
from worker.watchdog import RUNNING_KEY

ENV = {"RAZOR_PROFILE_VISIBILITY_TIMEOUT_S": "3600"}   # the broker's own redelivery is far away


@pytest.fixture(scope="module")
def url(redis_url) -> str:
    return flushed_db(redis_url, 7)


@pytest.fixture(scope="module")
def jobs(url) -> ProfileJobs:
    return ProfileJobs(url, stale_after_s=3.0)


def _kill_whole_worker(proc) -> None:
    members = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)   # start_worker gives each worker its own process group
    proc.wait(timeout=30)
    # The pool child dies on its own schedule (SIGKILL is delivered asynchronously): give it a moment.
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in members) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in members)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _runner(url: str, job_id: str, deadline_s: float = 60) -> str:
    """The worker name (before '@host') holding the job's running entry."""
    client, end = redis.Redis.from_url(url), time.monotonic() + deadline_s
    while time.monotonic() < end:
        entry = client.hget(RUNNING_KEY, job_id)
        if entry:
            return json.loads(entry)["worker"].split("@")[0]
        time.sleep(0.05)
    pytest.fail(f"job {job_id} never claimed")


def _final_worker(url: str, job_id: str) -> str:
    meta = json.loads(redis.Redis.from_url(url).get(f"celery-task-meta-{job_id}"))
    return meta["worker"].split("@")[0]


def test_killed_worker_job_runs_on_the_other_live_worker_within_two_minutes(url, jobs):
    workers = [start_worker(url, **ENV), start_worker(url, **ENV)]   # both prefork: main process + pool child
    try:
        wait_for_workers(jobs, 2)
        job_id = jobs.submit("tiny-random", dict(SLOW, seed=11), calibrate=False)
        wait_for(jobs, job_id, lambda s: s["state"] == "running" and s["stage"] == "scoring heads")
        victim = next(w for w in workers if w.worker_name == _runner(url, job_id))
        survivor = next(w for w in workers if w is not victim)
        _kill_whole_worker(victim)
        killed_at = time.monotonic()
        # re-queued and running again on the survivor within a minute (lease 3 s + one watchdog round)
        wait_for(jobs, job_id, lambda s: s["state"] == "running" or finished(s), deadline_s=60)
        status = wait_for(jobs, job_id, finished, deadline_s=120 - (time.monotonic() - killed_at))
        assert status["state"] == "succeeded", status
        assert _final_worker(url, job_id) == survivor.worker_name
        assert survivor.poll() is None
    finally:
        for proc in workers:
            if proc.poll() is None:
                stop_worker(proc)


def test_a_lone_dead_workers_job_waits_and_the_next_worker_to_start_runs_it(url, jobs):
    first = start_worker(url, pool="solo", **ENV)
    job_id = jobs.submit("tiny-random", dict(SLOW, seed=12), calibrate=False)
    try:
        wait_for(jobs, job_id, lambda s: s["state"] == "running" and s["stage"] == "scoring heads")
    finally:
        _kill_whole_worker(first)
    lost = wait_for(jobs, job_id, lambda s: s["state"] != "running", deadline_s=30)
    assert lost["state"] == "queued" and "worker lost" in lost["stage"]
    assert "no profiling worker is alive" in lost["stage"]
    second = start_worker(url, pool="solo", **ENV)
    try:
        status = wait_for(jobs, job_id, finished)
        assert status["state"] == "succeeded", status
    finally:
        stop_worker(second)


def wait_for_workers(jobs: ProfileJobs, n: int, deadline_s: float = 120) -> None:
    end = time.monotonic() + deadline_s
    while jobs.workers_alive() < n:
        if time.monotonic() > end:
            pytest.fail(f"fewer than {n} workers announced themselves")
        time.sleep(0.1)
