"""Spilled sessions in Redis: one hash per session, written atomically, with a TTL.

Key ``razor:{<id>}:spill`` holds field ``header`` (the codec's JSON header) and fields
``c0 .. c<n-1>`` (the blob's chunks). Every key of one session carries the session id as its hash tag
(``{<id>}``), so its spill, metadata and lease share one Redis Cluster slot and one Lua script or MULTI
can touch them together (`services.inference.directory` writes spills fenced by ownership). An unfenced write
here (tools, tests) is one MULTI/EXEC (DEL, HSET, EXPIRE), so a reader sees the old spill or the new one, never a
mix. Reads are batched: one HMGET per batch
of chunks (at most ``READ_BATCH_BYTES`` of the codec's chunks per reply), so restoring N chunks takes
about N / batch round trips, not N; ``read`` gets the header with the first batch. Every Redis failure
surfaces as ``SpillUnavailable``; redis-py reconnects on the next call once Redis is back.
"""
from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager

import redis
import redis.cluster
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .codec import DEFAULT_CHUNK_BYTES, Encoded, is_count

log = logging.getLogger(__name__)

# Most chunk bytes one read round trip asks for (two of the codec's 8 MiB chunks). It bounds the reply
# that Redis buffers and the client holds at once, and it is small on purpose: redis-py's pure-Python
# parser buffers a reply whole, and on the 2-core test machine replies of up to 16 MiB read at about
# 1.2 GB/s while replies of 24 MiB or more fell to 0.5-0.7 GB/s (hiredis showed the same, less so).
# A round trip costs ~0.05 ms on loopback: 16 MiB batches already make it noise next to the transfer.
READ_BATCH_BYTES = 16 * 2**20
# Most chunks one round trip asks for when a header (not yet verified by the codec) sets the batch: a forged tiny
# chunk size (n_chunks 10**9) could otherwise make one HMGET name millions of fields. The read also stops at the
# first missing chunk, so an unverified n_chunks never costs more than the chunks Redis really holds.
READ_BATCH_FIELDS = 1024


# What an unreachable Redis raises: redis-py's cluster client raises RedisClusterException, which is no
# RedisError, when no node of the cluster answers.
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)


class SpillUnavailable(Exception):
    """Redis could not be reached (or answered with an error)."""


def spill_key(session_id: str) -> str:
    return f"razor:{{{session_id}}}:spill"


def meta_key(session_id: str) -> str:
    return f"razor:{{{session_id}}}:meta"


def lease_key(session_id: str) -> str:
    return f"razor:{{{session_id}}}:lease"


def deleted_key(session_id: str) -> str:
    """A deleted session's tombstone (for its TTL): a copy saved locally before the delete is not uploaded."""
    return f"razor:{{{session_id}}}:deleted"


def connect(redis_url: str, password: str = "", timeout_s: float = 2.0, cluster: bool = False):
    """A redis-py client for the sessions' Redis: one server, or a Redis Cluster seeded from `redis_url`."""
    # One quick retry on a fresh connection: a pooled connection that died while Redis
    # restarted is replaced transparently; a Redis that is down fails within ms.
    options = dict(password=password or None, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    if cluster:
        return LazyCluster(redis_url, options)
    return redis.Redis.from_url(redis_url, retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 1), **options)


class LazyCluster:
    """A `RedisCluster` built on first use. redis-py's connects to the cluster in its constructor, so a service
    started while the cluster is down would not start, where on one Redis it starts and serves once Redis is up;
    until a node answers, every call raises ConnectionError, as one unreachable Redis does.

    Pub/sub goes through any primary, not only the one serving the channel's hash slot (redis-py's choice):
    classic pub/sub messages reach every node of a cluster, and that one node may be down while the others
    serve (``cluster-require-full-coverage no``)."""

    def __init__(self, redis_url: str, options: dict):
        self._url, self._options = redis_url, options
        self._client: redis.cluster.RedisCluster | None = None
        self._mu = threading.Lock()
        self._subscriptions = 0

    def __getattr__(self, name: str):
        return getattr(self._connected(), name)

    def pubsub(self, **kwargs):
        """A pub/sub connection on the next primary in turn, so a re-subscription after a failure moves on."""
        client = self._connected()
        primaries = client.get_primaries()
        self._subscriptions += 1
        return client.pubsub(node=primaries[self._subscriptions % len(primaries)], **kwargs)

    def publish(self, channel: str, message) -> int:
        """Publish through the first primary that answers."""
        client, failure = self._connected(), None
        for node in client.get_primaries():
            try:
                return client.publish(channel, message, target_nodes=node)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                failure = exc
        raise failure or redis.ConnectionError("the Redis Cluster has no primary")

    def _connected(self) -> redis.cluster.RedisCluster:
        with self._mu:
            if self._client is None:
                try:
                    self._client = redis.cluster.RedisCluster.from_url(self._url, **self._options)
                except redis.exceptions.RedisClusterException as exc:
                    raise redis.ConnectionError(str(exc)) from exc
            return self._client

    def close(self) -> None:
        with self._mu:
            if self._client is not None:
                self._client.close()


class Spill:
    def __init__(self, redis_url: str, ttl_s: int, password: str = "", timeout_s: float = 2.0,
                 cluster: bool = False):
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1, got {ttl_s}")
        self.ttl_s = ttl_s
        self.client = connect(redis_url, password, timeout_s, cluster)
        self._redis = self.client

    key = staticmethod(spill_key)

    def write(self, session_id: str, encoded: Encoded) -> None:
        fields = {"header": encoded.header, **{f"c{i}": c for i, c in enumerate(encoded.chunks)}}
        key = self.key(session_id)
        with self._errors("write"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(key)   # not chained: a cluster pipeline's `delete` does not return the pipeline
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def read_header(self, session_id: str) -> bytes | None:
        with self._errors("read"):
            return self._redis.hget(self.key(session_id), "header")

    def read_chunks(self, session_id: str, n_chunks: int,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes | None]:
        """Chunks ``c0 .. c<n_chunks-1>`` in order (None for a missing one), one HMGET per batch of
        about ``READ_BATCH_BYTES`` (``chunk_bytes`` is the size the chunks were cut at)."""
        key, step = self.key(session_id), self.batch_chunks(chunk_bytes)
        chunks: list[bytes | None] = []
        with self._errors("read"):
            for start in range(0, n_chunks, step):
                chunks.extend(self._redis.hmget(key, _fields(start, min(n_chunks, start + step))))
        return chunks

    def read(self, session_id: str, n_chunks: int | None = None,
             chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[bytes | None, list[bytes | None]]:
        """``(header, chunks)`` of a spilled session; ``(None, [])`` when there is none.

        The header comes in the same HMGET as the first batch of chunks, so a session of up to one
        batch is one round trip. Without ``n_chunks`` the header says how many chunks there are (and
        their size, for the later batches, never more than ``READ_BATCH_FIELDS`` a trip: it is not verified
        yet); a header that cannot be parsed or names counts the codec refuses, or a missing chunk, ends the
        read early, with what was read so far, for the codec to refuse."""
        key, step = self.key(session_id), self.batch_chunks(chunk_bytes)
        first = step if n_chunks is None else min(step, n_chunks)
        with self._errors("read"):
            header, *chunks = self._redis.hmget(key, ["header", *_fields(0, first)])
            if header is None:
                return None, []
            if n_chunks is None:
                n_chunks, chunk_bytes = _chunking(header, chunk_bytes)
                if n_chunks is None:
                    return header, chunks
                chunks = chunks[:n_chunks]
                step = min(READ_BATCH_FIELDS, self.batch_chunks(chunk_bytes))   # the header is not verified yet
            for start in range(len(chunks), n_chunks, step):
                if None in chunks:  # incomplete: the codec refuses it whatever the rest holds
                    break
                chunks.extend(self._redis.hmget(key, _fields(start, min(n_chunks, start + step))))
        return header, chunks

    @staticmethod
    def batch_chunks(chunk_bytes: int) -> int:
        """Chunks per read round trip: as many as fit ``READ_BATCH_BYTES``, at least one."""
        return max(1, READ_BATCH_BYTES // max(1, chunk_bytes))

    def delete(self, session_id: str) -> bool:
        with self._errors("delete"):
            return bool(self._redis.delete(self.key(session_id)))

    def reachable(self) -> bool:
        try:
            return bool(self._redis.ping())
        except REDIS_ERRORS:
            return False

    def close(self) -> None:
        self._redis.close()

    @staticmethod
    def _errors(what: str):
        return translated(what)


@contextmanager
def translated(what: str, error: type[Exception] = SpillUnavailable, message: str = "Redis {what} failed: {exc}"):
    """Redis errors inside the block -> `error(message)`: callers see one exception class, never redis-py's."""
    try:
        yield
    except REDIS_ERRORS as exc:
        raise error(message.format(what=what, exc=exc)) from exc


def _fields(start: int, stop: int) -> list[str]:
    return [f"c{i}" for i in range(start, stop)]


def _chunking(header: bytes, default_chunk_bytes: int) -> tuple[int | None, int]:
    """(n_chunks, chunk size) from a codec header, not yet verified: a hint for batching only; (None, default)
    when it cannot be read or its counts are ones the codec refuses."""
    try:
        parsed = json.loads(header)
        n_chunks, total = parsed["n_chunks"], parsed["total_bytes"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None, default_chunk_bytes
    if not (is_count(n_chunks) and is_count(total)) or (n_chunks == 0) != (total == 0) or n_chunks > total:
        return None, default_chunk_bytes
    return n_chunks, -(-total // n_chunks) if n_chunks else default_chunk_bytes
