"""Ownership: this replica's claim on the sessions it holds — leases, fencing, take-over, and sessions lost.

`SessionDirectory` is the truth in Redis (a lease plus a fencing generation per session); this keeps the local
side in step with it: ``lease_until`` (until when our lease is surely valid, so a turn need not ask Redis), and
``fenced`` (another replica took the session over: our copy goes once idle). It takes sessions over from other
replicas (asking their owner to hand them over first), renews leases for `LeaseKeeper`, expires idle sessions
past their TTL, and records in Redis why a session was lost. It moves no tensors (that is `Spiller`).
"""
from __future__ import annotations

import functools
import logging
import time

from .directory import Claimed, OwnedElsewhere, SessionDirectory
from .errors import SessionBusy, StoreUnavailable
from .session_entry import SUMMARY, SessionEntry, entry_from_meta, identity_fields
from .session_table import SessionTable

log = logging.getLogger(__name__)


def run_here(fn, *args):
    """Run Redis work on the calling thread (the default where a caller may route it elsewhere)."""
    return fn(*args)


class Ownership:
    def __init__(self, table: SessionTable, directory: SessionDirectory, lease_ttl_s: float,
                 handoff_timeout_s: float, clock):
        self.table, self.directory, self._clock = table, directory, clock
        self.lease_ttl_s, self.handoff_timeout_s = lease_ttl_s, handoff_timeout_s

    def lease_until(self, renewed_at: float) -> float:
        """Until when a lease renewed at ``renewed_at`` (monotonic, taken before the round trip) is surely ours:
        a margin short of its TTL."""
        return renewed_at + 0.8 * self.lease_ttl_s

    # ---- taking sessions -----------------------------------------------------------------------
    def begin_turn(self, entry: SessionEntry) -> bool:
        """A turn starts on a session owned here: make sure it is still ours, and that Redis knows the spill is
        about to go stale (so a takeover after a crash reports it lost rather than continuing an old copy)."""
        if entry.turn_recorded and time.monotonic() < entry.lease_until:
            return True
        started = time.monotonic()
        if not self.directory.fenced(entry.session_id, entry.gen, "begin", **identity_fields(entry)):
            return False
        entry.turn_recorded = True
        self._extend(entry.session_id, started)
        return True

    def take_over(self, entry: SessionEntry, tenant: str) -> None:
        """Claim ownership of a session no replica holds (asking its owner first); its spill stays current until
        `Spiller.load` restores it for the turn."""
        sid = entry.session_id
        started = time.monotonic()
        claimed: Claimed = self.with_handover(sid, lambda: self.directory.claim(sid, tenant))
        described = entry_from_meta({**(self.directory.describe(sid, tenant) or {}), "session_id": sid})
        with self.table.mu:
            for name in SUMMARY:
                setattr(entry, name, getattr(described, name))
            entry.owner, entry.location = self.directory.replica_id, "redis"
            entry.gen, entry.spill_gen = claimed.gen, claimed.spill_gen
            entry.turn_recorded, entry.saved = False, True
            entry.lease_until = self.lease_until(started)

    def with_handover(self, sid: str, attempt):
        """``attempt()`` until no other replica holds ``sid``: ask the owner to hand it over, wait, retry."""
        deadline, asked_at, pause = time.monotonic() + self.handoff_timeout_s, 0.0, 0.01
        while True:
            try:
                return attempt()
            except OwnedElsewhere as owned:
                now = time.monotonic()
                if now > deadline:
                    raise SessionBusy(f"session {sid} is in use on replica {owned.owner}; retry when its current "
                                      "stream ends") from None
                if now - asked_at > 1.0:   # pub/sub is fire-and-forget: ask again now and then
                    self.directory.request_release(owned.owner, sid)
                    asked_at = now
                time.sleep(pause)
                pause = min(0.1, pause * 2)

    # ---- keeping them (LeaseKeeper, summaries) ---------------------------------------------------
    def renew_leases(self) -> None:
        """Renew every lease here; a session another replica took over is dropped (once idle), and an idle one
        past its TTL is deleted (a spilled one expires in Redis by itself)."""
        now = self._clock()
        for entry in self.table.snapshot():
            if not self._renewable(entry):
                continue
            if self._take_expired(entry, now):
                self._expire(entry)
                continue
            started = time.monotonic()
            if self.directory.fenced(entry.session_id, entry.gen, "renew", reregister=lambda: self._renewable(entry),
                                     **identity_fields(entry)):
                self._extend(entry.session_id, started)
            elif self._renewable(entry):   # else a spill or delete decided meanwhile; it cleans up
                self.fence(entry.session_id, entry.gen)

    def _renewable(self, entry: SessionEntry) -> bool:
        """Still ours, and no spill or delete is deciding its lease: renewing one a spill just gave back would take
        the lease again for a session this replica no longer holds (others would wait out the TTL), and one being
        deleted would be registered again."""
        with self.table.mu:
            return (bool(entry.gen) and self.table.entries.get(entry.session_id) is entry and not entry.spilling
                    and not entry.deleting)

    def held(self, sid: str, gen: int) -> bool:
        """Still ours at ``gen`` and not being deleted (or expired): only then may a write that finds the metadata
        gone register it again; else the delete landed first, and registering would bring the session back."""
        with self.table.mu:
            entry = self.table.entries.get(sid)
            return entry is not None and entry.gen == gen and not entry.deleting

    def note(self, sid: str, gen: int, fields: dict, identity: dict) -> None:
        """Write a session's summary under our lease (for other replicas' listings); best effort."""
        try:
            if not self.directory.fenced(sid, gen, "note", fields, reregister=functools.partial(self.held, sid, gen),
                                         **identity):
                self.fence(sid, gen)
        except StoreUnavailable as exc:
            log.info("session %s summary not updated in Redis: %s", sid, exc)

    def fence(self, sid: str, gen: int) -> None:
        """Another replica took ``sid`` over from generation ``gen``: our copy is stale; drop it now if idle, else
        once its turn ends. A copy of a later generation (the session came back here meanwhile) stays."""
        with self.table.mu:
            entry = self.table.entries.get(sid)
            if entry is None or entry.gen != gen:
                return
            entry.fenced = True
            idle = not (entry.busy or entry.pinned or entry.spilling)
        log.warning("session %s was taken over by another replica; dropping this replica's copy", sid)
        if idle:
            self.table.drop(sid)

    def _extend(self, sid: str, renewed_at: float) -> None:
        with self.table.mu:
            entry = self.table.entries.get(sid)
            if entry is not None:
                entry.lease_until = self.lease_until(renewed_at)

    def _take_expired(self, entry: SessionEntry, now: float) -> bool:
        """An idle session past its TTL, marked busy and deleting as DeleteSession does: a request arriving while
        it is deleted is refused as busy (and then finds it expired), never runs a turn on the copy going away."""
        with self.table.mu:
            expired = not entry.busy and self._past_ttl(entry, now)
            if expired:
                entry.busy = entry.deleting = True
            return expired

    def expire_if_past_ttl(self, entry: SessionEntry) -> bool:
        """A session a request has just marked busy, past its TTL before the lease keeper's sweep reached it:
        expired now, as the sweep would, so that it is gone here as it already is for every other replica (its
        metadata in Redis expired with it). True when it was."""
        with self.table.mu:
            due = self._past_ttl(entry, self._clock())
            if due:
                entry.deleting = True
        if due:
            self._expire(entry)
        return due

    def _past_ttl(self, entry: SessionEntry, now: float) -> bool:
        """Caller holds the table's mutex. Still ours, no turn of it in the batch, no spill deciding its lease."""
        return (self.table.entries.get(entry.session_id) is entry and not entry.pinned and not entry.spilling
                and entry.last_used + entry.ttl_s < now)

    def _expire(self, entry: SessionEntry) -> None:
        log.info("session %s expired (%d s after its last use)", entry.session_id, entry.ttl_s)
        try:
            self.directory.delete(entry.session_id, entry.tenant)
        except OwnedElsewhere:
            pass   # taken over meanwhile: its new owner decides
        except StoreUnavailable:
            with self.table.mu:   # Redis is down: keep it, and try again at the next renewal
                entry.busy = entry.deleting = False
            raise
        self.table.drop(entry.session_id)

    # ---- losing them ---------------------------------------------------------------------------
    def mark_lost(self, sid: str, reason: str, redis_work=run_here) -> None:
        """Forget a session whose state can no longer be trusted, remembering why (in Redis, for every replica;
        ``redis_work`` runs that part)."""
        log.error("session %s lost: %s", sid, reason)
        self.table.drop(sid)
        redis_work(self._record_lost, sid, reason)

    def _record_lost(self, sid: str, reason: str) -> None:
        try:
            self.directory.mark_lost(sid, reason)
        except StoreUnavailable as exc:
            log.warning("could not record in Redis that session %s is lost: %s", sid, exc)
