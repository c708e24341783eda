"""Scheduler: iteration-level (continuous) batching of turns over per-session compressed caches.

Every `step()` is one forward over a packed batch: one decode token for every turn that is generating, plus
prefill chunks of new or continued turns, oldest first, up to `step_tokens` in all (chunked prefill: a long
prompt never stalls the others' decoding). Turns join at the next step and leave the moment they finish,
stop, are cancelled or pass their deadline. Admission is first come, first served (nobody is overtaken, so
nobody starves) and bounded: at most `max_running` turns, and each one only once the `admit` hook (the
service's KV-byte budget) accepts it; a hook that raises refuses the turn with that error. Not thread-safe except `submit` and `cancel_all`: one thread steps.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from . import hf
from .batch import StepBatch
from .slab import SlabPool
from .sampling import Sampled, SamplingParams, make_generator, sample_rows

if TYPE_CHECKING:   # generation imports the scheduler at call time; the scheduler needs its types only here
    from .generation import SessionState, TokenEvent
    from .text_stream import TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 32      # turns in the running batch
    step_tokens: int = 256     # tokens per forward: one per decoding turn, the rest for prefill chunks

    def __post_init__(self):
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.step_tokens <= self.max_running:
            raise ValueError(f"step_tokens ({self.step_tokens}) must exceed max_running ({self.max_running}) so a "
                             "step always has room for prefill after every running turn's decode token")


@dataclass
class TurnRequest:
    """One turn of one session. `on_token` runs on the stepping thread: keep it cheap (a queue put)."""

    state: "SessionState | None"                                # None: the admit hook resolves it
    new_ids: list[int]
    params: SamplingParams
    on_token: Callable[["TokenEvent"], "bool | None"] | None = None   # return False to cancel
    on_done: Callable[[object], None] | None = None             # GenerationResult, or the exception
    cancelled: Callable[[], bool] | None = None                 # polled before every step
    deadline: float | None = None                               # time.monotonic() at which the turn stops
    tag: object = None                                          # the caller's (e.g. the session id)
    started: bool = False   # set when the scheduler starts it: from then a failure may have touched the cache


@dataclass
class _Turn:
    request: TurnRequest
    pending: list[int]         # tokens still to feed (history lag + new tokens, then the last sample)
    cached: int                # history tokens reused from the cache
    stream: "TextStream | _NoText"
    generator: torch.Generator | None
    stops: frozenset[int]
    generated: list[int] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return len(self.pending) > 1 or not self.generated


class Scheduler:
    def __init__(self, engine, config: SchedulerConfig = SchedulerConfig(),
                 admit: Callable[[TurnRequest], bool] | None = None):
        self.engine, self.config, self.admit = engine, config, admit
        self._inbox: collections.deque[TurnRequest] = collections.deque()   # appends are thread-safe
        self.waiting: collections.deque[TurnRequest] = collections.deque()
        self.running: list[_Turn] = []
        self.slabs = SlabPool(engine.dims.head_dim, engine.loaded.dtype, engine.device)   # decoding turns' caches

    def submit(self, request: TurnRequest) -> None:
        """Queue a turn (any thread); it joins the batch at a coming step. A turn may come without its state
        (`state=None`): then the admit hook must provide it, and the engine checks it at admission."""
        if request.state is not None:
            self.engine.check_turn(request.state, request.new_ids, request.params)
        self._inbox.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self._inbox or self.waiting or self.running)

    # --- one step ---------------------------------------------------------------------------------
    def step(self) -> int:
        """Admit, run one forward over the batch, sample and stream. Returns the tokens it ran."""
        while self._inbox:
            self.waiting.append(self._inbox.popleft())
        self._drop_cancelled()
        self._admit()
        plan = self._plan()
        if not plan:
            return 0
        sampling = [i for i, (t, ids) in enumerate(plan) if len(ids) == len(t.pending)]
        try:
            logits, n_tokens = self._forward(plan, sampling)                                    # [n, V]
        except Exception as exc:  # noqa: BLE001 - these sessions' caches are now half-updated
            log.exception("a step over %d turns failed", len(plan))
            for turn, _ in plan:
                turn.request.state.damaged = f"a model step failed mid-turn ({type(exc).__name__}: {exc})"
                self._finish(turn, error=exc)
            return 0
        for turn, ids in plan:
            del turn.pending[:len(ids)]
        turns = [plan[i][0] for i in sampling]
        for turn, sampled in zip(turns, self._sample(logits, turns)):
            try:
                if isinstance(sampled, Exception):
                    raise sampled
                self._advance(turn, sampled)
            except Exception as exc:  # noqa: BLE001 - left running with nothing pending, it would stall every step
                log.error("turn %r could not take its next token: %r", turn.request.tag, exc, exc_info=exc)
                if turn in self.running:
                    self._finish(turn, error=exc)
        return n_tokens

    def _forward(self, plan: list[tuple[_Turn, list[int]]], sampling: list[int]) -> tuple[torch.Tensor, int]:
        """One forward over the plan -> the logits of the turns in `sampling` ([n, V]) and the tokens run."""
        self.slabs.arrange([(t.request.state.cache, _final_length(t)) for t, ids in plan if not t.prefilling])
        batch = StepBatch([(t.request.state.cache, ids) for t, ids in plan], self.engine.device)
        logits = hf.forward_step(self.engine.model, batch.input_ids(), batch.position_ids(), batch,
                                 batch.last_positions()[sampling])                             # [n, V]
        batch.compress([plan[i][0].request.state.cache for i in sampling])
        return logits, batch.n_tokens

    def _sample(self, logits: torch.Tensor, turns: list[_Turn]) -> list[Sampled | Exception]:
        """logits: [n, V] -> each turn's next token, or the error its turn fails with: a row that is not finite
        (a model that overflowed) fails its own turn only, before any generator draws, so the others' seeded
        draws stay as they would be."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()                                   # [n]
        rows = [i for i, ok in enumerate(finite) if ok]
        results: list[Sampled | Exception] = [
            RuntimeError("the model's logits for this turn are not finite (NaN or infinity): weights in "
                         "float16 may overflow; load the model in bfloat16 or float32")] * len(turns)
        try:
            sampled = sample_rows(logits if len(rows) == len(turns) else logits[rows],
                                  [turns[i].request.params for i in rows], [turns[i].generator for i in rows])
        except Exception as exc:  # noqa: BLE001 - a fault in sampling itself: these turns fail, the loop goes on
            sampled = [exc] * len(rows)
        for i, result in zip(rows, sampled):
            results[i] = result
        return results

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for turn in list(self.running):
            if _stopped(turn.request, now):
                self._finish(turn, "cancelled")
        for request in list(self.waiting):
            if _stopped(request, now):
                self.waiting.remove(request)
                self._finish(self._unstarted(request), "cancelled")

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_running:
            request = self.waiting[0]
            try:
                if self.admit is not None and not self.admit(request):
                    return   # first come, first served: later turns wait behind this one
                self.engine.check_turn(request.state, request.new_ids, request.params)
                turn = self._start(request)
            except Exception as exc:  # noqa: BLE001 - the hook (or starting) refuses this turn for good
                self.waiting.popleft()
                self._finish(self._unstarted(request), error=exc)
                continue
            self.waiting.popleft()
            self.running.append(turn)

    def _start(self, request: TurnRequest) -> _Turn:
        state, params = request.state, request.params
        cached = state.cache.seq_length
        pending = state.token_ids[cached:] + list(request.new_ids)
        stops = frozenset(params.stop_token_ids) | frozenset(self.engine.eos_ids)
        turn = _Turn(request, pending, cached, self.engine.text_stream(params),
                     make_generator(params, self.engine.device), stops)
        state.token_ids.extend(request.new_ids)   # last: a start that raised leaves the session as it was
        request.started = True
        return turn

    def _unstarted(self, request: TurnRequest) -> _Turn:
        """A turn that leaves before it ran: the session is left exactly as it was."""
        cached = 0 if request.state is None else request.state.cache.seq_length
        return _Turn(request, [], cached, _NO_TEXT, None, frozenset())   # no stream: it never streamed a token

    def _plan(self) -> list[tuple[_Turn, list[int]]]:
        """Decode tokens first (one per generating turn), then prefill chunks in arrival order."""
        plan = [(t, t.pending[:1]) for t in self.running if not t.prefilling]
        budget = self.config.step_tokens - len(plan)
        for turn in self.running:
            if turn.prefilling and budget > 0:
                chunk = turn.pending[:budget]
                plan.append((turn, chunk))
                budget -= len(chunk)
        return plan

    # --- sampling and streaming -------------------------------------------------------------------
    def _advance(self, turn: _Turn, sampled: Sampled) -> None:
        """Take the turn's sampled next token, stream it, and decide whether the turn goes on."""
        params, state = turn.request.params, turn.request.state
        token, logprob, top = sampled
        turn.generated.append(token)
        state.token_ids.append(token)
        is_stop = token in turn.stops
        at_limit = len(turn.generated) >= params.max_new_tokens
        delta = turn.stream.push(None if is_stop else token, flush=is_stop or at_limit)
        keep_going = _call(turn.request.on_token, self.engine.token_event(token, delta, logprob, top))
        if is_stop or turn.stream.stopped:
            self._finish(turn, "stop")
        elif keep_going is False:
            self._finish(turn, "cancelled")
        elif at_limit:
            self._finish(turn, "length")
        else:
            turn.pending = [token]

    def _finish(self, turn: _Turn, reason: str = "", error: BaseException | None = None) -> None:
        if turn in self.running:
            self.running.remove(turn)
        state = turn.request.state
        try:
            if state is not None and state.cache.seat is not None:
                self.slabs.unseat(state.cache)   # the session owns its cache again before anyone sees it
            outcome = error if error is not None else self.engine.result(turn, reason)
        except Exception as exc:  # noqa: BLE001 - out of memory, say: the turn fails, and its caller still hears
            log.exception("turn %r could not finish cleanly", turn.request.tag)
            outcome = error if error is not None else exc
        _call(turn.request.on_done, outcome)

    def run_until_idle(self) -> None:
        while self.has_work:
            if not self.step() and not self.running and self.waiting:
                raise RuntimeError("waiting turns cannot be admitted: the admit hook refuses them all")

    def cancel_all(self) -> None:
        """Cancel every turn (any thread): they finish with reason "cancelled" at the next step."""
        for turn in list(self.running):
            turn.request.deadline = 0.0
        for request in list(self.waiting) + list(self._inbox):
            request.deadline = 0.0


class _NoText:
    """The text stream of a turn that never ran: empty (built without the engine, whose stream may be what failed)."""
    text, stopped = "", False


_NO_TEXT = _NoText()


def _final_length(turn: _Turn) -> int:
    """The most tokens a decoding turn's cache holds by its end (each step appends one, up to the limit)."""
    return turn.request.state.cache.seq_length + turn.request.params.max_new_tokens - len(turn.generated)


def _stopped(request: TurnRequest, now: float) -> bool:
    return (request.cancelled is not None and request.cancelled()) or (
        request.deadline is not None and now >= request.deadline)


def _call(callback, arg):
    """Run a caller's callback; one that raises must not take down the other sessions' step."""
    if callback is None:
        return None
    try:
        return callback(arg)
    except Exception:  # noqa: BLE001
        log.exception("turn callback failed")
        return False
