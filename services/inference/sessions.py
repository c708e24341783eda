"""SessionStore: the sessions this replica owns, their compressed caches within a device-byte budget.

Redis is the truth about which sessions exist, whose they are (tenant) and which replica owns each
(`SessionDirectory`: a lease plus a fencing generation). This store keeps the sessions this replica owns:
resident ones with a live ``SessionState``, and ones whose turn waits while their cache is in Redis. A session
is owned here from the moment a request takes it (``create``, or ``acquire`` taking it over, after asking its
owner to hand it over if another replica holds it) until it is spilled idle or handed over; spills are written
under the lease, so a replica that lost a session can never overwrite a newer copy.

The store keeps the table and per-request marking itself and delegates the rest, each collaborator in its own
module: `Residency` (the device-byte budget, pins, which session to spill), `Spiller` (caches to and from Redis,
hand-overs, shutdown and local spills) and `Ownership` (leases, fencing, take-over, lost sessions).

Concurrency model:
* Handler threads call ``create``, ``acquire``, ``release``, ``info``, ``page`` and ``delete``; one mutex (the
  `SessionTable`'s, shared by every collaborator) guards the table; Redis round trips happen outside it.
* The runtime's I/O thread calls what moves tensors (``load``, ``make_room``, ``settle``, ``spill_all``,
  ``hand_over``), so Redis never stalls the model loop; the model loop ``pin``s a session when its turn joins
  the running batch and ``put``s it after the turn. A pinned session is never spilled; one whose turn still
  waits may be (it keeps its lease and is restored on admission).
* One request per session: a second ``acquire`` raises ``SessionBusy`` until ``release``.
* `LeaseKeeper` renews the leases of every session here and passes on owners' hand-over requests.

Redis down: resident sessions keep working while their lease is known to be valid; a spill that is needed to
make room raises ``BudgetExhausted`` and nothing is dropped; at shutdown sessions go to `LocalSpills`.
"""
from __future__ import annotations

import logging
import time
import uuid

import torch

from .directory import OwnedElsewhere, SessionDirectory, not_found_message
from .errors import (BudgetExhausted, InvalidArgument, SessionBusy, SessionError, SessionLost,  # noqa: F401
                     SessionModelMismatch, SessionNotFound, StoreUnavailable)
from .local_spill import LocalSpills
from .ownership import Ownership, run_here
from .residency import Residency
from .session_entry import SessionEntry, entry_from_meta, identity_fields, lifetime_fields, summary_fields
from .session_table import SessionTable
from .spill import Spill
from .spilled import SpilledCopies
from .spilled_header import ModelShape
from .spiller import Spiller

log = logging.getLogger(__name__)


def _setting_of(part: str, name: str) -> property:
    """A store attribute kept by one of its collaborators (``store.<part>.<name>``), read and set through it."""
    return property(lambda store: getattr(getattr(store, part), name),
                    lambda store, value: setattr(getattr(store, part), name, value))


class SessionStore:
    def __init__(self, spill: Spill, fingerprint_id: str, device: torch.device | str,
                 budget_bytes: int, max_sessions: int = 10_000, clock=time.time, reserved_bytes=None,
                 dtype: str = "float32", replica_id: str = "", lease_ttl_s: float = 10.0,
                 handoff_timeout_s: float = 10.0, local_spills: LocalSpills | None = None, spill_key: bytes = b"",
                 shape: ModelShape | None = None, max_pinned: int = 16):
        if budget_bytes < 0 or max_sessions < 1:
            raise ValueError("budget_bytes must be >= 0 and max_sessions >= 1")
        self.spill, self.fingerprint_id, self.device = spill, fingerprint_id, torch.device(device)
        self.dtype = dtype   # of the caches this service holds; a spill in another dtype is refused
        self.replica_id = replica_id or new_replica_id()
        self.lease_ttl_s, self.max_sessions, self._clock = lease_ttl_s, max_sessions, clock
        self.directory = self._directory_of(self.replica_id)
        # Restores verify the deployment's spill key (`RAZOR_SPILL_KEY`) and, given `shape`, this model's geometry.
        self.copies = SpilledCopies(spill, fingerprint_id, dtype, self.device, key=spill_key, shape=shape)
        self.local_spills = local_spills
        self.defer = run_here   # the runtime routes Redis work to its I/O thread
        self.table = SessionTable()
        self._mu, self._entries = self.table.mu, self.table.entries   # the one lock, and the LRU-ordered entries
        self.ownership = Ownership(self.table, self.directory, lease_ttl_s, handoff_timeout_s, clock)
        self.spiller = Spiller(self.table, self.ownership, self.copies, local_spills, self._directory_of)
        self.residency = Residency(self.table, budget_bytes, max_pinned, self.directory.count, self.spiller.spill_one)
        if reserved_bytes is not None:
            self.reserved_bytes = reserved_bytes

    def _directory_of(self, replica_id: str) -> SessionDirectory:
        """The directory as ``replica_id`` writes to it (ours, or a previous process's for its local spills)."""
        return SessionDirectory(self.spill.client, replica_id, self.lease_ttl_s, self.spill.ttl_s,
                                self.fingerprint_id, self.dtype)

    # Settings kept where they are used; the runtime and tests read (and may set) them here.
    budget_bytes = _setting_of("residency", "budget_bytes")
    max_pinned = _setting_of("residency", "max_pinned")
    # Bytes running turns may still grow into (the runtime's admission reservations): room is made for them.
    reserved_bytes = _setting_of("residency", "reserved_bytes")
    handoff_timeout_s = _setting_of("ownership", "handoff_timeout_s")

    # ---- handler threads -----------------------------------------------------------------
    def create(self, tenant: str = "", ttl_s: int = 0, pin: bool = False) -> str:
        """Register a new, busy, still-empty session owned here and return its id."""
        sid, now, ttl_s = uuid.uuid4().hex, self._clock(), self._ttl(ttl_s)
        with self._mu:
            if len(self._entries) >= self.max_sessions:
                raise BudgetExhausted(f"the service holds {self.max_sessions} sessions (its limit): delete some "
                                      "with DeleteSession or generate with keep_session=false")
            if pin:
                self.residency.check_pin_room()
        lease_from = time.monotonic()
        gen = self.directory.create(sid, tenant, ttl_s=ttl_s, pinned=pin)
        with self._mu:
            self._entries[sid] = SessionEntry(sid, now, now, busy=True, fingerprint_id=self.fingerprint_id,
                                              tenant=tenant, owner=self.replica_id, gen=gen, turn_recorded=True,
                                              lease_until=self.ownership.lease_until(lease_from), ttl_s=ttl_s,
                                              keep_resident=pin)
        return sid

    def update(self, sid: str, tenant: str = "", ttl_s: int | None = None, pin: bool | None = None) -> SessionEntry:
        """Change a session's TTL or pin it resident; it is taken over like a turn, so every replica agrees."""
        self.acquire(sid, tenant)
        try:
            with self._mu:
                entry = self._entries[sid]
                if pin and not entry.keep_resident:
                    self.residency.check_pin_room()
                entry.ttl_s = entry.ttl_s if ttl_s is None else self._ttl(ttl_s)
                entry.keep_resident = entry.keep_resident if pin is None else pin
                fields, gen, identity = lifetime_fields(entry), entry.gen, identity_fields(entry)
            if not self.directory.fenced(sid, gen, "note", fields, **identity):
                raise SessionBusy(f"session {sid} was taken over by another replica meanwhile; retry")
            with self._mu:
                return entry.snapshot()
        finally:
            self.release(sid)

    def acquire(self, sid: str, tenant: str = "") -> SessionEntry:
        """Take ``sid`` for one turn: from this replica's table, or from Redis (after asking its owner to hand it
        over); raises SessionNotFound for an unknown id or another tenant's session."""
        entry = self.table.mark_busy(sid, tenant, self._clock)
        try:
            if entry.state is not None or entry.gen:
                if self.ownership.expire_if_past_ttl(entry):
                    raise SessionNotFound(not_found_message(sid, expired=True))
                if self.ownership.begin_turn(entry):
                    return entry.snapshot()
                self.table.drop(sid)   # another replica took it over meanwhile: our copy is stale
                entry = self.table.mark_busy(sid, tenant, self._clock)
            self.ownership.take_over(entry, tenant)
            return entry.snapshot()
        except BaseException:
            self._unmark(sid, entry)
            raise

    def release(self, sid: str) -> None:
        with self._mu:
            entry = self._entries.get(sid)
            if entry is None:
                return
            entry.busy, entry.pinned, entry.last_used = False, False, self._clock()
            self._entries.move_to_end(sid)
            # Not resident (its turn never ran): nothing to keep here, so the lease goes back at once.
            hand_over, fenced = entry.hand_over or entry.state is None, entry.fenced
        if fenced:
            self.table.drop(sid)
        elif hand_over:
            self.defer(self.hand_over, sid)

    def _unmark(self, sid: str, entry: SessionEntry) -> None:
        """Undo ``mark_busy`` after a failure: a placeholder goes, an owned session is released."""
        with self._mu:
            placeholder = self._entries.get(sid) is entry and not entry.gen
            if placeholder:   # it never became ours
                del self._entries[sid]
        if not placeholder:
            self.release(sid)

    def discard(self, sid: str, redis_work=run_here) -> None:
        """Forget a session created by ``create`` whose first turn failed; ``redis_work`` runs its Redis part
        (the model loop passes the I/O thread's submit)."""
        tenant = self.table.tenant_of(sid)
        self.table.drop(sid)
        redis_work(self._unregister, sid, tenant)

    def _unregister(self, sid: str, tenant: str) -> None:
        try:
            self.directory.delete(sid, tenant)
        except (StoreUnavailable, OwnedElsewhere) as exc:
            log.warning("could not remove the failed new session %s from Redis: %s", sid, exc)

    def info(self, sid: str, tenant: str = "") -> SessionEntry:
        """A snapshot of the session as every replica sees it (lost ones with their reason)."""
        with self._mu:
            local = self._entries.get(sid)
            local = local.snapshot() if local is not None and local.tenant == tenant else None
        try:
            described = self.directory.describe(sid, tenant)
        except StoreUnavailable:
            if local is None:
                raise
            return local   # Redis is down: what this replica holds is still right
        if described is None:
            raise SessionNotFound(not_found_message(sid))
        return local if local is not None and local.gen and not described.get("lost") else entry_from_meta(described)

    def page(self, tenant: str, after: str, size: int) -> tuple[list[SessionEntry], bool]:
        """A page of ``tenant``'s sessions in id order, as every replica sees them, and whether more follow."""
        described, more = self.directory.page(tenant, after, size)
        with self._mu:
            local = {e.session_id: e.snapshot() for e in self._entries.values() if e.gen}
        return [local.get(d["session_id"]) or entry_from_meta(d) for d in described], more

    def owned(self) -> list[SessionEntry]:
        """Snapshots of the sessions this replica owns (metrics, tests)."""
        with self._mu:
            return [e.snapshot() for e in self._entries.values() if e.gen]

    def delete(self, sid: str, tenant: str = "") -> bool:
        """Delete a session wherever it lives (its owner hands it over first); False when there was none."""
        try:
            entry = self.table.mark_busy(sid, tenant, self._clock)
        except SessionNotFound:   # another tenant's: as if there were none
            return False
        with self._mu:
            entry.deleting = True
        try:
            found = self.ownership.with_handover(sid, lambda: self.directory.delete(sid, tenant))
        except BaseException:
            with self._mu:
                entry.deleting = False
            self._unmark(sid, entry)
            raise
        self.table.drop(sid)
        return found

    def _ttl(self, ttl_s: int) -> int:
        """A session's TTL: at most RAZOR_SESSION_TTL_S (the default)."""
        if not 0 <= ttl_s <= self.spill.ttl_s:
            raise InvalidArgument(f"session_ttl_s must be within 1..{self.spill.ttl_s} (RAZOR_SESSION_TTL_S; "
                                  f"0 or unset = that), got {ttl_s}")
        return ttl_s or self.spill.ttl_s

    # ---- model loop ----------------------------------------------------------------------
    def pin(self, sid: str):
        """When a turn joins the batch: the resident state, pinned; None while spilled or spilling."""
        return self.residency.pin(sid)

    def unpin(self, sid: str) -> None:
        self.residency.unpin(sid)

    def put(self, sid: str, state) -> None:
        """Record the (new or grown) state of a session after a turn; its summary reaches Redis off the loop."""
        with self._mu:
            entry = self._entries.get(sid)
            if entry is None:  # deleted meanwhile: nothing to keep
                return
            entry.state, entry.location, entry.saved = state, "device", False
            entry.length, entry.head_map_version = len(state.token_ids), state.head_map_version
            entry.nbytes, entry.full_nbytes = state.nbytes(), state.full_nbytes()
            entry.stored_nbytes, entry.last_token = state.stored_nbytes(), state.last_token
            fields, gen, identity = summary_fields(entry), entry.gen, identity_fields(entry)
        self.defer(self.ownership.note, sid, gen, fields, identity)

    def resident_state(self, sid: str):
        """The live state of a resident session, or None when it is spilled."""
        with self._mu:
            entry = self._entries.get(sid)
            return None if entry is None else entry.state

    def last_token(self, sid: str) -> int | None:
        with self._mu:
            entry = self._entries.get(sid)
            return None if entry is None else entry.last_token

    # ---- the budget (Residency) ----------------------------------------------------------------
    def counted_bytes(self, sid: str) -> int:
        """The bytes the budget counts for ``sid`` now (0 when spilled or unknown)."""
        return self.residency.counted_bytes(sid)

    def resident_bytes(self) -> int:
        """Bytes resident here (no Redis: the model loop's admission asks on every check)."""
        return self.residency.resident_bytes()

    def usage(self) -> tuple[int, int, int]:
        """(resident bytes, resident sessions, sessions only in Redis); reads Redis: for reports only."""
        return self.residency.usage()

    def pinned_count(self) -> int:
        return self.residency.pinned_count()

    # ---- I/O thread ----------------------------------------------------------------------
    def load(self, sid: str, make_room) -> object:
        """The live state of an acquired session, restored from Redis (after ``make_room(nbytes)``) if spilled."""
        return self.spiller.load(sid, make_room)

    def make_room(self, need_bytes: int, keep: str | None = None) -> None:
        """Spill LRU sessions not in the running batch until ``need_bytes`` more fit (or BudgetExhausted)."""
        self.residency.make_room(need_bytes, keep)

    def settle(self) -> None:
        """After a turn: spill LRU idle sessions while over budget; Redis failures only log."""
        self.residency.settle()

    def hand_over(self, sid: str) -> None:
        """Another replica asked for ``sid``: spill it and drop our lease now, or once its turn ends."""
        self.spiller.hand_over(sid)

    def spill_all(self) -> dict:
        """Graceful shutdown: every session to Redis (or locally); counts of spilled, saved_locally, lost."""
        return self.spiller.spill_all()

    def upload_local_spills(self) -> int:
        """At start: upload sessions a previous process saved locally while Redis was down; returns how many."""
        return self.spiller.upload_local_spills()

    # ---- ownership (Ownership) -----------------------------------------------------------------
    def renew_leases(self) -> None:
        """LeaseKeeper: renew every lease here, dropping sessions taken over and deleting idle expired ones."""
        self.ownership.renew_leases()

    def mark_lost(self, sid: str, reason: str, redis_work=run_here) -> None:
        """Forget a session whose state can no longer be trusted, recording why in Redis (via ``redis_work``)."""
        self.ownership.mark_lost(sid, reason, redis_work)


def new_replica_id() -> str:
    return uuid.uuid4().hex[:12]
