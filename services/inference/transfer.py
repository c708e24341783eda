"""Session export blobs: one session's spill, framed and checksummed to move between deployments.

An export is the spill format (the codec's JSON header and its tensor blob) inside a small frame:

    MAGIC (20 bytes) | frame version (u16 LE) | header length (u32 LE) | header | blob | SHA-256 of all before (32)

The header is signed with a plain SHA-256 (the codec's ``integrity: sha256``), never with the exporting
deployment's ``RAZOR_SPILL_KEY``: a deployment with another key (or none) imports it. Integrity, not
authenticity: the trailing SHA-256 catches any damage in transit (a flipped byte, a truncated or padded stream)
before anything is parsed, the codec's digests catch a header or blob edited behind a rewritten trailer, and
every header field is then checked against the importing model as a restored spill is (`spilled_header`).
Anyone can still write a well-formed export; what it holds becomes a session of the importing tenant only.

``unpack`` refuses damage with ``ExportDamaged`` (DATA_LOSS) and an intact export of another model, dtype,
head map or format version with ``ExportIncompatible`` (FAILED_PRECONDITION). Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from services.engine import HeadMapError

from . import codec, spilled_header
from .spilled_header import HeaderInvalid, ModelShape

MAGIC = b"RAZORSERVE-SESSION\r\n"   # \r\n: a text-mode transfer that rewrites line ends shows as damage
FRAME_VERSION = 1
_FRAME = struct.Struct("<HI")        # frame version, header length
_TRAILER = hashlib.sha256().digest_size
MESSAGE_BYTES = 2 * 2**20            # bytes per streamed message: under gRPC's default 4 MiB receive limit


class ExportDamaged(Exception):
    """The export is not intact: truncated, padded, a byte changed, or fields edited (DATA_LOSS)."""


class ExportIncompatible(Exception):
    """An intact export this deployment cannot continue: another model, dtype, head map or format version."""


class ImportTooLarge(Exception):
    """The export is over this service's import limit (RAZOR_MAX_IMPORT_BYTES)."""


@dataclass(frozen=True)
class Deployment:
    """What an imported session must match: the model, its geometry and dtype, and a known head map."""

    fingerprint_id: str
    dtype: str
    shape: ModelShape
    head_maps: object    # .get(version) -> HeadMap; KeyError or HeadMapError when this deployment lacks it


# ---- export ------------------------------------------------------------------------------------
def pack(state, meta: dict) -> list[bytes]:
    """The export of ``state`` (spill header ``meta`` fields besides ``state``), as parts to concatenate."""
    tensors, state_meta = state.to_tensors()
    encoded = codec.encode(tensors, {**meta, "state": state_meta}, chunk_bytes=MESSAGE_BYTES)
    return frame(encoded.header, encoded.chunks)


def frame(header: bytes, chunks: list[bytes]) -> list[bytes]:
    """Frame a codec header and its blob's chunks; the last part is the SHA-256 of all the others."""
    parts = [MAGIC + _FRAME.pack(FRAME_VERSION, len(header)), header, *chunks]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return [*parts, digest.digest()]


def messages(parts: list[bytes], size: int = MESSAGE_BYTES) -> Iterator[bytes]:
    """The concatenated parts re-cut into pieces of at most ``size`` bytes (what each gRPC message carries)."""
    pending, held = [], 0
    for part in parts:
        view = memoryview(part)
        while view:
            take = view[:size - held]
            pending.append(take)
            held += len(take)
            view = view[len(take):]
            if held == size:
                yield b"".join(pending)
                pending, held = [], 0
    if pending:
        yield b"".join(pending)


def copy_state(state):
    """A deep copy of a live ``SessionState`` on its own device (a fork): tensors cloned, metadata rebuilt."""
    from services.engine import SessionState

    tensors, state_meta = state.to_tensors()
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    return SessionState.from_tensors({name: t.clone() for name, t in tensors.items()}, state_meta, device)


# ---- import ------------------------------------------------------------------------------------
def gather(pieces: Iterable[bytes], limit: int, declared: int = 0) -> bytes:
    """The whole export from its streamed pieces, refused once it passes ``limit`` bytes or, where the client
    declared its size, when it carried another number of bytes."""
    if declared > limit:
        raise ImportTooLarge(_too_large(f"is {declared} bytes", limit))
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        if len(buffer) > limit:
            raise ImportTooLarge(_too_large(f"passed {limit} bytes", limit))
    if declared and len(buffer) != declared:
        raise ExportDamaged(f"the stream carried {len(buffer)} bytes where its options declared {declared}: it was "
                            "cut short (a cancelled call, a broken connection) or padded; nothing was imported: "
                            "export it again and send all of it")
    return bytes(buffer)


def _too_large(what: str, limit: int) -> str:
    return (f"the export {what}, over this service's import limit of {limit} bytes (RAZOR_MAX_IMPORT_BYTES); "
            "raise the limit or import it into a deployment that allows it")


def unpack(blob: bytes, deployment: Deployment, device) -> tuple[object, dict]:
    """(the ``SessionState`` on ``device``, its header meta) of an export, everything checked first."""
    from services.engine import SessionState

    header, body = _unframe(blob)
    try:
        parsed = codec.read_header(header)   # no key: exports carry a plain SHA-256
        spilled_header.check_meta(parsed["meta"])
    except (codec.CodecError, HeaderInvalid) as exc:
        raise ExportDamaged(f"the export's header is damaged or was edited ({exc})") from exc
    meta = parsed["meta"]
    _check_deployment(meta, deployment)
    try:
        spilled_header.check(parsed, meta["session_id"], deployment.shape)
        tensors = codec.decode_body(parsed, _pieces(body, parsed["n_chunks"]), device="cpu")
    except (codec.CodecError, HeaderInvalid) as exc:
        raise ExportDamaged(f"the export is damaged or was edited ({exc})") from exc
    return SessionState.from_tensors(tensors, meta["state"], device), meta


def _unframe(blob: bytes) -> tuple[bytes, bytes]:
    """(header, blob) of a framed export whose trailing SHA-256 verifies; raises ExportDamaged."""
    start = len(MAGIC) + _FRAME.size
    if len(blob) < start + _TRAILER or not blob.startswith(MAGIC):
        raise ExportDamaged(f"not a RazorServe session export, or truncated ({len(blob)} bytes): export it again")
    if not hmac.compare_digest(hashlib.sha256(memoryview(blob)[:-_TRAILER]).digest(), blob[-_TRAILER:]):
        raise ExportDamaged("the export is damaged (its SHA-256 does not match: truncated, padded or altered in "
                            "transit); export it again")
    version, header_len = _FRAME.unpack_from(blob, len(MAGIC))
    if version != FRAME_VERSION:
        raise ExportIncompatible(f"the export has format version {version} and this service reads version "
                                 f"{FRAME_VERSION}; import it into a service of the version that exported it")
    if start + header_len > len(blob) - _TRAILER:
        raise ExportDamaged(f"the export's header length {header_len} runs past its end")
    return blob[start:start + header_len], blob[start + header_len:-_TRAILER]


def _pieces(body: bytes, n: int) -> list[bytes]:
    """The blob cut into the ``n`` chunks the header names (the codec checks the count; where they are cut does
    not matter: it checksums their concatenation)."""
    if n == 0 or n > len(body):
        return [body] if body else []
    bounds = [len(body) * i // n for i in range(n + 1)]
    return [body[a:b] for a, b in zip(bounds, bounds[1:])]


def _check_deployment(meta: dict, deployment: Deployment) -> None:
    if meta["fingerprint_id"] != deployment.fingerprint_id:
        raise ExportIncompatible(f"the export was made under another model (fingerprint {meta['fingerprint_id']}) "
                                 f"and this service runs {deployment.fingerprint_id}; import it into a deployment "
                                 "of that model")
    if meta["dtype"] != deployment.dtype:
        raise ExportIncompatible(f"the export's cache is in {meta['dtype']} and this service runs "
                                 f"{deployment.dtype}; import it into a deployment with RAZOR_DTYPE={meta['dtype']}")
    version = meta["head_map_version"]
    try:
        head_map = deployment.head_maps.get(version)
    except (KeyError, HeadMapError):   # HeadMaps.get's documented "not known here"
        raise ExportIncompatible(f"the export was compressed with head map {version}, which this deployment does "
                                 "not know; publish that map here, or import into a deployment that has it") from None
    cache = meta["state"].get("cache") if isinstance(meta["state"], dict) else None
    if isinstance(cache, dict) and (cache.get("retrieval_kv_heads") != head_map.retrieval_kv_heads
                                    or cache.get("params") != head_map.compression.to_dict()):
        raise ExportIncompatible(f"the export's cache layout differs from this deployment's head map {version} "
                                 "(another map under the same version name); import it where that map was made")
