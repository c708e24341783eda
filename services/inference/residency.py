"""Residency: the device-byte budget of the sessions this replica holds — what it counts, who may stay, who goes.

It counts the bytes of resident sessions (``location == "device"``) in the `SessionTable`, plus the bytes
running turns may still grow into (``reserved_bytes``, the runtime's admission reservations). Two kinds of pin
keep a session resident: ``pinned`` while its turn is in the running batch (`pin`/`unpin`, model loop) and
``keep_resident`` when its user pinned it (at most ``max_pinned`` of those). To make room it spills the least
recently used session neither pin protects, through the ``spill_one`` it is given (`Spiller.spill_one`).
"""
from __future__ import annotations

import logging

from .errors import BudgetExhausted, StoreUnavailable
from .session_table import SessionTable

log = logging.getLogger(__name__)


class Residency:
    def __init__(self, table: SessionTable, budget_bytes: int, max_pinned: int, count_sessions, spill_one):
        self.table, self.budget_bytes, self.max_pinned = table, budget_bytes, max_pinned
        self.reserved_bytes = lambda: 0   # the runtime installs its admission's reservations
        self._count_sessions, self._spill_one = count_sessions, spill_one

    # ---- accounting ---------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        """Bytes resident here (no Redis: the model loop's admission asks on every check)."""
        with self.table.mu:
            return _device_bytes(self.table.entries.values())

    def counted_bytes(self, sid: str) -> int:
        """The bytes the budget counts for ``sid`` now (0 when spilled or unknown)."""
        with self.table.mu:
            entry = self.table.entries.get(sid) if sid else None
            return entry.nbytes if entry is not None and entry.location == "device" else 0

    def usage(self) -> tuple[int, int, int]:
        """(resident bytes, resident sessions, sessions in Redis not resident here — 0 while Redis is down).
        Reads Redis: for reports (ServerInfo, GetLoad, metrics), never the model loop."""
        with self.table.mu:
            resident = [e for e in self.table.entries.values() if e.location == "device"]
        try:
            elsewhere = max(0, self._count_sessions() - len(resident))
        except StoreUnavailable:
            elsewhere = 0
        return _device_bytes(resident), len(resident), elsewhere

    def pinned_count(self) -> int:
        with self.table.mu:
            return self._user_pins()

    # ---- the running batch's pins (model loop) -------------------------------------------------
    def pin(self, sid: str):
        """When a turn joins the batch: the resident state, pinned; None while spilled or spilling."""
        with self.table.mu:
            entry = self.table.entries.get(sid)
            if entry is None or entry.state is None or entry.spilling:
                return None
            entry.pinned = True
            return entry.state

    def unpin(self, sid: str) -> None:
        with self.table.mu:
            entry = self.table.entries.get(sid)
            if entry is not None:
                entry.pinned = False

    # ---- making room (I/O thread) -------------------------------------------------------------
    def make_room(self, need_bytes: int, keep: str | None = None) -> None:
        """Spill LRU sessions that are not in the running batch until ``need_bytes`` more fit the budget.

        Raises ``BudgetExhausted`` when a needed spill fails because Redis is unreachable.
        """
        while True:
            victim = self._victim(need_bytes, keep)
            if victim is None:
                self._check_pins_leave_room(need_bytes)
                return
            try:
                self._spill_one(victim)
            except StoreUnavailable as exc:
                used = self.resident_bytes()
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

    def _victim(self, need_bytes: int, keep: str | None) -> str | None:
        """The least recently used spillable session, marked spilling; None when ``need_bytes`` fit already or
        nothing can go."""
        with self.table.mu:
            used = _device_bytes(self.table.entries.values())
            if used + self.reserved_bytes() + need_bytes <= self.budget_bytes:
                return None
            for e in self.table.entries.values():  # least recently used first
                if _spillable(e) and e.session_id != keep:
                    e.spilling = True   # claimed under the lock: `pin` refuses it and no other spill picks it
                    return e.session_id
            return None

    # ---- user pins -------------------------------------------------------------------------------
    def _check_pins_leave_room(self, need_bytes: int) -> None:
        """Pinned sessions never spill: a turn that cannot fit beside them is refused rather than left waiting."""
        with self.table.mu:
            pinned = _device_bytes(e for e in self.table.entries.values() if e.keep_resident)
        if pinned and pinned + need_bytes > self.budget_bytes:
            raise BudgetExhausted(f"pinned sessions hold {pinned} of the {self.budget_bytes}-byte KV budget and this "
                                  f"turn needs {need_bytes} more; unpin some (UpdateSession pinned=false) or delete "
                                  "them")

    def check_pin_room(self) -> None:
        """Caller holds the mutex. Refuses one more user pin past ``max_pinned``."""
        pinned = self._user_pins()
        if pinned >= self.max_pinned:
            raise BudgetExhausted(f"this replica already pins {pinned} sessions (RAZOR_MAX_PINNED_SESSIONS); unpin "
                                  "one with UpdateSession(pinned=false) or delete it")

    def _user_pins(self) -> int:
        """Caller holds the mutex."""
        return sum(e.keep_resident for e in self.table.entries.values())


def _device_bytes(entries) -> int:
    """What the budget counts of ``entries``: the bytes of the resident ones."""
    return sum(e.nbytes for e in entries if e.location == "device")


def _spillable(entry) -> bool:
    """Resident, and neither in the running batch, pinned by its user, already being spilled, nor being deleted
    (a spill landing after the delete would bring the session back)."""
    return (entry.location == "device" and entry.state is not None and not entry.pinned and not entry.spilling
            and not entry.keep_resident and not entry.deleting)
