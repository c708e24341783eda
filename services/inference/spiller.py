"""Spiller: moves the caches of this replica's sessions between the device and Redis (or a local directory).

Every move runs on the runtime's I/O thread, so Redis never stalls the model loop. A spill is written under the
lease (`SessionDirectory.fenced`), so a replica that lost a session can never overwrite a newer copy; an idle
session leaves this replica with its spill (its lease is dropped), one whose turn waits stays ours until
`load` restores it. A hand-over is a spill another replica asked for. At shutdown sessions go to Redis, or to
`LocalSpills` while Redis is down, which are uploaded, fenced as the spill they stand for, at the next start.
Bytes are encoded and verified by `SpilledCopies`; the entries' bookkeeping lives in the `SessionTable`.
"""
from __future__ import annotations

import functools
import logging
import time

from .directory import SessionDirectory, not_found_message
from .errors import SessionBusy, SessionLost, SessionNotFound, StoreUnavailable
from .local_spill import LocalSpill, LocalSpills
from .ownership import Ownership
from .session_entry import SessionEntry, identity_fields, summary_fields
from .session_table import SessionTable
from .spilled import Refused, SpilledCopies

log = logging.getLogger(__name__)


class Spiller:
    """``directory_of(replica_id)``: the `SessionDirectory` as that replica sees it (uploads write as the
    replica that saved a local spill)."""

    def __init__(self, table: SessionTable, ownership: Ownership, copies: SpilledCopies,
                 local_spills: LocalSpills | None, directory_of):
        self.table, self.ownership, self.copies = table, ownership, copies
        self.local_spills, self._directory_of = local_spills, directory_of
        self.directory: SessionDirectory = ownership.directory

    # ---- restoring -----------------------------------------------------------------------------
    def load(self, sid: str, make_room) -> object:
        """The live state of an acquired session, restored from Redis if it is not resident.

        ``make_room(nbytes)`` is called before a restore so the budget holds.
        """
        with self.table.mu:
            entry = self.table.entries.get(sid)
            if entry is None:
                raise SessionNotFound(not_found_message(sid))
            if entry.state is not None:
                return entry.state
            nbytes, spill_gen = entry.nbytes, entry.spill_gen
        make_room(nbytes)
        state = self._restore(sid, spill_gen)
        # The turn runs once this returns: from now on the spill is stale (a turn cancelled before this point
        # leaves the session exactly as its spill holds it).
        if not self.ownership.begin_turn(entry):
            self.table.drop(sid)
            raise SessionBusy(f"session {sid} was taken over by another replica while its turn waited; retry")
        with self.table.mu:
            entry.state, entry.location, entry.nbytes = state, "device", state.nbytes()
        return state

    def _restore(self, sid: str, spill_gen: int):
        try:
            state, meta = self.copies.read_state(sid)
            if meta.get("gen") != spill_gen:
                raise Refused(SessionLost, f"its spill is from generation {meta.get('gen')}, Redis names {spill_gen}")
            if meta.get("tenant") != self.table.tenant_of(sid):
                raise Refused(SessionLost, "its spilled copy names another tenant than Redis's record")
        except Refused as refused:
            self.ownership.mark_lost(sid, refused.reason)
            raise refused.error(f"session {sid} cannot be continued: {refused.reason}") from refused
        log.info("restored session %s (%d tokens)", sid, len(state.token_ids))
        return state

    # ---- spilling ------------------------------------------------------------------------------
    def spill_one(self, sid: str) -> None:
        """Spill one session under our lease. An idle one leaves this replica (its lease is dropped); one whose
        turn waits stays ours, its state in Redis until admission restores it."""
        with self.table.mu:
            entry = self.table.entries[sid]
            entry.spilling = True
            release = not entry.busy
            state, gen, saved = entry.state, entry.gen, entry.saved
            fields, identity = summary_fields(entry), identity_fields(entry)
        # Metadata found gone is registered again only while the session is still ours (not deleted meanwhile).
        identity["reregister"] = functools.partial(self.ownership.held, sid, gen)
        try:
            if saved:   # Redis already holds exactly this state: nothing to write
                still_ours = self.directory.fenced(sid, gen, "release" if release else "renew", **identity)
            else:
                header, chunks = self.copies.encode(state, _spill_meta(entry))
                mode = "save_release" if release else "save"
                still_ours = self.directory.fenced(sid, gen, mode, fields, blob=(header, chunks), **identity)
        except BaseException:
            with self.table.mu:
                self._spill_ended(entry)
            raise
        self._after_spill(sid, entry, release, still_ours, wrote=not saved)

    def _spill_ended(self, entry: SessionEntry) -> None:
        """Caller holds the mutex. Wakes requests waiting on the entry (`SessionTable.mark_busy`)."""
        entry.spilling = False
        self.table.spill_ended.notify_all()

    def _after_spill(self, sid: str, entry: SessionEntry, released: bool, still_ours: bool, wrote: bool) -> None:
        # One critical section with the end of `spilling`: a request woken by it must find the entry already
        # gone when the spill gave the lease back (else its turn would run on a copy Redis no longer lets us own).
        with self.table.mu:
            self._spill_ended(entry)
            if self.table.entries.get(sid) is not entry:   # deleted while we wrote it
                return
            if not still_ours:
                log.warning("session %s was taken over by another replica before it spilled; copy dropped", sid)
                self.table.entries.pop(sid)
            elif released:
                self.table.entries.pop(sid)
            else:
                entry.state, entry.location, entry.saved = None, "redis", True
                if wrote:   # else Redis's spill is unchanged: still of the generation it was written at
                    entry.spill_gen = entry.gen
                entry.turn_recorded = False
        if still_ours:
            log.info("spilled session %s (%d bytes, %d tokens)", sid, entry.nbytes, entry.length)

    def hand_over(self, sid: str) -> None:
        """Another replica asked for ``sid``: spill it and drop our lease now, or once its turn ends."""
        with self.table.mu:
            entry = self.table.entries.get(sid)
            if entry is None:
                return
            if entry.busy or entry.pinned or entry.spilling:
                entry.hand_over = True
                return
            entry.spilling = True
        try:
            self.spill_one(sid)
        except StoreUnavailable as exc:
            log.warning("could not hand session %s over: %s", sid, exc)

    # ---- shutdown and the next start -----------------------------------------------------------
    def spill_all(self) -> dict:
        """Graceful shutdown: every session here to Redis, or to the local spill directory while Redis is down.
        Returns counts: spilled, saved_locally, lost."""
        counts = {"spilled": 0, "saved_locally": 0, "lost": 0}
        for entry in self.table.snapshot():   # owned but not resident (their turns never ran): only the lease goes
            if entry.state is None and entry.gen:
                self.hand_over(entry.session_id)
        for sid in [e.session_id for e in self.table.snapshot() if e.state is not None and e.length]:
            try:
                self.spill_one(sid)
                counts["spilled"] += 1
            except StoreUnavailable as exc:
                counts["saved_locally" if self._save_locally(sid) else "lost"] += 1
                log.warning("Redis unreachable at shutdown for session %s: %s", sid, exc)
        return counts

    def _save_locally(self, sid: str) -> bool:
        entry = self.table.get(sid)
        if self.local_spills is None or entry is None or entry.state is None:
            return False
        header, chunks = self.copies.encode(entry.state, _spill_meta(entry))
        spill = LocalSpill(sid, self.directory.replica_id, entry.gen, entry.tenant, entry.created_at,
                           summary_fields(entry), header, chunks, entry.ttl_s, entry.keep_resident)
        log.warning("saved session %s to %s", sid, self.local_spills.save(spill))
        return True

    def upload_local_spills(self) -> int:
        """At start: upload sessions a previous process saved locally while Redis was down; returns how many."""
        if self.local_spills is None:
            return 0
        n = 0
        for path in self.local_spills.paths():
            try:
                n += self._upload(self.local_spills.load(path))
            except ValueError as exc:
                log.error("local spill %s is unreadable, skipped: %s", path.name, exc)
                continue
            path.unlink(missing_ok=True)
        return n

    def _upload(self, spill: LocalSpill) -> int:
        """Fenced as a spill by the replica and generation that saved it: refused once the session moved on."""
        uploader = self._directory_of(spill.owner)
        ttl_s = spill.ttl_s or uploader.session_ttl_s
        if _outlived(spill, ttl_s):
            log.warning("local copy of session %s was last used longer ago than the session lives (%d s); "
                        "discarded", spill.sid, ttl_s)
            return 0
        if uploader.fenced(spill.sid, spill.gen, "save_release", spill.fields, blob=(spill.header, spill.chunks),
                           tenant=spill.tenant, created_at=spill.created_at, ttl_s=spill.ttl_s, pinned=spill.pinned,
                           reregister=lambda: not uploader.deleted(spill.sid)):   # else Redis lost it: bring it back
            log.info("uploaded session %s saved locally at the last shutdown", spill.sid)
            return 1
        log.warning("local copy of session %s is older than Redis's (it moved on or was deleted); discarded",
                    spill.sid)
        return 0


def _outlived(spill: LocalSpill, ttl_s: int) -> bool:
    """Unused for longer than its TTL: the session expired while its copy waited (no tombstone tells)."""
    try:
        last_used = float(spill.fields.get("last_used", 0))
    except (TypeError, ValueError):
        return False
    return last_used > 0 and time.time() - last_used > ttl_s


def _spill_meta(entry: SessionEntry) -> dict:
    """The header meta a spill (or a local spill) of ``entry`` carries."""
    return {"session_id": entry.session_id, "fingerprint_id": entry.fingerprint_id,
            "head_map_version": entry.head_map_version, "token_count": entry.length,
            "nbytes": entry.nbytes, "full_nbytes": entry.full_nbytes, "stored_nbytes": entry.stored_nbytes,
            "created_at": entry.created_at, "last_used": entry.last_used, "tenant": entry.tenant,
            "gen": entry.gen}
