"""The errors the service reports to clients; ``servicer.status_for`` maps each, by class, to a status code.

Raise one of these (or the engine's ``services.engine.errors.InvalidRequest``) for anything a client or the
environment caused: a bare ``ValueError`` or ``KeyError`` is a bug and answers INTERNAL with an incident id.
"""


class InvalidArgument(ValueError):
    """The request is malformed (empty id, bad page size, input over a limit); the message says what to fix."""


class NotFound(LookupError):
    """A named thing other than a session (e.g. a profiling job) does not exist."""


class SessionError(Exception):
    """Base of the errors a session operation reports to the client."""


class SessionNotFound(SessionError):
    pass


class SessionBusy(SessionError):
    pass


class SessionLost(SessionError):
    """The spilled copy is corrupt; the session cannot be continued."""


class SessionModelMismatch(SessionLost):
    """The session was made under another model."""


class BudgetExhausted(SessionError):
    """No room can be made (Redis unreachable, or too many sessions)."""


class StoreUnavailable(SessionError):
    """The session is spilled and Redis cannot be reached to restore it."""


class Overloaded(Exception):
    """This replica already runs and queues as many turns as it takes (RAZOR_MAX_RUNNING + RAZOR_MAX_WAITING)."""


class ShuttingDown(Exception):
    """The service is stopping and takes no new turns."""


class Cancelled(Exception):
    """The request was cancelled before its turn started."""


class NotConfigured(Exception):
    """An optional collaborator (profiling worker, head-map store) is not configured."""
