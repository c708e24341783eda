"""Memory over a long run: does the service's process, or Redis, grow with the turns it serves?

A real gRPC server in this process with a private redis-server on loopback, and a KV budget of a few sessions, so
that sessions spill to Redis and come back. `--clients` threads run `--turns` turns in all over a pool of
`--sessions` live sessions: each turn continues a random session of the pool, and a session that has had
`--session-turns` turns is deleted and a new one started in its place. So every path of a session's life runs
over and over: create, grow, spill, restore, delete. Every `--every` turns it samples the process's RSS, the
service's resident KV bytes and sessions (GetLoad), and Redis's used memory and keys. It prints the samples and
the growth of each over the second half of the run (after the warm-up) per 1,000 turns, and plots them.

    .venv/bin/python bench/bench_soak.py --model tiny-random --turns 4000     # minutes
    .venv/bin/python bench/bench_soak.py --turns 1000                         # SmolLM2, shipped head map
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import threading
from collections import Counter
from pathlib import Path

import common
import grpc
import psutil
import redis
from services.engine import CompressionParams, HeadMap, load_model
from services.engine.headmap import shipped_head_map
from services.inference.client import RazorClient
from services.inference.runtime import FixedHeadMaps
from services.inference.server import build_server
from services.settings import Settings

BUDGET_MIB = {"smollm2": 24, "tiny-random": 2}   # fewer sessions than the pool, so some spill
WORDS = ("river", "stone", "lantern", "harbour", "orchard", "glacier", "market", "bridge", "meadow", "tower")


class Pool:
    """The live sessions, shared by the client threads; a session is used by one turn at a time."""

    def __init__(self, size: int, session_turns: int, seed: int):
        self.free: list[tuple[str, int]] = [("", 0)] * size   # (session id, its turns so far); "": none yet
        self.session_turns, self.lock, self.rng = session_turns, threading.Lock(), random.Random(seed)

    def take(self) -> tuple[str, int]:
        with self.lock:
            return self.free.pop(self.rng.randrange(len(self.free)))

    def give_back(self, session_id: str, turns: int) -> None:
        with self.lock:
            self.free.append((session_id, turns))


def one_turn(client: RazorClient, pool: Pool, rng: random.Random, new_tokens: int) -> None:
    """A turn on a session of the pool: a new session if its place has none, or if its session had its turns
    (that one is deleted first)."""
    session_id, turns = pool.take()
    text = " ".join(rng.choice(WORDS) for _ in range(12))
    try:
        if session_id and turns >= pool.session_turns:
            client.delete_session(session_id)
            session_id, turns = "", 0
        if session_id:
            client.continue_session(session_id, text, max_new_tokens=new_tokens)
        else:
            session_id = client.generate(f"Tell me about the {text}.", max_new_tokens=new_tokens).session_id
        turns += 1
    finally:
        pool.give_back(session_id, turns)


def sample(turns: int, process: psutil.Process, client: RazorClient, store: redis.Redis) -> dict:
    load = client.get_load()
    return {"turns": turns, "rss_mib": process.memory_info().rss / 2**20, "kv_mib": load.kv_bytes_used / 2**20,
            "resident": load.resident_sessions, "spilled": load.spilled_sessions,
            "redis_mib": store.info("memory")["used_memory"] / 2**20, "redis_keys": store.dbsize(),
            "objects": len(gc.get_objects())}


def run(target: str, redis_url: str, args) -> tuple[list[dict], Counter]:
    """`--clients` threads sharing `--turns` turns; a sample every `--every` turns (taken by the thread that
    finished that turn, while the others go on)."""
    pool, process = Pool(args.sessions, args.session_turns, args.seed), psutil.Process()
    store = redis.Redis.from_url(redis_url)
    samples, errors, done, lock = [], Counter(), [0], threading.Lock()

    def client_loop(c: int) -> None:
        rng = random.Random(args.seed * 1000 + c)
        with RazorClient(target, timeout_s=600) as client:
            while True:
                with lock:
                    if done[0] >= args.turns:
                        return
                    done[0] += 1
                    n = done[0]
                try:
                    one_turn(client, pool, rng, args.new_tokens)
                except grpc.RpcError as exc:   # counted: a soak run should have none
                    errors[exc.code().name] += 1
                if n % args.every == 0 or n == args.turns:
                    point = sample(n, process, client, store)
                    with lock:
                        samples.append(point)
                    print("  " + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in point.items()), flush=True)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(samples, key=lambda s: s["turns"]), errors


def slope_per_1000(samples: list[dict], key: str) -> float:
    """Least-squares growth of `key` per 1,000 turns over the samples of the run's second half."""
    half = [s for s in samples if s["turns"] > samples[-1]["turns"] / 2]
    if len(half) < 2:
        return float("nan")
    return 1000 * statistics.linear_regression([s["turns"] for s in half], [float(s[key]) for s in half]).slope


def plot(samples: list[dict], args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = [s["turns"] for s in samples]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, keys, label in ((axes[0], ("rss_mib",), "service process RSS (MiB)"),
                            (axes[1], ("kv_mib", "redis_mib"), "MiB"), (axes[2], ("redis_keys", "resident", "spilled"),
                                                                       "count")):
        for key in keys:
            ax.plot(turns, [s[key] for s in samples], marker=".", label=key)
        ax.set(xlabel="turns served", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{args.model}: {args.turns} turns, {args.clients} clients, {args.sessions} live sessions of up to "
                 f"{args.session_turns} turns, KV budget {args.budget_mib} MiB", fontsize=9)
    common.save_figure(fig, path)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(BUDGET_MIB))
    ap.add_argument("--turns", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--sessions", type=int, default=16, help="live sessions in the pool (more than the budget holds)")
    ap.add_argument("--session-turns", type=int, default=12, help="turns before a session is deleted and replaced")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--every", type=int, default=50, help="turns between samples")
    ap.add_argument("--budget-mib", type=float, default=0, help="RAZOR_KV_BUDGET_BYTES in MiB (default: the model's, "
                    "about eight sessions)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", default=None, help="plot path (default docs/soak-<model>.png)")
    args = ap.parse_args()
    assert args.sessions > args.clients, "each client needs a session of its own at a time"
    args.budget_mib = args.budget_mib or BUDGET_MIB[args.model]
    args.png = Path(args.png or f"docs/soak-{args.model}.png")
    return args


def main() -> None:
    args = parse_args()
    clock = common.Stopwatch()
    print(common.header())
    loaded = load_model(args.model, device="cpu")
    head_map = shipped_head_map(loaded.fingerprint) or HeadMap.full(loaded.fingerprint, CompressionParams())
    redis_proc, url = common.start_redis()
    settings = Settings(host="127.0.0.1", port=0, redis_url=url, metrics_port=0, auth_token="", tls_cert="",
                        tls_key="", log_level="WARNING", kv_budget_bytes=int(args.budget_mib * 2**20))
    server = build_server(settings, loaded=loaded, head_maps=FixedHeadMaps(head_map), jobs=None,
                          head_map_store=None).start()
    try:
        samples, errors = run(server.target, url, args)
    finally:
        server.stop(0)
        redis_proc.kill()
        redis_proc.wait()
    first, last = samples[0], samples[-1]
    rows = [[key, f"{first[key]:.1f}", f"{last[key]:.1f}", f"{max(s[key] for s in samples):.1f}",
             f"{slope_per_1000(samples, key):+.2f}"]
            for key in ("rss_mib", "kv_mib", "redis_mib", "redis_keys", "resident", "spilled", "objects")]
    print(f"\nmodel {args.model}, head map {head_map.version}; {args.turns} turns by {args.clients} clients over "
          f"{args.sessions} live sessions of up to {args.session_turns} turns ({args.new_tokens} new tokens each), "
          f"KV budget {args.budget_mib} MiB; errors: {dict(errors) or 'none'}\n")
    print(common.table([f"measure (every {args.every} turns)", f"at {first['turns']} turns", f"at {last['turns']}",
                        "highest", "growth per 1,000 turns (second half)"], rows))
    plot(samples, args, args.png)
    print(f"\nplot: {args.png}\nbench_soak: {clock}")


if __name__ == "__main__":
    main()
