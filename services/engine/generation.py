"""Prefill, decode and sessions over the compressed cache (the service's narrow interface).

A `SessionState` is a conversation: its tokens and its `CompressedKVCache`. The last sampled token is not
run through the model until the next turn (it is "pending"), so a continued turn feeds
pending + new tokens once and never re-runs the history.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import attention, chat, hf
from .batch import StepBatch
from .cache import CompressedKVCache
from .errors import ContextLengthError, InvalidRequest, SessionDamagedError, SessionMismatchError
from .headmap import HeadMap
from .models import LoadedModel
from .sampling import SamplingParams
from .text_stream import TextStream


@dataclass
class TokenEvent:
    token_id: int
    text: str                   # new text this token completes (may be empty while UTF-8 / stop strings pend)
    logprob: float | None = None
    # The top_logprobs most likely tokens at this position: (token id, logprob, the token's own text).
    top_logprobs: tuple[tuple[int, float, str], ...] = ()


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str          # "length" | "stop" | "cancelled"
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int          # history tokens reused from the cache, not re-run


@dataclass
class SessionState:
    token_ids: list[int]
    cache: CompressedKVCache
    head_map_version: str
    fingerprint_id: str
    chat: bool = False
    damaged: str = ""   # why a failed step left the cache half-updated; such a session is never run again

    @property
    def seq_length(self) -> int:
        return len(self.token_ids)

    @property
    def last_token(self) -> int | None:
        return self.token_ids[-1] if self.token_ids else None

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def stored_nbytes(self) -> int:
        return self.cache.stored_nbytes()

    def full_nbytes(self) -> int:
        return self.cache.full_nbytes()

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, cache_meta = self.cache.to_tensors()
        return tensors, {"token_ids": self.token_ids, "head_map_version": self.head_map_version,
                         "fingerprint_id": self.fingerprint_id, "chat": self.chat, "cache": cache_meta}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, device) -> "SessionState":
        cache = CompressedKVCache.from_tensors(tensors, meta["cache"], device)
        return cls(list(meta["token_ids"]), cache, meta["head_map_version"], meta["fingerprint_id"],
                   bool(meta.get("chat", False)))


OnToken = Callable[[TokenEvent], "bool | None"]


def forward(model, ids: list[int], cache: CompressedKVCache) -> torch.Tensor:
    """Run new tokens of one session against its cache, then compress it. -> logits [V] of the last position."""
    return forward_all(model, ids, cache, last_only=True)[-1]


def forward_all(model, ids: list[int], cache: CompressedKVCache, last_only: bool = False) -> torch.Tensor:
    """The same, teacher-forced: logits [Q, V] at every new position (or [1, V] with `last_only`)."""
    batch = StepBatch([(cache, ids)], model.device)
    logits = hf.forward_step(model, batch.input_ids(), batch.position_ids(), batch,
                             batch.last_positions() if last_only else None)
    batch.compress()
    return logits


class Engine:
    """One model on one device. Not thread-safe: the service steps it on one thread.

    `generate` / `continue_session` run one turn to the end (a one-turn `Scheduler`); a server batches many
    turns by submitting them to its own `Scheduler(engine)` and stepping it."""

    def __init__(self, loaded: LoadedModel, head_map: HeadMap | None = None):
        self.loaded = loaded
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        hf.install(self.model, attention.razor_attention)
        self.dims = hf.model_dims(self.model.config)
        self.eos_ids = self.dims.eos_ids
        self.head_map = head_map or HeadMap.full(loaded.fingerprint)
        self.set_head_map(self.head_map)
        self._token_texts: dict[int, str] = {}   # top-logprob candidates' texts

    def set_head_map(self, head_map: HeadMap) -> None:
        head_map.validate(self.loaded.fingerprint)
        self.head_map = head_map

    def new_cache(self, head_map: HeadMap | None = None) -> CompressedKVCache:
        hm = head_map or self.head_map
        return CompressedKVCache(hm.retrieval_kv_heads, self.loaded.fingerprint.n_kv_heads, hm.compression)

    def new_session(self, chat: bool = False, head_map: HeadMap | None = None) -> SessionState:
        hm = head_map or self.head_map
        return SessionState([], self.new_cache(hm), hm.version, self.loaded.fingerprint.id, chat)

    # --- prompts ----------------------------------------------------------------------------------
    def encode(self, text: str | None = None, messages: list[dict] | None = None) -> list[int]:
        if messages:
            return chat.encode_chat(self.tokenizer, messages)
        if not text:
            raise InvalidRequest("the prompt is empty; send `prompt` text or chat `messages`")
        return chat.encode_text(self.tokenizer, text, first=True)

    def encode_turn(self, last_token: int | None, text: str | None = None,
                    messages: list[dict] | None = None) -> list[int]:
        """The tokens a continued turn adds after a session whose last token is `last_token`."""
        if messages:
            return chat.encode_chat_turn(self.tokenizer, messages, last_token)
        if not text:
            raise InvalidRequest("the new turn is empty; send `text` or chat `messages`")
        return chat.encode_text(self.tokenizer, text, first=False)

    # --- generation -------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams, on_token: OnToken | None = None,
                 chat: bool = False, head_map: HeadMap | None = None) -> tuple[SessionState, GenerationResult]:
        state = self.new_session(chat, head_map)
        return state, self.continue_session(state, prompt_ids, params, on_token)

    def continue_session(self, state: SessionState, new_ids: list[int], params: SamplingParams,
                         on_token: OnToken | None = None) -> GenerationResult:
        # Imported here: the scheduler builds on this module's SessionState and TextStream.
        from .scheduler import Scheduler, SchedulerConfig, TurnRequest

        one = Scheduler(self, SchedulerConfig(max_running=1, step_tokens=self.loaded.max_context + 1))
        outcome: list = []
        one.submit(TurnRequest(state, list(new_ids), params, on_token, on_done=outcome.append))
        one.run_until_idle()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    # --- what the scheduler asks of the engine ----------------------------------------------------
    def text_stream(self, params: SamplingParams) -> "TextStream":
        return TextStream(self.tokenizer, params.stop_strings)

    def token_event(self, token: int, text: str, logprob: float | None,
                    top: tuple[tuple[int, float], ...] = ()) -> TokenEvent:
        return TokenEvent(token, text, logprob, tuple((t, lp, self._token_text(t)) for t, lp in top))

    def _token_text(self, token: int) -> str:
        """One token decoded on its own, cached (at most the vocabulary): 20 decodes per generated token would
        cost the model loop ~0.2 ms."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text

    @staticmethod
    def result(turn, finish: str) -> GenerationResult:
        return GenerationResult(list(turn.generated), turn.stream.text, finish, len(turn.request.new_ids),
                                len(turn.generated), turn.cached)

    def check_turn(self, state: SessionState, new_ids: list[int], params: SamplingParams) -> None:
        if state.damaged:
            raise SessionDamagedError(f"this session cannot be continued: {state.damaged}; start a new session")
        if state.fingerprint_id != self.loaded.fingerprint.id:
            raise SessionMismatchError(f"session was made with model {state.fingerprint_id}; this server runs "
                                       f"{self.loaded.fingerprint.id}: start a new session")
        if not new_ids and state.cache.seq_length == len(state.token_ids):
            raise InvalidRequest("nothing to run: the new turn has no tokens")
        vocab = self.dims.vocab_size
        if any(not 0 <= t < vocab for t in new_ids):
            raise InvalidRequest(f"token ids must be within 0..{vocab - 1}")
        need = len(state.token_ids) + len(new_ids) + params.max_new_tokens
        if need > self.loaded.max_context:
            raise ContextLengthError(
                f"session length {len(state.token_ids)} + new {len(new_ids)} + max_new_tokens "
                f"{params.max_new_tokens} = {need} exceeds the model's context of {self.loaded.max_context} "
                f"tokens; shorten the prompt or lower max_new_tokens")
