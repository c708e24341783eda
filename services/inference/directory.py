"""SessionDirectory: who owns each session, in Redis, so any replica can serve any session without forking it.

Per session (all keys share the hash tag ``{<id>}``, so they sit in one Redis Cluster slot):

* ``razor:{id}:meta`` — a hash: tenant, model fingerprint and dtype, ``gen`` (the fencing token, bumped by
  every change of owner, and when an owner gives its lease back: a late write of its generation is refused),
  ``spill_gen`` (the generation whose state the spill holds), ``dirty`` (the generation of a turn not yet saved
  to the spill, 0 when the spill is current), ``owner`` (the last replica to own it), ``lost`` (why it can no
  longer be continued), and a summary (length, bytes, head-map version, times) for listing from any replica.
* ``razor:{id}:lease`` — the id of the replica holding the session resident (or running a turn on it),
  with a TTL that the holder renews; it disappears with a dead replica.
* ``razor:{id}:spill`` — the spilled cache (`Spill`), written only under a valid lease and generation.

Every write is one Lua script that first checks the caller still holds the lease at its generation, so a
replica that was paused past its lease, or whose session was taken over, can never overwrite a newer copy
(the fencing token of Kleppmann's critique of Redlock; a lease alone is not enough). A replica that takes a
session over whose last owner ran turns it never saved (``dirty``) reports the session lost, never continues
it from the older spill. Replicas ask an owner to hand a session over on the channel ``razor:release:<owner>``.
Sessions are listed from sorted sets per model and tenant (``razor:sessions:<fingerprint>:<tenant>``), and
counted from one per model (``razor:sessions:<fingerprint>``): a Redis shared by services of several models
lists each service its own model's sessions.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import redis

from .errors import SessionLost, SessionModelMismatch, SessionNotFound, StoreUnavailable
from .spill import deleted_key, lease_key, meta_key, spill_key, translated

log = logging.getLogger(__name__)

# ---- Lua (KEYS: meta, lease, spill) --------------------------------------------------------------
# The check every fenced write starts with: our generation, and no other replica's lease.
_HOLDS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local holder = redis.call('GET', KEYS[2])
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[2] or (holder and holder ~= ARGV[1]) then return 0 end
"""

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'tenant', ARGV[3], 'fingerprint_id', ARGV[4], 'dtype', ARGV[5], 'gen', ARGV[8],
           'spill_gen', 0, 'dirty', ARGV[8], 'owner', ARGV[1], 'created_at', ARGV[6], 'last_used', ARGV[6], 'length', 0,
           'ttl', ARGV[7], 'pinned', ARGV[9])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""

# ARGV: me, lease_ms, tenant, fingerprint, dtype, session_ttl_s, now
_CLAIM = """
local m = redis.call('HMGET', KEYS[1], 'tenant', 'fingerprint_id', 'dtype', 'dirty', 'spill_gen', 'lost', 'owner')
if not m[1] or m[1] ~= ARGV[3] then return {'missing'} end
if m[6] and m[6] ~= '' then return {'lost', m[6]} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {'owned', holder} end
if m[2] ~= ARGV[4] or m[3] ~= ARGV[5] then return {'model', m[2], m[3]} end
if tonumber(m[4]) ~= 0 then
  local reason = 'replica ' .. (m[7] or '?') .. ' stopped before saving its last turns to Redis'
  redis.call('HSET', KEYS[1], 'lost', reason)
  redis.call('DEL', KEYS[2], KEYS[3])
  return {'lost', reason}
end
if redis.call('EXISTS', KEYS[3]) == 0 then return {'expired'} end
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'last_used', ARGV[7])
redis.call('EXPIRE', KEYS[1], tonumber(redis.call('HGET', KEYS[1], 'ttl')) or ARGV[6])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {'ok', gen, m[5]}
"""

# ARGV: me, gen, lease_ms, session_ttl_s, mode, n_fields, field, value, ..., [header, chunk0, chunk1, ...]
# mode: renew | begin (a turn starts: the spill is stale from now) | note (summary only) | save | save_release |
#       release (hand over a session whose spill holds exactly its state: a turn that never ran leaves it current)
_FENCED = _HOLDS + """
local mode, n = ARGV[5], tonumber(ARGV[6])
for i = 0, n - 1 do redis.call('HSET', KEYS[1], ARGV[7 + 2 * i], ARGV[8 + 2 * i]) end
local blob = 7 + 2 * n
if mode == 'save' or mode == 'save_release' then
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[3], 'header', ARGV[blob])
  for c = blob + 1, #ARGV do redis.call('HSET', KEYS[3], 'c' .. (c - blob - 1), ARGV[c]) end
  redis.call('HSET', KEYS[1], 'spill_gen', ARGV[2], 'dirty', 0)
elseif mode == 'begin' then
  redis.call('HSET', KEYS[1], 'dirty', ARGV[2])
elseif mode == 'release' then
  redis.call('HSET', KEYS[1], 'dirty', 0)
end
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl')) or ARGV[4]   -- the session's own TTL
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ttl) end
redis.call('EXPIRE', KEYS[1], ttl)
if mode == 'release' or mode == 'save_release' then
  redis.call('DEL', KEYS[2])
  redis.call('HINCRBY', KEYS[1], 'gen', 1)   -- our generation ends: a late renewal or note of it is refused
else
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
end
return 1
"""

# KEYS: meta, lease, spill, tombstone; ARGV: me, tenant, session_ttl_s
_DELETE = """
local tenant = redis.call('HGET', KEYS[1], 'tenant')
if not tenant or tenant ~= ARGV[2] then return {'missing'} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {'owned', holder} end
local fingerprint = redis.call('HGET', KEYS[1], 'fingerprint_id') or ''
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl')) or tonumber(ARGV[3])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SET', KEYS[4], '1', 'EX', ttl)   -- a copy saved locally while Redis was away must not bring it back
return {'ok', fingerprint}
"""

# The spill itself is left to its TTL: a copy this replica could not verify (another RAZOR_SPILL_KEY) is evidence.
_LOSE = """
redis.call('HSET', KEYS[1], 'lost', ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""


@dataclass(frozen=True)
class Claimed:
    """The session is now ours at generation `gen`; its spill holds the state of `spill_gen`."""

    gen: int
    spill_gen: int


class OwnedElsewhere(Exception):
    """Another live replica holds the session; ask it to hand the session over and retry."""

    def __init__(self, owner: str):
        super().__init__(owner)
        self.owner = owner


class SessionDirectory:
    def __init__(self, client, replica_id: str, lease_ttl_s: float, session_ttl_s: int,
                 fingerprint_id: str, dtype: str):
        self.client, self.replica_id = client, replica_id
        self.lease_ms, self.session_ttl_s = max(1, int(lease_ttl_s * 1000)), session_ttl_s
        self.fingerprint_id, self.dtype = fingerprint_id, dtype
        self._create, self._claim = _Script(client, _CREATE), _Script(client, _CLAIM)
        self._fenced, self._delete = _Script(client, _FENCED), _Script(client, _DELETE)
        self._lose = _Script(client, _LOSE)

    @staticmethod
    def keys(sid: str) -> list[str]:
        return [meta_key(sid), lease_key(sid), spill_key(sid)]

    @staticmethod
    def channel(replica_id: str) -> str:
        return f"razor:release:{replica_id}"

    # ---- ownership ---------------------------------------------------------------------------
    def create(self, sid: str, tenant: str, gen: int = 1, created_at: float | None = None, ttl_s: int = 0,
               pinned: bool = False) -> int:
        """Register a session owned here (a new one, or one whose metadata Redis lost); returns its generation."""
        with _redis("register a new session"):
            self._create(keys=self.keys(sid), args=[self.replica_id, self.lease_ms, tenant, self.fingerprint_id,
                                                   self.dtype, created_at or time.time(), ttl_s or self.session_ttl_s,
                                                   gen, int(pinned)])
            self.client.zadd(self.index(tenant), {sid: 0})
            self.client.zadd(self.index(), {sid: 0})
        return gen

    def claim(self, sid: str, tenant: str) -> Claimed:
        """Take a session no live replica holds. Raises OwnedElsewhere, SessionNotFound or SessionLost."""
        with _redis("take over the session"):
            reply = self._claim(keys=self.keys(sid), args=[
                self.replica_id, self.lease_ms, tenant, self.fingerprint_id, self.dtype, self.session_ttl_s,
                time.time()])
        kind, *rest = [_text(x) for x in reply]
        if kind == "ok":
            return Claimed(gen=int(rest[0]), spill_gen=int(rest[1]))
        if kind == "owned":
            raise OwnedElsewhere(rest[0])
        if kind == "lost":
            raise SessionLost(f"session {sid} cannot be continued: {rest[0]}")
        if kind == "model":
            raise SessionModelMismatch(self._mismatch(sid, model=rest[0], dtype=rest[1]))
        raise SessionNotFound(not_found_message(sid, expired=kind == "expired"))

    def _mismatch(self, sid: str, model: str, dtype: str) -> str:
        if model != self.fingerprint_id:
            return (f"session {sid} was made under another model (fingerprint {model}) and this service runs "
                    f"{self.fingerprint_id}; continue it on a service running that model, or start a new session")
        return (f"session {sid}: its cache was spilled in {dtype} and this service runs {self.dtype}; continue it "
                f"on a service with RAZOR_DTYPE={dtype}, or start a new session")

    def fenced(self, sid: str, gen: int, mode: str, fields: dict | None = None,
               blob: tuple[bytes, list[bytes]] | None = None, tenant: str = "", created_at: float = 0.0,
               ttl_s: int = 0, pinned: bool = False, reregister=lambda: True) -> bool:
        """One write under our lease at `gen` (see _FENCED's modes); False when the session is no longer ours.

        Metadata that Redis lost altogether (a restart without persistence) is registered again under `gen`:
        no other replica can have taken the session over without it. ``reregister()`` is asked first, once the
        loss is seen: False when the metadata went because the session was deleted meanwhile."""
        pairs = [x for k, v in (fields or {}).items() for x in (k, v)]
        header, chunks = blob or (None, [])
        args = [self.replica_id, gen, self.lease_ms, self.session_ttl_s, mode, len(pairs) // 2, *pairs]
        if blob is not None:
            args += [header, *chunks]
        with _redis(f"{mode} the session's lease"):
            reply = self._fenced(keys=self.keys(sid), args=args)
            if reply == -1:
                if not reregister():
                    return False
                log.warning("session %s's metadata is gone from Redis (lost by Redis, or its TTL of %s s ran out "
                            "during a turn); registering it again", sid, ttl_s or self.session_ttl_s)
                self.create(sid, tenant, gen, created_at, ttl_s, pinned)
                reply = self._fenced(keys=self.keys(sid), args=args)
        return reply == 1

    def delete(self, sid: str, tenant: str) -> bool:
        """Delete a session no other replica holds; False when there was none. Raises OwnedElsewhere."""
        with _redis("delete the session"):
            kind, *rest = [_text(x) for x in self._delete(keys=[*self.keys(sid), deleted_key(sid)],
                                                          args=[self.replica_id, tenant, self.session_ttl_s])]
            if kind == "owned":
                raise OwnedElsewhere(rest[0])
            if kind == "ok":
                self.client.zrem(self.index(tenant, rest[0]), sid)
                self.client.zrem(self.index(None, rest[0]), sid)
        return kind == "ok"

    def deleted(self, sid: str) -> bool:
        """Whether the session was deleted within its TTL (its tombstone is there)."""
        with _redis("read the session's tombstone"):
            return bool(self.client.exists(deleted_key(sid)))

    def mark_lost(self, sid: str, reason: str) -> None:
        with _redis("mark the session lost"):
            self._lose(keys=self.keys(sid), args=[reason])

    def request_release(self, owner: str, sid: str) -> None:
        with _redis("ask the owner to hand the session over"):
            self.client.publish(self.channel(owner), sid)

    # ---- reading -----------------------------------------------------------------------------
    def describe(self, sid: str, tenant: str) -> dict | None:
        """The session's metadata with its current `holder` ("" when none), or None (unknown, other tenant)."""
        with _redis("read the session"):
            meta = {_text(k): _text(v) for k, v in self.client.hgetall(meta_key(sid)).items()}
            holder = _text(self.client.get(lease_key(sid))) if meta else None
        if not meta or meta.get("tenant") != tenant:
            return None
        return {**meta, "holder": holder or "", "session_id": sid}

    def page(self, tenant: str, after: str, size: int) -> tuple[list[dict], bool]:
        """Up to `size` sessions of `tenant` with ids after `after`, in id order, and whether more follow."""
        with _redis("list sessions"):
            ids = [_text(x) for x in self.client.zrangebylex(self.index(tenant), f"({after}" if after else "-",
                                                              "+", start=0, num=size + 1)]
        found = [d for d in (self.describe(sid, tenant) for sid in ids[:size]) if d is not None]
        stale = [sid for sid in ids[:size] if sid not in {d["session_id"] for d in found}]
        if stale:   # expired from Redis: keep the index in step
            with _redis("list sessions"):
                self.client.zrem(self.index(tenant), *stale)
                self.client.zrem(self.index(), *stale)
        return found, len(ids) > size

    def count(self) -> int:
        with _redis("count sessions"):
            return int(self.client.zcard(self.index()))

    def index(self, tenant: str | None = None, fingerprint_id: str | None = None) -> str:
        """The sorted set listing a model's sessions: all of them, or one tenant's."""
        base = f"razor:sessions:{fingerprint_id or self.fingerprint_id}"
        return base if tenant is None else f"{base}:{tenant}"


def not_found_message(sid: str, expired: bool = False) -> str:
    if expired:
        return f"no session {sid}: it expired from Redis (RAZOR_SESSION_TTL_S) or was deleted"
    return (f"no session {sid}: check the id (sessions expire RAZOR_SESSION_TTL_S seconds after their last use)")


class _Script:
    """A Lua script run by its SHA on the node that holds its keys, and sent whole (EVAL, which caches it there)
    when that node lacks it. redis-py's `register_script` loads a missing script on every primary of a Redis
    Cluster, so one node down would stop the scripts of sessions on all the others."""

    def __init__(self, client, source: str):
        self.client, self.source, self.sha = client, source, hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, keys: list[str], args: list):
        try:
            return self.client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self.client.eval(self.source, len(keys), *keys, *args)


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else (None if value is None else str(value))


def _redis(what: str):
    """Redis errors inside the block -> StoreUnavailable (UNAVAILABLE to the client)."""
    return translated(what, StoreUnavailable, "could not {what}: Redis is unreachable ({exc}); retry when it is back")
