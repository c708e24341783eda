"""The same service on a real Redis Cluster: three redis-server nodes on loopback (conftest's `redis_cluster`).

Sessions land in different hash slots and so on different nodes; each session's keys (meta, lease, spill) share
its id as hash tag, so the directory's Lua scripts run on the one node that holds them. Head maps and the Celery
broker stay on the single Redis (`RAZOR_REDIS_URL`); only sessions use the cluster.
"""
from __future__ import annotations

import grpc
import pytest
import torch

from services.engine import Engine
from services.inference import codec
from services.inference.client import RazorClient
from services.inference.directory import SessionDirectory
from services.inference.spill import Spill, lease_key, meta_key, spill_key
from tests.test_service import PROMPT, SAMPLED, TURNS, engine_turns, rpc_error, wait_until

DEVICE, REDIS = 1, 2
SAMPLING = dict(max_new_tokens=SAMPLED.max_new_tokens, temperature=SAMPLED.temperature, seed=SAMPLED.seed)


def on_cluster(cluster, **settings) -> dict:
    return dict(sessions_redis_url=cluster.url, sessions_redis_cluster=True, **settings)


def sessions_on_nodes(client, cluster, first_turn: list[int], ports=None, limit: int = 40) -> dict[int, list[str]]:
    """Generate sessions until each node of `ports` (default: all) holds one; ids are random, so slots are too.
    Every first turn must equal the engine's."""
    by_port: dict[int, list[str]] = {port: [] for port in cluster.ports}
    for _ in range(limit):
        reply = client.generate(prompt=PROMPT, **SAMPLING)
        assert reply.token_ids == first_turn
        by_port[cluster.port_of(meta_key(reply.session_id))].append(reply.session_id)
        if all(by_port[port] for port in ports or cluster.ports):
            return by_port
    pytest.fail(f"{limit} sessions did not reach every node: {by_port}")


def keys_on_their_node(cluster, sid: str) -> list[bool]:
    """Which of the session's keys exist, asked of the node serving its slot (any other node answers MOVED)."""
    node = cluster.node(cluster.port_of(meta_key(sid)))
    return [bool(node.exists(key)) for key in (meta_key(sid), lease_key(sid), spill_key(sid))]


def engine_length(loaded, head_map, turns) -> int:
    """Tokens in the engine's own session after the prompt and `turns`."""
    engine = Engine(loaded, head_map)
    state, _ = engine.generate(engine.encode(text=PROMPT), SAMPLED)
    for text in turns:
        engine.continue_session(state, engine.encode_turn(state.last_token, text=text), SAMPLED)
    return len(state.token_ids)


def assert_unavailable(call, hint="Redis") -> None:
    error = rpc_error(call)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and hint in error.details(), (error.code(), error.details())


def test_an_unfenced_spill_is_written_atomically_to_its_node_and_read_back(redis_cluster):
    tensors = {"k": torch.arange(3000, dtype=torch.float32).reshape(30, 100)}
    encoded = codec.encode(tensors, {"session_id": "s1"}, chunk_bytes=4096)   # several chunks, one MULTI
    spill = Spill(redis_cluster.url, ttl_s=60, cluster=True)
    try:
        spill.write("s1", encoded)
        header, chunks = spill.read("s1")
        assert torch.equal(codec.decode(header, chunks)[0]["k"], tensors["k"]) and len(chunks) > 1
        assert 0 < redis_cluster.node(redis_cluster.port_of(spill_key("s1"))).ttl(spill_key("s1")) <= 60
        assert spill.delete("s1") and spill.read("s1") == (None, [])
    finally:
        spill.close()


def test_sessions_on_every_node_spill_restore_list_get_and_delete(start_server, redis_cluster, tiny_loaded,
                                                                  tiny_head_map):
    expected = engine_turns(tiny_loaded, tiny_head_map, turns=TURNS[:1], params=SAMPLED)
    server = start_server(**on_cluster(redis_cluster, kv_budget_bytes=1))   # every idle session spills
    with RazorClient(server.target) as client:
        by_port = sessions_on_nodes(client, redis_cluster, expected[0])
        every = {sid for ids in by_port.values() for sid in ids}
        for sid in every:
            wait_until(lambda: client.get_session(sid).location == REDIS)
            assert keys_on_their_node(redis_cluster, sid) == [True, False, True], "spilled, no lease held"
        one_per_node = [ids[0] for ids in by_port.values()]
        for sid in one_per_node:   # restored from its node bit-exact: the same tokens as the engine's own turn
            assert client.continue_session(sid, text=TURNS[0], **SAMPLING).token_ids == expected[1]
            wait_until(lambda: client.get_session(sid).location == REDIS)
        assert {s.session_id for s in client.list_sessions(page_size=2)} == every
        length = engine_length(tiny_loaded, tiny_head_map, TURNS[:1])
        for sid in one_per_node:
            session = client.get_session(sid)
            assert (session.length, session.model_fingerprint, session.lost_reason) == \
                (length, tiny_loaded.fingerprint.id, "")
        for sid in one_per_node:
            assert client.delete_session(sid)
            assert rpc_error(lambda: client.get_session(sid)).code() == grpc.StatusCode.NOT_FOUND
            assert keys_on_their_node(redis_cluster, sid) == [False, False, False]
        assert {s.session_id for s in client.list_sessions()} == every - set(one_per_node)
        assert client.server_info().memory.redis_reachable


def test_a_replica_continues_a_session_another_holds_resident(start_server, redis_cluster, tiny_loaded,
                                                               tiny_head_map):
    expected = engine_turns(tiny_loaded, tiny_head_map, params=SAMPLED)
    a = start_server(**on_cluster(redis_cluster, replica_id="replica-a"))
    b = start_server(**on_cluster(redis_cluster, replica_id="replica-b"))
    with RazorClient(a.target) as on_a, RazorClient(b.target) as on_b:
        reply = on_a.generate(prompt=PROMPT, **SAMPLING)
        sid, outs = reply.session_id, [reply.token_ids]
        assert (on_b.get_session(sid).location, on_b.get_session(sid).owner) == (DEVICE, "replica-a")
        # B asks A (pub/sub on the cluster) to hand the session over, then restores A's spill from its node.
        outs.append(on_b.continue_session(sid, text=TURNS[0], **SAMPLING).token_ids)
        assert (on_a.get_session(sid).location, on_a.get_session(sid).owner) == (DEVICE, "replica-b")
        outs.append(on_a.continue_session(sid, text=TURNS[1], **SAMPLING).token_ids)   # and back again
        listed = [[(s.session_id, s.owner, s.length) for s in c.list_sessions()] for c in (on_a, on_b)]
    assert outs == expected, "no turn was lost or forked across the hand-overs"
    assert listed[0] == listed[1] == [(sid, "replica-a", engine_length(tiny_loaded, tiny_head_map, TURNS))]
    assert redis_cluster.node(redis_cluster.port_of(lease_key(sid))).get(lease_key(sid)) == b"replica-a"


def test_whole_cluster_down_is_unavailable_and_hand_over_resumes_when_it_is_back(start_server, make_redis_cluster,
                                                                                  tmp_path, tiny_loaded, tiny_head_map):
    expected = engine_turns(tiny_loaded, tiny_head_map, turns=TURNS[:1], params=SAMPLED)
    cluster = make_redis_cluster(tmp_path / "cluster").start()
    try:
        a = start_server(**on_cluster(cluster, replica_id="replica-a"))
        b = start_server(**on_cluster(cluster, replica_id="replica-b"))
        with RazorClient(a.target) as on_a, RazorClient(b.target) as on_b:
            sid = on_a.generate(prompt=PROMPT, **SAMPLING).session_id
            cluster.stop()
            assert not on_b.server_info().memory.redis_reachable
            assert_unavailable(lambda: on_b.generate(prompt=PROMPT, max_new_tokens=2))
            assert_unavailable(lambda: on_b.continue_session(sid, text=TURNS[0], max_new_tokens=2))
            assert_unavailable(lambda: on_b.get_session(sid))
            assert_unavailable(lambda: list(on_b.list_sessions()))
            assert_unavailable(lambda: on_b.delete_session(sid))
            cluster.start()   # back, empty: A registers its resident session again when it renews its lease
            wait_until(lambda: keys_on_their_node(cluster, sid)[0], timeout_s=20)
            # A's hand-over listener outlived the outage: B's request reaches it and A's copy moves to B.
            assert on_b.continue_session(sid, text=TURNS[0], **SAMPLING).token_ids == expected[1]
            assert on_a.get_session(sid).owner == "replica-b"
    finally:
        cluster.stop()


def test_a_service_started_while_the_cluster_is_down_serves_once_it_is_up(start_server, make_redis_cluster,
                                                                          tmp_path):
    cluster = make_redis_cluster(tmp_path / "cluster")   # not started yet
    try:
        server = start_server(**on_cluster(cluster))
        with RazorClient(server.target) as client:
            assert_unavailable(lambda: client.generate(prompt=PROMPT, max_new_tokens=2))
            assert not client.server_info().memory.redis_reachable
            cluster.start()
            sid = client.generate(prompt=PROMPT, max_new_tokens=2).session_id
            assert [s.session_id for s in client.list_sessions()] == [sid]
    finally:
        cluster.stop()


def test_sessions_on_live_nodes_continue_and_hand_over_while_another_node_is_down(
        start_server, make_redis_cluster, tmp_path, tiny_loaded, tiny_head_map):
    """With cluster-require-full-coverage off, live nodes serve their slots while one is down. Scripts that a live
    node has not cached (here flushed, as after it restarted) still run there, and the hand-over request reaches
    replica A although the node serving its channel's slot is the one that is down."""
    expected = engine_turns(tiny_loaded, tiny_head_map, turns=TURNS[:1], params=SAMPLED)
    cluster = make_redis_cluster(tmp_path / "cluster", full_coverage=False).start()
    a_id = next(f"replica-a{i}" for i in range(1000)
                if cluster.port_of(SessionDirectory.channel(f"replica-a{i}")) == cluster.ports[1])
    live, dead = cluster.ports[0], cluster.ports[1]
    try:
        a = start_server(**on_cluster(cluster, replica_id=a_id, lease_ttl_s=3.0))   # re-subscribes every second
        b = start_server(**on_cluster(cluster, replica_id="replica-b"))
        with RazorClient(a.target) as on_a, RazorClient(b.target) as on_b:
            by_port = sessions_on_nodes(on_a, cluster, expected[0], ports=[live, dead])
            on_live, on_dead = by_port[live][0], by_port[dead][0]
            cluster.kill_node(dead)
            cluster.node(live).script_flush()
            assert on_b.continue_session(on_live, text=TURNS[0], **SAMPLING).token_ids == expected[1]
            assert on_a.get_session(on_live).owner == "replica-b"
            assert_unavailable(lambda: on_b.continue_session(on_dead, text=TURNS[0], max_new_tokens=2))
    finally:
        cluster.stop()
