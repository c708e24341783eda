"""Issue 13, item 5 end to end: an active head-map pointer in Redis that cannot be loaded never turns
compression off. A real gRPC server on loopback, a real Redis and the service's own start-up path
(`build_server` -> `resolve_head_maps`), restarted after the pointer went bad.
"""
from __future__ import annotations

import logging

import grpc
import pytest
import redis

from conftest import announce_raw, flushed_db, free_port
from services.headmap_store import HeadMapStore, map_key
from services.inference.client import RazorClient
from services.inference.runtime import FixedHeadMaps
from services.inference.server import build_server
from services.settings import Settings
from test_service import rpc_error

LONG_PROMPT = " ".join(["fox"] * 22)   # longer than the tiny map's local window (sink 4 + 16)
BAD = "corrupt0json0000"


@pytest.fixture
def url(redis_url) -> str:
    return flushed_db(redis_url, 10)


@pytest.fixture
def store(url) -> HeadMapStore:
    return HeadMapStore(redis.Redis.from_url(url))


def _start(url: str, loaded, store, **overrides):
    settings = Settings(**{**dict(host="127.0.0.1", port=0, redis_url=url, grace_s=2.0, auth_token="",
                                  tls_cert="", tls_key="", metrics_port=0), **overrides})
    return build_server(settings, loaded=loaded, jobs=None, head_map_store=store).start()


def _compressed_session(client: RazorClient):
    session = client.get_session(client.generate(prompt=LONG_PROMPT, max_new_tokens=4).session_id)
    assert 0 < session.kv_bytes < session.kv_bytes_full, "the session's cache is not compressed"
    return session


def test_restart_with_a_bad_active_pointer_still_compresses_and_says_so(url, store, tiny_loaded, tiny_head_map,
                                                                        caplog):
    fp = tiny_loaded.fingerprint
    store.publish(tiny_head_map)
    store.activate(fp, tiny_head_map.version)
    first = _start(url, tiny_loaded, store)
    try:
        with RazorClient(first.target) as client:
            assert client.server_info().head_map.version == tiny_head_map.version
            before = _compressed_session(client)
    finally:
        first.stop()   # spills the session

    store.client.set(map_key(fp.id, BAD), "{not json")   # what a faulty publisher could leave ...
    announce_raw(store.client, fp.id, BAD)                 # ... and name active while no service listens
    with caplog.at_level(logging.ERROR, logger="services.inference.headmaps"):
        second = _start(url, tiny_loaded, store)
    try:
        with RazorClient(second.target) as client:
            info = client.server_info().head_map
            assert info.version == tiny_head_map.version and info.kv_fraction < 1.0
            after = _compressed_session(client)
            assert after.head_map_version == tiny_head_map.version
            assert after.kv_bytes == before.kv_bytes   # the same prompt, compressed the same way
            restored = client.continue_session(before.session_id, text=" and then", max_new_tokens=2)
            assert client.get_session(restored.session_id).head_map_version == tiny_head_map.version
            listed = {v.version: v for v in client.list_head_maps()}
    finally:
        second.stop()
    assert listed[BAD].refused and not listed[BAD].active and "not valid JSON" in listed[BAD].refused_reason
    assert not any(v.active for v in listed.values()), "the refused pointer's version is not reported active"
    logged = [r.getMessage() for r in caplog.records if BAD in r.getMessage()]
    assert logged and "not valid JSON" in logged[0] and tiny_head_map.version in logged[0], logged


def test_bad_pointer_and_nothing_valid_in_redis_uses_the_configured_map(url, store, tiny_loaded, tiny_head_map,
                                                                        tmp_path):
    path = tmp_path / "map.json"
    path.write_text(tiny_head_map.to_json())
    announce_raw(store.client, tiny_loaded.fingerprint.id, BAD)   # named, never stored
    server = _start(url, tiny_loaded, store, head_map_path=str(path))
    try:
        with RazorClient(server.target) as client:
            assert client.server_info().head_map.version == tiny_head_map.version
            _compressed_session(client)
            listed = {v.version: v for v in client.list_head_maps()}
    finally:
        server.stop()
    assert listed[BAD].refused and "no head map version" in listed[BAD].refused_reason


def test_list_head_maps_with_redis_down_is_unavailable(service_redis_url, tiny_loaded, tiny_head_map):
    dead = HeadMapStore(redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5))
    settings = Settings(host="127.0.0.1", port=0, redis_url=service_redis_url, grace_s=2.0, auth_token="",
                        tls_cert="", tls_key="", metrics_port=0)
    server = build_server(settings, loaded=tiny_loaded, head_maps=FixedHeadMaps(tiny_head_map), jobs=None,
                          head_map_store=dead).start()
    try:
        with RazorClient(server.target) as client:
            error = rpc_error(lambda: client.list_head_maps())
    finally:
        server.stop(0)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "cannot reach Redis" in error.details()
