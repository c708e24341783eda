"""Prompt encoding: plain text, chat templates, and the tokens a continued chat turn adds.

A continued turn must never re-render the history (it is already in the cache), so we render only the
*difference* the new messages make to the template, using a probe conversation to learn what the template
puts after an assistant message (e.g. "<|im_end|>\\n").
"""
from __future__ import annotations

from jinja2.exceptions import TemplateError, TemplateSyntaxError

from .errors import InvalidRequest

_PROBE_USER, _PROBE_REPLY = "\x00probe-user\x00", "\x00probe-reply\x00"


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model's tokenizer has no chat template; send `prompt` text instead of messages")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateSyntaxError:
        raise   # a broken template is the deployment's bug, not the caller's
    except TemplateError as exc:   # the template's own raise_exception, e.g. "roles must alternate"
        raise InvalidRequest(f"the model's chat template refused these messages: {exc}; change them as it says (a "
                             "continued session's messages follow its last assistant reply)") from exc


def check_messages(messages: list[dict]) -> None:
    if not messages:
        raise InvalidRequest("messages is empty; send at least one message")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"message {i} has role {m.get('role')!r}; use system, user, assistant or tool")
        if not isinstance(m.get("content"), str):
            raise InvalidRequest(f"message {i} needs a text `content`")


def encode_text(tokenizer, text: str, first: bool) -> list[int]:
    """Plain text; special tokens (BOS) only at the start of a session."""
    return tokenizer(text, add_special_tokens=first).input_ids


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    check_messages(messages)
    return tokenizer(_render(tokenizer, messages, True), add_special_tokens=False).input_ids


def encode_chat_turn(tokenizer, messages: list[dict], last_token: int | None) -> list[int]:
    """Tokens that append `messages` to a conversation whose last assistant reply is already cached.

    `last_token` is the session's last token: when it is the end-of-turn token the model generated, the
    template's own end-of-turn text is not repeated.
    """
    check_messages(messages)
    probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}]
    closed = _render(tokenizer, probe, False)
    extended = _render(tokenizer, probe + messages, True)
    if not extended.startswith(closed):
        raise InvalidRequest("this chat template cannot append turns incrementally; send `text` instead")
    after_reply = closed[closed.index(_PROBE_REPLY) + len(_PROBE_REPLY):]   # e.g. "<|im_end|>\n"
    if last_token is not None:
        last_text = tokenizer.decode([last_token])
        if last_text and after_reply.startswith(last_text):
            after_reply = after_reply[len(last_text):]
    delta = after_reply + extended[len(closed):]
    return tokenizer(delta, add_special_tokens=False).input_ids
