"""The errors the engine raises for a request it cannot run as sent.

The engine imports no service, so a server maps these classes to its own status codes (the inference
service's `servicer._STATUS` table). Each is a `ValueError`, so plain library callers that catch
`ValueError` keep working; a server must map them by class, never by that base.
"""
from __future__ import annotations


class InvalidRequest(ValueError):
    """The caller must change the request: bad sampling parameters, empty or out-of-range input, a chat
    template that cannot render it. The message says what to fix."""


class ContextLengthError(InvalidRequest):
    """Prompt plus max_new_tokens does not fit the model's context window."""


class SessionMismatchError(InvalidRequest):
    """A session made under another model."""


class SessionDamagedError(ValueError):
    """A session whose cache a failed step left half-updated (some layers hold a chunk the others lack): it
    cannot be continued; start a new one. Not an `InvalidRequest`: no change to the request helps."""
