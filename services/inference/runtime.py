"""The runtime: owns the Engine and runs every model step on ONE dedicated thread.

gRPC handler threads validate a request, register it with the session store, enqueue a job
on the engine thread and stream its tokens back through a queue. The job's ``on_token``
callback returns False as soon as the request's cancel flag is set (client cancel, deadline,
shutdown), so generation stops within one decode step and the session stays consistent.
Jobs take whole turns today; passing session states (not globals) keeps the door open for a
scheduler that batches decode steps across sessions.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from services.engine import Engine, GenerationResult, HeadMap, LoadedModel, SamplingParams, TokenEvent

from .errors import Cancelled, SessionError, ShuttingDown
from .sessions import SessionStore

log = logging.getLogger(__name__)
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class Turn:
    """One request's input, validated on the handler thread. Exactly one of text / messages."""

    params: SamplingParams
    text: str | None = None
    messages: tuple[dict, ...] | None = None
    keep_session: bool = True
    session_id: str | None = None  # set for ContinueSession

    def __post_init__(self):
        if (self.text is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt text or chat messages")
        if self.text is not None and not self.text:
            raise ValueError("the prompt is empty; send some text")
        if self.messages is not None and not self.messages:
            raise ValueError("the chat has no messages; send at least one")
        if self.session_id is not None and not self.session_id:
            raise ValueError("session_id is empty; pass the id a Generate stream returned")


@dataclass(frozen=True)
class Finished:
    result: GenerationResult


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class TurnStream:
    """Iterate for ``TokenEvent``s then one ``Finished``; raises the job's error if it failed."""

    def __init__(self, session_id: str, events: "queue.SimpleQueue"):
        self.session_id, self._events = session_id, events

    def __iter__(self) -> Iterator[TokenEvent | Finished]:
        while True:
            item = self._events.get()
            if isinstance(item, _Failed):
                raise item.error
            yield item
            if isinstance(item, Finished):
                return


class FixedHeadMaps:
    """The smallest head-map source: fixed maps, the first one active (until a registry is plugged in)."""

    def __init__(self, active: HeadMap, *others: HeadMap):
        self._active = active
        self._maps = {m.version: m for m in (active, *others)}

    @property
    def active(self) -> HeadMap:
        return self._active

    def get(self, version: str) -> HeadMap:
        return self._maps[version]


class Runtime:
    def __init__(self, loaded: LoadedModel, head_maps, store: SessionStore):
        self.loaded, self.head_maps, self.store = loaded, head_maps, store
        self.engine = Engine(loaded, head_maps.active)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="razor-engine")
        self._mu = threading.Condition()
        self._cancels: set[threading.Event] = set()
        self._closed = False
        self.on_turn = None  # optional hook(result, seconds), e.g. metrics
        self._engine_thread: threading.Thread = self._executor.submit(threading.current_thread).result()
        fp = loaded.fingerprint
        # Upper bound of the cache a token adds (keys + values of every KV head), for budgeting.
        self.full_bytes_per_token = 2 * fp.n_layers * fp.n_kv_heads * fp.head_dim * self._dtype_size()

    # ---- turns -----------------------------------------------------------------------------
    def start_turn(self, turn: Turn, cancel: threading.Event) -> TurnStream:
        """Open (or create) the turn's session and queue the turn on the engine thread."""
        if turn.session_id is not None:
            sid = turn.session_id
            self.store.acquire(sid)
        else:
            sid = self.store.create() if turn.keep_session else ""
        events: queue.SimpleQueue = queue.SimpleQueue()
        with self._mu:
            if self._closed:
                self._abandon(turn, sid)
                raise ShuttingDown("the service is shutting down; retry on another replica or after restart")
            self._cancels.add(cancel)
            # Submitted under the lock, so close() queues its final spill after every turn.
            self._executor.submit(self._job, turn, sid, events, cancel)
        return TurnStream(sid, events)

    def _job(self, turn: Turn, sid: str, events, cancel: threading.Event) -> None:
        try:
            if cancel.is_set():
                raise Cancelled("the request was cancelled before it started")
            started = time.perf_counter()
            result = self._run(turn, sid, cancel, events)
        except BaseException as exc:  # every failure reaches the waiting handler
            self._abandon(turn, sid, exc)
            events.put(_Failed(exc))
        else:
            if sid:
                self.store.release(sid)
            events.put(Finished(result))
            self._notify(result, time.perf_counter() - started)
            self.store.settle()  # spill over-budget idle sessions once the client has its answer
        finally:
            with self._mu:
                self._cancels.discard(cancel)
                self._mu.notify_all()

    def _notify(self, result: GenerationResult, seconds: float) -> None:
        try:
            if self.on_turn is not None:
                self.on_turn(result, seconds)
        except Exception:  # noqa: BLE001 - a metrics hook must never break serving
            log.exception("on_turn hook failed")

    def _run(self, turn: Turn, sid: str, cancel, events) -> GenerationResult:
        def on_token(event: TokenEvent) -> bool:
            events.put(event)
            return not cancel.is_set()

        if turn.session_id is None:
            ids = self.engine.encode(text=turn.text, messages=_messages(turn))
            self._check_fits(0, len(ids), turn.params)
            if sid:
                self.store.make_room(self.full_bytes_per_token * (len(ids) + turn.params.max_new_tokens), keep=sid)
            state, result = self.engine.generate(ids, turn.params, on_token=on_token,
                                                 chat=turn.messages is not None, head_map=self.head_maps.active)
        else:
            state = self.store.load(sid, lambda n: self.store.make_room(n, keep=sid))
            ids = self.engine.encode_turn(state, text=turn.text, messages=_messages(turn))
            if not ids:
                raise ValueError("the new turn adds no tokens; send some text")
            self._check_fits(len(state.token_ids), len(ids), turn.params)
            self.store.make_room(self.full_bytes_per_token * (len(ids) + turn.params.max_new_tokens), keep=sid)
            # The cache carries its own head layout, so a session keeps the map it was made with.
            result = self.engine.continue_session(state, ids, turn.params, on_token=on_token)
        if sid:
            self.store.put(sid, state)
        return result

    def _abandon(self, turn: Turn, sid: str, exc: BaseException | None = None) -> None:
        if not sid:
            return
        if turn.session_id is None:
            self.store.discard(sid)  # a new session whose first turn failed never existed
        elif exc is None or isinstance(exc, (ValueError, SessionError, Cancelled)):
            self.store.release(sid)  # refused before the cache was touched
        else:
            self.store.mark_lost(sid, f"an internal error interrupted a turn ({exc!r})")

    def _check_fits(self, history: int, new: int, params: SamplingParams) -> None:
        limit = self.loaded.max_context
        if history + new + params.max_new_tokens > limit:
            held = f"the session holds {history} tokens, " if history else ""
            raise ValueError(
                f"{held}the {'turn' if history else 'prompt'} has {new} tokens and max_new_tokens is "
                f"{params.max_new_tokens}: together {history + new + params.max_new_tokens} exceed the model's "
                f"context of {limit} tokens; shorten the input or lower max_new_tokens")

    # ---- lifecycle -------------------------------------------------------------------------
    def healthy(self, timeout_s: float = 5.0) -> bool:
        """Touch the engine thread and the device: True when both answer."""
        if self._closed or not self._engine_thread.is_alive():
            return False
        with self._mu:
            busy = bool(self._cancels)
        if busy:  # a turn is running on the engine thread, so it is alive
            return True
        try:
            return self._executor.submit(self._probe_device).result(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - any failure means not serving
            log.exception("health probe failed")
            return False

    def _probe_device(self) -> bool:
        return bool(torch.ones(1, device=self.loaded.device).sum().item() == 1.0)

    def wait_idle(self, timeout_s: float) -> bool:
        with self._mu:
            return self._mu.wait_for(lambda: not self._cancels, timeout=timeout_s)

    def cancel_all(self) -> None:
        with self._mu:
            for cancel in self._cancels:
                cancel.set()

    def close(self) -> int:
        """Refuse new turns, let queued ones end, spill resident sessions; returns how many spilled."""
        with self._mu:
            self._closed = True
        spilled = self._executor.submit(self.store.spill_all).result()
        self._executor.shutdown(wait=True)
        self.store.spill.close()
        log.info("runtime closed; %d sessions spilled to Redis", spilled)
        return spilled

    def _dtype_size(self) -> int:
        return next(self.loaded.model.parameters()).dtype.itemsize

    # ---- queries ---------------------------------------------------------------------------
    def list_sessions(self, page_size: int, page_token: str):
        """A page of sessions ordered by id, and the token of the next page ("" at the end)."""
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be within 0..{MAX_PAGE_SIZE} (0 = 50), got {page_size}")
        size = page_size or 50
        entries = sorted((e for e in self.store.list() if e.session_id > page_token), key=lambda e: e.session_id)
        page = entries[:size]
        return page, (page[-1].session_id if len(entries) > size else "")


def _messages(turn: Turn) -> list[dict] | None:
    return None if turn.messages is None else [dict(m) for m in turn.messages]
