"""ExportSession, ImportSession and ForkSession over real gRPC servers on loopback, real Redis, the tiny model.

An exported session imported into a second deployment on another Redis (with another RAZOR_SPILL_KEY) continues
with the same sampled tokens and log-probabilities as the original; a fork and its parent continue independently,
each like the engine replaying its own turns; damaged exports are DATA_LOSS, another model's or head map's
FAILED_PRECONDITION, and another tenant's session NOT_FOUND.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time

import grpc
import pytest
import torch

from services.api.razorserve.v1 import razorserve_pb2 as pb
from services.engine import Engine, HeadMap, SamplingParams, load_model
from services.inference import codec, servicer, session_moves, transfer
from services.inference.client import RazorClient

from replay import replay_logprobs

# Longer than the tiny head map's window (sink 4 + 16), so local heads have folded tokens by export time.
PROMPT = "The quick brown fox jumps over the lazy dog near the quiet river bank, again and again, " * 2
NEW_TOKENS = 4
DEVICE, REDIS = 1, 2   # SessionLocation
KEY_A, KEY_B = "alice-key-1", "bob-key-1"
API_KEYS = f"alice:{KEY_A},bob:{KEY_B}"
# Turns are sampled with a fixed seed, as tests/test_service.py's SAMPLED: the tiny random model's greedy tokens
# barely depend on its attention (it mostly repeats one token), so a damaged cache could still match greedily;
# sampled tokens and their log-probabilities follow any change in the logits.
SAMPLING = dict(temperature=1.0, seed=7)
LOGPROB_ATOL = 1e-4   # tests/test_engine_batching.py's: batched and alone agree this closely


@pytest.fixture
def other_redis_url(make_redis):
    """A second, empty Redis: the importing deployment shares nothing with the exporting one."""
    server = make_redis().start()
    yield server.url
    server.stop()


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def replay(loaded, head_map, turns: list[str]) -> list[tuple[list[int], list[float]]]:
    """The engine alone, sampling as `turn` does: (tokens, logprobs) of the first reply to PROMPT and of each
    following turn."""
    return replay_logprobs(loaded, head_map, PROMPT, turns,
                           SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=True, **SAMPLING))


def first_reply(client: RazorClient):
    return client.generate(prompt=PROMPT, max_new_tokens=NEW_TOKENS, logprobs=True, **SAMPLING)


def turn(client: RazorClient, sid: str, text: str):
    return client.continue_session(sid, text=text, max_new_tokens=NEW_TOKENS, logprobs=True, **SAMPLING)


def assert_same_turns(got, expected) -> None:
    """Replies (`got`) against (tokens, logprobs) pairs or other replies: the same sampled tokens, each as likely."""
    expected = [e if isinstance(e, tuple) else (e.token_ids, e.logprobs) for e in expected]
    assert [r.token_ids for r in got] == [tokens for tokens, _ in expected]
    for reply, (_, logprobs) in zip(got, expected):
        assert len(reply.logprobs) == len(logprobs) == NEW_TOKENS
        torch.testing.assert_close(torch.tensor(reply.logprobs), torch.tensor(logprobs, dtype=torch.float32),
                                   atol=LOGPROB_ATOL, rtol=0)


def same_tensors(a, b) -> bool:
    """Two session states hold the same tokens, metadata and cache tensors, bit for bit."""
    (ta, ma), (tb, mb) = a.to_tensors(), b.to_tensors()
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ---- export -> import -> continue -----------------------------------------------------------------
def test_an_import_on_another_redis_continues_exactly_as_the_original(start_server, other_redis_url):
    source = start_server(spill_key="exporting-deployment-key")
    # Another Redis, another spill key, a budget of one byte: the imported session is spilled (fenced) at once
    # and restored for its next turn.
    target = start_server(redis_url=other_redis_url, spill_key="importing-deployment-key", kv_budget_bytes=1)
    with RazorClient(source.target) as a, RazorClient(target.target) as b:
        sid = first_reply(a).session_id
        turn(a, sid, " A first turn.")
        original = a.get_session(sid)
        blob = a.export_session(sid)
        imported = b.import_session(blob)
        new_sid = imported.session.session_id
        assert imported.source_session_id == sid and new_sid != sid
        assert imported.session.length == original.length
        assert imported.session.head_map_version == original.head_map_version
        wait_until(lambda: b.get_session(new_sid).location == REDIS)
        for text in (" What happened next?", " And then?"):
            there, here = turn(b, new_sid, text), turn(a, sid, text)
            assert_same_turns([there], [here])                 # sampled: any change to the cache shows
            assert there.cached_tokens == here.cached_tokens   # no re-prefill on either side
        assert a.export_session(sid) != blob, "the original moved on; the export was a copy"


def test_an_export_streams_in_bounded_messages_whose_bytes_import(start_server):
    server = start_server(kv_budget_bytes=1)   # exported while spilled: restored as a turn would restore it
    with RazorClient(server.target) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=NEW_TOKENS).session_id
        wait_until(lambda: client.get_session(sid).location == REDIS)
        messages = list(client.stub.ExportSession(pb.ExportSessionRequest(session_id=sid)))
        assert messages[0].total_bytes == sum(len(m.chunk) for m in messages)
        assert all(0 < len(m.chunk) <= transfer.MESSAGE_BYTES for m in messages)
        pieces = [m.chunk[i:i + 100] for m in messages for i in range(0, len(m.chunk), 100)]
        new_sid = client.import_session(pieces).session.session_id   # any cut of the bytes imports
        assert_same_turns([turn(client, new_sid, " more")], [turn(client, sid, " more")])



def test_messages_recut_an_export_into_full_pieces_of_at_most_the_size():
    parts = [b"ab", b"", b"cdefg", b"h" * 10]
    for size in (1, 3, 7, 17, 100):
        pieces = list(transfer.messages(parts, size))
        assert b"".join(pieces) == b"".join(parts)
        assert all(len(p) == size for p in pieces[:-1]) and 0 < len(pieces[-1]) <= size


# ---- fork -------------------------------------------------------------------------------------------
def test_a_fork_and_its_parent_continue_independently(start_server, tiny_loaded, tiny_head_map):
    server = start_server(kv_budget_bytes=1)   # both spill after every turn: each restores its own copy
    with RazorClient(server.target) as client:
        parent = first_reply(client)
        sid = parent.session_id
        fork = client.fork_session(sid)
        assert fork.session_id != sid and fork.length == client.get_session(sid).length
        parent_turns = [turn(client, sid, " The fox ran."), turn(client, sid, " Then?")]
        fork_turns = [turn(client, fork.session_id, " The dog slept."), turn(client, fork.session_id, " Then?")]
        assert fork_turns[0].cached_tokens == parent_turns[0].cached_tokens > 0   # reused, not re-prefilled
    parent_control = replay(tiny_loaded, tiny_head_map, [" The fox ran.", " Then?"])
    fork_control = replay(tiny_loaded, tiny_head_map, [" The dog slept.", " Then?"])
    assert parent_control[2] != fork_control[2], "the two conversations' last turns must tell them apart"
    assert_same_turns([parent, *parent_turns], parent_control)
    assert_same_turns([parent, *fork_turns], fork_control)


def test_a_session_busy_with_a_turn_is_neither_exported_nor_forked(start_server):
    server = start_server()
    with RazorClient(server.target) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=NEW_TOKENS).session_id
        stream = client.stream_continue(sid, text=" A long turn.", max_new_tokens=2000)
        next(iter(stream))   # the turn is running
        for call in (lambda: client.export_session(sid), lambda: client.fork_session(sid)):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "busy" in error.details()
        stream.cancel()
        wait_until(lambda: not client.get_session(sid).busy)
        assert client.fork_session(sid).length == client.get_session(sid).length


# ---- tenants ------------------------------------------------------------------------------------------
def test_tenants_export_fork_and_import_only_their_own(start_server):
    server = start_server(api_keys=API_KEYS)
    with RazorClient(server.target, token=KEY_A) as alice, RazorClient(server.target, token=KEY_B) as bob:
        sid = alice.generate(prompt=PROMPT, max_new_tokens=NEW_TOKENS).session_id
        unknown = "0123456789abcdef0123456789abcdef"
        for call in (lambda s: bob.export_session(s), lambda s: bob.fork_session(s)):
            theirs, none = rpc_error(lambda: call(sid)), rpc_error(lambda: call(unknown))
            assert theirs.code() == none.code() == grpc.StatusCode.NOT_FOUND
            assert theirs.details().replace(sid, "<id>") == none.details().replace(unknown, "<id>")
        # Alice's export imported by Bob is a new session of Bob's, which Alice cannot see.
        bobs = bob.import_session(alice.export_session(sid)).session.session_id
        assert {s.session_id for s in bob.list_sessions()} == {bobs}
        assert rpc_error(lambda: alice.get_session(bobs)).code() == grpc.StatusCode.NOT_FOUND
        assert_same_turns([turn(bob, bobs, " more")], [turn(alice, sid, " more")])


# ---- damaged exports --------------------------------------------------------------------------------
def split(blob: bytes) -> tuple[bytes, bytes]:
    """(codec header, tensor blob) of a framed export."""
    _, header_len = struct.unpack_from("<HI", blob, len(transfer.MAGIC))
    start = len(transfer.MAGIC) + 6
    return blob[start:start + header_len], blob[start + header_len:-32]


def reframed(header: bytes, body: bytes, version: int = transfer.FRAME_VERSION) -> bytes:
    """An export framed again around ``header`` and ``body`` (as the format is documented), its SHA-256 matching."""
    framed = transfer.MAGIC + struct.pack("<HI", version, len(header)) + header + body
    return framed + hashlib.sha256(framed).digest()


def resigned(blob: bytes, edit) -> bytes:
    """The export with its header meta edited by ``edit(meta)`` and every digest made to match again."""
    header, body = split(blob)
    parsed = codec.read_header(header)
    tensors = codec.decode_body(parsed, [body])
    meta = json.loads(json.dumps(parsed["meta"]))
    edit(meta)
    encoded = codec.encode(tensors, meta)
    return reframed(encoded.header, b"".join(encoded.chunks))


def test_damaged_exports_are_data_loss_and_leave_nothing_behind(start_server):
    server = start_server()
    with RazorClient(server.target) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=NEW_TOKENS).session_id
        blob = client.export_session(sid)
        header, body = split(blob)
        body_at = len(blob) - 32 - len(body)
        flipped = {name: bytearray(blob) for name in ("magic", "version", "header", "body", "trailer")}
        for name, at in (("magic", 3), ("version", len(transfer.MAGIC)), ("header", body_at - len(header) // 2),
                         ("body", body_at + len(body) // 2), ("trailer", len(blob) - 1)):
            flipped[name][at] ^= 0x01
        edited_header = header.replace(b'"chat":false', b'"chat":true', 1)
        assert edited_header != header
        cases = {**{f"flipped {name}": bytes(b) for name, b in flipped.items()},
                 "truncated": blob[:len(blob) // 2], "one byte short": blob[:-1], "padded": blob + b"\0",
                 "empty": b"",
                 "header edited, frame re-summed": reframed(edited_header, body),
                 "token count edited, all re-signed": resigned(blob, lambda m: m.update(token_count=1)),
                 "token id out of vocabulary": resigned(blob, lambda m: m["state"]["token_ids"].__setitem__(0, 10**9))}
        for name, damaged in cases.items():
            error = rpc_error(lambda: client.import_session(damaged))
            assert error.code() == grpc.StatusCode.DATA_LOSS, (name, error.code(), error.details())
        # A truncated stream: the client sends half and closes its side.
        half = [blob[:len(blob) // 2]]
        error = rpc_error(lambda: client.import_session(half, size_bytes=len(blob)))
        assert error.code() == grpc.StatusCode.DATA_LOSS and "export it again" in error.details()
        assert {s.session_id for s in client.list_sessions()} == {sid}, "no refused import left a session"
        assert client.import_session(blob).source_session_id == sid, "the intact export still imports"


def test_exports_of_another_model_map_or_version_are_failed_precondition(start_server, other_redis_url,
                                                                          tiny_loaded):
    other = load_model("tiny-random:1", device="cpu")
    foreign = start_server(loaded=other, head_map=HeadMap.full(other.fingerprint), redis_url=other_redis_url)
    server = start_server()
    unknown_map = start_server(head_map=HeadMap.full(tiny_loaded.fingerprint))
    with RazorClient(foreign.target) as f, RazorClient(server.target) as client, \
            RazorClient(unknown_map.target) as u:
        foreign_blob = f.export_session(f.generate(prompt=PROMPT, max_new_tokens=2).session_id)
        blob = client.export_session(client.generate(prompt=PROMPT, max_new_tokens=2).session_id)
        header, body = split(blob)
        cases = [(client, foreign_blob, "another model"),
                 (u, blob, "head map"),
                 (client, resigned(blob, lambda m: m.update(dtype="bfloat16")), "RAZOR_DTYPE=bfloat16"),
                 (client, reframed(header, body, version=2), "format version 2")]
        for target, export, hint in cases:
            error = rpc_error(lambda: target.import_session(export))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and hint in error.details(), error.details()


# ---- limits and protocol ------------------------------------------------------------------------------
def test_imports_over_the_limit_and_malformed_streams_are_refused(start_server):
    server = start_server(max_import_bytes=1000)
    with RazorClient(server.target) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=2).session_id
        blob = client.export_session(sid)
        assert len(blob) > 1000
        for export in (blob, [blob[:600], blob[600:]]):   # declared up front, or found while streaming
            error = rpc_error(lambda: client.import_session(export))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "RAZOR_MAX_IMPORT_BYTES" in error.details()
        chunk_first = iter([pb.ImportSessionRequest(chunk=blob[:10])])
        options_twice = iter([pb.ImportSessionRequest(options=pb.ImportOptions())] * 2)
        for requests in (chunk_first, options_twice, iter([])):
            error = rpc_error(lambda: client.stub.ImportSession(requests))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        for call in (lambda: client.export_session(""), lambda: client.fork_session("")):
            assert rpc_error(call).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_import_the_client_cancels_midway_imports_nothing_and_is_no_incident(start_server, monkeypatch,
                                                                                 caplog):
    """Once the client cancels, grpc's request iterator raises a bare RpcError (or ends early): the client's
    doing (CANCELLED, or the declared size not reached), with nothing imported, never an internal incident."""
    mapped = []
    status_for = servicer.status_for
    monkeypatch.setattr(servicer, "status_for", lambda exc: mapped.append((exc, status_for(exc))) or mapped[-1][1])
    server = start_server()
    with RazorClient(server.target) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=2).session_id
        blob, sent = client.export_session(sid), threading.Event()

        def requests():
            yield pb.ImportSessionRequest(options=pb.ImportOptions(size_bytes=len(blob)))
            yield pb.ImportSessionRequest(chunk=blob[:100])
            sent.set()
            time.sleep(5)   # the rest never comes: the call is cancelled first

        call = client.stub.ImportSession.future(requests())
        assert sent.wait(10)
        time.sleep(0.3)   # the server reads the first chunk and waits for the next
        call.cancel()
        wait_until(lambda: mapped, timeout_s=10)
        (exc, (code, _)), = mapped
        # grpc either raises in the request iterator or just ends it (then the declared size is not reached)
        assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DATA_LOSS), mapped
        assert "nothing was imported" in str(exc) and ("cancelled" in str(exc) or "declared" in str(exc)), mapped
        # servicer.py logs an internal incident as ERROR "internal error ..." (the word "incident" is only in the
        # gRPC details, never in the log): none may come from this cancellation.
        assert not [r for r in caplog.records if r.name == servicer.log.name and r.levelno >= logging.ERROR], \
            caplog.text
        assert "internal error" not in caplog.text
        assert [s.session_id for s in client.list_sessions()] == [sid]


def test_the_cli_exports_imports_and_forks(start_server, tmp_path, capsys):
    from services.inference import cli

    server = start_server()
    with RazorClient(server.target) as client:
        sid = client.generate(prompt=PROMPT, max_new_tokens=2).session_id
    path = tmp_path / "session.razor"
    assert cli.main(["--target", server.target, "export", sid, str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == path.stat().st_size
    assert cli.main(["--target", server.target, "import", str(path)]) == 0
    imported = json.loads(capsys.readouterr().out)
    assert imported["sourceSessionId"] == sid and imported["session"]["sessionId"] != sid
    assert cli.main(["--target", server.target, "fork", sid]) == 0
    assert json.loads(capsys.readouterr().out)["sessionId"] not in (sid, imported["session"]["sessionId"])
    path.write_bytes(path.read_bytes()[:-1])
    assert cli.main(["--target", server.target, "import", str(path)]) == 1
    assert "DATA_LOSS" in capsys.readouterr().err


# ---- the store: a session held for an export or a fork may be spilled meanwhile ------------------------
def test_a_restored_session_spilled_while_held_restores_again(service_redis_url, tiny_loaded, tiny_head_map):
    """Taken over (generation 2), restored for a fork and spilled by an LRU pass before release: its spill still
    holds generation 1's state, unchanged, and restores again (not reported lost)."""
    from services.inference.sessions import SessionStore
    from services.inference.spill import Spill

    engine = Engine(tiny_loaded, tiny_head_map)
    state, _ = engine.generate(engine.encode(text=PROMPT), SamplingParams(max_new_tokens=NEW_TOKENS))
    # generation 1's state generated again, apart from the object the store adopts (no aliasing)
    original, _ = engine.generate(engine.encode(text=PROMPT), SamplingParams(max_new_tokens=NEW_TOKENS))
    store = SessionStore(Spill(service_redis_url, ttl_s=60), tiny_loaded.fingerprint.id, "cpu", budget_bytes=0)
    sid = session_moves.adopt_state(store, state, tenant="")   # then spilled idle (budget 0), its lease given back
    assert store.info(sid).location == "redis" and not store.owned()
    store.acquire(sid)                                   # taken over at generation 2
    first = store.load(sid, lambda n: None)              # restored: Redis holds exactly this state
    assert same_tensors(first, original)
    store.settle()                                       # an LRU pass spills it while still held: nothing to write
    assert store.resident_state(sid) is None
    restored = store.load(sid, lambda n: None)
    assert restored is not first and same_tensors(restored, original), "the spill still holds generation 1's state"
    store.release(sid)
    assert session_moves.fork(store, sid, tenant="") != sid
