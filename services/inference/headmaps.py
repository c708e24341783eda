"""HeadMapRegistry: the service's view of one model's head maps, hot-loaded from Redis.

Construct it once per model, next to the engine:

    store = HeadMapStore(redis.Redis.from_url(settings.redis_url, password=settings.redis_password or None))
    registry = HeadMapRegistry(store, loaded.fingerprint, initial=default_map)   # default_map may be None
    registry.start()          # loads the active map from Redis, then listens on `razor:headmaps`
    ...
    head_map = registry.active            # read once when a session starts; the session keeps it
    old = registry.get(state.head_map_version)   # the map an older session was compressed with
    registry.stop()

A notification for a map that cannot be loaded (missing, another model, wrong shapes, corrupt JSON) is refused
and logged, and so is such an active pointer found at start. A refused pointer never turns compression off:
the registry falls back to the newest valid map published for the model, then to the configured initial map,
then to the map shipped with the package, then to `fallback()` (the service profiles the model); only when
all of these are missing does it keep every head, and it says so at ERROR. Every replica resolves a refusal
the same way, so replicas that were running and replicas that restart agree. The refusal and its reason are
recorded in Redis, where ListHeadMaps reports them.

Sessions keep the map they were created with, so a swap never changes how an existing cache is read.
`wait_processed(version)` lets tests wait for a notification's outcome. A notification whose handling fails in
any other way (a fallback profile out of memory, a bug) is logged with its traceback and recorded as "failed: ...";
the listener keeps going, so later activations are still hot-loaded.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Callable

import redis

from services.engine import CompressionParams, HeadMap, HeadMapError, ModelFingerprint
from services.engine.headmap import shipped_head_map
from services.headmap_store import CHANNEL, HeadMapStore

log = logging.getLogger(__name__)

RECONNECT_MAX_S = 5.0   # longest pause between attempts to reach Redis again


class HeadMapRegistry:
    def __init__(self, store: HeadMapStore, fingerprint: ModelFingerprint, initial: HeadMap | None = None,
                 poll_s: float = 1.0, fallback: Callable[[], HeadMap] | None = None):
        if initial is not None:
            initial.validate(fingerprint)
        self.store = store
        self.fingerprint = fingerprint
        self._initial, self._fallback = initial, fallback
        self._active = initial   # None until start() (or the first read) settles one
        self._known: dict[str, HeadMap] = {initial.version: initial} if initial else {}
        self._outcomes: dict[str, str] = {}   # version -> "activated" | "rejected: ..." (latest notification)
        self.refused: dict[str, str] = {}     # version -> why this process could not load it
        self._cond = threading.Condition()
        self._settle_lock = threading.Lock()  # one caller of a slow fallback() at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_s = poll_s

    # --- what the service reads ---------------------------------------------------------------
    @property
    def active(self) -> HeadMap:
        with self._cond:
            if self._active is not None:
                return self._active
        with self._settle_lock:
            if self._active is None:   # nothing named in Redis (or Redis down): the local chain
                self._set_active(*self._local_fallback())
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
            log.warning("head maps: Redis unreachable at start (%s); using map %s and retrying",
                        e, self.active.version)
        except Exception:  # noqa: BLE001 - e.g. a fallback profile out of memory: serve on, the listener retries
            log.exception("head maps: loading the active map of model %s failed; using map %s and retrying",
                          self.fingerprint.id, self.active.version)
        log.info("head maps: model %s starts on map %s", self.fingerprint.id, self.active.version)
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
            self._activate_guarded(version)

    def _activate_guarded(self, version: str) -> None:
        """`_activate`, where any failure but Redis's is logged and recorded, never raised: one bad activation
        (a fallback profile out of memory, a bug) must not stop the listener. RedisError: reconnect, then the
        catch-up read handles the pointer again."""
        try:
            self._activate(version)
        except redis.RedisError:
            raise
        except Exception as e:  # noqa: BLE001 - logged with its traceback
            log.exception("head maps: handling the activation of version %s of model %s failed; still "
                          "serving map %s", version, self.fingerprint.id, self._active_version())
            self._record(version, f"failed: {type(e).__name__}: {e}")

    def _active_version(self) -> str:
        with self._cond:
            return self._active.version if self._active is not None else "(none)"

    def _activate(self, version: str) -> None:
        """Swap to `version` if it loads; otherwise refuse it and fall back (never to no compression)."""
        try:
            head_map = self.get(version)
        except (HeadMapError, KeyError) as e:
            self._refuse(version, str(e.args[0] if isinstance(e, KeyError) else e))
            return
        with self._cond:
            self.refused.pop(version, None)
        self._set_active(head_map, "active in Redis")
        self.store.clear_refusal(self.fingerprint, version)   # e.g. published after its pointer was set
        self._record(version, "activated")

    def _refuse(self, version: str, reason: str) -> None:
        with self._cond:
            self.refused[version] = reason
        head_map, source = self._newest_valid(skip=version) or self._local_fallback()
        log.error("head maps: refused active version %s for model %s: %s; serving map %s (%s) instead",
                  version, self.fingerprint.id, reason, head_map.version, source)
        self._set_active(head_map, source)
        self._record(version, f"rejected: {reason}; serving {head_map.version} ({source})")
        self.store.record_refusal(self.fingerprint, version, reason)

    def _newest_valid(self, skip: str) -> tuple[HeadMap, str] | None:
        """The most recently published map of this model that loads, with where it came from."""
        for version in self.store.versions_newest_first(self.fingerprint):
            if version == skip:
                continue
            try:
                return self.get(version), "newest valid map in Redis"
            except (HeadMapError, KeyError) as e:
                log.warning("head maps: skipping unusable version %s of model %s: %s", version,
                            self.fingerprint.id, e)
        return None

    def _local_fallback(self) -> tuple[HeadMap, str]:
        """A map that needs no Redis: the configured one, the shipped one, a profiled one, else every head."""
        if self._initial is not None:
            return self._initial, "configured initial map"
        try:
            shipped = shipped_head_map(self.fingerprint)
        except HeadMapError as e:
            log.warning("head maps: ignoring the shipped head map: %s", e)
            shipped = None
        if shipped is not None:
            return shipped, "map shipped with the package"
        if self._fallback is not None:
            return self._fallback(), "fallback map"
        log.error("head maps: no usable head map for model %s: COMPRESSION IS OFF (every head keeps its "
                  "whole cache) until a valid map is activated", self.fingerprint.id)
        return HeadMap.full(self.fingerprint, CompressionParams()), "no map: every head kept"

    def _set_active(self, head_map: HeadMap, source: str) -> None:
        with self._cond:
            self._known.setdefault(head_map.version, head_map)
            changed = self._active is None or self._active.version != head_map.version
            self._active = head_map
        if changed:
            log.info("head maps: model %s now uses map %s (%s, kv fraction %.3f)",
                     self.fingerprint.id, head_map.version, source, head_map.kv_fraction)

    def _record(self, version: str, outcome: str) -> None:
        with self._cond:
            self._outcomes[version] = outcome
            self._cond.notify_all()

    def _listen_forever(self) -> None:
        """Never ends before stop(): a thread that died would leave this replica deaf to every later activation."""
        delay = 0.2
        while not self._stop.is_set():
            try:
                self._listen_once()
                delay = 0.2
            except redis.RedisError as e:
                log.warning("head maps: lost Redis (%s); reconnecting in %.1fs", e, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
            except Exception:  # noqa: BLE001 - a bug outside one activation: resubscribe (and catch up) later
                log.exception("head maps: listener failed; resubscribing in %.1fs", delay)
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
        except (ValueError, TypeError, KeyError, RecursionError):
            log.error("head maps: ignoring malformed notification %r", data[:200] if isinstance(data, (bytes, str))
                      else data)
            return
        if fp == self.fingerprint.id:
            self._activate_guarded(str(version))
