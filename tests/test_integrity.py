"""Integrity of restored sessions through a real server: an edited spill header is never used.

Each case spills a real session to a real Redis, edits its hash there, and continues it over gRPC: the
client gets DATA_LOSS with the reason, the session is reported LOST with it, and nothing is silently used.
Edits re-signed with the server's key pass the MAC, so they prove the field checks on their own; edits left
unsigned prove the MAC. Also: the header checks against the tensors and the model, unit by unit.
"""
from __future__ import annotations

import json
import tracemalloc
from typing import NamedTuple

import grpc
import pytest
import redis
from test_codec import resign

from services.api.razorserve.v1 import razorserve_pb2 as pb
from services.inference import codec, spilled_header
from services.inference import spill as spill_module
from services.inference.client import RazorClient
from services.inference.local_spill import LocalSpill, LocalSpills
from services.inference.spill import Spill
from services.inference.spilled_header import HeaderInvalid, ModelShape
from tests.test_service import rpc_error, wait_until

KEY = "integrity-test-key-0123456789"
PROMPT = ("The quick brown fox jumps over the lazy dog near the river bank while the sun sets "
          "slowly behind the distant hills and the birds sing their evening songs")


def spilled_session(client) -> str:
    sid = client.generate(prompt=PROMPT, max_new_tokens=3).session_id
    wait_until(lambda: client.get_session(sid).location == pb.SESSION_LOCATION_REDIS)
    return sid


def edit_header(r, sid: str, edit, key: bytes | None) -> None:
    """Edit the spilled header in Redis, re-signed with `key` (None: left with its old digest)."""
    header = json.loads(r.hget(Spill.key(sid), "header"))
    edit(header)
    r.hset(Spill.key(sid), "header", json.dumps(header) if key is None else resign(header, key))


def assert_lost(client, sid: str, hint: str) -> None:
    error = rpc_error(lambda: client.stream_continue(sid, text=" and then?", max_new_tokens=2))
    assert error.code() == grpc.StatusCode.DATA_LOSS and hint in error.details(), error.details()
    info = client.get_session(sid)
    assert info.location == pb.SESSION_LOCATION_LOST and hint in info.lost_reason, info.lost_reason


def meta(h):
    return h["meta"]


def state(h):
    return h["meta"]["state"]


def cache(h):
    return h["meta"]["state"]["cache"]


def _set(obj_of, key, value):
    return lambda h: obj_of(h).__setitem__(key, value)


FIELD_EDITS = {   # case -> (edit of the header, a word of the reason)
    "token id out of vocabulary": (lambda h: state(h)["token_ids"].__setitem__(3, 49152), "0..49151"),
    "negative token id": (lambda h: state(h)["token_ids"].__setitem__(0, -1), "token_ids[0]"),
    "token id as text": (lambda h: state(h)["token_ids"].__setitem__(1, "504"), "token_ids[1]"),
    "token id as bool": (lambda h: state(h)["token_ids"].__setitem__(1, True), "token_ids[1]"),
    "token history longer than token_count": (lambda h: state(h)["token_ids"].append(5), "token_count"),
    "token_count off by one": (lambda h: meta(h).__setitem__("token_count", meta(h)["token_count"] - 1),
                               "token_count"),
    "token_count as text": (_set(meta, "token_count", "33"), "meta.token_count"),
    "seq_len of one layer": (lambda h: cache(h)["seq_len"].__setitem__(1, cache(h)["seq_len"][1] + 1), "seq_len"),
    "seq_len past the history": (lambda h: cache(h).__setitem__("seq_len", [meta(h)["token_count"] + 1] * 4),
                                 "seq_len"),
    "comp_count of a local layer": (lambda h: cache(h)["comp_count"].__setitem__(1, cache(h)["comp_count"][1] + 1),
                                    "folded"),
    "head-map version as int": (_set(meta, "head_map_version", 7), "meta.head_map_version"),
    "head-map versions disagree": (_set(state, "head_map_version", "0123456789abcdef"), "differs"),
    "dropped meta field": (lambda h: meta(h).pop("full_nbytes"), "lacks ['full_nbytes']"),
    "dropped state field": (lambda h: state(h).pop("chat"), "lacks ['chat']"),
    "unknown field": (_set(meta, "owner", "mallory"), "unknown ['owner']"),
    "negative nbytes": (_set(meta, "nbytes", -1), "meta.nbytes"),
    "stored_nbytes off": (lambda h: meta(h).__setitem__("stored_nbytes", meta(h)["stored_nbytes"] + 4), "disagree"),
    "created_at as text": (_set(meta, "created_at", "yesterday"), "meta.created_at"),
    "chat as int": (_set(state, "chat", 1), "state.chat"),
    "retrieval head out of range": (lambda h: cache(h)["retrieval_kv_heads"].__setitem__(0, [0, 2]),
                                    "retrieval_kv_heads[0]"),
    "a layer dropped": (lambda h: cache(h)["retrieval_kv_heads"].pop(), "this model has 4"),
    "ratio as text": (lambda h: cache(h)["params"].__setitem__("ratio", "5"), "ratio"),
    "tensor dims swapped": (lambda h: h["tensors"][0]["shape"].reverse(), "tensor 0.keys"),
    "another session's id": (_set(meta, "session_id", "0" * 32), "names session"),
    "tensor byte range": (lambda h: h["tensors"][1].__setitem__("offset", 0), "byte range"),
}


@pytest.mark.parametrize("case", list(FIELD_EDITS))
def test_edited_header_field_is_data_loss_even_when_signed(start_server, service_redis_url, case):
    edit, hint = FIELD_EDITS[case]
    server = start_server(kv_budget_bytes=1, spill_key=KEY)
    r = redis.Redis.from_url(service_redis_url)
    with RazorClient(server.target) as client:
        sid = spilled_session(client)
        assert any(cache_of(r, sid)["comp_count"]), "the session's local heads have folded tokens"
        edit_header(r, sid, edit, KEY.encode())
        assert_lost(client, sid, hint)
    assert not r.exists(Spill.key(sid)), "a verified but invalid copy is deleted"


def cache_of(r, sid: str) -> dict:
    return json.loads(r.hget(Spill.key(sid), "header"))["meta"]["state"]["cache"]


UNSIGNED_EDITS = {   # a consistent edit, caught by the MAC alone
    "left unsigned": (None, "MAC mismatch"),
    "signed with another key": (b"another-key-0123456789", "MAC mismatch"),
    "signed with plain SHA-256": (b"", "no MAC"),
}


@pytest.mark.parametrize("case", list(UNSIGNED_EDITS))
def test_header_edit_without_the_key_is_data_loss(start_server, service_redis_url, case):
    key, hint = UNSIGNED_EDITS[case]
    server = start_server(kv_budget_bytes=1, spill_key=KEY)
    r = redis.Redis.from_url(service_redis_url)

    def longer_history(h):   # one more token, counted everywhere: only the MAC can tell
        state(h)["token_ids"].append(state(h)["token_ids"][-1])
        meta(h)["token_count"] += 1

    with RazorClient(server.target) as client:
        sid = spilled_session(client)
        edit_header(r, sid, longer_history, key)
        assert_lost(client, sid, hint)
    assert r.exists(Spill.key(sid)), "a copy this replica cannot verify is kept for replicas that can"


def test_a_copy_moved_to_another_sessions_key_is_refused(start_server, service_redis_url):
    server = start_server(kv_budget_bytes=1, spill_key=KEY)
    r = redis.Redis.from_url(service_redis_url)
    with RazorClient(server.target) as client:
        victim, other = spilled_session(client), spilled_session(client)
        r.copy(Spill.key(other), Spill.key(victim), replace=True)   # a whole, validly signed hash
        assert_lost(client, victim, "names session")
        assert client.continue_session(other, text=" fine", max_new_tokens=2).generated_tokens == 2


def test_without_a_key_sha256_catches_header_corruption(start_server, service_redis_url):
    server = start_server(kv_budget_bytes=1)
    r = redis.Redis.from_url(service_redis_url)
    with RazorClient(server.target) as client:
        corrupted, invalid = spilled_session(client), spilled_session(client)
        edit_header(r, corrupted, _set(meta, "token_count", 2), None)
        edit_header(r, invalid, _set(meta, "token_count", 2), b"")   # a valid SHA-256 over an invalid header
        assert_lost(client, corrupted, "SHA-256 mismatch")
        assert_lost(client, invalid, "token_count")


def test_edited_header_is_refused_after_a_restart_too(start_server, service_redis_url):
    first = start_server(kv_budget_bytes=1, spill_key=KEY)
    r = redis.Redis.from_url(service_redis_url)
    with RazorClient(first.target) as client:
        sid, good = spilled_session(client), spilled_session(client)
    first.stop(1.0)
    edit_header(r, sid, lambda h: state(h)["token_ids"].__setitem__(0, 10**6), KEY.encode())
    second = start_server(spill_key=KEY)   # indexes spilled sessions from their headers at start
    with RazorClient(second.target) as client:
        # Listed from the session directory; the copy itself is checked when it is restored.
        assert sorted(s.session_id for s in client.list_sessions()) == sorted([sid, good])
        assert_lost(client, sid, "token_ids[0]")
        assert client.get_session(sid).location == pb.SESSION_LOCATION_LOST
        assert client.continue_session(good, text=" fine", max_new_tokens=2).generated_tokens == 2


def test_a_restored_session_is_bit_exact_under_a_key(start_server):
    """Sampled turns (sensitive to any change in logits) match between a session kept resident and one
    spilled and restored, MAC-verified, before every turn."""
    outs = []
    for spills in (False, True):
        server = start_server(kv_budget_bytes=1 if spills else 10**9, spill_key=KEY)
        with RazorClient(server.target) as client:
            replies, _ = sampled_turns(client, PROMPT, spills)
        outs.append([r.token_ids for r in replies])
        server.stop(0)
    assert outs[0] == outs[1]


def sampled_turns(client: RazorClient, prompt: str, spilled: bool) -> tuple[list, pb.Session]:
    """Three sampled turns of one session (any change in a logit shows in them), each continued turn waiting
    until the session is in Redis (`spilled`) or on the device; the replies and the session's final record."""
    sampled = dict(max_new_tokens=4, temperature=1.0, seed=7)
    where = pb.SESSION_LOCATION_REDIS if spilled else pb.SESSION_LOCATION_DEVICE
    replies = [client.generate(prompt=prompt, **sampled)]
    sid = replies[0].session_id
    for text in (" Then", " Next"):
        wait_until(lambda: client.get_session(sid).location == where)
        replies.append(client.continue_session(sid, text=text, **sampled))
    return replies, client.get_session(sid)


# ---- unit: the header against its tensors and the model ----------------------------------------
class Spilled(NamedTuple):
    header: dict          # as codec.read_header returns it
    chunks: list[bytes]
    shape: ModelShape


@pytest.fixture(scope="module")
def spilled(tiny_loaded, tiny_head_map) -> Spilled:
    """A real compressed session of the tiny model, encoded."""
    from services.engine import Engine, SamplingParams

    engine = Engine(tiny_loaded, tiny_head_map)
    st, _ = engine.generate(engine.encode(text=PROMPT), SamplingParams(max_new_tokens=3))
    tensors, state_meta = st.to_tensors()
    m = {"session_id": "s1", "fingerprint_id": st.fingerprint_id, "head_map_version": st.head_map_version,
         "token_count": len(st.token_ids), "nbytes": st.nbytes(), "full_nbytes": st.full_nbytes(),
         "stored_nbytes": st.stored_nbytes(), "created_at": 1.0, "last_used": 2.0, "dtype": "float32",
         "state": state_meta}
    encoded = codec.encode(tensors, m)
    return Spilled(codec.read_header(encoded.header), encoded.chunks, ModelShape.of(tiny_loaded))


def test_a_real_header_passes_with_and_without_the_model(spilled):
    parsed, _, shape = spilled
    spilled_header.check(parsed, "s1", shape)
    spilled_header.check(parsed, "s1")


@pytest.mark.parametrize("case", [c for c in FIELD_EDITS if c != "tensor byte range"])
def test_each_field_edit_is_refused_by_the_header_check(spilled, case):
    parsed, _, shape = spilled
    edit, hint = FIELD_EDITS[case]
    header = json.loads(json.dumps(parsed))
    edit(header)
    with pytest.raises(HeaderInvalid) as info:
        spilled_header.check(header, "s1", shape)
    assert hint in str(info.value), str(info.value)


def test_model_shape_is_checked_only_when_given(spilled):
    parsed, _, shape = spilled
    smaller = ModelShape(shape.n_layers, shape.n_kv_heads, shape.head_dim, vocab_size=100)
    with pytest.raises(HeaderInvalid, match="0..99"):
        spilled_header.check(parsed, "s1", smaller)
    other_dim = ModelShape(shape.n_layers, shape.n_kv_heads, 2 * shape.head_dim, shape.vocab_size)
    with pytest.raises(HeaderInvalid, match="expected"):
        spilled_header.check(parsed, "s1", other_dim)


def test_spill_key_setting_is_read_validated_and_kept_out_of_reprs(monkeypatch):
    from pydantic import ValidationError

    from services.settings import Settings

    monkeypatch.setenv("RAZOR_SPILL_KEY", KEY)
    settings = Settings()
    assert settings.spill_key_bytes() == KEY.encode() and KEY not in repr(settings)
    assert Settings(spill_key="").spill_key_bytes() == b""
    with pytest.raises(ValidationError, match="RAZOR_SPILL_KEY must be at least 16 characters"):
        Settings(spill_key="too-short")


def _leaves(obj, path=()):
    """Every (path, value) of a JSON value, containers included."""
    yield path, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _leaves(v, (*path, k))


def _replaced(obj, path, value):
    out = json.loads(json.dumps(obj))
    target = out
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    return out


BAD_VALUES = (None, "x", -1, 0, 1.5, True, [], {}, [1], 10**30, 10**400)


def test_any_value_anywhere_is_refused_cleanly_or_rebuilds(spilled, tiny_loaded):
    """Every field of a real header replaced by every kind of bad value: the checks raise only their own
    errors, and whatever they accept rebuilds into a session without an error."""
    from services.engine import SessionState

    parsed, chunks, shape = spilled
    tensors = codec.decode_body(parsed, chunks)
    refused = accepted = 0
    for path, _ in list(_leaves(parsed))[1:]:
        for value in BAD_VALUES:
            header = _replaced(parsed, path, value)
            try:
                checked = codec.read_header(resign(header), b"")
                spilled_header.check(checked, "s1", shape)
            except (codec.CodecError, HeaderInvalid):
                refused += 1
                continue
            accepted += 1
            SessionState.from_tensors(tensors, checked["meta"]["state"], "cpu")
    assert refused > 1000 and accepted < refused / 10, (refused, accepted)


# ---- lengths from an unverified header or local spill never size a read --------------------------
FORGED_COUNTS = {   # case -> (the key the forged header is signed with, None: left unsigned; a word of the reason)
    "left unsigned": (None, "MAC mismatch"),
    "re-signed with the key": (KEY.encode(), "total_bytes"),
}


@pytest.mark.parametrize("case", list(FORGED_COUNTS))
def test_forged_chunk_counts_are_refused_before_they_size_a_read(start_server, service_redis_url, monkeypatch, case):
    """A header naming 10**9 one-byte chunks: the restore asks Redis for a bounded batch (not one HMGET of
    millions of fields, gigabytes on the I/O thread), then the codec refuses the header as DATA_LOSS."""
    key, hint = FORGED_COUNTS[case]
    server = start_server(kv_budget_bytes=1, spill_key=KEY)
    r = redis.Redis.from_url(service_redis_url)
    client_of_spills, asked = server.runtime.store.spill.client, []
    hmget = client_of_spills.hmget

    def bounded_hmget(name, fields):
        asked.append(len(fields))
        if len(fields) > 10_000:   # refused here rather than allocated
            raise redis.ResponseError(f"HMGET of {len(fields)} fields")
        return hmget(name, fields)

    with RazorClient(server.target) as client:
        sid = spilled_session(client)
        r.hset(Spill.key(sid), "c1", b"x")   # a second chunk, so the read goes on past its first batch
        edit_header(r, sid, lambda h: h.update(n_chunks=10**9, total_bytes=10**9), key)
        monkeypatch.setattr(client_of_spills, "hmget", bounded_hmget)
        assert_lost(client, sid, hint)
    assert asked and max(asked) <= spill_module.READ_BATCH_FIELDS, asked


LOCAL_EDITS = {   # the sizes a local spill's first line names, edited
    "a header of a petabyte": lambda intro: intro.update(header_bytes=10**15),
    "a chunk of 2 GiB": lambda intro: intro["chunk_bytes"].__setitem__(0, 2**31),
    "a negative chunk": lambda intro: intro["chunk_bytes"].__setitem__(1, -1),
    "a size as text": lambda intro: intro.update(header_bytes=str(intro["header_bytes"])),
}


@pytest.mark.parametrize("case", list(LOCAL_EDITS))
def test_a_local_spill_naming_sizes_its_file_lacks_is_refused_before_reading(tmp_path, case):
    spills = LocalSpills(tmp_path)
    path = spills.save(LocalSpill("s1", "a", 1, "", 1.0, {"length": 3}, b"h" * 10, [b"x" * 5, b"y" * 3]))
    assert LocalSpills.load(path).chunks == [b"x" * 5, b"y" * 3]
    first, rest = path.read_bytes().split(b"\n", 1)
    intro = json.loads(first)
    LOCAL_EDITS[case](intro)
    path.write_bytes(json.dumps(intro).encode() + b"\n" + rest)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="truncated"):   # what upload_local_spills skips, never MemoryError
            LocalSpills.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak} bytes allocated for a 10-byte header"
