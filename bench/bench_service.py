"""Service benchmarks (a script, not a test): prints two markdown tables.

1. Restoring a spilled session from Redis vs re-prefilling the same history (the alternative a
   service without spill would have), per history length.
2. gRPC streaming vs calling the engine in-process for the same generation (ratio, and the
   overhead per streamed token).
3. The same gRPC generation with top-N logprobs (k = 20) against none.

Every ratio is against a baseline measured in the same run, on the same machine.

    .venv/bin/python bench/bench_service.py                       # tiny random model, private Redis
    .venv/bin/python bench/bench_service.py --model smollm2 --lengths 256,1024,2048
"""
from __future__ import annotations

import argparse
import statistics
import time

import common  # also puts the repository root on sys.path

from services.engine import CompressionParams, Engine, HeadMap, SamplingParams, load_model  # noqa: E402
from services.engine.headmap import shipped_head_map  # noqa: E402
from services.inference.client import RazorClient  # noqa: E402
from services.inference.runtime import FixedHeadMaps  # noqa: E402
from services.inference.server import build_server  # noqa: E402
from services.inference.sessions import SessionStore  # noqa: E402
from services.inference.spill import Spill  # noqa: E402
from services.inference.spilled_header import ModelShape  # noqa: E402
from services.settings import Settings  # noqa: E402

TEXT = ("In the long history of the valley, the river changed its course many times, and each time the "
        "villages along its banks moved with it, carrying their stories, their songs and their names. ")


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def timed_pair(first, second, repeats: int) -> tuple[float, float]:
    """Medians of two functions timed alternately, so drift in machine load hits both alike."""
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(first, 1))
        b.append(timed(second, 1))
    return statistics.median(a), statistics.median(b)


def history_ids(engine: Engine, length: int) -> list[int]:
    ids = engine.encode(text=TEXT * (length // 20 + 1))
    return ids[:length]


def bench_restore(engine: Engine, redis_url: str, lengths: list[int], repeats: int) -> list[str]:
    loaded = engine.loaded
    # As the server builds it: a spill's header records the caches' dtype, and a restore refuses any other.
    store = SessionStore(Spill(redis_url, ttl_s=600), loaded.fingerprint.id, loaded.device, 0,
                         dtype=loaded.dtype_name, shape=ModelShape.of(loaded))
    one = SamplingParams(max_new_tokens=1)
    rows = ["| history tokens | KV bytes (full) | spill ms | restore ms | re-prefill ms | re-prefill / restore |",
            "|---:|---:|---:|---:|---:|---:|"]
    for length in lengths:
        ids = history_ids(engine, length)
        prefill_s = timed(lambda: engine.generate(ids, one), repeats)  # baseline: run the history again
        state, _ = engine.generate(ids, one)
        spill_s, restore_s = [], []
        for _ in range(repeats):
            sid = store.create()
            store.put(sid, state)
            store.release(sid)
            start = time.perf_counter()
            store.settle()  # budget 0: spills it
            spill_s.append(time.perf_counter() - start)
            store.acquire(sid)
            start = time.perf_counter()
            store.load(sid, lambda n: None)
            restore_s.append(time.perf_counter() - start)
            store.release(sid)
            store.delete(sid)
        spill, restore = statistics.median(spill_s), statistics.median(restore_s)
        rows.append(f"| {len(ids)} | {state.nbytes()} ({state.full_nbytes()}) | {spill * 1e3:.1f} | "
                    f"{restore * 1e3:.1f} | {prefill_s * 1e3:.1f} | {prefill_s / restore:.2f}x |")
    return rows


def bench_streaming(engine: Engine, target: str, prompt_len: int, token_counts: list[int], repeats: int) -> list[str]:
    prompt = engine.tokenizer.decode(history_ids(engine, prompt_len), skip_special_tokens=True)
    rows = ["| new tokens | in-process ms | gRPC stream ms | gRPC / in-process | overhead ms per token |",
            "|---:|---:|---:|---:|---:|"]
    with RazorClient(target) as client:
        client.generate(prompt=prompt, max_new_tokens=2, keep_session=False)  # warm the channel
        prompt_ids = engine.encode(text=prompt)
        for n in token_counts:
            params = SamplingParams(max_new_tokens=n)
            local, remote = timed_pair(lambda: engine.generate(prompt_ids, params),
                                       lambda: client.generate(prompt=prompt, max_new_tokens=n, keep_session=False),
                                       repeats)
            rows.append(f"| {n} | {local * 1e3:.1f} | {remote * 1e3:.1f} | {remote / local:.2f}x | "
                        f"{(remote - local) / n * 1e3:.2f} |")
    return rows


def bench_top_logprobs(engine: Engine, target: str, prompt_len: int, n: int, repeats: int, k: int = 20) -> list[str]:
    """The cost of top-N logprobs: the same gRPC generation with top_logprobs=k against 0, in one run."""
    prompt = engine.tokenizer.decode(history_ids(engine, prompt_len), skip_special_tokens=True)
    rows = ["| new tokens | top_logprobs=0 ms | top_logprobs=%d ms | ratio | extra ms per token |" % k,
            "|---:|---:|---:|---:|---:|"]
    with RazorClient(target) as client:
        plain, top = timed_pair(
            lambda: client.generate(prompt=prompt, max_new_tokens=n, keep_session=False),
            lambda: client.generate(prompt=prompt, max_new_tokens=n, keep_session=False, top_logprobs=k), repeats)
    rows.append(f"| {n} | {plain * 1e3:.1f} | {top * 1e3:.1f} | {top / plain:.2f}x | {(top - plain) / n * 1e3:.2f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-random", help="tiny-random (default), smollm2, or a path")
    p.add_argument("--lengths", default="128,512,2048", help="history lengths for the restore table")
    p.add_argument("--tokens", default="16,64", help="generated token counts for the streaming table")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--redis-url", default="", help="use this Redis instead of a private one")
    args = p.parse_args()

    loaded = load_model(args.model, device="cpu")
    head_map = shipped_head_map(loaded.fingerprint) or HeadMap.full(loaded.fingerprint, CompressionParams())
    proc, url = (None, args.redis_url) if args.redis_url else common.start_redis()
    settings = Settings(host="127.0.0.1", port=0, redis_url=url, metrics_port=0, auth_token="", tls_cert="", tls_key="")
    server = build_server(settings, loaded=loaded, head_maps=FixedHeadMaps(head_map), jobs=None,
                          head_map_store=None).start()
    try:
        engine = Engine(loaded, head_map)
        engine.generate(history_ids(engine, 256), SamplingParams(max_new_tokens=8))  # warm-up, not measured
        print(f"model {loaded.ref} ({loaded.fingerprint.id}) on {loaded.device}, head map {head_map.version} "
              f"({head_map.kv_fraction:.0%} of KV heads full), median of {args.repeats}\n")
        print("Restore from Redis vs re-prefill of the same history")
        print("\n".join(bench_restore(engine, url, [int(x) for x in args.lengths.split(",")], args.repeats)))
        print("\ngRPC streaming vs in-process engine (prompt of 64 tokens, greedy)")
        print("\n".join(bench_streaming(engine, server.target, 64, [int(x) for x in args.tokens.split(",")],
                                        args.repeats)))
        n = max(int(x) for x in args.tokens.split(","))
        print(f"\nTop-N logprobs over gRPC (prompt of 64 tokens, greedy, {n} new tokens)")
        print("\n".join(bench_top_logprobs(engine, server.target, 64, n, args.repeats)))
    finally:
        server.stop(0)
        if proc is not None:
            proc.kill()


if __name__ == "__main__":
    main()
