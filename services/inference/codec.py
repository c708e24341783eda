"""Tensors <-> bytes without pickle: a JSON header plus one raw blob, cut into chunks.

The header names every tensor's dtype, shape and byte range in the blob, the blob's sha256,
a format version and caller metadata (JSON-safe only). Chunks keep each Redis value far under
its 512 MiB limit. ``decode`` verifies the checksum before a single tensor is built: a blob
that fails it is refused with ``CodecError``, never loaded.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass

import torch

FORMAT = "razorserve.tensors"
FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 8 * 2**20

# Allowlist: only plain numeric dtypes cross the boundary.
_DTYPES = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

if sys.byteorder != "little":  # the wire format is little-endian raw memory
    raise ImportError("services.inference.codec supports little-endian hosts only")


class CodecError(ValueError):
    """The bytes are not a valid, intact encoding (wrong format, version, sizes or checksum)."""


@dataclass(frozen=True)
class Encoded:
    header: bytes        # UTF-8 JSON
    chunks: list[bytes]  # the blob, in order

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(len(c) for c in self.chunks)


def encode(tensors: dict[str, torch.Tensor], meta: dict, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Encoded:
    """Serialize ``tensors`` (any device) and JSON-safe ``meta`` into a header and chunks."""
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
        "sha256": hashlib.sha256(blob).hexdigest(), "meta": meta,
    }
    return Encoded(json.dumps(header, separators=(",", ":")).encode(), chunks)


def read_header(header: bytes | str) -> dict:
    """Parse and check a header (format, version, byte order); raises ``CodecError``."""
    try:
        parsed = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"header is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict) or parsed.get("format") != FORMAT:
        raise CodecError(f"header is not a {FORMAT} header")
    if parsed.get("version") != FORMAT_VERSION:
        raise CodecError(f"format version {parsed.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    if parsed.get("byteorder") != "little":
        raise CodecError(f"byte order {parsed.get('byteorder')!r} is not supported")
    return parsed


def decode(header: bytes | str, chunks: list[bytes], device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of ``encode``: returns ``(tensors, meta)``; raises ``CodecError`` on any mismatch."""
    parsed = read_header(header)
    if len(chunks) != parsed["n_chunks"] or any(c is None for c in chunks):
        raise CodecError(f"expected {parsed['n_chunks']} chunks, found {sum(c is not None for c in chunks)}")
    blob = b"".join(chunks)
    if len(blob) != parsed["total_bytes"]:
        raise CodecError(f"blob holds {len(blob)} bytes, header says {parsed['total_bytes']}")
    if hashlib.sha256(blob).hexdigest() != parsed["sha256"]:
        raise CodecError("checksum mismatch: the blob is corrupt")
    tensors = {e["name"]: _tensor_from(blob, e).to(device) for e in parsed["tensors"]}
    return tensors, parsed["meta"]


def _tensor_bytes(name: str, tensor: torch.Tensor) -> bytes:
    if tensor.dtype not in _DTYPE_NAMES:
        raise ValueError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    # view(uint8) reinterprets any dtype (bfloat16 included) as its raw bytes.
    return flat.view(torch.uint8).numpy().tobytes()


def _tensor_from(blob: bytes, entry: dict) -> torch.Tensor:
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CodecError(f"tensor {entry['name']!r} has unsupported dtype {entry['dtype']!r}")
    shape, start, size = tuple(entry["shape"]), entry["offset"], entry["nbytes"]
    expected = math.prod(shape) * dtype.itemsize if all(d >= 0 for d in shape) else -1
    if size != expected or start < 0 or start + size > len(blob):
        raise CodecError(f"tensor {entry['name']!r}: byte range does not match shape {list(shape)}")
    if size == 0:
        return torch.empty(shape, dtype=dtype)
    raw = bytearray(blob[start:start + size])  # writable copy: the tensor owns its memory
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)

