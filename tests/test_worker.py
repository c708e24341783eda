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
from services.headmap_store import InvalidProfileParams
from services.inference.profile_jobs import TASK_NAME, WORKERS_KEY, BrokerUnavailable, ProfileJobs
from services.model_refs import ModelRefPolicy, ModelRefRefused

ROOT = Path(__file__).resolve().parents[1]
FAST = {"seq_len": 32, "repeats": 2, "n_samples": 2}
SLOW = {"seq_len": 256, "repeats": 4, "n_samples": 4}   # seconds: long enough to kill mid-job
CALIBRATION_TASKS = {"RAZOR_CALIBRATION_FAMILIES": "digits,word", "RAZOR_CALIBRATION_LENGTHS": "128,256"}
JOB_DEADLINE_S = 240   # generous: only a hung job gets near it on a busy 2-core machine


def start_worker(url: str, pool: str = "prefork", **env) -> subprocess.Popen:
    # Calibration on two families at two short lengths: what a job does, in seconds rather than a minute.
    environ = dict(os.environ, REDIS_URL=url, RAZOR_PROFILE_HEARTBEAT_S="0.5", RAZOR_PROFILE_LEASE_S="3",
                   RAZOR_PROFILE_MAX_RETRIES="2", RAZOR_LOG_JSON="false", PYTHONPATH=str(ROOT),
                   **{**CALIBRATION_TASKS, **env})
    name = f"test-{pool}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "profiling",
           f"--pool={pool}", "-c", "1", "--loglevel=INFO", "--without-heartbeat", "--without-gossip",
           "--without-mingle", "-n", f"{name}@%h"]
    log = open(os.environ.get("RAZOR_TEST_WORKER_LOG", os.devnull), "ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=log, stderr=log,
                            start_new_session=True)   # its own process group: kill -9 takes the whole worker
    proc.worker_name = name   # before the '@host' celery appends
    return proc


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
def models_dir(tmp_path_factory) -> Path:
    """RAZOR_PROFILE_MODELS_DIR of this module's worker: an empty directory and a junk .gguf file."""
    root = tmp_path_factory.mktemp("models")
    (root / "empty").mkdir()
    (root / "junk.gguf").write_bytes(b"not a gguf file")
    return root


@pytest.fixture(scope="module")
def worker(url, models_dir):
    proc = start_worker(url, RAZOR_PROFILE_MODELS_DIR=str(models_dir))
    yield proc
    stop_worker(proc)


@pytest.fixture(scope="module")
def jobs(url, models_dir) -> ProfileJobs:
    return ProfileJobs(url, stale_after_s=3.0, models=ModelRefPolicy(models_dir=str(models_dir)))


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
    from services.inference.profile_jobs import _record_key
    from worker.app import QUEUE, TASK_NAME as WORKER_TASK
    from worker.tasks import JOB_RECORD_KEY
    from worker.watchdog import WORKERS_KEY as WORKER_WORKERS_KEY
    assert WORKER_TASK == TASK_NAME and QUEUE == "profiling" and WORKER_WORKERS_KEY == WORKERS_KEY
    assert JOB_RECORD_KEY.format("abc") == _record_key("abc")   # the worker reads submitted_at from it


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
    first = wait_for(jobs, jobs.submit("tiny-random", params, calibrate=False), finished)
    before = store.list_versions(tiny.fingerprint)
    second = wait_for(jobs, jobs.submit("tiny-random", params, calibrate=False), finished)
    assert first["state"] == second["state"] == "succeeded"
    assert first["head_map_version"] == second["head_map_version"]
    assert store.list_versions(tiny.fingerprint) == before


def test_a_job_asking_for_8_bit_retrieval_heads_calibrates_and_publishes_an_8_bit_map(worker, jobs, store, tiny):
    params = dict(FAST, seed=11, retrieval_bits=8, local_bits=6, local_value_bits=4)   # local rows in 6/4 too
    status = wait_for(jobs, jobs.submit("tiny-random", params, calibrate=True), finished)
    assert status["state"] == "succeeded", status
    head_map = store.get(tiny.fingerprint, status["head_map_version"])
    assert head_map.compression.retrieval_bits == 8 and head_map.compression.local_storage() == "6/4"
    assert head_map.calibration["chosen"]["bits"] == 8 and head_map.calibration["chosen"]["local_bits"] == "6/4"
    assert {(c["bits"], c["local_bits"]) for c in head_map.calibration["candidates"]} == {(8, "6/4")}


def test_a_calibrating_job_gets_exactly_the_window_sink_and_ratio_it_names(worker, jobs, store, tiny):
    # none of them on calibration's own grid (windows 32/64/128, sink 4, ratios fixed/10): it searches only these
    params = dict(FAST, seed=13, min_window=48, sink=2, ratio=8.0)
    status = wait_for(jobs, jobs.submit("tiny-random", params, calibrate=True), finished)
    assert status["state"] == "succeeded", status
    head_map = store.get(tiny.fingerprint, status["head_map_version"])
    shape = head_map.compression
    assert (shape.min_window, shape.sink, shape.ratio) == (48, 2, 8.0)
    assert head_map.method == "razor+calibrated"
    assert {(c["window"], c["sink"], c["ratio"]) for c in head_map.calibration["candidates"]} == {(48, 2, 8.0)}
    searched = head_map.calibration["params"]
    assert (searched["windows"], searched["sinks"], searched["ratios"]) == ([48], [2], [8.0])


def test_only_the_shape_fields_a_job_names_are_pinned():
    from services.engine import CompressionParams
    from worker.tasks import _shape_grids
    shape = CompressionParams(sink=2, min_window=48, ratio=8.0)
    assert _shape_grids({"min_window": 48, "seq_len": 32}, shape) == {"windows": (48,)}
    assert _shape_grids({"sink": 2, "ratio": 8.0, "min_window": 48}, shape) == \
        {"windows": (48,), "sinks": (2,), "ratios": (8.0,)}
    assert _shape_grids({}, shape) == {}   # calibration searches its own grid


def test_an_older_job_finishing_after_a_newer_one_publishes_its_map_but_leaves_the_newer_active(
        worker, jobs, store, tiny, url):
    r = redis.Redis.from_url(url)
    newer_id = jobs.submit("tiny-random", dict(FAST, seed=21), calibrate=False)
    newer = wait_for(jobs, newer_id, finished)
    assert newer["state"] == "succeeded", newer
    assert store.active_version(tiny.fingerprint) == newer["head_map_version"]
    # A job submitted a minute before it that finishes only now: its pool child was killed and it was retried,
    # a watchdog re-queued it, or another worker was slower. Its record says when it was submitted.
    older_id, older_params = f"older-{time.monotonic_ns()}", dict(FAST, seed=22)
    submitted = float(r.hget(f"razor:profile:job:{newer_id}", "submitted_at")) - 60
    r.hset(f"razor:profile:job:{older_id}", mapping={"model_ref": "tiny-random", "params": json.dumps(older_params),
                                                     "submitted_at": submitted, "calibrate": "false"})
    jobs.app.send_task(TASK_NAME, args=["tiny-random", older_params], kwargs={"calibrate": False},
                       task_id=older_id, queue="profiling")
    older = wait_for(jobs, older_id, finished)
    assert older["state"] == "succeeded", older   # it succeeds, and its map is published ...
    version = older["head_map_version"]
    assert version and version != newer["head_map_version"]
    assert store.get(tiny.fingerprint, version).version == version
    assert store.active_version(tiny.fingerprint) == newer["head_map_version"]   # ... but not activated
    result = json.loads(r.get(f"celery-task-meta-{older_id}"))["result"]
    assert result["activated"] is False and result["active_version"] == newer["head_map_version"]
    assert "published but not activated" in result["activation"] and newer_id in result["activation"]
    assert r.hget(f"razor:profile:job:{older_id}", "activation").decode() == result["activation"]
    assert r.hget(f"razor:profile:job:{newer_id}", "activation") == b"activated"
    # GetProfileJob says so too
    assert newer["activation"] == "activated" and older["activation"] == result["activation"]
    from services.inference.servicer import profile_job_pb
    assert profile_job_pb(older_id, older).activation == result["activation"]


def test_the_soft_time_limit_gets_through_the_heartbeat_and_the_picture(tiny, monkeypatch):
    """Both swallow other errors; the soft time limit must reach the task, which tells the user to shrink the job
    (else it runs into the hard kill and fails saying nothing useful)."""
    from types import SimpleNamespace

    from celery.exceptions import SoftTimeLimitExceeded

    from services.engine import HeadMap
    from worker import tasks

    def task_whose_backend_raises(exc):
        def store_result(*args, **kwargs):
            raise exc
        return SimpleNamespace(request=SimpleNamespace(id="job-1"), backend=SimpleNamespace(store_result=store_result))

    tasks.Heartbeat(task_whose_backend_raises(redis.ConnectionError("down")), 1, 60.0).update(1, 2, "scoring heads")
    beat = tasks.Heartbeat(task_whose_backend_raises(SoftTimeLimitExceeded()), 1, 60.0)
    with pytest.raises(SoftTimeLimitExceeded):
        beat.update(1, 2, "scoring heads")   # a stage change writes at once, on the job's own thread

    head_map = HeadMap.full(tiny.fingerprint)

    def render_raising(exc):
        def render_png(self, path):
            raise exc
        return render_png

    monkeypatch.setattr(HeadMap, "render_png", render_raising(RuntimeError("no fonts")))
    assert tasks._png(head_map) is None   # the picture is a nicety
    monkeypatch.setattr(HeadMap, "render_png", render_raising(SoftTimeLimitExceeded()))
    with pytest.raises(SoftTimeLimitExceeded):
        tasks._png(head_map)


def test_model_refs_outside_the_deployment_are_refused_at_submit(jobs, url):
    queued = redis.Redis.from_url(url).llen("profiling")
    messages = set()
    for ref in ("/no/such/model", "/etc/passwd", "../models/x", "~/x"):
        with pytest.raises(ModelRefRefused) as refused:
            jobs.submit(ref, FAST)
        messages.add(str(refused.value))
    assert len(messages) == 1, "the refusal must not depend on what the path is or whether it exists"
    assert "RAZOR_PROFILE_MODELS_DIR" in messages.pop()
    assert redis.Redis.from_url(url).llen("profiling") == queued


def test_unloadable_models_fail_alike_and_worker_keeps_serving(worker, jobs, models_dir):
    errors = {}
    for name in ("missing", "empty", "junk.gguf"):   # absent, a directory, a file: told apart by nothing
        status = wait_for(jobs, jobs.submit(name, FAST), finished)
        assert status["state"] == "failed", status
        errors[name] = status["error"].replace(repr(name), "NAME")
    assert len(set(errors.values())) == 1, errors
    assert "could not be loaded" in errors["missing"] and str(models_dir) not in errors["missing"]
    good = wait_for(jobs, jobs.submit("tiny-random", dict(FAST, seed=3), calibrate=False), finished)
    assert good["state"] == "succeeded", good


def test_worker_checks_model_refs_again(worker, url):
    # A client whose policy allows more than the worker's (or a message put on the queue by hand).
    lax = ProfileJobs(url, stale_after_s=3.0, models=ModelRefPolicy(allowed=("/etc/passwd",)))
    status = wait_for(lax, lax.submit("/etc/passwd", FAST), finished)
    assert status["state"] == "failed" and "not a model this deployment may profile" in status["error"]


def test_invalid_params_are_refused_before_queueing(jobs, url):
    queued = redis.Redis.from_url(url).llen("profiling")
    for params in ({"induction_fraction": 2.0}, {"seq_len": 0}, {"nonsense": 1}, {"seq_len": 10**6},
                   {"repeats": 10**3}, {"n_samples": 10**3}):
        with pytest.raises(InvalidProfileParams):
            jobs.submit("tiny-random", params)
    assert redis.Redis.from_url(url).llen("profiling") == queued


def test_live_workers_announce_themselves(worker, jobs, url):
    deadline = time.monotonic() + 60
    while jobs.workers_alive() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    names = [n.decode() for n in redis.Redis.from_url(url).zrange(WORKERS_KEY, 0, -1)]
    assert any(n.startswith(worker.worker_name + "@") for n in names), names


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
        job_id = jobs.submit("tiny-random", SLOW, calibrate=False)
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


def test_a_lease_shorter_than_two_heartbeats_is_refused_at_start():
    from pydantic import ValidationError

    from services.settings import Settings
    with pytest.raises(ValidationError, match="RAZOR_PROFILE_LEASE_S"):
        Settings(profile_heartbeat_s=20.0)   # the default 30 s lease would expire between two beats
    assert Settings(profile_heartbeat_s=15.0).profile_lease_s == 30.0


def test_calibration_tasks_from_settings_and_an_unknown_family_stops_the_worker_at_start(url):
    from pydantic import ValidationError

    from services.settings import Settings
    assert Settings().calibration_overrides() == {}   # empty: the engine's defaults
    assert Settings(calibration_families="digits, word", calibration_lengths="128,256").calibration_overrides() == \
        {"families": ("digits", "word"), "lengths": (128, 256)}
    with pytest.raises(ValidationError, match="RAZOR_CALIBRATION_LENGTHS"):
        Settings(calibration_lengths="128,16")
    env = dict(os.environ, REDIS_URL=url, PYTHONPATH=str(ROOT), RAZOR_CALIBRATION_FAMILIES="digits,poetry")
    done = subprocess.run([sys.executable, "-c", "import worker.tasks"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "families must be some of" in done.stderr and "poetry" in done.stderr
