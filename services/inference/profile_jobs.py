"""ProfileJobs: enqueue profiling jobs on the worker's queue and read their state, without importing it.

The task is sent by name (`razor.profile_model`) to queue `profiling`; its state is read from the
Celery result backend as raw JSON (never unpickled, and no class named in Redis is imported).
A job record `razor:profile:job:{id}` tells a queued job (Celery: PENDING) from an unknown id.
`model_ref` is checked at submit against what this deployment may load (`ModelRefPolicy`), and the
sizes against their bounds (`services.headmap_store.PROFILE_LIMITS`), before anything is queued.
Workers announce themselves in `razor:profile:workers` (see worker/watchdog.py), so a queued job can
say that no worker is alive to take it.

    jobs = ProfileJobs(settings.redis_dsn(), models=ModelRefPolicy.from_settings(settings))
    job_id = jobs.submit("tiny-random", {"seq_len": 64})   # ValueError subclasses / BrokerUnavailable
    jobs.status(job_id)   # {state, done, total, stage, timings, head_map_version, error}; KeyError if unknown
"""
from __future__ import annotations

import json
import uuid

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from services.headmap_store import InvalidProfileParams, parse_profile_params, redis_time
from services.model_refs import ModelRefPolicy
from services.settings import get_settings

TASK_NAME = "razor.profile_model"   # must match worker/app.py (checked by tests/test_worker.py)
QUEUE = "profiling"
RECORD_TTL_S = 7 * 86400            # as long as the worker keeps results
DEFAULT_STALE_AFTER_S = 30.0        # heartbeats older than this mean the worker running the job died
TIMEOUT_S = 2.0                     # connect/read timeout: a dead broker answers quickly, never hangs
WORKERS_KEY = "razor:profile:workers"   # sorted set worker name -> last seen; must match worker/watchdog.py


class BrokerUnavailable(RuntimeError):
    """The broker (Redis) cannot be reached; the message says where and why."""


def _client_app(broker_url: str) -> Celery:
    app = Celery("razor-service", broker=broker_url, backend=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        result_accept_content=["json"], broker_connection_timeout=TIMEOUT_S,
        broker_connection_retry=False, broker_connection_max_retries=0,
        broker_transport_options={"socket_connect_timeout": TIMEOUT_S, "socket_timeout": TIMEOUT_S},
        redis_socket_connect_timeout=TIMEOUT_S, redis_socket_timeout=TIMEOUT_S,
    )
    return app


class ProfileJobs:
    def __init__(self, app_or_url: Celery | str, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                 models: ModelRefPolicy | None = None):
        """`models` None: the policy of this process's settings (RAZOR_MODEL, RAZOR_PROFILE_*)."""
        self.app = _client_app(app_or_url) if isinstance(app_or_url, str) else app_or_url
        url = self.app.conf.result_backend or self.app.conf.broker_url
        self.redis = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)
        self.stale_after_s = stale_after_s
        self.models = ModelRefPolicy.from_settings(get_settings()) if models is None else models

    # --- submit -----------------------------------------------------------------------------
    def submit(self, model_ref: str, params: dict | None = None, calibrate: bool | None = None) -> str:
        """Validate, record and enqueue a job; returns its id at once. `calibrate` None = worker's setting.

        ModelRefRefused / InvalidProfileParams (ValueErrors): nothing is queued; the message says what to fix.
        BrokerUnavailable: Redis cannot be reached."""
        params = dict(params or {})
        self.models.check(model_ref)
        targets = parse_profile_params(params)[2]
        if targets and calibrate is False:
            raise InvalidProfileParams(f"{sorted(targets)} are calibration targets; drop them or set calibrate=true")
        job_id = uuid.uuid4().hex
        try:
            record = {"model_ref": model_ref, "params": json.dumps(params), "submitted_at": redis_time(self.redis),
                      "calibrate": json.dumps(calibrate)}   # Redis's clock: maps go live in this order
            self.redis.hset(_record_key(job_id), mapping=record)
            self.redis.expire(_record_key(job_id), RECORD_TTL_S)
            self.app.send_task(TASK_NAME, args=[model_ref, params], kwargs={"calibrate": None if calibrate is None else bool(calibrate)},
                               task_id=job_id, queue=QUEUE, retry=False)
        except (redis.RedisError, OperationalError, OSError) as e:
            raise BrokerUnavailable(f"profiling queue unavailable: cannot reach Redis at "
                                    f"{_safe_url(self.app.conf.broker_url)} ({e}); is the broker running?") from e
        return job_id

    # --- status -----------------------------------------------------------------------------
    def status(self, job_id: str) -> dict:
        """The job's state (queued / running / succeeded / failed), progress, timings, version, error.

        KeyError for an id never submitted (or expired); BrokerUnavailable when Redis is down."""
        try:
            if not self.redis.exists(_record_key(job_id)):
                raise KeyError(f"no profiling job {job_id!r}")
            raw = self.redis.get(f"celery-task-meta-{job_id}")
            out = self._describe(*_meta(raw), now=redis_time(self.redis))
            if out["state"] == "queued" and not self.workers_alive():
                out["stage"] += " (no profiling worker is alive to take it)"
        except redis.RedisError as e:
            raise BrokerUnavailable(f"cannot read job state from Redis: {e}") from e
        return out

    def workers_alive(self) -> int:
        """Workers whose watchdog reported within the staleness window."""
        return self.redis.zcount(WORKERS_KEY, redis_time(self.redis) - self.stale_after_s, "+inf")

    def _describe(self, celery_state: str | None, result, now: float) -> dict:
        """`now` is Redis's clock, which workers stamp their heartbeats with (hosts' clocks may drift apart)."""
        out = {"state": "queued", "done": 0, "total": 0, "stage": "queued", "timings": {},
               "head_map_version": "", "error": "", "activation": ""}
        if celery_state == "PROGRESS" and isinstance(result, dict):
            out.update(done=int(result.get("done", 0)), total=int(result.get("total", 0)),
                       stage=str(result.get("stage", "")))
            if now - float(result.get("heartbeat", 0)) <= self.stale_after_s:
                out["state"] = "running"
            else:   # the worker died mid-job; the broker redelivers it (late ack) or it fails after retries
                out["stage"] = f"worker lost during '{out['stage']}'; waiting to be retried"
        elif celery_state == "RETRY":
            out["stage"] = f"retrying after: {_error_text(result)}"
        elif celery_state == "SUCCESS" and isinstance(result, dict):
            out.update(state="succeeded", done=1, total=1, stage="done",
                       timings=dict(result.get("timings", {})),
                       head_map_version=str(result.get("head_map_version", "")),
                       activation=str(result.get("activation", "activated")))   # results before it: activated
        elif celery_state in ("FAILURE", "REVOKED", "REJECTED", "SUCCESS"):
            out.update(state="failed", stage="failed", error=_error_text(result))
        return out


def _record_key(job_id: str) -> str:
    return f"razor:profile:job:{job_id}"


def _meta(raw) -> tuple[str | None, object]:
    """(Celery state, result) from the backend's JSON; an unreadable record reads as a failure."""
    if not raw:
        return "PENDING", None
    try:
        meta = json.loads(raw)
    except ValueError:
        return "FAILURE", "the job's state record in Redis is unreadable"
    if not isinstance(meta, dict):
        return "FAILURE", "the job's state record in Redis is unreadable"
    return meta.get("status"), meta.get("result")


def _error_text(result) -> str:
    """Celery's JSON exception shape {exc_type, exc_message} as one line, without importing anything."""
    if isinstance(result, dict) and "exc_type" in result:
        message = result.get("exc_message")
        if isinstance(message, (list, tuple)):
            message = " ".join(str(m) for m in message)
        return f"{result['exc_type']}: {message}"
    return str(result or "unknown error")


def _safe_url(url: str) -> str:
    """The broker URL without its password, for error messages."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[-1]}"
