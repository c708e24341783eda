"""KV-budget admission: a turn joins the running batch only once the bytes it may grow to fit the budget.

Each admitted turn reserves the most bytes its cache can reach by the end of the turn (`bytes_bound`) minus
what the store already counts for its session; resident idle sessions plus reservations never exceed the
budget, so resident KV bytes never do either. When a turn does not fit, the I/O thread spills least recently
used sessions that are not in the running batch (idle ones, or ones whose turn still waits) and wakes the model
loop; the turn waits in order meanwhile. The one exception is a turn larger than the whole budget: it runs
alone, once every other session has been spilled (refusing it would make a small budget unusable; the overrun
lasts that turn only).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from services.engine import TurnRequest

from .errors import BudgetExhausted
from .sessions import SessionStore

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, store: SessionStore, io: ThreadPoolExecutor, wake, head_dim: int, itemsize: int):
        self.store, self.io, self.wake = store, io, wake
        self.head_dim, self.itemsize = head_dim, itemsize
        self._mu = threading.Lock()
        self._reserved: dict[int, int] = {}       # id(request) -> bytes reserved beyond the store's count
        self._spilling = False
        self._spill_error: BudgetExhausted | None = None

    def reserved_bytes(self) -> int:
        with self._mu:
            return sum(self._reserved.values())

    def need(self, request: TurnRequest) -> int:
        """Bytes beyond what the store already counts that this turn's cache may grow to."""
        state = request.state
        final = len(state.token_ids) + len(request.new_ids) + request.params.max_new_tokens
        # Compression waits for a prompt's last chunk, so the local group may briefly hold all of the new input
        # (in decoding, one token at a time).
        chunk = max(1, len(state.token_ids) + len(request.new_ids) - state.cache.seq_length)
        bound = state.cache.bytes_bound(final, chunk, self.head_dim, self.itemsize)
        return max(0, bound - self.store.counted_bytes(request.tag))

    def fits(self, request: TurnRequest, need: int, running: int) -> bool:
        resident = self.store.resident_bytes()
        if resident + self.reserved_bytes() + need <= self.store.budget_bytes:
            return True
        # A turn over the whole budget may run alone, once nothing else is running or resident.
        own = self.store.counted_bytes(request.tag)
        return own + need > self.store.budget_bytes and not running and resident <= own

    def admit(self, request: TurnRequest, running: int) -> bool:
        """Scheduler hook (model loop): reserve and admit, or start making room and wait."""
        need = self.need(request)
        if self.fits(request, need, running):
            with self._mu:
                self._reserved[id(request)] = need
                self._spill_error = None
            return True
        with self._mu:
            error, spilling = self._spill_error, self._spilling
            if error is not None and not running:
                self._spill_error = None   # refuse this turn with it; the next one tries to make room afresh
            elif error is None and not spilling:
                self._spilling = True
                self.io.submit(self._make_room, request, need)
        if error is not None and not running:
            raise error   # e.g. Redis is down and nothing running will free memory: refuse, never wait forever
        return False

    def release(self, request: TurnRequest) -> None:
        with self._mu:
            self._reserved.pop(id(request), None)

    def _make_room(self, request: TurnRequest, need: int) -> None:
        """I/O thread: spill idle sessions until `need` more bytes fit (as far as idle sessions allow)."""
        try:
            self.store.make_room(need, keep=request.tag or None)
        except BudgetExhausted as exc:   # Redis is unreachable: nothing can be spilled
            with self._mu:
                self._spill_error = exc
        except Exception:  # noqa: BLE001 - never leave the model loop waiting on a dead spill
            log.exception("making room in the KV budget failed")
        finally:
            with self._mu:
                self._spilling = False
            self.wake()
