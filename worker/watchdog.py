"""Job leases and the watchdog: a job whose whole worker died is re-queued by a live worker within seconds.

Celery's late ack keeps a dead worker's message, but Redis hands it out again only after the visibility
timeout (longer than the job time limit: about an hour). So each delivery also takes a lease in Redis:

    razor:profile:lease:{job_id}   the running delivery's token, expiring after `profile_lease_s`;
                                   the job's heartbeat thread renews it every `profile_heartbeat_s`
    razor:profile:running          hash job_id -> {"args", "kwargs", "worker", "claimed_at"} (JSON)
    razor:profile:workers          sorted set worker name -> last seen (read by the service)

Every worker's main process runs a `Watchdog` thread. A job still listed as running whose lease has
expired lost its worker: the first watchdog to notice removes it from the running hash (one Lua script, so
exactly one watchdog wins) and sends the task again under the same id. A delivery that finds the job
finished is dropped; one that finds another delivery's live lease waits one lease period for it to lapse
(a lost pool child's lease), then drops itself if it is still held. A dead worker's original message comes
back after the visibility timeout and is dropped the same way. Only JSON is stored; nothing is pickled.
The Lua scripts touch two keys, so the broker must be a single Redis node (Celery requires that anyway).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid

import redis

from services.headmap_store import redis_time

log = logging.getLogger(__name__)

RUNNING_KEY = "razor:profile:running"
WORKERS_KEY = "razor:profile:workers"   # must match services/inference/profile_jobs.py
FORGET_WORKER_AFTER_S = 86400.0         # entries of workers gone this long are pruned

_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
  return 1
end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
_TAKE_ORPHAN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if entry then redis.call('HDEL', KEYS[2], ARGV[1]) end
return entry
"""


def lease_key(job_id: str) -> str:
    return f"razor:profile:lease:{job_id}"


class JobLease:
    """One delivery's claim on a job: taken before it runs, renewed by its heartbeat, released at the end."""

    def __init__(self, client: redis.Redis, job_id: str, ttl_s: float, entry: dict):
        self.client, self.job_id, self.ttl_ms = client, job_id, max(int(ttl_s * 1000), 1)
        self.token = f"{entry.get('worker', '?')}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.entry = json.dumps(dict(entry, claimed_at=time.time()))
        self.held = False

    def claim(self, wait_s: float) -> bool:
        """Take the lease, waiting up to `wait_s` for another delivery's lease to lapse."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.client.eval(_CLAIM, 2, lease_key(self.job_id), RUNNING_KEY, self.token, self.ttl_ms,
                                self.job_id, self.entry):
                self.held = True
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(self.ttl_ms / 4000, 1.0))

    def renew(self) -> bool:
        """Extend the lease; False when it lapsed and another delivery may have taken the job."""
        return bool(self.client.eval(_RENEW, 1, lease_key(self.job_id), self.token, self.ttl_ms))

    def release(self) -> None:
        if self.held:
            self.client.eval(_RELEASE, 2, lease_key(self.job_id), RUNNING_KEY, self.token, self.job_id)
            self.held = False


class Watchdog:
    """Announces this worker and re-queues jobs whose lease lapsed; `resend(job_id, args, kwargs)` queues one."""

    def __init__(self, client: redis.Redis, name: str, every_s: float, resend):
        self.client, self.name, self.every_s, self.resend = client, name, every_s, resend
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="profile-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.client.zrem(WORKERS_KEY, self.name)
        except redis.RedisError as e:
            log.warning("profile watchdog: could not sign off %s: %s", self.name, e)

    def tick(self) -> list[str]:
        """One round: say this worker is alive, then re-queue orphaned jobs. Returns their ids."""
        now = redis_time(self.client)   # the service compares it with Redis's clock too
        self.client.zadd(WORKERS_KEY, {self.name: now})
        self.client.zremrangebyscore(WORKERS_KEY, "-inf", now - FORGET_WORKER_AFTER_S)
        requeued = []
        for raw_id in self.client.hkeys(RUNNING_KEY):
            job_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            entry = self.client.eval(_TAKE_ORPHAN, 2, lease_key(job_id), RUNNING_KEY, job_id)
            if entry is not None and self._requeue(job_id, entry):
                requeued.append(job_id)
        return requeued

    def _requeue(self, job_id: str, entry: bytes) -> bool:
        try:
            orphan = json.loads(entry)
            args, kwargs = list(orphan["args"]), dict(orphan["kwargs"])
        except (ValueError, KeyError, TypeError) as e:
            log.error("profile job %s: unreadable running entry (%s); left to the visibility timeout", job_id, e)
            return False
        try:
            self.resend(job_id, args, kwargs)
        except Exception as e:  # noqa: BLE001 - put it back so the next round (or another worker) retries
            self.client.hsetnx(RUNNING_KEY, job_id, entry)
            log.warning("profile job %s: re-queue failed (%s); retrying next round", job_id, e)
            return False
        log.warning("profile job %s: worker %s stopped renewing its lease; re-queued by %s",
                    job_id, orphan.get("worker", "?"), self.name)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - Redis away: the next round tries again
                log.warning("profile watchdog: round failed: %s", e)
            self._stop.wait(self.every_s)
