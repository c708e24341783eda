"""The profiling worker end to end: a real redis-server, a real Celery worker process, tiny-random.

The worker runs as a subprocess (`celery -A worker.app worker -Q profiling`) with its environment
pointing at a private Redis database; jobs are submitted with `ProfileJobs` as the service does.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import redis

from conftest import flushed_db
from services.engine import load_model
from services.headmap_store import HeadMapStore
from services.inference.headmaps import HeadMapRegistry
from services.inference.profile_jobs import TASK_NAME, BrokerUnavailable, ProfileJobs

ROOT = Path(__file__).resolve().parents[1]
FAST = {"seq_len": 32, "repeats": 2, "n_samples": 2}
SLOW = {"seq_len": 256, "repeats": 4, "n_samples": 4}   # seconds: long enough to kill mid-job
JOB_DEADLINE_S = 240   # generous: only a hung job gets near it on a busy 2-core machine


def start_worker(url: str, pool: str = "prefork", **env) -> subprocess.Popen:
    environ = dict(os.environ, REDIS_URL=url, RAZOR_PROFILE_HEARTBEAT_S="0.5", RAZOR_PROFILE_MAX_RETRIES="2",
                   RAZOR_LOG_JSON="false", PYTHONPATH=str(ROOT), **env)
    cmd = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "profiling",
           f"--pool={pool}", "-c", "1", "--loglevel=INFO", "--without-heartbeat", "--without-gossip",
           "--without-mingle", "-n", f"test-{pool}-{time.monotonic_ns()}@%h"]
    log = open(os.environ.get("RAZOR_TEST_WORKER_LOG", os.devnull), "ab")
    return subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=log, stderr=log,
                            start_new_session=True)


def stop_worker(proc: subprocess.Popen) -> None:
    for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
        child.kill()
    proc.kill()
    proc.wait(timeout=30)


def wait_for(jobs: ProfileJobs, job_id: str, predicate, deadline_s: float = JOB_DEADLINE_S) -> dict:
    """Poll the job until `predicate(status)`; fail (never hang) after the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        status = jobs.status(job_id)
        if predicate(status):
            return status
        time.sleep(0.05)
    pytest.fail(f"job {job_id} did not reach the expected state; last: {jobs.status(job_id)}")


def finished(status: dict) -> bool:
    return status["state"] in ("succeeded", "failed")


@pytest.fixture(scope="module")
def url(redis_url) -> str:
    return flushed_db(redis_url, 6)


@pytest.fixture(scope="module")
def worker(url):
    proc = start_worker(url)
    yield proc
    stop_worker(proc)


@pytest.fixture(scope="module")
def jobs(url) -> ProfileJobs:
    return ProfileJobs(url, stale_after_s=3.0)


@pytest.fixture(scope="module")
def store(url) -> HeadMapStore:
    return HeadMapStore(redis.Redis.from_url(url))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random")


class StateRecorder:
    """Every state the result backend publishes (Celery's Redis backend PUBLISHes each write)."""

    def __init__(self, url: str):
        self.pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("celery-task-meta-*")
        self.states: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            msg = self.pubsub.get_message(timeout=0.1)
            if msg:
                self.states.append(json.loads(msg["data"]))

    def close(self):
        self._stop.set()
        self._thread.join()
        self.pubsub.close()


def test_service_and_worker_agree_on_the_task_name():
    from worker.app import QUEUE, TASK_NAME as WORKER_TASK
    assert WORKER_TASK == TASK_NAME and QUEUE == "profiling"


def test_job_succeeds_with_progress_and_registry_hot_loads(worker, jobs, store, tiny, url):
    registry = HeadMapRegistry(store, tiny.fingerprint, poll_s=0.1).start()
    recorder = StateRecorder(url)
    try:
        job_id = jobs.submit("tiny-random", FAST)
        status = wait_for(jobs, job_id, finished)
        assert status["state"] == "succeeded", status
        version = status["head_map_version"]
        assert status["timings"]["total_s"] > 0 and status["error"] == ""
        # hot-loaded through pub/sub (or the catch-up read at subscribe), without a restart
        assert registry.wait_processed(version) == "activated"
        assert registry.active.version == version
    finally:
        recorder.close()
        registry.stop()
    progress = [s["result"] for s in recorder.states if s["task_id"] == job_id and s["status"] == "PROGRESS"]
    assert any(0 < p["done"] < p["total"] for p in progress), progress
    assert store.active(tiny.fingerprint).version == version
    assert store.png(tiny.fingerprint, version).startswith(b"\x89PNG")
    rows = store.list_versions(tiny.fingerprint)
    assert [r["version"] for r in rows if r["active"]] == [version]


def test_same_model_and_params_twice_gives_one_version(worker, jobs, store, tiny):
    params = dict(FAST, seed=7)
    first = wait_for(jobs, jobs.submit("tiny-random", params), finished)
    before = store.list_versions(tiny.fingerprint)
    second = wait_for(jobs, jobs.submit("tiny-random", params), finished)
    assert first["state"] == second["state"] == "succeeded"
    assert first["head_map_version"] == second["head_map_version"]
    assert store.list_versions(tiny.fingerprint) == before


def test_unknown_model_fails_clearly_and_worker_keeps_serving(worker, jobs):
    bad = wait_for(jobs, jobs.submit("/no/such/model", FAST), finished)
    assert bad["state"] == "failed"
    assert "/no/such/model" in bad["error"]
    good = wait_for(jobs, jobs.submit("tiny-random", dict(FAST, seed=3)), finished)
    assert good["state"] == "succeeded", good


def test_invalid_params_are_refused_before_queueing(jobs, url):
    queued = redis.Redis.from_url(url).llen("profiling")
    for params in ({"induction_fraction": 2.0}, {"seq_len": 0}, {"nonsense": 1}):
        with pytest.raises(ValueError):
            jobs.submit("tiny-random", params)
    assert redis.Redis.from_url(url).llen("profiling") == queued


def test_unknown_job_id_is_a_key_error(jobs):
    with pytest.raises(KeyError):
        jobs.status("no-such-job")


def test_broker_down_is_broker_unavailable_not_a_hang():
    from conftest import free_port
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_submit_outcome(f"redis://127.0.0.1:{free_port()}/0")))
    thread.start()
    thread.join(timeout=60)   # a hang fails here instead of blocking the suite
    assert not thread.is_alive() and outcome and isinstance(outcome[0], BrokerUnavailable)
    assert "cannot reach Redis" in str(outcome[0])


def _submit_outcome(url: str):
    try:
        return ProfileJobs(url).submit("tiny-random", FAST)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e


def test_killing_the_pool_child_mid_job_retries_it(worker, jobs, url):
    recorder = StateRecorder(url)
    try:
        job_id = jobs.submit("tiny-random", SLOW)
        wait_for(jobs, job_id, lambda s: s["state"] == "running" and s["stage"] == "scoring heads")
        children = psutil.Process(worker.pid).children(recursive=True)
        assert children, "prefork worker has no pool child"
        for child in children:
            child.send_signal(signal.SIGKILL)
        status = wait_for(jobs, job_id, finished)
    finally:
        recorder.close()
    assert status["state"] == "succeeded", status   # retried on a fresh pool child
    seen = [s["status"] for s in recorder.states if s["task_id"] == job_id]
    assert "RETRY" in seen, seen
    attempts = {s["result"].get("attempt") for s in recorder.states
                if s["task_id"] == job_id and s["status"] == "PROGRESS"}
    assert attempts == {1, 2}
    assert worker.poll() is None


def test_service_and_worker_never_import_each_other():
    import ast

    def imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    for path in (ROOT / "worker").glob("*.py"):
        assert not any(m.startswith("services.inference") for m in imports(path)), path
    for path in (ROOT / "services" / "inference").glob("*.py"):
        assert not any(m == "worker" or m.startswith("worker.") for m in imports(path)), path
    assert not any(m.startswith(("services.inference", "worker")) for m in imports(ROOT / "services/headmap_store.py"))
