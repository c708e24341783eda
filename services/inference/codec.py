"""Tensors <-> bytes without pickle: a JSON header plus one raw blob, cut into chunks.

The header names every tensor's dtype, shape and byte range in the blob, the blob's sha256, a format
version and caller metadata (JSON-safe only); its ``digest`` covers every other header field, so it
covers the blob too (through ``body_sha256``). With a key the digest is an HMAC-SHA256 (a header or blob
edited by anyone without the key is refused); without one a plain SHA-256, which still catches corruption.
Chunks keep each Redis value far under its 512 MiB limit.

``read_header`` verifies the digest and the type and consistency of every header field before anything is
trusted, so a caller may check a header on its own (its metadata) without fetching the blob; ``decode_body``
then checks the blob against ``body_sha256`` before a single tensor is built. Anything damaged, edited or of
the wrong type is refused with ``CodecError``, never loaded.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import sys
from dataclasses import dataclass

import torch

FORMAT = "razorserve.tensors"
FORMAT_VERSION = 2   # 1 had a checksum of the blob only
DEFAULT_CHUNK_BYTES = 8 * 2**20
HMAC_SHA256, SHA256 = "hmac-sha256", "sha256"   # the header's "integrity": keyed, or corruption only

# Allowlist: only plain numeric dtypes cross the boundary.
_DTYPES = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"format", "version", "byteorder", "tensors", "total_bytes", "n_chunks", "body_sha256", "meta", "integrity"}
_ENTRY_FIELDS = {"name", "dtype", "shape", "offset", "nbytes"}
_MAX_DIMS = 8

if sys.byteorder != "little":  # the wire format is little-endian raw memory
    raise ImportError("services.inference.codec supports little-endian hosts only")


class CodecError(Exception):
    """The bytes are not a valid, intact encoding (format, version, digest, a field's type or value, sizes)."""


class Unverifiable(CodecError):
    """This reader cannot verify the header: another format version, a digest that does not verify, or a
    scheme that does not match its key (or lack of one). Possibly intact for a reader configured otherwise."""


@dataclass(frozen=True)
class Encoded:
    header: bytes        # UTF-8 JSON
    chunks: list[bytes]  # the blob, in order

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(len(c) for c in self.chunks)


def encode(tensors: dict[str, torch.Tensor], meta: dict, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
           key: bytes = b"") -> Encoded:
    """Serialize ``tensors`` (any device) and JSON-safe ``meta`` (string keys, finite numbers) into a header
    and chunks.

    ``key`` (the deployment's shared secret) makes the digest an HMAC; empty = a plain SHA-256."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    entries, parts, offset = [], [], 0
    for name, tensor in tensors.items():
        raw = _tensor_bytes(name, tensor)
        entries.append({"name": name, "dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "offset": offset, "nbytes": len(raw)})
        parts.append(raw)
        offset += len(raw)
    blob = b"".join(parts)
    chunks = [blob[i:i + chunk_bytes] for i in range(0, len(blob), chunk_bytes)]
    header = {
        "format": FORMAT, "version": FORMAT_VERSION, "byteorder": "little",
        "tensors": entries, "total_bytes": len(blob), "n_chunks": len(chunks),
        "body_sha256": hashlib.sha256(blob).hexdigest(), "meta": meta,
        "integrity": HMAC_SHA256 if key else SHA256,
    }
    covered = _canonical(header)
    # The digest goes last, outside what it covers; a reader pops it and recomputes over the rest.
    signed = covered[:-1] + b',"digest":"' + _digest(covered, key).encode() + b'"}'
    return Encoded(signed, chunks)


def read_header(header: bytes | str, key: bytes = b"") -> dict:
    """Parse a header, verify its digest, then check every field; raises ``CodecError``.

    The digest is checked over exactly what was parsed (re-serialized canonically), so what a caller reads
    is what was signed; a key's presence must match the header's (no downgrade to a plain SHA-256)."""
    parsed = _parse(header)
    if parsed.get("format") != FORMAT:
        raise CodecError(f"header is not a {FORMAT} header")
    if parsed.get("version") != FORMAT_VERSION or not is_count(parsed.get("version")):
        raise Unverifiable(f"format version {parsed.get('version')!r} is not supported (expected "
                         f"{FORMAT_VERSION}; version 1 headers carried no integrity check of their own)")
    _verify(parsed, key)
    _check_fields(parsed)
    return parsed


def decode_body(parsed: dict, chunks: list[bytes | None],
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a header ``read_header`` accepted, from its chunks; raises ``CodecError``."""
    if len(chunks) != parsed["n_chunks"] or any(c is None for c in chunks):
        raise CodecError(f"expected {parsed['n_chunks']} chunks, found {sum(c is not None for c in chunks)}")
    blob = b"".join(chunks)
    if len(blob) != parsed["total_bytes"]:
        raise CodecError(f"blob holds {len(blob)} bytes, header says {parsed['total_bytes']}")
    if not hmac.compare_digest(hashlib.sha256(blob).hexdigest(), parsed["body_sha256"]):
        raise CodecError("checksum mismatch: the blob is corrupt")
    return {e["name"]: _tensor_from(blob, e).to(device) for e in parsed["tensors"]}


def decode(header: bytes | str, chunks: list[bytes | None], device: torch.device | str = "cpu",
           key: bytes = b"") -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of ``encode``: returns ``(tensors, meta)``; raises ``CodecError`` on any mismatch."""
    parsed = read_header(header, key)
    return decode_body(parsed, chunks, device), parsed["meta"]


# ---- the header's integrity --------------------------------------------------------------------
def _canonical(obj) -> bytes:
    """One byte string per JSON value: what the digest covers, at write and at read alike."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _digest(covered: bytes, key: bytes) -> str:
    return hmac.new(key, covered, hashlib.sha256).hexdigest() if key else hashlib.sha256(covered).hexdigest()


def _parse(header: bytes | str) -> dict:
    try:
        parsed = json.loads(header)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:   # JSONDecodeError is a ValueError
        raise CodecError(f"header is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise CodecError(f"header is not a {FORMAT} header")
    return parsed


def _verify(parsed: dict, key: bytes) -> None:
    digest, integrity = parsed.pop("digest", None), parsed.get("integrity")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise CodecError("header has no valid digest")
    if integrity not in (SHA256, HMAC_SHA256):
        raise CodecError(f"header names an unknown integrity scheme {integrity!r}")
    if integrity == SHA256 and key:
        raise Unverifiable("header carries no MAC, but this service has RAZOR_SPILL_KEY set: it was written by a "
                           "service without the key, or forged")
    if integrity == HMAC_SHA256 and not key:
        raise Unverifiable("header is signed with a key and this service has none: set RAZOR_SPILL_KEY to the key "
                           "the writing service uses")
    try:
        covered = _canonical(parsed)
    except ValueError:   # NaN or infinity: never written by encode
        raise CodecError("header holds a number that is not finite") from None
    if not hmac.compare_digest(_digest(covered, key), digest):
        what = "MAC" if key else "SHA-256"
        raise Unverifiable(f"header {what} mismatch: the header or its digest was edited or corrupted"
                           + (", or it was written under another RAZOR_SPILL_KEY" if key else ""))


# ---- the header's fields -----------------------------------------------------------------------
def _check_fields(parsed: dict) -> None:
    if set(parsed) != _FIELDS:
        raise CodecError(f"header fields {sorted(parsed)} differ from {sorted(_FIELDS)}")
    if parsed["byteorder"] != "little":
        raise CodecError(f"byte order {parsed['byteorder']!r} is not supported")
    total, n_chunks = parsed["total_bytes"], parsed["n_chunks"]
    if not is_count(total) or not is_count(n_chunks) or (n_chunks == 0) != (total == 0) or n_chunks > total:
        raise CodecError(f"total_bytes {total!r} and n_chunks {n_chunks!r} are not consistent counts")
    if not isinstance(parsed["body_sha256"], str) or not _HEX64.fullmatch(parsed["body_sha256"]):
        raise CodecError("body_sha256 is not a SHA-256 hex digest")
    if not isinstance(parsed["meta"], dict):
        raise CodecError("meta is not a JSON object")
    if not isinstance(parsed["tensors"], list):
        raise CodecError("tensors is not a list")
    names, offset = set(), 0
    for entry in parsed["tensors"]:
        _check_entry(entry, offset)
        if entry["name"] in names:
            raise CodecError(f"tensor {entry['name']!r} appears twice")
        names.add(entry["name"])
        offset += entry["nbytes"]
    if offset != total:
        raise CodecError(f"tensors cover {offset} bytes, total_bytes says {total}")


def _check_entry(entry, offset: int) -> None:
    """One tensor's entry: known dtype, a shape of counts, and the next byte range, of exactly its size."""
    if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS or not isinstance(entry["name"], str):
        raise CodecError(f"tensor entry {str(entry)[:80]} does not have exactly {sorted(_ENTRY_FIELDS)}")
    name, shape = entry["name"], entry["shape"]
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in _DTYPES:
        raise CodecError(f"tensor {name!r} has unsupported dtype {entry['dtype']!r}")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(is_count(d) for d in shape):
        raise CodecError(f"tensor {name!r} has a shape {shape!r} that is not a list of counts")
    size = math.prod(shape) * _DTYPES[entry["dtype"]].itemsize
    start, nbytes = entry["offset"], entry["nbytes"]
    if not (is_count(start) and is_count(nbytes)) or (start, nbytes) != (offset, size):
        raise CodecError(f"tensor {name!r}: byte range does not match shape {shape} at offset {offset}")


def is_count(value) -> bool:
    """A non-negative int, and not a bool (which JSON keeps apart but Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---- tensors -------------------------------------------------------------------------------------
def _tensor_bytes(name: str, tensor: torch.Tensor) -> bytes:
    if tensor.dtype not in _DTYPE_NAMES:
        raise ValueError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    # view(uint8) reinterprets any dtype (bfloat16 included) as its raw bytes.
    return flat.view(torch.uint8).numpy().tobytes()


def _tensor_from(blob: bytes, entry: dict) -> torch.Tensor:
    """A tensor from its checked entry (``_check_entry`` proved the range lies inside the blob)."""
    dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
    start, size = entry["offset"], entry["nbytes"]
    if size == 0:
        return torch.empty(shape, dtype=dtype)
    raw = bytearray(blob[start:start + size])  # writable copy: the tensor owns its memory
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)
