"""`profile_model`: load → profile (progress states) → validate → store map + PNG → activate → notify.

Job-state shape (read by the service through the result backend):
  while running: state PROGRESS, meta {done, total, stage, attempt, heartbeat (unix seconds)}
  on success:    {head_map_version, fingerprint, kv_fraction, reused, activated, active_version, activation,
                  timings}
  on failure:    the exception (type + message), e.g. a model that cannot be loaded.
Maps go live in the order their jobs were SUBMITTED (`submitted_at` of the job record the service writes, by
Redis's clock), not the order they finish: a retried, re-queued or slower older job publishes its map but leaves a
newer job's map active (`HeadMapStore.activate_if_newer`); its result and its job record (field `activation`) say
so.
A calibrating job that names `min_window`, `sink` or `ratio` gets exactly those: they become one-value search grids.
The heartbeat is refreshed every `profile_heartbeat_s` by a thread, so a reader can tell a running job
from one whose worker died; the same thread renews the job's lease (worker/watchdog.py), whose lapse makes
a live worker re-queue the job. `model_ref` is checked again here (`ModelRefPolicy`: a message put on the
queue by hand gets no further) and a model that cannot be loaded fails with a message that does not say
whether its path exists or what it is; the details go to the worker log.
"""
from __future__ import annotations

import functools
import logging
import tempfile
import threading
import time
from pathlib import Path

import redis
from celery.exceptions import Ignore, SoftTimeLimitExceeded

import services.engine as engine
from services.headmap_store import HeadMapStore, params_digest, parse_profile_params, redis_time
from services.model_refs import ModelRefPolicy
from services.settings import get_settings
from worker.app import TASK_NAME, app, redis_client
from worker.watchdog import JobLease

log = logging.getLogger(__name__)
settings = get_settings()
JOB_RECORD_KEY = "razor:profile:job:{}"   # the service's job record; must match services/inference/profile_jobs.py
FIRST_SEEN_KEY = "razor:profile:first_seen:{}"   # a job without a record: when a worker first saw it
# the compression fields a job may pin, and the calibration search grid each one pins
SHAPE_GRIDS = {"min_window": "windows", "sink": "sinks", "ratio": "ratios"}
# The deployment's calibration tasks (RAZOR_CALIBRATION_FAMILIES, RAZOR_CALIBRATION_LENGTHS), checked here so that
# a family the engine does not know stops the worker at start rather than failing every job.
CALIBRATION_TASKS = settings.calibration_overrides()
engine.CalibrationParams(**CALIBRATION_TASKS)


class Heartbeat:
    """Publishes progress meta; a background thread re-sends it so the heartbeat stays fresh."""

    def __init__(self, task, attempt: int, every_s: float, lease: JobLease | None = None, clock=time.time):
        self.task, self.every_s, self.lease = task, every_s, lease
        self.clock = clock   # the heartbeat's time: Redis's clock in a job, which the service compares it with
        # The request is thread-local: the beat thread would see an empty one (no id, no name), so
        # this delivery's request is captured here and passed to every write.
        self.request = task.request
        self.task_id = self.request.id
        self.meta = {"done": 0, "total": 1, "stage": "starting", "attempt": attempt}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_sent = 0.0
        self._thread = threading.Thread(target=self._beat, name="profile-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._send()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def update(self, done: int, total: int, stage: str) -> None:
        """The engine's progress callback; writes are throttled except on a stage change."""
        with self._lock:
            stage_changed = stage != self.meta["stage"]
            self.meta.update(done=int(done), total=int(total), stage=str(stage))
        if stage_changed or time.time() - self._last_sent > 0.1:
            self._send()

    def _send(self) -> None:
        with self._lock:
            try:
                meta = dict(self.meta, heartbeat=self.clock())
                self.task.backend.store_result(self.task_id, meta, "PROGRESS", request=self.request)
                self._last_sent = time.time()
                if self.lease is not None and not self.lease.renew():
                    # Another delivery may run it too; the result is the same (idempotent publish).
                    log.warning("profile job %s: lease lapsed; a watchdog may have re-queued it", self.task_id)
            except SoftTimeLimitExceeded:   # the job's time is up (main thread): it must end, saying why
                raise
            except Exception as e:  # a missed beat must not kill the job; the next one may get through
                log.warning("profile job %s: progress update failed: %s", self.task_id, e)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            self._send()


@functools.lru_cache(maxsize=1)   # one connection pool per (pool child) process
def _redis() -> redis.Redis:
    return redis_client(settings)


def _store() -> HeadMapStore:
    return HeadMapStore(_redis())


def _drop_if_finished(task) -> None:
    """Raise Ignore for a stale redelivery of a job that already finished."""
    meta = task.backend.get_task_meta(task.request.id)
    if meta.get("status") in ("SUCCESS", "FAILURE"):
        log.info("profile job %s already %s; dropping its redelivered message", task.request.id, meta["status"])
        raise Ignore()


def _count_attempt(task) -> int:
    """This run's number, counted in Redis once per delivery that holds the job's lease: the result backend's
    state cannot count it (a worker-lost redelivery may find it RETRY, with no attempt recorded)."""
    key = f"razor:profile:attempts:{task.request.id}"
    client = _redis()
    attempt = int(client.incr(key))
    client.expire(key, 7 * 86400)
    return attempt


def _claim(task) -> JobLease:
    """This delivery's lease on the job; Ignore when the job is finished or another delivery holds it."""
    _drop_if_finished(task)   # before waiting for any lease
    entry = {"args": list(task.request.args or ()), "kwargs": dict(task.request.kwargs or {}),
             "worker": task.request.hostname or "?"}
    lease = JobLease(_redis(), task.request.id, settings.profile_lease_s, entry)
    if not lease.claim(wait_s=settings.profile_lease_s + settings.profile_heartbeat_s):
        log.info("profile job %s runs under another delivery's lease; dropping this one", task.request.id)
        raise Ignore()
    return lease


def _job_order(task) -> float:
    """When the job was submitted (its record's `submitted_at`): the order in which maps go live. A job without a
    readable record (put on the queue by hand, or its record expired) counts from when a worker first saw it,
    remembered so that a retry keeps its place."""
    client = _redis()
    submitted = client.hget(JOB_RECORD_KEY.format(task.request.id), "submitted_at")
    try:
        return float(submitted)
    except (TypeError, ValueError):
        key = FIRST_SEEN_KEY.format(task.request.id)
        client.set(key, repr(redis_time(client)), nx=True, ex=7 * 86400)
        return float(client.get(key))


def _note_on_record(job_id: str, note: str) -> None:
    """Add `note` to the job's record (field `activation`), if the record still exists."""
    client, key = _redis(), JOB_RECORD_KEY.format(job_id)
    try:
        if client.exists(key):
            client.hset(key, "activation", note)
    except redis.RedisError as e:   # the result says it too
        log.warning("profile job %s: could not annotate its record: %s", job_id, e)


def _shape_grids(params: dict, compression: engine.CompressionParams) -> dict:
    """The calibration search grids pinned by the job: each of `SHAPE_GRIDS` it names, searched at that value
    only (the others are searched over calibration's own grid)."""
    return {grid: (getattr(compression, key),) for key, grid in SHAPE_GRIDS.items() if key in params}


def _load(model_ref: str) -> engine.LoadedModel:
    """The model `model_ref` names; a failure says what to check, never whether or what a path is."""
    path = ModelRefPolicy.from_settings(settings).resolve(model_ref)   # ModelRefRefused: a ValueError
    try:
        return engine.load_model(path or None, settings.device, threads=settings.torch_threads,
                                 dtype=settings.dtype)
    except SoftTimeLimitExceeded:
        raise
    except Exception as e:  # noqa: BLE001 - the cause (with paths) goes to the worker log only
        log.warning("profile job: loading model %r failed: %r", model_ref, e)
        raise ValueError(f"model {model_ref!r} could not be loaded: give a transformers checkpoint directory "
                         f"or .gguf file the worker can read (the worker log has the details)") from None


def _profile(loaded, profile_params, compression, calibrate: bool, targets: dict, progress,
             grids: dict | None = None) -> engine.HeadMap:
    # Calibration reports its own stages (prefilling, ablating, searching) through `progress`.
    # a job's retrieval_bits and local_bits are the storage its calibration searches (the map's heads are chosen
    # for it), its recent rows those every searched point keeps, and a window, sink or ratio it names (`grids`,
    # see _shape_grids) the only one searched
    calibration = (engine.CalibrationParams.for_model(loaded, bits=(compression.storage(),),
                                                      local_bits=(compression.local_storage(),),
                                                      recent_rows=compression.recent_rows,
                                                      local_recent_rows=compression.local_recent_rows,
                                                      **CALIBRATION_TASKS, **(grids or {}),
                                                      **targets) if calibrate else None)
    return engine.profile_model(loaded, profile_params, compression, progress=progress, calibrate=calibration)


def _png(head_map: engine.HeadMap) -> bytes | None:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "headmap.png"
            head_map.render_png(path)
            return path.read_bytes()
    except SoftTimeLimitExceeded:   # the job's time is up: it must end, saying why
        raise
    except Exception as e:  # the picture is a nicety; the map is what matters
        log.warning("head map %s: heatmap PNG failed: %s", head_map.version, e)
        return None


@app.task(bind=True, name=TASK_NAME, max_retries=settings.profile_max_retries,
          default_retry_delay=1)   # a lost worker's job is retried at once (task_retry_on_worker_lost)
def profile_model(self, model_ref: str, params: dict | None = None, calibrate: bool | None = None) -> dict:
    lease = _claim(self)
    try:
        return _profile_claimed(self, lease, model_ref, params, calibrate)
    finally:
        try:
            lease.release()
        except redis.RedisError as e:   # the lease lapses on its own; the watchdog then finds the job done
            log.warning("profile job %s: could not release its lease: %s", self.request.id, e)


def _profile_claimed(task, lease: JobLease, model_ref: str, params: dict | None, calibrate: bool | None) -> dict:
    _drop_if_finished(task)   # again: the job may have finished while this delivery waited
    attempt = _count_attempt(task)
    if attempt > settings.profile_max_retries + 1:
        raise RuntimeError(f"profiling gave up after {attempt - 1} attempts: the worker was lost each time "
                           f"(out of memory or killed?)")
    compression_defaults = engine.CompressionParams(settings.sink, settings.min_window, settings.ratio,
                                                    retrieval_bits=settings.retrieval_bits,
                                                    retrieval_value_bits=settings.retrieval_value_bits or None)
    profile_params, compression, targets = parse_profile_params(params or {}, compression_defaults)
    calibrate = settings.calibrate if calibrate is None else bool(calibrate)
    grids = _shape_grids(params or {}, compression) if calibrate else {}
    order = _job_order(task)
    t0 = time.perf_counter()
    try:
        with Heartbeat(task, attempt, settings.profile_heartbeat_s, lease, functools.partial(redis_time, _redis())) \
                as beat:
            return _run(beat, model_ref, profile_params, compression, calibrate, targets, t0, grids, order)
    except SoftTimeLimitExceeded:
        raise RuntimeError(f"profiling exceeded the time limit of {settings.profile_time_limit_s}s; "
                           f"use smaller seq_len / repeats / n_samples or raise RAZOR_PROFILE_TIME_LIMIT_S") from None


def _run(beat: Heartbeat, model_ref, profile_params, compression, calibrate, targets, t0, grids: dict,
         order: float) -> dict:
    beat.update(0, 1, "loading model")
    loaded = _load(model_ref)
    t_load = time.perf_counter()
    store = _store()
    # the tasks a map was calibrated on are part of what it is: other tasks, another version; so is a pinned
    # grid (which also keeps a job from reusing a map published before pinned shapes were honoured)
    digest = params_digest(profile_params, compression, calibrate,
                           {**targets, **{k: list(v) for k, v in {**CALIBRATION_TASKS, **grids}.items()}})
    version = store.version_for_params(loaded.fingerprint, digest)
    reused = version is not None
    if not reused:   # idempotency: the same model and parameters are profiled once
        head_map = _profile(loaded, profile_params, compression, calibrate, targets, beat.update, grids)
        beat.update(1, 1, "validating")
        engine.HeadMap.from_json(head_map.to_json(), expect=loaded.fingerprint)
        beat.update(1, 1, "storing")
        version = store.publish(head_map, _png(head_map), params_digest=digest)
    t_profile = time.perf_counter()
    job_id = beat.task_id
    activation = store.activate_if_newer(loaded.fingerprint, version, order, job_id)
    kv_fraction = store.get(loaded.fingerprint, version).kv_fraction
    t_end = time.perf_counter()
    # a newer job may have set the same map (the same parameters): then this job's map is active all the same
    active = activation.activated or activation.active == version
    if active:
        note = "activated"
        log.info("profile job: model %s map %s active (reused=%s)", loaded.fingerprint.id, version, reused)
    else:
        setter = f"job {activation.by_job}" if activation.by_job else "an explicit activation"
        note = (f"published but not activated: map {activation.active} is active, set by {setter} newer than "
                f"this job")
        log.warning("profile job %s: model %s map %s %s", job_id, loaded.fingerprint.id, version, note)
    _note_on_record(job_id, note)
    return {"head_map_version": version, "fingerprint": loaded.fingerprint.id, "kv_fraction": kv_fraction,
            "reused": reused, "activated": active, "active_version": activation.active, "activation": note,
            "timings": {"load_s": round(t_load - t0, 3), "profile_s": round(t_profile - t_load, 3),
                        "publish_s": round(t_end - t_profile, 3), "total_s": round(t_end - t0, 3)}}
