"""Request ids of running turns, and Abort from any connection and any replica.

Every turn runs under a request id (the client's, or a uuid4 hex the server assigns), unique among the running
turns of its tenant. This replica keeps its running turns' cancel events by (tenant, id); Redis keeps
``razor:request:{<id>}:<tenant>`` -> ``{"replica", "tenant", "turn"}`` (JSON, hash-tagged by the request id, with a TTL
that this replica renews while the turn runs), so any replica can tell a running id from an unknown one, and a
second turn with a running id is refused wherever it arrives. ``Abort`` sets the event of a turn running here,
or publishes ``{"tenant", "request_id"}`` (JSON, never pickle) on the channel ``razor:abort`` that every
replica's registry listens to; the replica running the turn sets its event, and the scheduler drops the turn
before its next step. Another tenant's id is reported exactly like an unknown one.

Redis down: turns still start (registered here only, with a warning) and Abort still reaches turns running
on the replica it is sent to; an Abort this replica cannot resolve answers UNAVAILABLE.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

from .errors import InvalidArgument, NotFound, StoreUnavailable
from .spill import REDIS_ERRORS

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]+")
ABORT_CHANNEL = "razor:abort"
REQUEST_TTL_S = 60          # a dead replica's ids free up after this; renewed every third of it while running
_POLL_S = 0.2               # how often the listener checks for a stop between messages
_FORGET_WAIT_S = 30.0       # longest a second caller of `unregister` waits for the first to delete the Redis key

# Delete the registration only while it is still ours (a turn of the same id on another replica may follow).
_DELETE_IF_OURS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class DuplicateRequest(Exception):
    """A turn of the same tenant with this request id is still running (ALREADY_EXISTS)."""


class RequestNotFound(NotFound):
    """No running turn of the caller's tenant has this request id."""


def check_request_id(request_id: str) -> str:
    """A request id as sent, or InvalidArgument saying what is wrong with it (never echoing it back)."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"request_id has {len(request_id)} characters, over the limit of "
                              f"{MAX_REQUEST_ID_CHARS}; send a shorter id (or none: the server assigns one)")
    if not _REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument("request_id may hold only letters, digits, '.', '_', ':' and '-'; "
                              "send such an id (or none: the server assigns one)")
    return request_id


def request_key(tenant: str, request_id: str) -> str:
    return f"razor:request:{{{request_id}}}:{tenant}"


@dataclass
class _Running:
    cancel: threading.Event   # also the turn's identity: a later turn may reuse the id
    value: str                # what Redis holds for it (with a per-turn nonce), to delete it only while ours
    in_redis: bool
    ending: bool = False      # the turn ended and its Redis key is being deleted: Abort no longer finds it
    forgotten: threading.Event = field(default_factory=threading.Event)   # set once it is gone everywhere


class RequestRegistry:
    """The running turns' request ids: here and in Redis. `on_abort` runs after an abort set a cancel event
    (e.g. to wake the model loop)."""

    def __init__(self, client, replica_id: str, on_abort=lambda: None, ttl_s: int = REQUEST_TTL_S):
        self.client, self.replica_id, self.on_abort, self.ttl_s = client, replica_id, on_abort, ttl_s
        self._running: dict[tuple[str, str], _Running] = {}
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen_loop, name="razor-abort", daemon=True)

    def start(self) -> "RequestRegistry":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # ---- turns starting and ending (handler threads; the I/O thread) ----------------------------
    def register(self, tenant: str, request_id: str, cancel: threading.Event) -> None:
        """Record a starting turn; raises DuplicateRequest while another turn of the tenant has its id."""
        key = (tenant, request_id)
        value = json.dumps({"replica": self.replica_id, "tenant": tenant, "turn": uuid.uuid4().hex})
        running = _Running(cancel, value, in_redis=False)
        with self._mu:
            if key in self._running:
                raise _duplicate(request_id)
            self._running[key] = running
        try:
            stored = self.client.set(request_key(tenant, request_id), value, nx=True, ex=self.ttl_s)
        except REDIS_ERRORS as exc:
            log.warning("request %s registered on this replica only: Redis is unreachable (%s)", request_id, exc)
            return
        if not stored:
            with self._mu:
                self._running.pop(key, None)
            raise _duplicate(request_id)
        running.in_redis = True   # before the turn is queued: nothing unregisters it yet

    def unregister(self, tenant: str, request_id: str, cancel: threading.Event) -> None:
        """Forget the ended turn whose cancel event is `cancel`, here and in Redis; a no-op when it is already
        forgotten (call it off the model loop: it talks to Redis). It returns only once the id is gone everywhere,
        even when another thread is deleting it, so a client told of the end finds the id unknown on every
        replica."""
        key = (tenant, request_id)
        with self._mu:
            running = self._running.get(key)
            if running is None or running.cancel is not cancel:
                return
            first, running.ending = not running.ending, True
        if not first:
            running.forgotten.wait(_FORGET_WAIT_S)
            return
        try:
            if running.in_redis:
                self._delete(tenant, request_id, running.value)
        finally:
            with self._mu:
                del self._running[key]   # still this turn's: `register` refuses the id while it is here
            running.forgotten.set()

    def _delete(self, tenant: str, request_id: str, value: str) -> None:
        try:
            self.client.eval(_DELETE_IF_OURS, 1, request_key(tenant, request_id), value)
        except REDIS_ERRORS as exc:   # the key expires on its own
            log.warning("could not unregister request %s: Redis is unreachable (%s)", request_id, exc)

    # ---- Abort (handler threads) ---------------------------------------------------------------
    def abort(self, tenant: str, request_id: str) -> None:
        """Stop the tenant's running turn `request_id`, here or on the replica running it."""
        running = self._local(tenant, request_id)
        if running is not None:
            if running.ending:   # its end is on its way to its client
                raise _not_found()
            self._cancel(running)
            return
        try:
            if self.client.get(request_key(tenant, request_id)) is None:
                raise _not_found()
            self.client.publish(ABORT_CHANNEL, json.dumps({"tenant": tenant, "request_id": request_id}))
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"could not reach the replica running the request: Redis is unreachable "
                                   f"({exc}); retry when it is back") from exc

    def _local(self, tenant: str, request_id: str) -> _Running | None:
        with self._mu:
            return self._running.get((tenant, request_id))

    def _cancel(self, running: _Running) -> None:
        running.cancel.set()
        self.on_abort()

    # ---- the listener (its own thread): aborts published by other replicas, and TTL renewals ----
    def _listen_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except (*REDIS_ERRORS, OSError) as exc:
                log.info("abort channel interrupted (%s); re-subscribing", exc)
                self._stop.wait(1.0)

    def _listen(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        renewed = time.monotonic()
        try:
            pubsub.subscribe(ABORT_CHANNEL)
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=_POLL_S)
                if message and message.get("type") == "message":
                    self._on_message(message["data"])
                if time.monotonic() - renewed >= self.ttl_s / 3:
                    self._renew()
                    renewed = time.monotonic()
        finally:
            pubsub.close()

    def _on_message(self, data) -> None:
        try:
            payload = json.loads(data)
            tenant, request_id = payload["tenant"], payload["request_id"]
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring a malformed message on %s", ABORT_CHANNEL)
            return
        running = self._local(tenant, request_id) if isinstance(tenant, str) and isinstance(request_id, str) else None
        if running is not None and not running.ending:
            self._cancel(running)
            log.info("request %s aborted from another replica", request_id)

    def _renew(self) -> None:
        with self._mu:
            keys = [request_key(*key) for key, running in self._running.items() if running.in_redis]
        for key in keys:   # a turn that ended meanwhile has no key left: EXPIRE does nothing
            self.client.expire(key, self.ttl_s)


def _duplicate(request_id: str) -> DuplicateRequest:
    return DuplicateRequest(f"request {request_id} is still running; wait for it to end, abort it, or send another "
                            "request_id")


def _not_found() -> RequestNotFound:
    return RequestNotFound("no running request with this request_id: it ended, never started, or was sent with "
                           "another API key's tenant")
