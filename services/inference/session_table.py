"""SessionTable: the entries of the sessions this replica holds, in LRU order, under the store's one mutex.

`SessionStore` and each of its collaborators (`Residency`, `Ownership`, `Spiller`) read and change entries
only while holding ``mu``: one lock for the whole table, so there is no lock order to get wrong. Nobody holds
it across a Redis round trip. ``spill_ended`` is a condition on that same lock, notified when a spill finishes,
so a request that finds its session being spilled waits for the spill rather than racing it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from .directory import not_found_message
from .errors import SessionBusy, SessionNotFound
from .session_entry import SessionEntry


class SessionTable:
    def __init__(self):
        self.mu = threading.Lock()
        self.spill_ended = threading.Condition(self.mu)
        self.entries: OrderedDict[str, SessionEntry] = OrderedDict()   # least recently used first

    def get(self, sid: str) -> SessionEntry | None:
        with self.mu:
            return self.entries.get(sid)

    def drop(self, sid: str) -> None:
        with self.mu:
            self.entries.pop(sid, None)

    def snapshot(self) -> list[SessionEntry]:
        """The entries as they are now (the live objects), to walk without holding the lock."""
        with self.mu:
            return list(self.entries.values())

    def tenant_of(self, sid: str) -> str:
        with self.mu:
            entry = self.entries.get(sid)
            return "" if entry is None else entry.tenant

    def mark_busy(self, sid: str, tenant: str, clock) -> SessionEntry:
        """The local entry of ``sid`` marked busy (a placeholder, dated by ``clock``, when it is not owned here);
        SessionNotFound for another tenant's, SessionBusy while another request holds it."""
        with self.mu:
            entry = self._after_spill_ends(sid)
            if entry is not None and entry.tenant != tenant:
                raise SessionNotFound(not_found_message(sid))
            if entry is not None and entry.busy:
                raise SessionBusy(f"session {sid} is busy with another request; retry when that stream ends")
            if entry is None:
                entry = self._placeholder(sid, tenant, clock())
            entry.busy = True
            return entry

    def _after_spill_ends(self, sid: str) -> SessionEntry | None:
        """Caller holds the mutex. An LRU spill of an idle session may drop it: look again once it ends."""
        entry = self.entries.get(sid)
        while entry is not None and entry.spilling and not entry.busy:
            self.spill_ended.wait(timeout=1.0)
            entry = self.entries.get(sid)
        return entry

    def _placeholder(self, sid: str, tenant: str, now: float) -> SessionEntry:
        """Caller holds the mutex. An entry for a session only Redis holds so far, placed first in LRU order."""
        entry = self.entries[sid] = SessionEntry(sid, now, now, location="redis", tenant=tenant)
        self.entries.move_to_end(sid, last=False)
        return entry
