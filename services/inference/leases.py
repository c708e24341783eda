"""LeaseKeeper: keeps this replica's session leases alive and answers other replicas' hand-over requests.

Two daemon threads, neither on the model loop:
* every third of the lease TTL, renew the lease of every session this replica owns (a session another replica
  has taken over meanwhile is dropped here);
* listen on ``razor:release:<replica id>``; each message names a session another replica wants, which is
  handed over on the I/O thread (at once when idle, else when its turn ends).
A Redis outage only logs: renewals resume, and the subscription is re-opened, when Redis is back.
"""
from __future__ import annotations

import logging
import threading

from .directory import SessionDirectory
from .errors import StoreUnavailable
from .sessions import SessionStore
from .spill import REDIS_ERRORS

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, store: SessionStore, hand_over):
        self.store, self.hand_over = store, hand_over
        self.interval_s = max(0.05, store.lease_ttl_s / 3)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._renew_loop, name="razor-leases", daemon=True),
                         threading.Thread(target=self._listen_loop, name="razor-handover", daemon=True)]

    def start(self) -> "LeaseKeeper":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.renew_leases()
            except StoreUnavailable as exc:
                log.warning("could not renew session leases: %s", exc)
            except Exception:  # noqa: BLE001 - the keeper must outlive any one failure
                log.exception("renewing session leases failed")

    def _listen_loop(self) -> None:
        channel = SessionDirectory.channel(self.store.replica_id)
        while not self._stop.is_set():
            try:
                self._listen(channel)
            except (*REDIS_ERRORS, OSError) as exc:
                log.info("hand-over channel interrupted (%s); re-subscribing", exc)
                self._stop.wait(self.interval_s)

    def _listen(self, channel: str) -> None:
        pubsub = self.store.spill.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(channel)
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=0.2)
                if message and message.get("type") == "message":
                    sid = message["data"].decode() if isinstance(message["data"], bytes) else str(message["data"])
                    self.hand_over(sid)
        finally:
            pubsub.close()
