"""Several replicas on one Redis: any replica serves any session, no session forks, and a replica that dies or
stops while Redis is down loses nothing silently.

Real gRPC servers on loopback (in this process, and a real server process where one is killed with SIGKILL),
one real Redis, the tiny random-weight model. Every conversation is checked against the engine replaying the
acknowledged turns in order, so a lost or forked turn changes the tokens and fails the test.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis

from services.inference.client import RazorClient
from services.inference.spill import meta_key

from conftest import free_port
from replay import replay as engine_replay
from tests.test_service import wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 3
DEVICE, REDIS, LOST = 1, 2, 3   # SessionLocation


def replay(loaded, head_map, prompt: str, turns: list[str]) -> tuple[list[list[int]], int]:
    return engine_replay(loaded, head_map, prompt, turns, NEW_TOKENS)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.mark.parametrize("store", ["redis", "redis cluster"])
def test_random_routing_over_three_replicas_never_forks_a_session(store, request, start_server, tiny_loaded,
                                                                  tiny_head_map):
    """200 turns over 20 sessions, two at a time on the same session from different replicas."""
    fp = tiny_loaded.fingerprint
    per_token = 2 * fp.n_layers * fp.n_kv_heads * fp.head_dim * 4
    where = {}
    if store == "redis cluster":
        where = dict(sessions_redis_url=request.getfixturevalue("redis_cluster").url, sessions_redis_cluster=True)
    # Budgets for a few sessions each: replicas spill as well as hand over.
    replicas = [start_server(replica_id=f"replica-{i}", kv_budget_bytes=per_token * 400, handoff_timeout_s=20.0,
                             **where) for i in range(3)]
    clients = [RazorClient(r.target, timeout_s=120) for r in replicas]
    rng = random.Random(13)
    prompts, acked, mu = {}, {}, threading.Lock()
    for i in range(20):
        prompt = f"Conversation {i}: the fox and the river, part {i * 7}"
        reply = rng.choice(clients).generate(prompt=prompt, max_new_tokens=NEW_TOKENS)
        prompts[reply.session_id], acked[reply.session_id] = prompt, [(0, "", reply.token_ids)]
    refused: list[str] = []

    def one_turn(sid: str, text: str, client: RazorClient) -> None:
        try:
            reply = client.continue_session(sid, text=text, max_new_tokens=NEW_TOKENS)
        except grpc.RpcError as error:   # busy (FAILED_PRECONDITION) is the one expected refusal
            with mu:
                refused.append((error.code(), error.details()))
            return
        with mu:   # the history the turn saw orders it: one turn runs on a session at a time
            acked[sid].append((reply.cached_tokens, text, reply.token_ids))

    def one_round(k: int) -> None:
        sid = rng.choice(sorted(prompts))
        a, b = rng.sample(clients, 2)
        pair = [threading.Thread(target=one_turn, args=(sid, f" Turn {k}{side}.", c)) for side, c in zip("ab", (a, b))]
        for t in pair:
            t.start()
        for t in pair:
            t.join()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one_round, range(100)))
    assert sum(len(turns) - 1 for turns in acked.values()) + len(refused) == 200
    unexpected = [(code, details) for code, details in refused if code != grpc.StatusCode.FAILED_PRECONDITION]
    assert not unexpected, unexpected
    for sid, turns in acked.items():
        turns.sort()
        outs, length = replay(tiny_loaded, tiny_head_map, prompts[sid], [text for _, text, _ in turns[1:]])
        assert outs == [tokens for _, _, tokens in turns], f"session {sid} forked or lost an acknowledged turn"
        assert {c.get_session(sid).length for c in clients} == {length}
    listings = [sorted((s.session_id, s.length) for s in c.list_sessions()) for c in clients]
    assert listings[0] == listings[1] == listings[2] and len(listings[0]) == 20
    for c in clients:
        c.close()


def test_a_session_moves_to_the_replica_that_is_asked(start_server, tiny_loaded, tiny_head_map):
    a, b = start_server(replica_id="a"), start_server(replica_id="b")
    with RazorClient(a.target) as on_a, RazorClient(b.target) as on_b:
        first = on_a.generate(prompt="Where does the river go?", max_new_tokens=NEW_TOKENS)
        assert on_b.get_session(first.session_id).owner == "a"
        second = on_b.continue_session(first.session_id, text=" And then?", max_new_tokens=NEW_TOKENS)
        assert on_a.get_session(first.session_id).owner == "b", "b took it over: a handed it over"
        outs, _ = replay(tiny_loaded, tiny_head_map, "Where does the river go?", [" And then?"])
        assert outs == [first.token_ids, second.token_ids]
        assert on_a.delete_session(first.session_id), "deleting from a replica that does not hold it"
        error = rpc_error(lambda: on_b.get_session(first.session_id))
        assert error.code() == grpc.StatusCode.NOT_FOUND


def test_a_spill_under_an_old_generation_is_refused(start_server, service_redis_url):
    """Fencing: a replica that lost its lease (paused past it) cannot overwrite the newer owner's copy."""
    a, b = start_server(replica_id="a"), start_server(replica_id="b")
    with RazorClient(a.target) as on_a, RazorClient(b.target) as on_b:
        sid = on_a.generate(prompt="A fenced conversation", max_new_tokens=NEW_TOKENS).session_id
        stale = a.runtime.store._entries[sid].gen
        on_b.continue_session(sid, text=" Moved.", max_new_tokens=NEW_TOKENS)
        directory = a.runtime.store.directory
        assert not directory.fenced(sid, stale, "save", {"length": 1}, blob=(b"{}", [b"x"])), "old generation"
        assert on_b.get_session(sid).length > 1 and on_b.get_session(sid).owner == "b"


def _replica_process(tmp_path: Path, redis_url: str, head_map_path: Path, name: str, **env) -> tuple:
    port = free_port()
    environ = {**os.environ, "RAZOR_MODEL": "tiny-random", "RAZOR_DEVICE": "cpu", "RAZOR_PORT": str(port),
               "RAZOR_HOST": "127.0.0.1", "RAZOR_REDIS_URL": redis_url, "RAZOR_HEAD_MAP_PATH": str(head_map_path),
               "RAZOR_REPLICA_ID": name, "RAZOR_LOG_JSON": "false", "RAZOR_LOG_LEVEL": "WARNING",
               "RAZOR_LOCAL_SPILL_DIR": str(tmp_path / f"spill-{name}"), "RAZOR_AUTH_TOKEN": "",
               "RAZOR_METRICS_PORT": "0", "RAZOR_TORCH_THREADS": "1", **env}
    proc = subprocess.Popen([sys.executable, "-m", "services.inference.server"], env=environ, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.log", "wb"))
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with RazorClient(target, timeout_s=2) as client:
                client.server_info()
            return proc, target
        except grpc.RpcError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / f"{name}.log").read_text()
            time.sleep(0.3)


def test_kill_9_replica_spilled_sessions_continue_and_resident_ones_are_reported_lost(
        start_server, service_redis_url, tiny_loaded, tiny_head_map, tmp_path):
    head_map_path = tmp_path / "map.json"
    head_map_path.write_text(tiny_head_map.to_json())
    fp = tiny_loaded.fingerprint
    per_token = 2 * fp.n_layers * fp.n_kv_heads * fp.head_dim * 4
    proc, target = _replica_process(tmp_path, service_redis_url, head_map_path, "doomed",
                                    RAZOR_KV_BUDGET_BYTES=str(per_token * 40), RAZOR_LEASE_TTL_S="1.5")
    try:
        with RazorClient(target) as doomed:
            spilled = doomed.generate(prompt="An older conversation about hills", max_new_tokens=NEW_TOKENS)
            resident = doomed.generate(prompt="A newer conversation about seas", max_new_tokens=NEW_TOKENS)
            deadline = time.monotonic() + 10
            while doomed.get_session(spilled.session_id).location != REDIS:   # the budget holds one session
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    survivor = start_server(replica_id="survivor", handoff_timeout_s=10.0)
    with RazorClient(survivor.target) as client:
        reply = client.continue_session(spilled.session_id, text=" Go on.", max_new_tokens=NEW_TOKENS)
        outs, _ = replay(tiny_loaded, tiny_head_map, "An older conversation about hills", [" Go on."])
        assert [spilled.token_ids, reply.token_ids] == outs, "the spilled session continues exactly"
        error = rpc_error(lambda: client.continue_session(resident.session_id, text=" Go on.", max_new_tokens=2))
        assert error.code() == grpc.StatusCode.DATA_LOSS and "doomed" in error.details()
        lost = client.get_session(resident.session_id)
        assert lost.location == LOST and "stopped before saving" in lost.lost_reason


def test_stop_with_redis_down_then_start_with_redis_up_continues_every_session(
        start_server, make_redis, tiny_loaded, tiny_head_map, tmp_path):
    own = make_redis().start()
    spill_dir = tmp_path / "spill-dir"
    try:
        first = start_server(redis_url=own.url, local_spill_dir=str(spill_dir))
        prompts = ["The first resident conversation", "The second resident conversation"]
        with RazorClient(first.target) as client:
            replies = [client.generate(prompt=p, max_new_tokens=NEW_TOKENS) for p in prompts]
        own.stop()
        first.stop(1.0)
        assert first.shutdown_counts == {"spilled": 0, "saved_locally": 2, "lost": 0}
        assert len(list(spill_dir.glob("*.razorspill"))) == 2
        own.start()   # an empty Redis: this one keeps no data across restarts
        second = start_server(redis_url=own.url, local_spill_dir=str(spill_dir))
        assert not list(spill_dir.glob("*.razorspill")), "uploaded at start"
        with RazorClient(second.target) as client:
            for prompt, reply in zip(prompts, replies):
                more = client.continue_session(reply.session_id, text=" Still here?", max_new_tokens=NEW_TOKENS)
                outs, _ = replay(tiny_loaded, tiny_head_map, prompt, [" Still here?"])
                assert [reply.token_ids, more.token_ids] == outs
    finally:
        own.stop()


def test_a_session_deleted_after_it_was_saved_locally_is_not_uploaded_again(start_server, make_redis, tmp_path,
                                                                           monkeypatch):
    """Redis was unreachable from this replica at its shutdown (here: its spills refused), so it saved its session
    locally; Redis kept the session, which was then deleted through another replica. The next start must not
    upload the local copy: the delete's tombstone tells it from a Redis that lost everything."""
    from services.inference.errors import StoreUnavailable

    own = make_redis().start()
    spill_dir = tmp_path / "spill-dir"
    try:
        first = start_server(redis_url=own.url, local_spill_dir=str(spill_dir), lease_ttl_s=0.5)
        with RazorClient(first.target) as client:
            sid = client.generate(prompt="A conversation deleted while its copy waited", max_new_tokens=2).session_id

        def unreachable(session_id):
            raise StoreUnavailable("Redis is unreachable (the test says so)")
        monkeypatch.setattr(first.runtime.store.spiller, "spill_one", unreachable)
        first.stop(1.0)
        assert first.shutdown_counts == {"spilled": 0, "saved_locally": 1, "lost": 0}
        time.sleep(0.6)   # its lease lapses
        other = start_server(redis_url=own.url, local_spill_dir=str(tmp_path / "other-spill"))
        with RazorClient(other.target) as client:
            assert client.delete_session(sid)
        third = start_server(redis_url=own.url, local_spill_dir=str(spill_dir))
        assert not list(spill_dir.glob("*.razorspill")), "read at start, and discarded"
        with RazorClient(third.target) as client:
            error = rpc_error(lambda: client.get_session(sid))
            assert error.code() == grpc.StatusCode.NOT_FOUND
        assert not redis.Redis.from_url(own.url).exists(meta_key(sid))
    finally:
        own.stop()


def test_a_session_that_expired_while_its_local_copy_waited_is_not_uploaded(start_server, make_redis, tmp_path,
                                                                           monkeypatch):
    """As above, but nobody deleted the session: it outlived its TTL while the replica was down. Its metadata
    is gone from Redis, as after a Redis that lost everything; its last use tells the two apart."""
    from services.inference.errors import StoreUnavailable

    own = make_redis().start()
    spill_dir = tmp_path / "spill-dir"
    try:
        first = start_server(redis_url=own.url, local_spill_dir=str(spill_dir), session_ttl_s=2)
        with RazorClient(first.target) as client:
            sid = client.generate(prompt="A conversation that expires while its copy waits", max_new_tokens=2)\
                .session_id

        def unreachable(session_id):
            raise StoreUnavailable("Redis is unreachable (the test says so)")
        monkeypatch.setattr(first.runtime.store.spiller, "spill_one", unreachable)
        first.stop(1.0)
        assert first.shutdown_counts == {"spilled": 0, "saved_locally": 1, "lost": 0}
        wait_until(lambda: not redis.Redis.from_url(own.url).exists(meta_key(sid)), timeout_s=10)
        time.sleep(0.5)
        second = start_server(redis_url=own.url, local_spill_dir=str(spill_dir), session_ttl_s=2)
        assert not list(spill_dir.glob("*.razorspill")), "read at start, and discarded"
        with RazorClient(second.target) as client:
            assert rpc_error(lambda: client.get_session(sid)).code() == grpc.StatusCode.NOT_FOUND
    finally:
        own.stop()


def test_a_local_copy_keeps_its_sessions_own_ttl_and_pin(start_server, make_redis, tmp_path):
    """A session's own TTL and pin travel with its local copy: one whose own (shorter) TTL ran out while the
    copy waited is not uploaded, though it is younger than the replica's default TTL; one that is uploaded keeps
    its TTL and pin (a Redis that lost everything has them only from the copy)."""
    own = make_redis().start()
    spill_dir = tmp_path / "spill-dir"
    try:
        first = start_server(redis_url=own.url, local_spill_dir=str(spill_dir), session_ttl_s=60)
        with RazorClient(first.target) as client:
            short = client.generate(prompt="A conversation that lives two seconds", max_new_tokens=2).session_id
            kept = client.generate(prompt="A pinned conversation that lives long", max_new_tokens=2).session_id
            client.update_session(short, ttl_s=2)
            client.update_session(kept, ttl_s=45, pinned=True)
        own.stop()
        first.stop(1.0)
        assert first.shutdown_counts == {"spilled": 0, "saved_locally": 2, "lost": 0}
        time.sleep(2.5)   # past the short session's own TTL, well within the default
        own.start()       # empty: this Redis keeps no data across restarts
        second = start_server(redis_url=own.url, local_spill_dir=str(spill_dir), session_ttl_s=60)
        assert not list(spill_dir.glob("*.razorspill")), "read at start"
        with RazorClient(second.target) as client:
            assert rpc_error(lambda: client.get_session(short)).code() == grpc.StatusCode.NOT_FOUND
            uploaded = client.get_session(kept)
            assert (uploaded.ttl_s, uploaded.pinned) == (45, True)
            assert redis.Redis.from_url(own.url).ttl(meta_key(kept)) <= 45
    finally:
        own.stop()


def test_a_resident_session_outlives_a_redis_restart_that_lost_its_metadata(start_server, make_redis, tiny_loaded,
                                                                             tiny_head_map):
    """Redis restarts empty (no persistence) under a running replica: the session's metadata and lease are gone,
    but its cache is resident here, so the next turn registers it again (`SessionDirectory.fenced`) and goes on
    from the acknowledged turn; then it can be deleted as usual."""
    own = make_redis().start()
    try:
        server = start_server(redis_url=own.url)
        prompt = "A conversation that outlives its Redis"
        with RazorClient(server.target) as client:
            first = client.generate(prompt=prompt, max_new_tokens=NEW_TOKENS)
            own.stop()
            own.start()   # empty: this one keeps no data across restarts
            store = redis.Redis.from_url(own.url)
            assert not store.exists(meta_key(first.session_id))
            more = client.continue_session(first.session_id, text=" Still here?", max_new_tokens=NEW_TOKENS)
            outs, _ = replay(tiny_loaded, tiny_head_map, prompt, [" Still here?"])
            assert [first.token_ids, more.token_ids] == outs
            assert store.exists(meta_key(first.session_id)), "registered again"
            assert client.get_session(first.session_id).location == DEVICE
            client.delete_session(first.session_id)
            assert not store.exists(meta_key(first.session_id))
    finally:
        own.stop()


def test_exit_status_says_what_happened_at_shutdown():
    from services.inference.server import exit_status

    assert exit_status({"spilled": 3, "saved_locally": 0, "lost": 0}) == 0
    assert exit_status({"spilled": 0, "saved_locally": 2, "lost": 0}) == 75
    assert exit_status({"spilled": 0, "saved_locally": 0, "lost": 1}) == 1
