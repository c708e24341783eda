"""Every check of a request's fields, in one place, with one message per fault.

The servicer calls ``check_*`` first thing in each handler, before anything is created, acquired or tokenized;
the runtime calls ``check_tokens`` once a turn is tokenized (the only checks that need the tokens: a turn that adds
none, and the model's context). Each message names the field and says what to fix. An id that fails its shape is
never echoed back (a client may send anything, of any length); messages that do echo an id (NOT_FOUND) only ever
see one that passed.

The engine keeps its own checks, since it is also a library (`SamplingParams`, `chat.check_messages`,
`Engine.check_turn`); these are a superset of them for anything a request can carry, so the service never reaches
the engine's with bad input (the one left to it: whether a chat template can append a turn, known only once
rendered). The bounds are the engine's (`services.engine.sampling`), and the proto documents the same numbers.
Profiling parameters and model refs are checked where they are defined (`services.headmap_store`,
`services.model_refs`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from services.engine import SamplingParams
from services.engine.sampling import MAX_NEW_TOKENS_LIMIT, MAX_TEMPERATURE

from .errors import InvalidArgument

# (pattern, the same in words): session ids, profiling job ids and page tokens (uuid hex ones fit), model ids
ID = (re.compile(r"[A-Za-z0-9_-]{1,64}"), "1 to 64 letters, digits, '-' or '_'")
FINGERPRINT_ID = (re.compile(r"[A-Za-z0-9._-]{1,128}"), "1 to 128 letters, digits, '.', '-' or '_'")
ROLES = ("system", "user", "assistant", "tool")     # the roles the engine's chat templates accept
MAX_PAGE_SIZE, DEFAULT_PAGE_SIZE = 1000, 50
MAX_STOP = 32            # stop strings, and stop token ids, per request
MAX_STOP_CHARS = 256     # characters of one stop string (the text stream holds back that many)
# Messages per chat turn: each costs its template's framing tokens, so 1,024 already passes any context we serve;
# without a bound, half a million empty messages would hold the shared tokenizer for seconds before the length
# check refused them.
MAX_CHAT_MESSAGES = 1024
DEFAULT_MAX_NEW_TOKENS = SamplingParams().max_new_tokens


@dataclass(frozen=True)
class Limits:
    """What requests are checked against: the served model's and this deployment's limits."""

    max_context: int        # tokens: history + new input + max_new_tokens must fit
    max_input_chars: int    # characters of one prompt or turn, refused before tokenizing
    vocab_size: int         # stop_token_ids must be ids of the vocabulary
    chat_template: bool     # the tokenizer can render chat messages


# ---- one per request type ------------------------------------------------------------------------
def check_generate(request, limits: Limits) -> None:
    _check_input(request, "prompt", limits)
    _check_options(request, limits)


def check_continue(request, limits: Limits) -> None:
    check_session_id(request.session_id)
    _check_input(request, "text", limits)
    _check_options(request, limits)


def check_session_id(value: str, field: str = "session_id") -> None:
    if not value:
        raise InvalidArgument(f"{field} is empty; pass the id a Generate stream returned")
    _check_id(value, field, ID)


def check_list_sessions(request) -> None:
    if not 0 <= request.page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be within 0..{MAX_PAGE_SIZE} (0 = {DEFAULT_PAGE_SIZE}), "
                              f"got {request.page_size}")
    if request.page_token:
        _check_id(request.page_token, "page_token", ID, "pass a previous response's next_page_token, or none")


def check_job_id(value: str) -> None:
    if not value:
        raise InvalidArgument("job_id is empty; pass the id ProfileModel returned")
    _check_id(value, "job_id", ID)


def check_fingerprint_id(value: str) -> None:
    if value:   # empty = the model this service runs
        _check_id(value, "fingerprint_id", FINGERPRINT_ID, "pass a ModelFingerprint.id, or none for this model")


def check_tokens(history: int, new: int, max_new_tokens: int, max_context: int) -> None:
    """A tokenized turn: it adds tokens, and the session, the turn and max_new_tokens fit the context."""
    what = "turn" if history else "prompt"
    if not new:
        raise InvalidArgument(f"the {what} adds no tokens once tokenized; send some text")
    if history + new + max_new_tokens > max_context:
        held = f"the session holds {history} tokens, " if history else ""
        raise InvalidArgument(
            f"{held}the {what} has {new} tokens and max_new_tokens is {max_new_tokens}: together "
            f"{history + new + max_new_tokens} exceed the model's context of {max_context} tokens; shorten the "
            f"input or lower max_new_tokens")


# ---- fields ----------------------------------------------------------------------------------------
def _check_id(value: str, field: str, shape: tuple[re.Pattern, str], fix: str = "") -> None:
    pattern, in_words = shape
    if not pattern.fullmatch(value):   # never echoed: it may be anything, of any length
        raise InvalidArgument(f"{field} must be {in_words} (got {len(value)} characters)" + (f"; {fix}" if fix else ""))


def _check_input(request, text_field: str, limits: Limits) -> None:
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidArgument(f"send `{text_field}` text or `chat` messages; the request has neither")
    if which == "chat":
        _check_chat(request.chat.messages, limits)
        chars = sum(len(m.content) for m in request.chat.messages)
    else:
        chars = len(getattr(request, text_field))
        if not chars:
            raise InvalidArgument(f"{text_field} is empty; send some text (or `chat` messages)")
    if chars > limits.max_input_chars:
        raise InvalidArgument(f"the input has {chars} characters, over this service's limit of "
                              f"{limits.max_input_chars}; shorten it")


def _check_chat(messages, limits: Limits) -> None:
    if not messages:
        raise InvalidArgument("chat has no messages; send at least one")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise InvalidArgument(f"chat has {len(messages)} messages; send at most {MAX_CHAT_MESSAGES} in one turn "
                              "(a continued session needs only the new ones)")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"chat message {i} has role {_shown(m.role)}; use one of {', '.join(ROLES)}")
    if not limits.chat_template:
        raise InvalidArgument("this model's tokenizer has no chat template; send text instead of chat messages")


def _check_options(request, limits: Limits) -> None:
    if request.HasField("max_new_tokens") and not 1 <= request.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise InvalidArgument(f"max_new_tokens must be within 1..{MAX_NEW_TOKENS_LIMIT} (unset = "
                              f"{DEFAULT_MAX_NEW_TOKENS}), got {request.max_new_tokens}")
    _check_sampling(request.sampling)
    _check_stop(request.stop, limits)


def _check_sampling(s) -> None:
    if s.HasField("temperature") and not 0.0 <= s.temperature <= MAX_TEMPERATURE:   # NaN fails too
        raise InvalidArgument(f"temperature must be within 0..{MAX_TEMPERATURE:g} (0 = greedy), got {s.temperature}")
    if s.HasField("top_p") and not 0.0 < s.top_p <= 1.0:
        raise InvalidArgument(f"top_p must be within (0, 1] (1 = off), got {s.top_p}")
    if s.HasField("top_k") and s.top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {s.top_k}")
    if s.HasField("seed") and s.seed < 0:
        raise InvalidArgument(f"seed must be >= 0, got {s.seed}")


def _check_stop(stop, limits: Limits) -> None:
    if len(stop.stop_strings) > MAX_STOP or len(stop.stop_token_ids) > MAX_STOP:
        raise InvalidArgument(f"send at most {MAX_STOP} stop_strings and {MAX_STOP} stop_token_ids, got "
                              f"{len(stop.stop_strings)} and {len(stop.stop_token_ids)}")
    for i, text in enumerate(stop.stop_strings):
        if not 1 <= len(text) <= MAX_STOP_CHARS:
            raise InvalidArgument(f"stop_strings[{i}] has {len(text)} characters; each needs 1..{MAX_STOP_CHARS}")
    for i, token in enumerate(stop.stop_token_ids):
        if not 0 <= token < limits.vocab_size:
            raise InvalidArgument(f"stop_token_ids[{i}] is {token}, not a token id of this model "
                                  f"(0..{limits.vocab_size - 1})")


def _shown(value: str) -> str:
    """A short printable value as itself; anything else by its length only."""
    return repr(value) if len(value) <= 32 and value.isprintable() else f"of {len(value)} characters"
