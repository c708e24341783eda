"""HeadMapRegistry: the service's view of one model's head maps, hot-loaded from Redis.

Construct it once per model, next to the engine:

    store = HeadMapStore(redis.Redis.from_url(settings.redis_url, password=settings.redis_password or None))
    registry = HeadMapRegistry(store, loaded.fingerprint, initial=default_map)   # default_map may be None
    registry.start()          # loads the active map from Redis, then listens on `razor:headmaps`
    ...
    head_map = registry.active            # read once when a session starts; the session keeps it
    old = registry.get(state.head_map_version)   # the map an older session was compressed with
    registry.stop()

A map that fails validation (another model, wrong shapes, corrupt JSON) is refused and logged; the
previous map stays active. Sessions keep the map they were created with, so a swap never changes how
an existing cache is read. `wait_processed(version)` lets tests wait for a notification's outcome.
"""
from __future__ import annotations

import json
import logging
import threading

import redis

from services.engine import CompressionParams, HeadMap, HeadMapError, ModelFingerprint
from services.headmap_store import CHANNEL, HeadMapStore

log = logging.getLogger(__name__)

RECONNECT_MAX_S = 5.0   # longest pause between attempts to reach Redis again


class HeadMapRegistry:
    def __init__(self, store: HeadMapStore, fingerprint: ModelFingerprint, initial: HeadMap | None = None,
                 poll_s: float = 1.0):
        if initial is not None:
            initial.validate(fingerprint)
        self.store = store
        self.fingerprint = fingerprint
        self._active = initial or HeadMap.full(fingerprint, CompressionParams())  # no map: keep every head
        self._known: dict[str, HeadMap] = {self._active.version: self._active}
        self._outcomes: dict[str, str] = {}   # version -> "activated" | "rejected: ..." (latest notification)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_s = poll_s

    # --- what the service reads ---------------------------------------------------------------
    @property
    def active(self) -> HeadMap:
        with self._cond:
            return self._active

    def get(self, version: str) -> HeadMap:
        """The map with `version` (cached, else read from Redis and validated). KeyError if unknown."""
        with self._cond:
            if version in self._known:
                return self._known[version]
        head_map = self.store.get(self.fingerprint, version)
        with self._cond:
            return self._known.setdefault(version, head_map)

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "HeadMapRegistry":
        """Load the active map now (a notification missed while down is not lost), then listen."""
        try:
            self._load_active()
        except redis.RedisError as e:
            log.warning("head maps: Redis unreachable at start (%s); keeping map %s and retrying",
                        e, self.active.version)
        self._stop.clear()
        self._thread = threading.Thread(target=self._listen_forever, name="headmap-registry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def wait_processed(self, version: str, timeout: float = 30.0) -> str | None:
        """Block until a notification for `version` was handled; its outcome, or None on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: version in self._outcomes, timeout=timeout)
            return self._outcomes.get(version)

    # --- internals ------------------------------------------------------------------------------
    def _load_active(self) -> None:
        version = self.store.active_version(self.fingerprint)
        if version is not None:
            self._activate(version)

    def _activate(self, version: str) -> None:
        """Swap to `version` if it validates; otherwise log and keep the current map."""
        try:
            head_map = self.get(version)
        except (HeadMapError, KeyError) as e:
            log.error("head maps: refused version %s for model %s: %s; keeping %s",
                      version, self.fingerprint.id, e, self.active.version)
            self._record(version, f"rejected: {e}")
            return
        with self._cond:
            changed = self._active.version != head_map.version
            self._active = head_map
        if changed:
            log.info("head maps: model %s now uses map %s (kv fraction %.3f)",
                     self.fingerprint.id, version, head_map.kv_fraction)
        self._record(version, "activated")

    def _record(self, version: str, outcome: str) -> None:
        with self._cond:
            self._outcomes[version] = outcome
            self._cond.notify_all()

    def _listen_forever(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                self._listen_once()
                delay = 0.2
            except redis.RedisError as e:
                log.warning("head maps: lost Redis (%s); reconnecting in %.1fs", e, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    def _listen_once(self) -> None:
        pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(CHANNEL)
            self._load_active()   # catch up on anything activated while we were not subscribed
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=self._poll_s)
                if message is not None:
                    self._on_message(message["data"])
        finally:
            pubsub.close()

    def _on_message(self, data) -> None:
        try:
            note = json.loads(data)
            fp, version = note["fingerprint"], note["version"]
        except (ValueError, TypeError, KeyError):
            log.error("head maps: ignoring malformed notification %r", data)
            return
        if fp == self.fingerprint.id:
            self._activate(str(version))
