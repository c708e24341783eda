"""Prefill, decode and sessions over the compressed cache (the service's narrow interface).

A `SessionState` is a conversation: its tokens and its `CompressedKVCache`. The last sampled token is not
run through the model until the next turn (it is "pending"), so a continued turn feeds
pending + new tokens once and never re-runs the history.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import attention, chat
from .cache import CompressedKVCache
from .headmap import HeadMap
from .models import LoadedModel
from .sampling import SamplingParams, make_generator, sample


class ContextLengthError(ValueError):
    """Prompt plus max_new_tokens does not fit the model's context window."""


class SessionMismatchError(ValueError):
    """A session made under another model."""


@dataclass
class TokenEvent:
    token_id: int
    text: str                   # new text this token completes (may be empty while UTF-8 / stop strings pend)
    logprob: float | None = None


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
    meta: dict = field(default_factory=dict)

    @property
    def seq_length(self) -> int:
        return len(self.token_ids)

    def nbytes(self) -> int:
        return self.cache.nbytes()

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


@torch.no_grad()
def forward(model, ids: list[int], cache: CompressedKVCache) -> torch.Tensor:
    """Run new tokens against the cache, then compress it. -> logits [V] of the last position."""
    input_ids = torch.tensor([ids], device=model.device)                  # [1, Q]
    out = model(input_ids, cache=cache, use_cache=True, razor_cache=cache, logits_to_keep=1)
    cache.compress()
    return out.logits[0, -1]


class TextStream:
    """Incremental detokenisation that holds back text a stop string might still claim."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...]):
        self.tokenizer, self.stop_strings = tokenizer, stop_strings
        self.holdback = max((len(s) for s in stop_strings), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False
        self.text = ""

    def push(self, token_id: int | None, flush: bool) -> str:
        """Add a token (None for a stop token, which has no text) -> the text now safe to emit."""
        if token_id is not None:
            self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop_strings if s in text]
        if hits:
            self.stopped, text = True, text[: min(hits)]
            safe = len(text)
        elif flush:
            safe = len(text)
        else:
            safe = len(text) - self.holdback
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                safe = min(safe, len(text) - 1)
        delta = text[self.emitted: max(safe, self.emitted)]
        self.emitted += len(delta)
        self.text = text
        return delta


class Engine:
    """One model on one device. Not thread-safe: the service runs every call on one thread."""

    def __init__(self, loaded: LoadedModel, head_map: HeadMap | None = None):
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        attention.install(self.model)
        self.head_map = head_map or HeadMap.full(loaded.fingerprint)
        self.set_head_map(self.head_map)
        eos = self.model.config.eos_token_id
        self.eos_ids = tuple(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])

    def set_head_map(self, head_map: HeadMap) -> None:
        head_map.validate(self.loaded.fingerprint)
        self.head_map = head_map

    def new_cache(self, head_map: HeadMap | None = None) -> CompressedKVCache:
        hm = head_map or self.head_map
        return CompressedKVCache(hm.retrieval_kv_heads, self.loaded.fingerprint.n_kv_heads, hm.compression)

    # --- prompts ----------------------------------------------------------------------------------
    def encode(self, text: str | None = None, messages: list[dict] | None = None) -> list[int]:
        if messages:
            return chat.encode_chat(self.tokenizer, messages)
        if not text:
            raise ValueError("the prompt is empty; send `prompt` text or chat `messages`")
        return chat.encode_text(self.tokenizer, text, first=True)

    def encode_turn(self, state: SessionState, text: str | None = None,
                    messages: list[dict] | None = None) -> list[int]:
        if messages:
            return chat.encode_chat_turn(self.tokenizer, messages, state.token_ids[-1] if state.token_ids else None)
        if not text:
            raise ValueError("the new turn is empty; send `text` or chat `messages`")
        return chat.encode_text(self.tokenizer, text, first=False)

    # --- generation -------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams, on_token: OnToken | None = None,
                 chat: bool = False, head_map: HeadMap | None = None) -> tuple[SessionState, GenerationResult]:
        hm = head_map or self.head_map
        state = SessionState([], self.new_cache(hm), hm.version, self.loaded.fingerprint.id, chat)
        return state, self.continue_session(state, prompt_ids, params, on_token)

    def continue_session(self, state: SessionState, new_ids: list[int], params: SamplingParams,
                         on_token: OnToken | None = None) -> GenerationResult:
        self._check(state, new_ids, params)
        cached = state.cache.seq_length
        pending = state.token_ids[cached:] + list(new_ids)
        state.token_ids.extend(new_ids)
        logits = forward(self.model, pending, state.cache)
        gen = make_generator(params, self.model.device)
        stops = set(params.stop_token_ids) | set(self.eos_ids)
        stream = TextStream(self.tokenizer, params.stop_strings)
        generated: list[int] = []
        finish = "length"
        while True:
            token, logprob = sample(logits, params, gen)
            generated.append(token)
            state.token_ids.append(token)
            is_stop = token in stops
            at_limit = len(generated) >= params.max_new_tokens
            delta = stream.push(None if is_stop else token, flush=is_stop or at_limit)
            keep_going = on_token(TokenEvent(token, delta, logprob)) if on_token else True
            if is_stop or stream.stopped:
                finish = "stop"
                break
            if keep_going is False:
                finish = "cancelled"
                break
            if at_limit:
                break
            logits = forward(self.model, [token], state.cache)
        return GenerationResult(generated, stream.text, finish, len(new_ids), len(generated), cached)

    def _check(self, state: SessionState, new_ids: list[int], params: SamplingParams) -> None:
        if state.fingerprint_id != self.loaded.fingerprint.id:
            raise SessionMismatchError(f"session was made with model {state.fingerprint_id}; this server runs "
                                       f"{self.loaded.fingerprint.id}: start a new session")
        if not new_ids and state.cache.seq_length == len(state.token_ids):
            raise ValueError("nothing to run: the new turn has no tokens")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in new_ids):
            raise ValueError(f"token ids must be within 0..{vocab - 1}")
        need = len(state.token_ids) + len(new_ids) + params.max_new_tokens
        if need > self.loaded.max_context:
            raise ContextLengthError(
                f"session length {len(state.token_ids)} + new {len(new_ids)} + max_new_tokens "
                f"{params.max_new_tokens} = {need} exceeds the model's context of {self.loaded.max_context} "
                f"tokens; shorten the prompt or lower max_new_tokens")
