"""KV bytes and prefill/decode speed on the embedded model: full cache vs RazorAttention, same process.

  python bench/bench_engine.py [--lengths 1024 2048 4096] [--decode 32] [--model REF] [--device cpu]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from services.engine import Engine, HeadMap, load_model
from services.engine.generation import forward
from services.engine.headmap import shipped_head_map


def measure(engine: Engine, prompt: list[int], decode_steps: int) -> dict:
    cache = engine.new_cache()
    sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    logits = forward(engine.model, prompt, cache)
    sync()
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode_steps):
        logits = forward(engine.model, [int(logits.argmax())], cache)
    sync()
    decode_s = time.perf_counter() - start
    return {"bytes": cache.stored_nbytes(), "prefill_tps": len(prompt) / prefill_s, "decode_tps": decode_steps / decode_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.device)
    razor_map = shipped_head_map(loaded.fingerprint)
    if razor_map is None:
        raise SystemExit("no shipped head map for this model; profile it first")
    engines = {"full": Engine(loaded, HeadMap.full(loaded.fingerprint)), "razor": Engine(loaded, razor_map)}
    print(f"model {loaded.fingerprint.id} on {loaded.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads); head map {razor_map.version}: {razor_map.kv_fraction:.0%} of KV "
          f"heads full, sink {razor_map.compression.sink}, S0 {razor_map.compression.min_window}, "
          f"C {razor_map.compression.ratio}")
    print("| prompt | full KV MiB | razor KV MiB | razor/full bytes | full prefill tok/s | razor prefill tok/s "
          "| full decode tok/s | razor decode tok/s | decode speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for engine in engines.values():  # warm-up: first calls pay one-off allocation and dispatch costs
        measure(engine, list(range(1000, 1064)), 2)
    gen = torch.Generator().manual_seed(0)
    for n in args.lengths:
        prompt = torch.randint(1000, 20000, (n,), generator=gen).tolist()
        full, razor = (measure(engines[k], prompt, args.decode) for k in ("full", "razor"))
        print(f"| {n} | {full['bytes'] / 2**20:.1f} | {razor['bytes'] / 2**20:.1f} | "
              f"{razor['bytes'] / full['bytes']:.2f} | {full['prefill_tps']:.0f} | {razor['prefill_tps']:.0f} | "
              f"{full['decode_tps']:.1f} | {razor['decode_tps']:.1f} | "
              f"{razor['decode_tps'] / full['decode_tps']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
