"""The runtime: gRPC handler threads prepare turns, one model loop batches them, one I/O thread talks to Redis.

A handler thread validates and tokenizes a request (with a size cap first), registers it with the session
store and submits it; the `EngineLoop` thread advances every admitted turn one token per step (continuous
batching, `services.engine.Scheduler`) and streams each turn's tokens to its own queue. A spilled session is
restored — fetched, checksum-verified and rebuilt — on the I/O thread before it joins the batch, and room in the
KV budget is made there too, so Redis never stalls the decoding of other sessions. Cancellation (client cancel,
deadline, shutdown, or `abort` by request id from any connection or replica) sets the turn's event, and the
scheduler drops the turn before its next step.
"""
from __future__ import annotations

import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from services.engine import (Engine, GenerationResult, HeadMap, LoadedModel, SamplingParams,
                             SchedulerConfig, Scheduler, TokenEvent, TurnRequest, threads)

from .admission import Admission
from .engine_loop import EngineLoop
from .errors import InvalidArgument, Overloaded, ShuttingDown
from .leases import LeaseKeeper
from .requests import RequestRegistry, check_request_id
from . import session_moves, transfer
from .sessions import SessionStore
from .spilled_header import ModelShape
from .validation import DEFAULT_PAGE_SIZE, Limits, check_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Turn:
    """One request's input, already checked by `validation`. Exactly one of text / messages."""

    params: SamplingParams
    text: str | None = None
    messages: tuple[dict, ...] | None = None
    keep_session: bool = True
    session_id: str | None = None  # set for ContinueSession
    tenant: str = ""               # the caller's tenant (from its API key; "" with auth off)
    session_ttl_s: int = 0         # a new session's TTL (0 = RAZOR_SESSION_TTL_S)
    pin_session: bool = False      # keep a new session resident
    request_id: str = ""           # the client's id for the turn ("" = start_turn assigns one)

    def __post_init__(self):
        if (self.text is None) == (self.messages is None):
            raise ValueError("a Turn takes exactly one of text or messages")   # a bug in the caller
        if self.request_id:
            check_request_id(self.request_id)


@dataclass
class _Request(TurnRequest):
    """A turn with what the runtime tracks for it, kept on the turn: CPython reuses a finished request's id()."""

    restore_error: BaseException | None = None   # the I/O thread's failed restore, raised at the next admission


@dataclass(frozen=True)
class Finished:
    result: GenerationResult
    session_kept: bool = True   # False: a new session whose turn never started (cancelled while queued) is gone


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class TurnStream:
    """Iterate for ``TokenEvent``s then one ``Finished``; raises the job's error if it failed. `on_end` runs once
    the turn has ended, before the client sees its end (so its request id is free again), or when the
    iteration is abandoned."""

    def __init__(self, session_id: str, events: "queue.SimpleQueue", request_id: str = "", on_end=lambda: None):
        self.session_id, self.request_id, self._events, self._on_end = session_id, request_id, events, on_end

    def __iter__(self) -> Iterator[TokenEvent | Finished]:
        try:
            while True:
                item = self._events.get()
                if isinstance(item, (_Failed, Finished)):
                    self._on_end()
                if isinstance(item, _Failed):
                    raise item.error
                if isinstance(item, Finished) and not item.session_kept:
                    self.session_id = ""   # the completion names no session: continuing it would be NOT_FOUND
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            self._on_end()


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
    def __init__(self, loaded: LoadedModel, head_maps, store: SessionStore,
                 scheduler: SchedulerConfig = SchedulerConfig(), max_input_chars: int = 0, max_turns: int = 0):
        self.loaded, self.head_maps, self.store = loaded, head_maps, store
        self.engine = Engine(loaded, head_maps.active)
        fp, itemsize = loaded.fingerprint, loaded.dtype.itemsize
        # Upper bound of the cache a token adds (keys + values of every KV head), for reporting.
        self.full_bytes_per_token = 2 * fp.n_layers * fp.n_kv_heads * fp.head_dim * itemsize
        # No real tokenizer averages 32 characters per token: longer input is refused before tokenizing.
        self.max_input_chars = max_input_chars or 32 * loaded.max_context
        self.limits = Limits(loaded.max_context, self.max_input_chars, self.engine.dims.vocab_size,
                             chat_template=bool(getattr(loaded.tokenizer, "chat_template", None)))
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="razor-io", initializer=threads.serial)
        self.scheduler = Scheduler(self.engine, scheduler, admit=self._admit)
        self.loop = EngineLoop(self.scheduler)
        self.admission = Admission(store, self.io, self.loop.wake, fp.head_dim, itemsize)
        store.reserved_bytes = self.admission.reserved_bytes
        store.defer = self.io.submit   # Redis work the model loop asks for runs on the I/O thread
        self.leases = LeaseKeeper(store, lambda sid: self.io.submit(store.hand_over, sid)).start()
        self.requests = RequestRegistry(store.spill.client, store.replica_id, on_abort=self.loop.wake).start()
        self._tokenizer = threading.Lock()   # a fast tokenizer is not safe to share between threads
        self._continued: set[int] = set()    # model loop: continued turns whose session it pinned
        self._restoring: set[int] = set()    # turns whose session the I/O thread is restoring
        self._mu = threading.Condition()
        self._cancels: set[threading.Event] = set()
        self._closed = False
        # Turns taken at once, running and waiting (0 = no bound): beyond it a turn is refused, not queued
        # where it would hold a handler thread that health checks and Abort need.
        self.max_turns = max_turns
        self.on_turn = None  # optional hook(result, seconds), e.g. metrics
        self.token_rate = TokenRate()

    # ---- turns (handler threads) -----------------------------------------------------------
    def start_turn(self, turn: Turn, cancel: threading.Event) -> TurnStream:
        """Register the turn's request id (assigning one when the client sent none), then open (or create) its
        session, tokenize, and queue the turn for the model loop. Raises DuplicateRequest while another turn of
        the tenant runs under the same id."""
        turn = turn if turn.request_id else replace(turn, request_id=uuid.uuid4().hex)
        self.requests.register(turn.tenant, turn.request_id, cancel)
        end = functools.partial(self.requests.unregister, turn.tenant, turn.request_id, cancel)
        try:
            sid, events = self._start_turn(turn, cancel)
        except BaseException:
            end()
            raise
        return TurnStream(sid, events, turn.request_id, on_end=end)

    def abort(self, tenant: str, request_id: str) -> None:
        """Stop the tenant's running turn `request_id` within one step, on whichever replica runs it (the session
        is left as after a client cancel). Raises RequestNotFound for an unknown id or another tenant's."""
        if not request_id:
            raise InvalidArgument("request_id is empty; pass the id of a running Generate or ContinueSession")
        self.requests.abort(tenant, check_request_id(request_id))

    def _start_turn(self, turn: Turn, cancel: threading.Event) -> tuple[str, queue.SimpleQueue]:
        self._check_room()   # before any session work: a refusal under load costs no Redis call
        entry = self.store.acquire(turn.session_id, turn.tenant) if turn.session_id is not None else None
        if entry is not None:
            sid = turn.session_id
        else:
            sid = self.store.create(turn.tenant, turn.session_ttl_s, turn.pin_session) if turn.keep_session else ""
        events: queue.SimpleQueue = queue.SimpleQueue()
        try:
            with self._mu:
                if self._closed:
                    raise ShuttingDown("the service is shutting down; retry on another replica or after restart")
                self._check_room()   # again under the lock, where the turn is counted
                self._cancels.add(cancel)
            request = self._request(turn, sid, entry, events, cancel)
            self.loop.submit(request)   # the engine's own checks raise here, synchronously
        except BaseException:
            self._forget(cancel)
            self._abandon(turn, sid)   # not submitted: the session's cache is untouched
            raise
        return sid, events

    def _check_room(self) -> None:
        if self.max_turns and len(self._cancels) >= self.max_turns:
            raise Overloaded(f"this replica is busy: it takes at most {self.max_turns} turns at once, running and "
                             "waiting (RAZOR_MAX_RUNNING + RAZOR_MAX_WAITING); retry with backoff, or on another "
                             "replica")

    def _request(self, turn: Turn, sid: str, entry, events, cancel: threading.Event) -> _Request:
        history = entry.length if entry is not None else 0
        ids = self._encode(turn, sid if entry is not None else None)
        check_tokens(history, len(ids), turn.params.max_new_tokens, self.loaded.max_context)
        # A continued session's state is resolved when its turn is admitted (pinned, or restored first).
        state = None if entry is not None else self.engine.new_session(chat=turn.messages is not None,
                                                                       head_map=self.head_maps.active)
        started = time.perf_counter()
        request = _Request(state, ids, turn.params, on_token=lambda event: self._stream(events, event),
                           cancelled=cancel.is_set, tag=sid)
        request.on_done = lambda outcome: self._done(turn, request, events, cancel, outcome, started)
        return request

    def _stream(self, events, event) -> bool:
        """Model loop: hand one token to its stream (and count it for the load report)."""
        self.token_rate.add()
        events.put(event)
        return True

    def _encode(self, turn: Turn, continued_sid: str | None) -> list[int]:
        with self._tokenizer:
            if continued_sid is None:
                return self.engine.encode(text=turn.text, messages=_messages(turn))
            return self.engine.encode_turn(self.store.last_token(continued_sid), text=turn.text,
                                           messages=_messages(turn))

    def _admit(self, request: _Request) -> bool:
        """Scheduler hook (model loop). A continued session is pinned (restored first when spilled) and
        unpinned again while its turn cannot fit yet, so a queued turn never keeps others from the budget."""
        continued = request.state is None or id(request) in self._continued
        if request.state is None:
            error, request.restore_error = request.restore_error, None
            if error is not None:
                raise error
            request.state = self.store.pin(request.tag)
            if request.state is None:
                self._restore(request)
                return False
            self._continued.add(id(request))
        if self.admission.admit(request, running=len(self.scheduler.running)):
            return True
        if continued:
            self.store.unpin(request.tag)
            request.state = None
        return False

    def _restore(self, request: _Request) -> None:
        """Restore a spilled session on the I/O thread (making room first), then wake the model loop."""
        if id(request) in self._restoring:
            return
        self._restoring.add(id(request))
        sid = request.tag

        def job() -> None:
            try:
                self.store.load(sid, lambda n: self.store.make_room(n, keep=sid))
            except BaseException as exc:  # noqa: BLE001 - the turn is refused with it at its next admission
                request.restore_error = exc   # a request that already ended takes it away with it
            finally:
                self._restoring.discard(id(request))
                self.loop.wake()
        self.io.submit(job)

    # ---- turn outcomes (model loop) --------------------------------------------------------
    def _done(self, turn: Turn, request: _Request, events, cancel, outcome, started: float) -> None:
        self.admission.release(request)
        self._continued.discard(id(request))
        if isinstance(outcome, BaseException):
            self._abandon(turn, request.tag, outcome, request.started, self.io.submit)  # model loop: no Redis here
            end = _Failed(outcome)
        else:
            end = Finished(outcome, session_kept=self._keep(turn, request))
            self._notify(outcome, time.perf_counter() - started)
            self.io.submit(self.store.settle)  # spill over-budget idle sessions, off the model loop
        # Its stream frees the request id before the client sees the end; this covers a stream never read.
        self.io.submit(self.requests.unregister, turn.tenant, turn.request_id, cancel)
        self._forget(cancel)   # before its caller hears: the caller's next turn must find the room free
        events.put(end)

    def _forget(self, cancel: threading.Event) -> None:
        with self._mu:
            self._cancels.discard(cancel)
            self._mu.notify_all()

    def _notify(self, result: GenerationResult, seconds: float) -> None:
        try:
            if self.on_turn is not None:
                self.on_turn(result, seconds)
        except Exception:  # noqa: BLE001 - a metrics hook must never break serving
            log.exception("on_turn hook failed")

    def _keep(self, turn: Turn, request: _Request) -> bool:
        """Model loop: record the session of a turn that ended without an error; False when it was a new session
        that is gone again."""
        if not request.started:   # cancelled while queued: as it was (a new session, never seen, never was)
            self._abandon(turn, request.tag, redis_work=self.io.submit)
            return turn.session_id is not None
        if request.tag:
            self.store.put(request.tag, request.state)
            self.store.release(request.tag)
        return True

    def _abandon(self, turn: Turn, sid: str, exc: BaseException | None = None, started: bool = False,
                 redis_work=None) -> None:
        """Drop the session of a turn that failed, or never ran (not `started`: its cache is untouched).
        `redis_work` runs the Redis part of dropping a session (the model loop passes the I/O thread's submit)."""
        if not sid:
            return
        redis_work = redis_work or (lambda fn, *args: fn(*args))
        if turn.session_id is None:
            self.store.discard(sid, redis_work)  # a new session whose first turn failed never existed
        elif not started:
            self.store.release(sid)  # ended before the scheduler started it: the cache was never touched
        else:
            self.store.mark_lost(sid, f"an internal error interrupted a turn ({exc!r})", redis_work)

    # ---- lifecycle -------------------------------------------------------------------------
    def healthy(self, timeout_s: float = 5.0) -> bool:
        """Touch the model loop and the device: True when both answer."""
        if self._closed or not self.loop.thread.is_alive():
            return False
        try:
            return self.loop.call(self._probe_device).result(timeout=timeout_s)
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
        self.loop.wake()

    def close(self) -> dict:
        """Refuse new turns, let queued ones end, spill resident sessions (to the local spill directory while
        Redis is down); returns the counts: spilled, saved_locally, lost."""
        with self._mu:
            self._closed = True
        self.loop.stop()
        counts = self.io.submit(self.store.spill_all).result()
        self.leases.stop()
        self.requests.stop()
        self.io.shutdown(wait=True)
        self.store.spill.close()
        log.info("runtime closed; sessions: %d spilled to Redis, %d saved locally, %d lost", counts["spilled"],
                 counts["saved_locally"], counts["lost"])
        return counts

    # ---- queries ---------------------------------------------------------------------------
    def load(self) -> dict:
        """What a router needs to pick a replica (GetLoad)."""
        resident_bytes, resident, spilled = self.store.usage()
        return {"replica_id": self.store.replica_id, "running_turns": len(self.scheduler.running),
                "queued_turns": len(self.scheduler.waiting), "resident_sessions": resident,
                "spilled_sessions": spilled, "kv_bytes_used": resident_bytes + self.admission.reserved_bytes(),
                "kv_budget_bytes": self.store.budget_bytes, "pinned_sessions": self.store.pinned_count(),
                "generated_tokens_per_second": self.token_rate.per_second()}

    def list_sessions(self, page_size: int, page_token: str, tenant: str = ""):
        """A page of the tenant's sessions ordered by id (from Redis: every replica gives the same answer), and
        the token of the next page ("" at the end). `validation.check_list_sessions` checked the arguments."""
        page, more = self.store.page(tenant, page_token, page_size or DEFAULT_PAGE_SIZE)
        return page, (page[-1].session_id if more and page else "")

    # ---- session transfer: export, import, fork (handler threads) -------------------------------
    max_import_bytes: int = 2**30   # RAZOR_MAX_IMPORT_BYTES; build_server sets it from the settings

    def export_session(self, sid: str, tenant: str) -> list[bytes]:
        """The session's export blob (parts to concatenate); read off the model loop, restored on the I/O thread."""
        return session_moves.export_state(self.store, sid, tenant, on_io=self._on_io)

    def fork_session(self, sid: str, tenant: str) -> str:
        """A copy of the session under a new id of the same tenant."""
        return session_moves.fork(self.store, sid, tenant, on_io=self._on_io)

    def import_session(self, pieces, tenant: str, declared_bytes: int = 0) -> tuple[str, dict]:
        """(the new session's id, the export's header meta) from an export's streamed pieces."""
        blob = transfer.gather(pieces, self.max_import_bytes, declared_bytes)
        deployment = transfer.Deployment(self.loaded.fingerprint.id, self.store.dtype, ModelShape.of(self.loaded),
                                         self.head_maps)
        state, meta = transfer.unpack(blob, deployment, self.loaded.device)
        return session_moves.adopt_state(self.store, state, tenant), meta

    def _on_io(self, fn, *args):
        """Run ``fn`` on the I/O thread (where restores and spills run) and wait for it."""
        if self._closed:
            raise ShuttingDown("the service is shutting down; retry on another replica or after restart")
        return self.io.submit(fn, *args).result()


class TokenRate:
    """Tokens counted into one-second buckets; the rate over the last `window_s` seconds. Only the model loop
    adds; readers may see a bucket mid-update, which only blurs a rate."""

    def __init__(self, window_s: int = 60, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._buckets: dict[int, int] = {}

    def add(self, n: int = 1) -> None:
        second = int(self.clock())
        self._buckets[second] = self._buckets.get(second, 0) + n
        if len(self._buckets) > self.window_s + 2:
            for old in [s for s in self._buckets if s <= second - self.window_s]:
                del self._buckets[old]

    def per_second(self) -> float:
        now = int(self.clock())
        return sum(n for s, n in list(self._buckets.items()) if now - self.window_s < s <= now) / self.window_s


def _messages(turn: Turn) -> list[dict] | None:
    return None if turn.messages is None else [dict(m) for m in turn.messages]
