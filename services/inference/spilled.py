"""SpilledCopies: the Redis side of sessions — encode and write a copy, read one back verified, read its header.

Everything read is integrity-checked (the codec's sha256) and checked against this service's model and dtype
before a tensor is built; nothing is unpickled. A copy that can never be continued here raises `Refused` with
the client-facing error class and reason, and a corrupt one is deleted first. Redis failures surface as
`StoreUnavailable`. The `SessionStore` keeps the index and the bookkeeping; this module only moves bytes.
"""
from __future__ import annotations

import logging

from . import codec
from .errors import SessionError, SessionLost, SessionModelMismatch, SessionNotFound, StoreUnavailable
from .spill import Spill, SpillUnavailable

log = logging.getLogger(__name__)


HEADER_FIELDS = ("fingerprint_id", "head_map_version", "token_count", "nbytes", "full_nbytes", "created_at",
                 "last_used")


class Refused(Exception):
    """The spilled copy can never be continued by this service."""

    def __init__(self, error: type[SessionError], reason: str):
        super().__init__(reason)
        self.error, self.reason = error, reason


class SpilledCopies:
    def __init__(self, spill: Spill, fingerprint_id: str, dtype: str, device):
        self.spill, self.fingerprint_id, self.dtype, self.device = spill, fingerprint_id, dtype, device

    def write(self, sid: str, state, meta: dict) -> int:
        """Spill `state` with JSON-safe `meta` in its header; returns the number of chunks written."""
        tensors, state_meta = state.to_tensors()
        encoded = codec.encode(tensors, {**meta, "dtype": self.dtype, "state": state_meta})
        self.spill.write(sid, encoded)
        return len(encoded.chunks)

    def read_state(self, sid: str, n_chunks: int, tenant: str | None = None):
        """The verified `SessionState` of a spilled session (of `tenant`, when given)."""
        from services.engine import SessionState

        try:
            header, chunks = self.spill.read(sid, n_chunks)   # header and first chunks in one round trip
        except SpillUnavailable as exc:
            raise StoreUnavailable(f"session {sid} is spilled to Redis, which is unreachable ({exc}); "
                                   "retry when Redis is back") from exc
        if header is None:
            raise Refused(SessionNotFound, "it expired from Redis (RAZOR_SESSION_TTL_S) or was deleted")
        try:
            tensors, meta = codec.decode(header, chunks, device=self.device)
            self.check(meta)
            if tenant is not None and meta.get("tenant", "") != tenant:   # not dropped: it is someone's copy
                raise Refused(SessionLost, "its spilled copy now names another tenant")
            return SessionState.from_tensors(tensors, meta["state"], self.device)
        except (codec.CodecError, KeyError, ValueError) as exc:
            self.drop(sid)
            raise Refused(SessionLost, f"its spilled copy is corrupt ({exc})") from exc

    def read_meta(self, sid: str) -> tuple[dict, int] | None:
        """(header meta, chunk count) of a spilled session, or None when Redis has none."""
        try:
            header = self.spill.read_header(sid)
        except SpillUnavailable as exc:
            raise StoreUnavailable(f"session {sid} is not in device memory and Redis is unreachable "
                                   f"({exc}); retry when Redis is back") from exc
        if header is None:
            return None
        try:
            parsed = codec.read_header(header)
            meta = parsed["meta"]
            missing = [k for k in HEADER_FIELDS if k not in meta]
            if missing or "token_ids" not in meta.get("state", {}):
                raise KeyError(f"the header lacks {missing or ['state.token_ids']}")
            return meta, parsed["n_chunks"]
        except (codec.CodecError, KeyError, TypeError) as exc:
            self.drop(sid)
            raise Refused(SessionLost, f"its spilled header is corrupt ({exc})") from exc

    def check(self, meta: dict) -> None:
        """Refuse a copy made under another model or in another dtype."""
        if meta["fingerprint_id"] != self.fingerprint_id:
            raise Refused(SessionModelMismatch, (
                f"it was made under another model (fingerprint {meta['fingerprint_id']}) and this service runs "
                f"{self.fingerprint_id}; continue it on a service running that model, or start a new session"))
        spilled_in = meta.get("dtype", "float32")   # spills from before the dtype setting were float32
        if spilled_in != self.dtype:
            raise Refused(SessionModelMismatch, (
                f"its cache was spilled in {spilled_in} and this service runs {self.dtype}; continue it on a service "
                f"with RAZOR_DTYPE={spilled_in}, or start a new session"))

    def drop(self, sid: str) -> None:
        """Delete a copy nobody may load (best effort)."""
        try:
            self.spill.delete(sid)
        except SpillUnavailable:
            pass

    def forget(self, sid: str) -> None:
        """Delete the copy of a restored session: the resident state is now the only truth."""
        try:
            self.spill.delete(sid)
        except SpillUnavailable as exc:
            log.warning("restored session %s but could not delete its Redis copy: %s", sid, exc)
