"""A worker killed outright (not only its pool child) mid-job: the job is redelivered, never stuck.

Its own Redis database and workers, so the module-wide worker of test_worker.py cannot take the job.
"""
from __future__ import annotations

import pytest

from conftest import flushed_db
from services.inference.profile_jobs import ProfileJobs
from test_worker import SLOW, finished, start_worker, stop_worker, wait_for


@pytest.fixture(scope="module")
def url(redis_url) -> str:
    return flushed_db(redis_url, 7)


@pytest.fixture(scope="module")
def jobs(url) -> ProfileJobs:
    return ProfileJobs(url, stale_after_s=3.0)


def test_killing_the_whole_worker_mid_job_is_not_stuck_running(url, jobs):
    # A solo worker dies with its job: the message stays unacked and Redis redelivers it after the
    # visibility timeout (short here) to the next worker; meanwhile the job no longer reads "running".
    env = {"RAZOR_PROFILE_VISIBILITY_TIMEOUT_S": "2"}
    first = start_worker(url, pool="solo", **env)
    job_id = jobs.submit("tiny-random", dict(SLOW, seed=11))
    try:
        wait_for(jobs, job_id, lambda s: s["state"] == "running" and s["stage"] == "scoring heads")
    finally:
        stop_worker(first)
    lost = wait_for(jobs, job_id, lambda s: s["state"] != "running")
    assert lost["state"] == "queued" and "worker lost" in lost["stage"]
    second = start_worker(url, pool="solo", **env)
    try:
        status = wait_for(jobs, job_id, finished)
        assert status["state"] == "succeeded", status
    finally:
        stop_worker(second)
