"""Spilled sessions in Redis: one hash per session, written atomically, with a TTL.

Key ``razor:session:<id>`` holds field ``header`` (the codec's JSON header) and fields
``c0 .. c<n-1>`` (the blob's chunks). A write is one MULTI/EXEC (DEL, HSET, EXPIRE), so a
reader sees the old spill or the new one, never a mix. Every Redis failure surfaces as
``SpillUnavailable``; redis-py reconnects on the next call once Redis is back.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .codec import Encoded

log = logging.getLogger(__name__)

KEY_PREFIX = "razor:session:"


class SpillUnavailable(Exception):
    """Redis could not be reached (or answered with an error)."""


class Spill:
    def __init__(self, redis_url: str, ttl_s: int, password: str = "", timeout_s: float = 2.0):
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1, got {ttl_s}")
        self.ttl_s = ttl_s
        # One quick retry on a fresh connection: a pooled connection that died while Redis
        # restarted is replaced transparently; a Redis that is down fails within ms.
        self._redis = redis.Redis.from_url(
            redis_url, password=password or None, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
        )

    @staticmethod
    def key(session_id: str) -> str:
        return KEY_PREFIX + session_id

    def write(self, session_id: str, encoded: Encoded) -> None:
        fields = {"header": encoded.header, **{f"c{i}": c for i, c in enumerate(encoded.chunks)}}
        key = self.key(session_id)
        with self._errors("write"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(key).hset(key, mapping=fields).expire(key, self.ttl_s)
            pipe.execute()

    def read_header(self, session_id: str) -> bytes | None:
        with self._errors("read"):
            return self._redis.hget(self.key(session_id), "header")

    def read_chunks(self, session_id: str, n_chunks: int) -> list[bytes | None]:
        # One chunk per reply keeps every reply bounded by the chunk size.
        key = self.key(session_id)
        with self._errors("read"):
            return [self._redis.hget(key, f"c{i}") for i in range(n_chunks)]

    def delete(self, session_id: str) -> bool:
        with self._errors("delete"):
            return bool(self._redis.delete(self.key(session_id)))

    def session_ids(self, limit: int) -> Iterator[str]:
        with self._errors("scan"):
            for n, key in enumerate(self._redis.scan_iter(match=KEY_PREFIX + "*", count=500)):
                if n >= limit:
                    return
                yield key.decode()[len(KEY_PREFIX):]

    def reachable(self) -> bool:
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self._redis.close()

    class _errors:  # context manager: redis errors -> SpillUnavailable
        def __init__(self, what: str):
            self.what = what

        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc, tb):
            if exc is not None and isinstance(exc, redis.RedisError):
                raise SpillUnavailable(f"Redis {self.what} failed: {exc}") from exc
            return False
