"""Codec: exact round trips, chunking, and refusal of anything damaged."""
import json

import pytest
import torch

from services.inference import codec


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "k": torch.randn(2, 3, 5, 4, generator=g),
        "v_half": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        "ids": torch.arange(11, dtype=torch.int64),
        "count": torch.tensor(3, dtype=torch.int32),
        "empty": torch.empty(0, 4),
        "mask": torch.tensor([True, False, True]),
    }


def test_round_trip_is_bit_exact_with_meta():
    tensors, meta = _tensors(), {"session_id": "abc", "turns": [1, 2]}
    enc = codec.encode(tensors, meta, chunk_bytes=64)
    assert len(enc.chunks) > 1 and all(len(c) <= 64 for c in enc.chunks)
    out, out_meta = codec.decode(enc.header, enc.chunks)
    assert out_meta == meta and out.keys() == tensors.keys()
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t), name


def test_header_is_json_with_version_and_checksum():
    enc = codec.encode(_tensors(), {})
    header = json.loads(enc.header)
    assert header["version"] == codec.FORMAT_VERSION and len(header["sha256"]) == 64
    assert [e["name"] for e in header["tensors"]][:2] == ["k", "v_half"]


def test_flipped_byte_fails_checksum():
    enc = codec.encode(_tensors(), {})
    bad = bytearray(enc.chunks[0])
    bad[10] ^= 0xFF
    with pytest.raises(codec.CodecError, match="checksum"):
        codec.decode(enc.header, [bytes(bad), *enc.chunks[1:]])


def test_missing_chunk_and_bad_headers_are_refused():
    enc = codec.encode(_tensors(), {}, chunk_bytes=32)
    with pytest.raises(codec.CodecError, match="chunks"):
        codec.decode(enc.header, enc.chunks[:-1])
    with pytest.raises(codec.CodecError, match="JSON"):
        codec.decode(b"{not json", enc.chunks)
    other = json.loads(enc.header) | {"version": 99}
    with pytest.raises(codec.CodecError, match="version"):
        codec.decode(json.dumps(other), enc.chunks)


def test_shape_that_disagrees_with_bytes_is_refused():
    enc = codec.encode({"x": torch.zeros(4)}, {})
    header = json.loads(enc.header)
    header["tensors"][0]["shape"] = [8]
    header_bytes = json.dumps(header).encode()
    with pytest.raises(codec.CodecError, match="shape"):
        codec.decode(header_bytes, enc.chunks)


def test_unsupported_dtype_is_rejected_on_encode():
    with pytest.raises(ValueError, match="dtype"):
        codec.encode({"c": torch.zeros(2, dtype=torch.complex64)}, {})
