"""What several replicas on one Redis cost a turn (a script, not a test): prints two markdown tables.

1. The Redis work around a turn, per operation (median over `--repeats`): registering a new session (lease +
   fencing generation + index), marking a turn's spill stale, taking a session over, the turn summary written
   after it, a request id registered and freed (Abort's registry), and a lease renewal. Each is shown against the
   latency of a one-token ContinueSession on a resident session, measured in the same run.
2. A turn on the replica that holds the session against the same turn arriving at the other replica, which
   first asks the owner to hand it over (spill + lease release there, take-over + restore here).

A real gRPC server pair on loopback (`build_server`, in this process) and a private redis-server.

    .venv/bin/python bench/bench_replicas.py                   # tiny random model
    .venv/bin/python bench/bench_replicas.py --model smollm2   # embedded SmolLM2, shipped head map
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid

import common  # first: puts the repository root on sys.path

from services.engine import CompressionParams, HeadMap, load_model  # noqa: E402
from services.engine.headmap import shipped_head_map  # noqa: E402
from services.inference.client import RazorClient  # noqa: E402
from services.inference.directory import SessionDirectory  # noqa: E402
from services.inference.requests import RequestRegistry  # noqa: E402
from services.inference.runtime import FixedHeadMaps  # noqa: E402
from services.inference.server import build_server  # noqa: E402
from services.inference.spill import connect  # noqa: E402
from services.settings import Settings  # noqa: E402

PROMPT = ("In the long history of the valley, the river changed its course many times, and each time the "
          "villages along its banks moved with it, carrying their stories, their songs and their names. ")


def median_ms(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def redis_rows(url: str, fingerprint: str, repeats: int, turn_ms: float) -> list[list]:
    """Each piece of per-turn Redis work, on fresh session ids, against one resident turn's latency."""
    client = connect(url)
    mine = SessionDirectory(client, "bench-a", 10.0, 3600, fingerprint, "float32")
    other = SessionDirectory(client, "bench-b", 10.0, 3600, fingerprint, "float32")
    registry = RequestRegistry(client, "bench-a")
    fresh = (uuid.uuid4().hex for _ in range(repeats))
    ops = {"register a new session (create)": lambda: mine.create(next(fresh), "")}
    sids = [uuid.uuid4().hex for _ in range(repeats)]
    for sid in sids:   # created, spilled and released by "a": "b" can take them over
        mine.create(sid, "")
        mine.fenced(sid, 1, "save_release", {"length": 1}, blob=(b"{}", [b"x"]))
    claims = iter(sids)
    ops["take a session over (claim)"] = lambda: other.claim(next(claims), "")
    ops["mark a turn's spill stale (begin)"] = lambda: other.fenced(sids[0], 2, "begin")
    ops["turn summary after a turn (note, I/O thread)"] = lambda: other.fenced(sids[0], 2, "note", {"length": 2})
    ops["lease renewal (per session, every TTL/3)"] = lambda: other.fenced(sids[0], 2, "renew")
    cancel = threading.Event()
    ops["request id registered + freed (Abort registry)"] = lambda: (
        registry.register("", "bench-request", cancel), registry.unregister("", "bench-request", cancel))
    rows = []
    for name, fn in ops.items():
        ms = median_ms(fn, repeats)
        rows.append([name, f"{ms:.3f}", f"{ms / turn_ms:.1%}"])
    client.close()
    return rows


def turn_rows(servers, repeats: int, new_tokens: int) -> tuple[list[list], float]:
    a, b = (RazorClient(s.target) for s in servers)
    sid = a.generate(prompt=PROMPT, max_new_tokens=new_tokens).session_id
    on_owner = median_ms(lambda: a.continue_session(sid, text=" More.", max_new_tokens=new_tokens), repeats)
    clients = [a, b]

    def moved():   # alternate replicas: every turn arrives where the session is not
        clients.reverse()
        clients[0].continue_session(sid, text=" More.", max_new_tokens=new_tokens)
    handed = median_ms(moved, repeats)
    history = a.get_session(sid).length
    a.close(), b.close()
    return [[f"on the replica holding it ({history} tokens at the end)", f"{on_owner:.1f}", "1.00x"],
            ["at the other replica: hand-over, then the turn", f"{handed:.1f}", f"{handed / on_owner:.2f}x"]], on_owner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-random", help="tiny-random (default) or smollm2")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=1)
    args = ap.parse_args()
    clock = common.Stopwatch()
    print(common.header())
    loaded = load_model(args.model if args.model != "smollm2" else None, device="cpu")
    head_map = shipped_head_map(loaded.fingerprint) or HeadMap.full(loaded.fingerprint, CompressionParams())
    proc, url = common.start_redis()
    settings = [Settings(host="127.0.0.1", port=0, redis_url=url, metrics_port=0, auth_token="", tls_cert="",
                         tls_key="", log_level="WARNING", replica_id=f"replica-{i}", local_spill_dir="")
                for i in range(2)]
    servers = [build_server(s, loaded=loaded, head_maps=FixedHeadMaps(head_map), jobs=None,
                            head_map_store=None).start() for s in settings]
    try:
        turns, turn_ms = turn_rows(servers, max(5, args.repeats // 5), args.new_tokens)
        ops = redis_rows(url, loaded.fingerprint.id, args.repeats, turn_ms)
    finally:
        for server in servers:
            server.stop(0)
        proc.kill()
    print(f"\nmodel {loaded.ref or 'smollm2'}; private Redis on loopback; medians; a turn = ContinueSession with "
          f"{args.new_tokens} new token(s)\n")
    print(common.table(["Redis work around a turn", "ms", "of a resident turn"], ops, align="lrr"))
    print()
    print(common.table(["ContinueSession", "ms", "vs holding replica"], turns, align="lrr"))
    print(f"\nbench_replicas: {clock}")


if __name__ == "__main__":
    main()
