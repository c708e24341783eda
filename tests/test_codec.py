"""Codec: exact round trips, chunking, a digest over header and blob, and refusal of anything damaged."""
import hashlib
import hmac
import json

import pytest
import torch

from services.inference import codec

KEY, OTHER_KEY = b"k" * 32, b"o" * 32


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


def resign(header: dict, key: bytes = b"") -> bytes:
    """What a writer who knows the scheme (and the key, if any) can produce: the documented digest over the
    canonical JSON of every field but the digest. Written here independently of the codec's own code."""
    fields = {k: v for k, v in header.items() if k != "digest"}
    fields["integrity"] = "hmac-sha256" if key else "sha256"
    covered = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    digest = hmac.new(key, covered, hashlib.sha256) if key else hashlib.sha256(covered)
    return json.dumps({**fields, "digest": digest.hexdigest()}).encode()


@pytest.mark.parametrize("key", [b"", KEY])
def test_round_trip_is_bit_exact_with_meta(key):
    tensors, meta = _tensors(), {"session_id": "abc", "turns": [1, 2], "at": 1712345678.123456}
    enc = codec.encode(tensors, meta, chunk_bytes=64, key=key)
    assert len(enc.chunks) > 1 and all(len(c) <= 64 for c in enc.chunks)
    out, out_meta = codec.decode(enc.header, enc.chunks, key=key)
    assert out_meta == meta and out.keys() == tensors.keys()
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t), name


def test_header_is_json_with_version_checksum_and_digest():
    header = json.loads(codec.encode(_tensors(), {}).header)
    assert header["version"] == codec.FORMAT_VERSION and len(header["body_sha256"]) == 64
    assert (header["integrity"], len(header["digest"])) == ("sha256", 64)
    assert [e["name"] for e in header["tensors"]][:2] == ["k", "v_half"]
    assert json.loads(codec.encode(_tensors(), {}, key=KEY).header)["integrity"] == "hmac-sha256"
    assert json.loads(resign(header))["digest"] == header["digest"], "the digest is the documented one"


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
    with pytest.raises(codec.CodecError, match="JSON"):
        codec.decode(b"[" * 100_000, enc.chunks)
    with pytest.raises(codec.Unverifiable, match="version"):
        codec.decode(resign(json.loads(enc.header) | {"version": 1}), enc.chunks)


@pytest.mark.parametrize("key", [b"", KEY])
@pytest.mark.parametrize("edit", [
    lambda h: h["meta"].update(turns=[1, 3]),
    lambda h: h["tensors"][0]["shape"].reverse(),
    lambda h: h.update(body_sha256="0" * 64),
    lambda h: h.update(n_chunks=h["n_chunks"] + 1),
])
def test_any_edit_of_a_signed_header_fails_its_digest(key, edit):
    enc = codec.encode(_tensors(), {"turns": [1, 2]}, chunk_bytes=64, key=key)
    header = json.loads(enc.header)
    edit(header)
    with pytest.raises(codec.Unverifiable, match="MAC mismatch" if key else "SHA-256 mismatch"):
        codec.read_header(json.dumps(header), key)


def test_a_duplicated_field_is_verified_as_parsed():
    enc = codec.encode(_tensors(), {"turns": [1, 2]}, key=KEY)
    doubled = enc.header[:-1] + b',"meta":{"turns":[9]}}'   # json.loads keeps the last one
    with pytest.raises(codec.Unverifiable, match="MAC mismatch"):
        codec.read_header(doubled, KEY)


def test_keys_must_match_and_never_downgrade_to_sha256():
    signed = codec.encode(_tensors(), {}, key=KEY)
    with pytest.raises(codec.Unverifiable, match="another RAZOR_SPILL_KEY"):
        codec.read_header(signed.header, OTHER_KEY)
    with pytest.raises(codec.Unverifiable, match="has none"):
        codec.read_header(signed.header)
    forged = resign(json.loads(signed.header))   # a valid plain SHA-256 over the same header
    with pytest.raises(codec.Unverifiable, match="no MAC"):
        codec.read_header(forged, KEY)
    codec.read_header(forged)   # ... which a service without a key accepts: SHA-256 only catches corruption


@pytest.mark.parametrize("field, edit, hint", [
    ("total_bytes as text", lambda h: h.update(total_bytes=str(h["total_bytes"])), "total_bytes"),
    ("negative n_chunks", lambda h: h.update(n_chunks=-1), "n_chunks"),
    ("bool n_chunks", lambda h: h.update(n_chunks=True), "n_chunks"),
    ("dropped field", lambda h: h.pop("byteorder"), "fields"),
    ("unknown field", lambda h: h.update(extra=1), "fields"),
    ("meta not an object", lambda h: h.update(meta=[1]), "meta"),
    ("body_sha256 not hex", lambda h: h.update(body_sha256="z" * 64), "body_sha256"),
    ("unknown dtype", lambda h: h["tensors"][0].update(dtype="complex64"), "dtype"),
    ("shape as text", lambda h: h["tensors"][0].update(shape="2x3"), "shape"),
    ("negative dim", lambda h: h["tensors"][0].update(shape=[-2, 3, 5, 4]), "shape"),
    ("shape off its bytes", lambda h: h["tensors"][0].update(shape=[2, 3, 5, 8]), "byte range"),
    ("overlapping offset", lambda h: h["tensors"][1].update(offset=0), "byte range"),
    ("bool offset", lambda h: h["tensors"][1].update(offset=True), "byte range"),
    ("float nbytes", lambda h: h["tensors"][0].update(nbytes=480.0), "byte range"),
    ("renamed twin", lambda h: h["tensors"][1].update(name="k"), "twice"),
    ("entry field dropped", lambda h: h["tensors"][0].pop("offset"), "exactly"),
    ("blob larger than tensors", lambda h: h.update(total_bytes=h["total_bytes"] + 4), "cover"),
])
def test_fields_of_wrong_type_or_inconsistent_are_refused_even_when_signed(field, edit, hint):
    enc = codec.encode(_tensors(), {}, chunk_bytes=64, key=KEY)
    header = json.loads(enc.header)
    edit(header)
    with pytest.raises(codec.CodecError, match=hint) as info:
        codec.decode(resign(header, KEY), enc.chunks, key=KEY)
    assert not isinstance(info.value, codec.Unverifiable), field


def test_non_finite_numbers_are_refused():
    header = codec.encode(_tensors(), {"x": 1.5}).header.replace(b'"x":1.5', b'"x":NaN')
    with pytest.raises(codec.CodecError, match="not finite"):
        codec.read_header(header)


def test_unsupported_dtype_is_rejected_on_encode():
    with pytest.raises(ValueError, match="dtype"):
        codec.encode({"c": torch.zeros(2, dtype=torch.complex64)}, {})
