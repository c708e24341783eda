"""SessionStore: session id -> compressed KV state, within a device-byte budget.

Resident sessions hold a live ``SessionState``; when room is needed, the least-recently-used
idle ones spill to Redis (codec header + chunks) and leave device memory; ``load`` restores a
spilled one. Concurrency model:

* Handler threads call the fast bookkeeping methods (``create``, ``acquire``, ``release``,
  ``info``, ``list``, ``delete``); a mutex guards the table.
* The runtime's I/O thread calls the ones that move tensors to and from Redis (``load``,
  ``make_room``, ``settle``, ``spill_all``), so Redis never stalls the model loop; the model loop
  ``pin``s a session when its turn joins the running batch and ``put``s it after the turn. A pinned
  session is never spilled; a busy one whose turn still waits may be (it is restored on admission),
  so queued turns never hold the budget hostage. ``pin`` refuses a session while it is being spilled.
* One request per session: ``acquire`` marks a session busy and a second ``acquire`` raises
  ``SessionBusy`` (the service answers FAILED_PRECONDITION) until ``release``.

Redis down: resident sessions keep working; a spill that is needed to make room raises
``BudgetExhausted`` and nothing is dropped. A blob that fails its checksum or comes from
another model is refused and the session is remembered as lost with the reason.

Tenants: a session belongs to the tenant that created it (recorded in its entry and its spill header). The
handler-facing methods take the caller's ``tenant`` and treat another tenant's session exactly like an unknown
id (``SessionNotFound``, same message; ``delete`` returns False), so nothing about it leaks.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from .errors import (BudgetExhausted, SessionBusy, SessionError, SessionLost, SessionModelMismatch,  # noqa: F401
                     SessionNotFound, StoreUnavailable)
from .spill import Spill, SpillUnavailable
from .spilled import Refused, SpilledCopies

log = logging.getLogger(__name__)
_LOST_REMEMBERED = 1000


@dataclass
class SessionEntry:
    session_id: str
    created_at: float
    last_used: float
    state: object | None = None  # SessionState while resident
    location: str = "device"     # "device" | "redis" | "lost"
    busy: bool = False
    pinned: bool = False            # its turn is in the running batch: never spilled
    spilling: bool = False          # a spill of it is being written
    length: int = 0
    nbytes: int = 0                 # allocated on the device (what the budget counts)
    stored_nbytes: int = 0          # what the compressed cache keeps
    full_nbytes: int = 0
    head_map_version: str = ""
    fingerprint_id: str = ""
    n_chunks: int = 0
    lost_reason: str = ""
    last_token: int | None = None   # what a continued chat turn's template delta depends on
    tenant: str = ""                # who created it; other tenants never see it

    def snapshot(self) -> "SessionEntry":
        return replace(self, state=None)


class SessionStore:
    def __init__(self, spill: Spill, fingerprint_id: str, device: torch.device | str,
                 budget_bytes: int, max_sessions: int = 10_000, clock=time.time, reserved_bytes=None,
                 dtype: str = "float32"):
        if budget_bytes < 0 or max_sessions < 1:
            raise ValueError("budget_bytes must be >= 0 and max_sessions >= 1")
        self.spill, self.fingerprint_id, self.device = spill, fingerprint_id, torch.device(device)
        self.dtype = dtype   # of the caches this service holds; a spill in another dtype is refused
        self.copies = SpilledCopies(spill, fingerprint_id, dtype, self.device)
        self.budget_bytes, self.max_sessions, self._clock = budget_bytes, max_sessions, clock
        # Bytes running turns may still grow into (the runtime's admission reservations): room is made for them.
        self.reserved_bytes = reserved_bytes or (lambda: 0)
        self._mu = threading.Lock()
        self._entries: OrderedDict[str, SessionEntry] = OrderedDict()  # LRU first
        # id -> (error, reason, tenant); tenant None when unknown (a header too corrupt to name it)
        self._lost: OrderedDict[str, tuple[type[SessionError], str, str | None]] = OrderedDict()

    # ---- handler threads -----------------------------------------------------------------
    def create(self, tenant: str = "") -> str:
        """Register a new, busy, still-empty session of ``tenant`` and return its id."""
        with self._mu:
            if len(self._entries) >= self.max_sessions:
                raise BudgetExhausted(f"the service holds {self.max_sessions} sessions (its limit): delete some "
                                      "with DeleteSession or generate with keep_session=false")
            sid, now = uuid.uuid4().hex, self._clock()
            self._entries[sid] = SessionEntry(sid, now, now, busy=True, fingerprint_id=self.fingerprint_id,
                                              tenant=tenant)
            return sid

    def acquire(self, sid: str, tenant: str = "") -> SessionEntry:
        """Mark ``sid`` busy for one request; finds sessions spilled by an earlier process."""
        with self._mu:
            entry = self._entries.get(sid)
        if entry is None:
            self._adopt(sid, tenant=tenant)
        with self._mu:
            entry = self._entries.get(sid)
            if entry is None or entry.tenant != tenant:
                raise _not_found(sid)
            if entry.busy:
                raise SessionBusy(f"session {sid} is busy with another request; retry when that stream ends")
            entry.busy = True
            return entry.snapshot()

    def release(self, sid: str) -> None:
        with self._mu:
            entry = self._entries.get(sid)
            if entry is not None:
                entry.busy, entry.pinned, entry.last_used = False, False, self._clock()
                self._entries.move_to_end(sid)

    def discard(self, sid: str) -> None:
        """Forget a session created by ``create`` whose first turn failed."""
        with self._mu:
            self._entries.pop(sid, None)

    def info(self, sid: str, tenant: str = "") -> SessionEntry:
        """A snapshot of the session; a lost one comes back with location "lost" and its reason."""
        with self._mu:
            entry = self._entries.get(sid)
            lost = self._lost.get(sid)
        if lost is not None and entry is None:
            if not _visible(lost[2], tenant):
                raise _not_found(sid)
            return SessionEntry(sid, 0.0, 0.0, location="lost", lost_reason=lost[1], tenant=lost[2] or "")
        if entry is None:
            self._adopt(sid, tenant=tenant)
        with self._mu:
            entry = self._entries.get(sid)
            if entry is None or entry.tenant != tenant:
                raise _not_found(sid)
            return entry.snapshot()

    def lost_reason(self, sid: str) -> str | None:
        with self._mu:
            lost = self._lost.get(sid)
        return None if lost is None else lost[1]

    def list(self, tenant: str | None = None) -> list[SessionEntry]:
        """Snapshots of ``tenant``'s sessions (every tenant's with None: the service's own bookkeeping)."""
        with self._mu:
            return [e.snapshot() for e in self._entries.values() if tenant is None or e.tenant == tenant]

    def delete(self, sid: str, tenant: str = "") -> bool:
        """Delete ``tenant``'s session ``sid``; False when it has none by that id."""
        with self._mu:
            entry = self._entries.get(sid)
            lost = self._lost.get(sid)
            if entry is not None and entry.tenant != tenant:
                return False
            if entry is not None and entry.busy:
                raise SessionBusy(f"session {sid} is busy; delete it when its stream ends")
            self._entries.pop(sid, None)
            was_lost = lost is not None and _visible(lost[2], tenant) and self._lost.pop(sid, None) is not None
        if entry is None and not was_lost and not self._spilled_by(sid, tenant):
            return False
        in_redis = self.spill.delete(sid) if entry is None or entry.location == "redis" else False
        return entry is not None or in_redis or was_lost

    def adopt_spilled(self, limit: int | None = None) -> int:
        """Index sessions a previous process spilled (headers only); returns how many."""
        n = 0
        for sid in list(self.spill.session_ids(limit or self.max_sessions)):
            try:
                n += self._adopt(sid, other_models="skip")
            except SessionError as exc:
                log.info("not adopting spilled session %s: %s", sid, exc)
        return n

    def pin(self, sid: str):
        """Model loop, when a turn joins the batch: the resident state, pinned; None while spilled or spilling."""
        with self._mu:
            entry = self._entries.get(sid)
            if entry is None or entry.state is None or entry.spilling:
                return None
            entry.pinned = True
            return entry.state

    def unpin(self, sid: str) -> None:
        with self._mu:
            entry = self._entries.get(sid)
            if entry is not None:
                entry.pinned = False

    def resident_state(self, sid: str):
        """The live state of a resident session, or None when it is spilled."""
        with self._mu:
            entry = self._entries.get(sid)
            return None if entry is None else entry.state

    def last_token(self, sid: str) -> int | None:
        with self._mu:
            entry = self._entries.get(sid)
            return None if entry is None else entry.last_token

    def counted_bytes(self, sid: str) -> int:
        """The bytes the budget counts for ``sid`` now (0 when spilled or unknown)."""
        with self._mu:
            entry = self._entries.get(sid) if sid else None
            return entry.nbytes if entry is not None and entry.location == "device" else 0

    def resident_bytes(self) -> int:
        return self.usage()[0]

    def usage(self) -> tuple[int, int, int]:
        """(resident bytes, resident sessions, spilled sessions)."""
        with self._mu:
            resident = [e for e in self._entries.values() if e.location == "device"]
            return sum(e.nbytes for e in resident), len(resident), len(self._entries) - len(resident)

    # ---- engine thread -------------------------------------------------------------------
    def load(self, sid: str, make_room) -> object:
        """The live state of an acquired session, restored from Redis if it was spilled.

        ``make_room(nbytes)`` is called before a restore so the budget holds.
        """
        with self._mu:
            entry = self._entries[sid]
            if entry.state is not None:
                return entry.state
            n_chunks, nbytes, tenant = entry.n_chunks, entry.nbytes, entry.tenant
        make_room(nbytes)
        state = self._restore(sid, n_chunks, tenant)
        with self._mu:
            entry.state, entry.location, entry.nbytes = state, "device", state.nbytes()
        self.copies.forget(sid)
        return state

    def put(self, sid: str, state) -> None:
        """Record the (new or grown) state of a session after a turn."""
        with self._mu:
            entry = self._entries.get(sid)
            if entry is None:  # deleted meanwhile: nothing to keep
                return
            entry.state, entry.location = state, "device"
            entry.length, entry.head_map_version = len(state.token_ids), state.head_map_version
            entry.nbytes, entry.full_nbytes = state.nbytes(), state.full_nbytes()
            entry.stored_nbytes = state.stored_nbytes()
            entry.last_token = state.last_token

    def make_room(self, need_bytes: int, keep: str | None = None) -> None:
        """Spill LRU idle sessions until ``need_bytes`` more fit the budget.

        Raises ``BudgetExhausted`` when a needed spill fails because Redis is unreachable.
        Pinned sessions (in the running batch) are never spilled.
        """
        while True:
            victim = self._victim(need_bytes, keep)
            if victim is None:
                return
            try:
                self._spill_one(victim)
            except SpillUnavailable as exc:
                used, _, _ = self.usage()
                raise BudgetExhausted(
                    f"KV budget is full ({used} of {self.budget_bytes} bytes resident, {need_bytes} more needed) "
                    f"and idle sessions cannot be spilled because Redis is unreachable ({exc}); retry later, "
                    "or free memory with DeleteSession") from exc

    def settle(self) -> None:
        """After a turn: spill LRU idle sessions while over budget; Redis failures only log."""
        try:
            self.make_room(0)
        except BudgetExhausted as exc:
            log.warning("over KV budget, keeping sessions resident: %s", exc)

    def spill_all(self) -> int:
        """Spill every resident session (graceful shutdown); returns how many were spilled."""
        n = 0
        for sid in [e.session_id for e in self.list() if e.location == "device" and e.length]:
            try:
                self._spill_one(sid)
                n += 1
            except (SpillUnavailable, KeyError) as exc:
                log.error("could not spill session %s at shutdown, it is lost: %s", sid, exc)
        return n

    def mark_lost(self, sid: str, reason: str) -> None:
        """Forget a session whose state can no longer be trusted, remembering why."""
        self._lose(sid, SessionLost, reason)

    # ---- internals -----------------------------------------------------------------------
    def _victim(self, need_bytes: int, keep: str | None) -> str | None:
        with self._mu:
            used = sum(e.nbytes for e in self._entries.values() if e.location == "device")
            if used + self.reserved_bytes() + need_bytes <= self.budget_bytes:
                return None
            for e in self._entries.values():  # least recently used first
                if (e.location == "device" and e.state is not None and not e.pinned and not e.spilling
                        and e.session_id != keep):
                    e.spilling = True
                    return e.session_id
            return None

    def _spill_one(self, sid: str) -> None:
        with self._mu:
            entry = self._entries[sid]
            entry.spilling = True
            state, meta = entry.state, _spill_meta(entry)
        try:
            n_chunks = self.copies.write(sid, state, meta)
        finally:
            with self._mu:
                entry.spilling = False
        with self._mu:
            gone = self._entries.get(sid) is not entry   # deleted while we wrote it
            if not gone:
                entry.state, entry.location, entry.n_chunks = None, "redis", n_chunks
        if gone:
            self.spill.delete(sid)
            return
        log.info("spilled session %s (%d bytes, %d tokens)", sid, meta["nbytes"], meta["token_count"])

    def _restore(self, sid: str, n_chunks: int, tenant: str):
        try:
            state = self.copies.read_state(sid, n_chunks, tenant=tenant)
        except Refused as refused:
            raise self._lose(sid, refused.error, refused.reason) from refused
        log.info("restored session %s (%d tokens)", sid, len(state.token_ids))
        return state

    def _spilled_by(self, sid: str, tenant: str) -> bool:
        """Whether Redis holds a copy of ``sid`` that ``tenant`` may see (a corrupt one: anyone may delete it)."""
        try:
            found = self.copies.read_meta(sid)
            return found is not None and _meta_tenant(found[0]) == tenant
        except Refused:
            return True   # corrupt: it names no owner, and nobody can continue it

    def _adopt(self, sid: str, other_models: str = "refuse", tenant: str | None = None) -> bool:
        """Index a session found only in Redis (spilled by this or an earlier process).

        Another model's session is refused and reported lost, or with ``other_models="skip"``
        (the start-up scan of a Redis shared by several services) silently left alone. With ``tenant``
        (a caller asking), another tenant's session is not found and left untouched.
        """
        with self._mu:
            lost = self._lost.get(sid)
        if lost is not None:
            if tenant is not None and not _visible(lost[2], tenant):
                raise _not_found(sid)
            raise lost[0](f"session {sid} cannot be continued: {lost[1]}")
        owner = None
        try:
            found = self.copies.read_meta(sid)
            if found is None:
                raise _not_found(sid)
            meta, n_chunks = found
            owner = _meta_tenant(meta)
            if tenant is not None and owner != tenant:
                raise _not_found(sid)
            if other_models == "skip" and meta["fingerprint_id"] != self.fingerprint_id:
                return False
            self.copies.check(meta)
        except Refused as refused:
            raise self._lose(sid, refused.error, refused.reason, owner) from refused
        with self._mu:
            self._entries.setdefault(sid, _entry_from_meta(sid, meta, n_chunks))
            self._entries.move_to_end(sid, last=False)  # idle: first in line to stay spilled
        return True

    def _lose(self, sid: str, cls: type[SessionError], reason: str, tenant: str | None = None) -> SessionError:
        log.error("session %s lost: %s", sid, reason)
        with self._mu:
            entry = self._entries.pop(sid, None)
            self._lost[sid] = (cls, reason, entry.tenant if entry is not None else tenant)
            while len(self._lost) > _LOST_REMEMBERED:
                self._lost.popitem(last=False)
        return cls(f"session {sid} cannot be continued: {reason}")



def _not_found(sid: str) -> SessionNotFound:
    """The one answer for an unknown id and for another tenant's session alike."""
    return SessionNotFound(f"no session {sid}: check the id (sessions expire "
                           "RAZOR_SESSION_TTL_S seconds after they spill)")


def _visible(owner: str | None, tenant: str) -> bool:
    """Whether a lost session's record may be shown to ``tenant`` (an unknown owner: to anyone holding the id)."""
    return owner is None or owner == tenant


def _meta_tenant(meta: dict) -> str:
    """The tenant a spill header names ("" for spills from before tenants)."""
    tenant = meta.get("tenant", "")
    if not isinstance(tenant, str):
        raise Refused(SessionLost, f"its spilled header is corrupt (tenant is a {type(tenant).__name__})")
    return tenant


def _spill_meta(entry: SessionEntry) -> dict:
    return {"session_id": entry.session_id, "fingerprint_id": entry.fingerprint_id, "tenant": entry.tenant,
            "head_map_version": entry.head_map_version, "token_count": entry.length,
            "nbytes": entry.nbytes, "full_nbytes": entry.full_nbytes, "stored_nbytes": entry.stored_nbytes,
            "created_at": entry.created_at, "last_used": entry.last_used}


def _entry_from_meta(sid: str, meta: dict, n_chunks: int) -> SessionEntry:
    token_ids = meta["state"]["token_ids"]
    return SessionEntry(sid, meta["created_at"], meta["last_used"], location="redis", length=meta["token_count"],
                        nbytes=meta["nbytes"], full_nbytes=meta["full_nbytes"],
                        stored_nbytes=meta.get("stored_nbytes", meta["nbytes"]),
                        head_map_version=meta["head_map_version"], fingerprint_id=meta["fingerprint_id"],
                        n_chunks=n_chunks, last_token=token_ids[-1] if token_ids else None,
                        tenant=_meta_tenant(meta))
