"""The Celery app of the profiling worker, configured for long ML jobs.

- Redis is broker and result backend (``Settings.redis_url`` + ``redis_password``); JSON only, no pickle.
- One dedicated queue, ``profiling``; prefetch of one so a busy worker does not hoard jobs.
- Late acknowledgement: a job is acked when it ends, so a worker killed mid-job does not lose it.
  A lost pool child gets a bounded retry (``profile_max_retries``; after that the job fails); a lost
  whole worker leaves the message unacked and Redis redelivers it after the visibility timeout,
  which is longer than the hard time limit so a live job is never run twice at once.
- While a job runs it refreshes a heartbeat in its progress meta, so readers can tell a running job
  from one whose worker died (see ``services/inference/profile_jobs.py``), and renews its lease; every
  worker's watchdog re-queues a job whose lease lapsed within ``profile_lease_s`` + ``profile_heartbeat_s``
  when the whole worker died, long before the visibility timeout (see ``worker/watchdog.py``).
"""
from __future__ import annotations

import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from services.settings import Settings, get_settings
from worker.watchdog import Watchdog

QUEUE = "profiling"
TASK_NAME = "razor.profile_model"   # the service sends it by this name, never importing the worker


def visibility_timeout(settings: Settings) -> int:
    return settings.profile_visibility_timeout_s or settings.profile_time_limit_s + 300


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    url = settings.redis_dsn()
    app = Celery("razor-worker", broker=url, backend=url, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=QUEUE, task_routes={TASK_NAME: {"queue": QUEUE}},
        task_acks_late=True, task_reject_on_worker_lost=True,
        task_retry_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.profile_time_limit_s,
        task_soft_time_limit=max(settings.profile_time_limit_s - 5, 1),
        result_extended=True, result_expires=7 * 86400,
        broker_connection_retry_on_startup=True, broker_connection_timeout=2,
        broker_transport_options={
            "visibility_timeout": visibility_timeout(settings),
            "socket_connect_timeout": 2, "socket_timeout": 10,
            "unacked_restore_interval": 5, "unacked_restore_throttle": 1,
        },
        redis_socket_connect_timeout=2, redis_socket_timeout=10,
        worker_hijack_root_logger=False, worker_send_task_events=False,
    )
    return app


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_dsn(), socket_connect_timeout=2, socket_timeout=10)


app = make_app()
_watchdogs: list[Watchdog] = []


@worker_ready.connect
def _start_watchdog(sender, **_) -> None:
    """In the worker's main process: announce it and re-queue jobs whose worker died."""
    settings = get_settings()

    def resend(job_id: str, args: list, kwargs: dict) -> None:
        app.send_task(TASK_NAME, args=args, kwargs=kwargs, task_id=job_id, queue=QUEUE)

    _watchdogs.append(Watchdog(redis_client(settings), sender.hostname, settings.profile_heartbeat_s,
                               resend).start())


@worker_shutdown.connect
def _stop_watchdog(**_) -> None:
    while _watchdogs:
        _watchdogs.pop().stop()
