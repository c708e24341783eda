"""SpilledCopies: the Redis side of sessions — encode and write a copy, read one back verified, read its header.

Everything read is integrity-checked before it is trusted: the codec's digest covers the header and, through
the blob's sha256, the tensors (an HMAC-SHA256 under `RAZOR_SPILL_KEY` when the deployment sets one), and
`spilled_header` checks every header field's type and its consistency with the tensors and the model. A
header alone (`read_meta`) is checked as fully as a whole copy, so nothing an edited header says is used.
Nothing is unpickled. A copy that can never be continued here raises `Refused` with the client-facing error
class and reason; a corrupt one is deleted first, unless this replica cannot verify it (its digest or format
version fails: that may be this replica's `RAZOR_SPILL_KEY` or version, and the copy good for the others).
Redis failures surface as `StoreUnavailable`. The `SessionStore` keeps the index and the bookkeeping; this
module only moves bytes.
"""
from __future__ import annotations

import logging

from . import codec, spilled_header
from .errors import SessionError, SessionLost, SessionModelMismatch, SessionNotFound, StoreUnavailable
from .spill import Spill, SpillUnavailable
from .spilled_header import HeaderInvalid, ModelShape

log = logging.getLogger(__name__)


class Refused(Exception):
    """The spilled copy can never be continued by this service."""

    def __init__(self, error: type[SessionError], reason: str):
        super().__init__(reason)
        self.error, self.reason = error, reason


class SpilledCopies:
    """`key`: the deployment's shared spill secret (empty = SHA-256 only); `shape`: the model's geometry and
    vocabulary, which a restored session must match (None = check a copy's internal consistency only)."""

    def __init__(self, spill: Spill, fingerprint_id: str, dtype: str, device, key: bytes = b"",
                 shape: ModelShape | None = None):
        self.spill, self.fingerprint_id, self.dtype, self.device = spill, fingerprint_id, dtype, device
        self.key, self.shape = key, shape

    def encode(self, state, meta: dict) -> tuple[bytes, list[bytes]]:
        """(header, chunks) of `state` with JSON-safe `meta` in its header, signed, as a spill stores them."""
        tensors, state_meta = state.to_tensors()
        encoded = codec.encode(tensors, {**meta, "dtype": self.dtype, "state": state_meta}, key=self.key)
        return encoded.header, encoded.chunks

    def write(self, sid: str, state, meta: dict) -> int:
        """Spill `state` unfenced (tools and tests; the store writes through `SessionDirectory`); returns the
        number of chunks written."""
        header, chunks = self.encode(state, meta)
        self.spill.write(sid, codec.Encoded(header, chunks))
        return len(chunks)

    def read_state(self, sid: str, n_chunks: int | None = None):
        """(the verified `SessionState` of a spilled session, its header meta)."""
        from services.engine import SessionState

        try:
            header, chunks = self.spill.read(sid, n_chunks)   # header and first chunks in one round trip
        except SpillUnavailable as exc:
            raise StoreUnavailable(f"session {sid} is spilled to Redis, which is unreachable ({exc}); "
                                   "retry when Redis is back") from exc
        if header is None:
            raise Refused(SessionNotFound, "it expired from Redis (RAZOR_SESSION_TTL_S) or was deleted")
        parsed = self._verified_header(sid, header, "copy")
        self.check(parsed["meta"])
        try:
            tensors = codec.decode_body(parsed, chunks, device=self.device)
        except codec.CodecError as exc:
            self.drop(sid)
            raise Refused(SessionLost, f"its spilled copy is corrupt ({exc})") from exc
        return SessionState.from_tensors(tensors, parsed["meta"]["state"], self.device), parsed["meta"]

    def read_meta(self, sid: str) -> tuple[dict, int] | None:
        """(header meta, chunk count) of a spilled session, verified, or None when Redis has none."""
        try:
            header = self.spill.read_header(sid)
        except SpillUnavailable as exc:
            raise StoreUnavailable(f"session {sid} is not in device memory and Redis is unreachable "
                                   f"({exc}); retry when Redis is back") from exc
        if header is None:
            return None
        parsed = self._verified_header(sid, header, "header")
        return parsed["meta"], parsed["n_chunks"]

    def _verified_header(self, sid: str, header: bytes, what: str) -> dict:
        """The parsed header, its digest and every field checked; a bad one is deleted and refused."""
        try:
            parsed = codec.read_header(header, self.key)
            meta = parsed["meta"]
            spilled_header.check_meta(meta)
            # Another model's or dtype's copy is never loaded here (`check` refuses it): the rest is theirs to check.
            if (meta["fingerprint_id"], meta["dtype"]) == (self.fingerprint_id, self.dtype):
                spilled_header.check(parsed, sid, self.shape)
            return parsed
        except (codec.CodecError, HeaderInvalid) as exc:
            if not isinstance(exc, codec.Unverifiable):   # maybe only this replica's key or version is wrong
                self.drop(sid)
            raise Refused(SessionLost, f"its spilled {what} is corrupt ({exc})") from exc

    def check(self, meta: dict) -> None:
        """Refuse a copy made under another model or in another dtype."""
        if meta["fingerprint_id"] != self.fingerprint_id:
            raise Refused(SessionModelMismatch, (
                f"it was made under another model (fingerprint {meta['fingerprint_id']}) and this service runs "
                f"{self.fingerprint_id}; continue it on a service running that model, or start a new session"))
        spilled_in = meta["dtype"]
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
