"""Pipelined spill reads against a real Redis: exact round trips, one round trip per batch of chunks (not
per chunk), bounded batches, and SpillUnavailable when Redis is down."""
from __future__ import annotations

import math

import pytest
import redis
import torch

from services.inference import codec, spill as spill_module
from services.inference.spill import Spill, SpillUnavailable
from tests.conftest import flushed_db, free_port

DB = 9  # this module's own Redis database


@pytest.fixture
def url(redis_url) -> str:
    return flushed_db(redis_url, DB)


def counting_spill(url: str) -> tuple[Spill, type]:
    """A Spill whose connections count what they send: one `send_packed_command` is one round trip (a
    single command, or a whole pipeline). The server is real; only the client's socket writes are counted."""

    class Counting(redis.Connection):
        sent = 0

        def send_packed_command(self, command, check_health=True):
            type(self).sent += 1
            return super().send_packed_command(command, check_health)

    spill = Spill(url, ttl_s=600)
    spill._redis.connection_pool.connection_class = Counting   # before its first connection
    assert spill.reachable()   # connects (the handshake is not counted below)
    Counting.sent = 0
    return spill, Counting


def blob(n_bytes: int = 300_000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"0.keys": torch.randn(1, 2, n_bytes // 64, 16, generator=g).to(torch.bfloat16),
            "0.comp_keys": torch.randn(1, 2, 1, 16, generator=g),
            "ids": torch.arange(1000, dtype=torch.int64)}


def assert_same(tensors: dict, expected: dict) -> None:
    assert tensors.keys() == expected.keys()
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name


def test_multi_chunk_round_trip_is_exact(url):
    tensors = blob()
    enc = codec.encode(tensors, {"session": "s"}, chunk_bytes=4096)
    assert len(enc.chunks) > 50
    spill = Spill(url, ttl_s=600)
    spill.write("s", enc)
    # The old two-call path and the one-call path give back the same bytes.
    assert spill.read_header("s") == enc.header
    assert spill.read_chunks("s", len(enc.chunks), chunk_bytes=4096) == enc.chunks
    for header, chunks in (spill.read("s"), spill.read("s", len(enc.chunks)), spill.read("s", chunk_bytes=4096)):
        assert header == enc.header and chunks == enc.chunks
        out, meta = codec.decode(header, chunks)
        assert meta == {"session": "s"}
        assert_same(out, tensors)
    assert spill.read("missing") == (None, [])
    assert spill.read_chunks("missing", 3) == [None, None, None]


def test_reading_n_chunks_takes_n_over_batch_round_trips(url, monkeypatch):
    chunk = 1024
    monkeypatch.setattr(spill_module, "READ_BATCH_BYTES", 8 * chunk)   # 8 chunks per round trip
    enc = codec.encode(blob(), {}, chunk_bytes=chunk)
    n = len(enc.chunks)
    assert n > 100
    spill, counter = counting_spill(url)
    spill.write("s", enc)
    assert counter.sent == 1, "a write is one MULTI/EXEC"

    counter.sent = 0
    assert spill.read_chunks("s", n, chunk_bytes=chunk) == enc.chunks
    assert counter.sent == math.ceil(n / 8)

    counter.sent = 0
    header, chunks = spill.read("s", chunk_bytes=chunk)   # the header rides with the first batch
    assert (header, chunks) == (enc.header, enc.chunks)
    assert counter.sent == math.ceil(n / 8)

    counter.sent = 0
    spill.read("s")   # no chunk size given: the first batch assumes 8 MiB chunks, the header corrects it
    assert counter.sent == 1 + math.ceil((n - 1) / 8)


def test_a_session_of_one_batch_is_one_round_trip(url):
    enc = codec.encode(blob(12 * 2**20), {})   # the codec's own 8 MiB chunks: 2 of them, one batch
    assert len(enc.chunks) == 2
    spill, counter = counting_spill(url)
    spill.write("s", enc)
    counter.sent = 0
    assert spill.read("s") == (enc.header, enc.chunks)
    assert counter.sent == 1
    counter.sent = 0
    assert spill.read_header("s") == enc.header and spill.read_chunks("s", len(enc.chunks)) == enc.chunks
    assert counter.sent == 2, "the two-call path: the header, then every chunk in one HMGET"


def test_batches_stay_within_the_byte_bound():
    # With the codec's 8 MiB chunks a round trip carries 2 of them (16 MiB), never more than the bound.
    step = Spill.batch_chunks(codec.DEFAULT_CHUNK_BYTES)
    assert step == 2 and step * codec.DEFAULT_CHUNK_BYTES <= spill_module.READ_BATCH_BYTES
    assert Spill.batch_chunks(spill_module.READ_BATCH_BYTES * 4) == 1   # a chunk bigger than the bound: one at a time
    assert Spill.batch_chunks(1024) == spill_module.READ_BATCH_BYTES // 1024


def test_incomplete_or_corrupt_spills_come_back_for_the_codec_to_refuse(url):
    enc = codec.encode(blob(), {}, chunk_bytes=4096)
    spill = Spill(url, ttl_s=600)
    spill.write("s", enc)
    client = redis.Redis.from_url(url)
    client.hdel(Spill.key("s"), "c3")
    header, chunks = spill.read("s", chunk_bytes=4096)
    assert header == enc.header and chunks[3] is None
    with pytest.raises(codec.CodecError):
        codec.decode(header, chunks)
    client.hset(Spill.key("s"), "header", b"not json")
    header, chunks = spill.read("s")
    assert header == b"not json"
    with pytest.raises(codec.CodecError):
        codec.decode(header, chunks)


def test_redis_down_raises_spill_unavailable_and_recovers(make_redis):
    enc = codec.encode(blob(20_000), {}, chunk_bytes=1024)
    dead = Spill(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60, timeout_s=0.5)
    for call in (lambda: dead.read("s"), lambda: dead.read_chunks("s", 4), lambda: dead.read_header("s"),
                 lambda: dead.write("s", enc)):
        with pytest.raises(SpillUnavailable, match="Redis"):
            call()

    server = make_redis().start()
    try:
        spill = Spill(server.url, ttl_s=60, timeout_s=0.5)
        spill.write("s", enc)
        server.stop()
        with pytest.raises(SpillUnavailable, match="read failed"):
            spill.read("s")
        with pytest.raises(SpillUnavailable, match="read failed"):
            spill.read_chunks("s", len(enc.chunks))
        server.start()   # same port, empty (no persistence): the client reconnects by itself
        assert spill.read("s") == (None, [])
        spill.write("s", enc)
        assert spill.read("s") == (enc.header, enc.chunks)
    finally:
        server.stop()
