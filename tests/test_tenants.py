"""Tenants end to end: a real server on loopback with two tenants' API keys, real Redis, tiny random-weight model.

A session belongs to the tenant whose key created it. Another tenant gets exactly what an unknown id gets
(NOT_FOUND, the same message) from every RPC, while resident, spilled, lost and after a restart, and its attempts
leave the owner's session untouched. Also: the settings that configure keys, and the loopback-only rule.
"""
from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
import redis

from services.inference import codec
from services.inference.auth import InsecureBind
from services.inference.client import RazorClient
from services.inference.server import build_server
from services.inference.spill import Spill
from services.settings import Settings
from tests.conftest import REPO_ROOT
from tests.test_service import PROMPT, rpc_error, wait_until

KEY_A, KEY_B, KEY_A2 = "alice-key-1", "bob-key-1", "alice-key-2"
API_KEYS = f"alice:{KEY_A},bob:{KEY_B},alice:{KEY_A2}"
UNKNOWN = "0123456789abcdef0123456789abcdef"
REDIS, LOST = 2, 3   # SessionLocation


def _clients(server):
    return RazorClient(server.target, token=KEY_A), RazorClient(server.target, token=KEY_B)


def _denials(client: RazorClient, sid: str) -> dict[str, tuple[str, str]]:
    """(status, message with the id masked) of every per-session RPC on ``sid``."""
    calls = {"GetSession": lambda: client.get_session(sid),
             "ContinueSession": lambda: client.stream_continue(sid, text=" more", max_new_tokens=2),
             "DeleteSession": lambda: client.delete_session(sid),
             "UpdateSession": lambda: client.update_session(sid, ttl_s=60, pinned=True)}
    out = {}
    for name, call in calls.items():
        error = rpc_error(call)
        out[name] = (error.code().name, error.details().replace(sid, "<id>"))
    return out


def assert_hidden(client: RazorClient, sid: str) -> None:
    """``client`` learns nothing about ``sid``: every RPC answers as for an id that never existed."""
    denied = _denials(client, sid)
    assert denied == _denials(client, UNKNOWN)
    assert {code for code, _ in denied.values()} == {"NOT_FOUND"}
    assert sid not in [s.session_id for s in client.list_sessions()]


def _ids(client: RazorClient) -> set[str]:
    return {s.session_id for s in client.list_sessions()}


def test_other_tenants_see_nothing_of_a_resident_session(start_server):
    server = start_server(api_keys=API_KEYS)
    alice, bob = _clients(server)
    with alice, bob:
        sid = alice.generate(prompt=PROMPT, max_new_tokens=3).session_id
        mine = bob.generate(prompt="Bob's own conversation", max_new_tokens=2).session_id
        assert_hidden(bob, sid)
        assert _ids(alice) == {sid} and _ids(bob) == {mine}
        with RazorClient(server.target, token=KEY_A2) as rotated:   # a tenant's second key: the same tenant
            assert _ids(rotated) == {sid}
        session = alice.get_session(sid)
        assert not session.busy and session.length > 3, "bob's attempts left alice's session untouched"
        assert alice.continue_session(sid, text=" more", max_new_tokens=2).generated_tokens == 2
        assert_hidden(alice, mine)
        assert alice.delete_session(sid) and _ids(alice) == set() and _ids(bob) == {mine}


def test_spilled_session_keeps_its_tenant_in_redis(start_server, service_redis_url):
    server = start_server(api_keys=API_KEYS, kv_budget_bytes=1)   # every idle session spills
    r = redis.Redis.from_url(service_redis_url)
    alice, bob = _clients(server)
    with alice, bob:
        sid = alice.generate(prompt=PROMPT, max_new_tokens=3).session_id
        wait_until(lambda: alice.get_session(sid).location == REDIS)
        assert codec.read_header(r.hget(Spill.key(sid), "header"))["meta"]["tenant"] == "alice"
        assert_hidden(bob, sid)
        assert alice.get_session(sid).location == REDIS, "bob's continue did not restore it"
        assert r.exists(Spill.key(sid)), "bob's delete did not touch the Redis copy"
        assert alice.continue_session(sid, text=" more", max_new_tokens=2).generated_tokens == 2


def test_tenants_survive_a_restart_on_the_same_redis(start_server):
    first = start_server(api_keys=API_KEYS)
    alice, bob = _clients(first)
    with alice, bob:
        sid = alice.generate(prompt=PROMPT, max_new_tokens=3).session_id
        mine = bob.generate(prompt="Bob's own conversation", max_new_tokens=2).session_id
    first.stop(1.0)   # graceful: both sessions spill to Redis
    second = start_server(api_keys=API_KEYS)
    alice, bob = _clients(second)
    with alice, bob:
        assert _ids(alice) == {sid} and _ids(bob) == {mine}
        assert_hidden(bob, sid)
        assert alice.continue_session(sid, text=" more", max_new_tokens=2).generated_tokens == 2


def test_a_session_found_only_in_redis_is_checked_on_adoption(start_server):
    """A session another replica spilled (not indexed at this one's start) is adopted for its own tenant only."""
    second = start_server(api_keys=API_KEYS)   # started first: its start-up scan sees an empty Redis
    first = start_server(api_keys=API_KEYS)
    with RazorClient(first.target, token=KEY_A) as alice:
        sid = alice.generate(prompt=PROMPT, max_new_tokens=3).session_id
    first.stop(1.0)
    alice, bob = _clients(second)
    with alice, bob:
        assert_hidden(bob, sid)
        assert alice.get_session(sid).location == REDIS
        assert alice.continue_session(sid, text=" more", max_new_tokens=2).generated_tokens == 2


def test_another_models_session_is_refused_to_its_owner_only(start_server):
    from services.engine import HeadMap, load_model

    other = load_model("tiny-random:1", device="cpu")
    first = start_server(api_keys=API_KEYS, loaded=other, head_map=HeadMap.full(other.fingerprint))
    with RazorClient(first.target, token=KEY_A) as alice:
        sid = alice.generate(prompt=PROMPT, max_new_tokens=2).session_id
    first.stop(1.0)
    second = start_server(api_keys=API_KEYS)
    alice, bob = _clients(second)
    with alice, bob:
        assert_hidden(bob, sid)   # not FAILED_PRECONDITION "another model": that would say it exists
        error = rpc_error(lambda: alice.stream_continue(sid, text=" more", max_new_tokens=2))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "another model" in error.details()
        assert alice.get_session(sid).location == REDIS   # not lost: still the other model's to continue
        assert_hidden(bob, sid)


def test_a_lost_session_is_reported_to_its_owner_only(start_server, service_redis_url):
    server = start_server(api_keys=API_KEYS, kv_budget_bytes=1)
    r = redis.Redis.from_url(service_redis_url)
    alice, bob = _clients(server)
    with alice, bob:
        sid = alice.generate(prompt=PROMPT, max_new_tokens=3).session_id
        wait_until(lambda: alice.get_session(sid).location == REDIS)
        chunk = bytearray(r.hget(Spill.key(sid), "c0"))
        chunk[100] ^= 0xFF
        r.hset(Spill.key(sid), "c0", bytes(chunk))
        assert_hidden(bob, sid)   # bob's continue must not be what discovers (and reports) the damage
        error = rpc_error(lambda: alice.stream_continue(sid, text=" more", max_new_tokens=2))
        assert error.code() == grpc.StatusCode.DATA_LOSS
        assert alice.get_session(sid).location == LOST
        assert_hidden(bob, sid)


def test_legacy_token_is_tenant_default(start_server):
    server = start_server(api_keys=API_KEYS, auth_token="legacy-token")
    with RazorClient(server.target, token="legacy-token") as legacy, RazorClient(server.target, token=KEY_A) as alice:
        sid = legacy.generate(prompt=PROMPT, max_new_tokens=2).session_id
        assert _ids(legacy) == {sid}
        assert_hidden(alice, sid)


def test_bad_or_missing_key_is_unauthenticated(start_server):
    server = start_server(api_keys=API_KEYS)
    for token in ("not-a-key", ""):
        with RazorClient(server.target, token=token) as client:
            error = rpc_error(lambda: list(client.list_sessions()))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "RAZOR_API_KEYS" in error.details()
            error = rpc_error(lambda: client.stream_generate(prompt="hi", max_new_tokens=1))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_without_keys_everyone_shares_one_space(start_server):
    server = start_server()
    with RazorClient(server.target) as one, RazorClient(server.target, token="ignored") as other:
        sid = one.generate(prompt=PROMPT, max_new_tokens=2).session_id
        assert _ids(other) == {sid} and other.get_session(sid).session_id == sid


# ---- settings -------------------------------------------------------------------------------------
def test_api_keys_from_settings_and_file(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# tenants of the staging cluster\n\ncarol: carol-key \n  # rotated 2024\ndave:d:with:colons\n")
    settings = Settings(auth_token="t0", api_keys=" alice:a1 , bob:b1,", api_keys_file=str(keys_file))
    assert settings.api_key_tenants() == {"t0": "default", "a1": "alice", "b1": "bob", "carol-key": "carol",
                                          "d:with:colons": "dave"}
    assert Settings(auth_token="", api_keys="").api_key_tenants() == {}


@pytest.mark.parametrize("fields, message", [
    (dict(api_keys="alice:secret-1,:secret-2"), "RAZOR_API_KEYS entry 2 has an empty tenant name"),
    (dict(api_keys="alice:"), "RAZOR_API_KEYS entry 1 has an empty key"),
    (dict(api_keys="secret-1"), "RAZOR_API_KEYS entry 1 has no ':'"),
    (dict(api_keys="alice:secret-1,bob:secret-1"), "entry 2 repeats the key of RAZOR_API_KEYS entry 1"),
    (dict(api_keys="alice:secret-1", auth_token="secret-1"), "repeats the key of RAZOR_AUTH_TOKEN"),
    (dict(api_keys="alice:secret-1,alice:secret-1"), "every API key must be unique"),
    (dict(api_keys="al ice:secret-1"), "tenant 'al ice' must be"),
    (dict(api_keys="alice:secret 1"), "contains whitespace"),
    (dict(api_keys_file="/nonexistent/keys"), "RAZOR_API_KEYS_FILE '/nonexistent/keys' cannot be read"),
])
def test_bad_api_keys_are_settings_errors_that_never_print_a_key(fields, message):
    with pytest.raises(ValueError) as err:
        Settings(**fields)
    assert message in str(err.value)
    assert "secret-1" not in str(err.value) and "secret 1" not in str(err.value)


def test_bad_line_in_keys_file_names_file_and_line(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("alice:secret-1\n# ok\nbob:secret-1\n")
    with pytest.raises(ValueError, match=rf"RAZOR_API_KEYS_FILE {keys_file} line 3 repeats the key of "
                                         rf"RAZOR_API_KEYS_FILE {keys_file} line 1") as err:
        Settings(api_keys_file=str(keys_file))
    assert "secret-1" not in str(err.value)


# ---- loopback-only without keys ---------------------------------------------------------------------
def test_no_keys_on_an_open_address_is_refused_before_loading(tiny_loaded):
    with pytest.raises(InsecureBind, match="RAZOR_ALLOW_UNAUTHENTICATED"):
        build_server(Settings(host="0.0.0.0", port=0, auth_token="", api_keys=""), loaded=tiny_loaded,
                     jobs=None, head_map_store=None)


def test_the_server_process_refuses_to_start_open_without_keys():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAZOR_")}
    env.update(RAZOR_HOST="0.0.0.0", RAZOR_PORT="0", RAZOR_MODEL="/nonexistent/model", RAZOR_LOG_JSON="false",
               PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-m", "services.inference.server"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "refusing to serve without authentication on RAZOR_HOST='0.0.0.0'" in done.stderr
    assert "RAZOR_API_KEYS" in done.stderr and "/nonexistent/model" not in done.stderr, "refused before loading"


def test_a_tenants_new_session_whose_first_turn_fails_leaves_nothing_in_redis(start_server, service_redis_url):
    server = start_server(api_keys=API_KEYS)
    with RazorClient(server.target, token=KEY_A) as alice:
        # Registered, then refused once tokenized: together with max_new_tokens it exceeds the context.
        error = rpc_error(lambda: alice.stream_generate(prompt=PROMPT, max_new_tokens=4090))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in error.details()
        assert list(alice.list_sessions()) == []
    assert not list(redis.Redis.from_url(service_redis_url).scan_iter("razor:{*}:meta"))
