"""Session lifetime and load over a real server: per-session TTL (resident and spilled copies alike), pinning,
UpdateSession, GetLoad. Tiny random-weight model, real Redis."""
from __future__ import annotations

import time

import grpc
import pytest
import redis

from services.api.razorserve.v1 import razorserve_pb2 as pb
from services.inference.client import RazorClient, collect
from services.inference.spill import meta_key, spill_key

DEVICE, REDIS = pb.SESSION_LOCATION_DEVICE, pb.SESSION_LOCATION_REDIS


def generate(client: RazorClient, prompt: str, **options) -> str:
    request = pb.GenerateRequest(prompt=prompt, max_new_tokens=2, **options)
    return collect(client._call(client.stub.Generate, request)).session_id


def wait_until(predicate, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def gone(client: RazorClient, sid: str) -> bool:
    try:
        client.get_session(sid)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        return True
    return False


def test_a_session_past_its_ttl_is_gone_from_device_and_redis(start_server, service_redis_url):
    server = start_server(lease_ttl_s=0.6)   # the lease keeper (every 0.2 s) sweeps expired resident sessions
    r = redis.Redis.from_url(service_redis_url)
    with RazorClient(server.target) as client:
        short, long = generate(client, "Short-lived", session_ttl_s=1), generate(client, "Long-lived")
        session = client.get_session(short)
        assert session.ttl_s == 1 and session.location == DEVICE
        assert session.expires_at.ToSeconds() == pytest.approx(session.last_used_at.ToSeconds() + 1, abs=1)
        wait_until(lambda: gone(client, short))
        assert not r.exists(meta_key(short)) and not r.exists(spill_key(short))
        assert client.get_session(long).location == DEVICE and client.get_session(long).ttl_s == 7 * 86400


def test_a_pinned_session_still_expires_after_its_ttl(start_server, service_redis_url):
    server = start_server(lease_ttl_s=0.6)
    r = redis.Redis.from_url(service_redis_url)
    with RazorClient(server.target) as client:
        sid = generate(client, "Pinned but short-lived", session_ttl_s=1, pin_session=True)
        assert client.get_session(sid).pinned
        wait_until(lambda: gone(client, sid))
        assert not r.exists(meta_key(sid)) and sid not in {e.session_id for e in server.runtime.store.owned()}


def test_a_spilled_session_expires_in_redis_with_its_own_ttl(start_server, service_redis_url):
    server = start_server(kv_budget_bytes=1)   # everything spills after its turn
    r = redis.Redis.from_url(service_redis_url)
    with RazorClient(server.target) as client:
        sid = generate(client, "Spilled and short-lived", session_ttl_s=2)
        wait_until(lambda: client.get_session(sid).location == REDIS)
        assert 0 < r.ttl(spill_key(sid)) <= 2 and 0 < r.ttl(meta_key(sid)) <= 2
        wait_until(lambda: gone(client, sid))
        assert not r.exists(spill_key(sid))


def test_update_session_changes_ttl_and_validates_it(start_server):
    server = start_server()
    with RazorClient(server.target) as client:
        sid = generate(client, "A conversation to keep a while")
        assert client.update_session(sid, ttl_s=60).ttl_s == 60
        assert client.get_session(sid).ttl_s == 60
        for bad in (0, 10**9):
            with pytest.raises(grpc.RpcError) as info:
                client.update_session(sid, ttl_s=bad)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ttl" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            generate(client, "x", session_ttl_s=10**9)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_pinned_session_is_never_spilled_and_pins_are_bounded(start_server, tiny_loaded):
    fp = tiny_loaded.fingerprint
    per_token = 2 * fp.n_layers * fp.n_kv_heads * fp.head_dim * 4
    server = start_server(kv_budget_bytes=per_token * 100, max_pinned_sessions=1)   # room for about two sessions
    with RazorClient(server.target) as client:
        pinned = generate(client, "Pinned: keep me on the device", pin_session=True)
        others = [generate(client, f"Unpinned conversation number {i}") for i in range(3)]
        wait_until(lambda: client.get_session(others[0]).location == REDIS)
        assert client.get_session(pinned).location == DEVICE and client.get_session(pinned).pinned
        with pytest.raises(grpc.RpcError) as info:
            client.update_session(others[-1], pinned=True)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "RAZOR_MAX_PINNED" in info.value.details()
        assert not client.update_session(pinned, pinned=False).pinned
        for i in range(3):   # the unpin touched it last: a few newer sessions push it out
            generate(client, f"One more unpinned conversation, number {i}")
        wait_until(lambda: client.get_session(pinned).location == REDIS)   # unpinned: spills like any other


def test_a_turn_that_cannot_fit_beside_pinned_sessions_is_refused_not_left_waiting(start_server, tiny_loaded):
    fp = tiny_loaded.fingerprint
    per_token = 2 * fp.n_layers * fp.n_kv_heads * fp.head_dim * 4
    server = start_server(kv_budget_bytes=per_token * 40)   # room for about one session
    with RazorClient(server.target, timeout_s=60) as client:
        generate(client, "Pinned: keep me on the device", pin_session=True)
        with pytest.raises(grpc.RpcError) as info:
            generate(client, "A second conversation that needs the room the pinned one holds")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in info.value.details()


def test_get_load_matches_sessions_and_running_streams(start_server):
    server = start_server(kv_budget_bytes=10**9)
    with RazorClient(server.target) as client:
        ids = [generate(client, f"Load report conversation {i}") for i in range(3)]
        stream = client.stream_generate(prompt="A long stream that keeps running", max_new_tokens=400,
                                        keep_session=False)
        next(stream)
        load = client.get_load()
        assert load.running_turns == 1 and load.queued_turns == 0
        assert load.resident_sessions == len(list(client.list_sessions())) == len(ids)
        assert load.kv_bytes_used >= sum(client.get_session(s).kv_bytes_allocated for s in ids)
        assert load.kv_budget_bytes == 10**9 and load.replica_id
        assert load.generated_tokens_per_second > 0
        stream.cancel()
        wait_until(lambda: client.get_load().running_turns == 0)


def test_a_session_past_its_ttl_is_expired_on_its_own_replica_before_the_sweep_reaches_it(
        start_server, service_redis_url, caplog):
    """Its metadata expired in Redis with the TTL, so every other replica already answers NOT_FOUND; the replica
    holding it did too only after its lease keeper's next sweep (here 20 s away). Before that, a turn ran on the
    expired copy and registered it in Redis again ("... registering it again")."""
    server = start_server(lease_ttl_s=60.0)
    r = redis.Redis.from_url(service_redis_url)
    with RazorClient(server.target) as client:
        sid = generate(client, "Short-lived", session_ttl_s=1)
        time.sleep(1.3)
        with pytest.raises(grpc.RpcError) as info:
            client.continue_session(sid, text=" and then?", max_new_tokens=2)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "expired" in info.value.details()
        assert gone(client, sid) and not r.exists(meta_key(sid))
        assert sid not in {e.session_id for e in server.runtime.store.owned()}
    assert "registering it again" not in caplog.text
