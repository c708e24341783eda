"""Issue 6 §2 and issue 12 on a GPU, on a random-weight Llama (32 layers, 32 query / 8 KV heads x 128, bf16 — a
Llama-3-8B shape), full cache vs RazorAttention, in the same process:

1. Per session at 8k–32k tokens: prefill and decode speed, KV bytes and peak memory.
2. Capacity at equal KV memory (bench_batching's capacity table on this model): in a KV budget of
   `--budget-sessions` full-cache sessions, how many `--capacity-length`-token sessions each cache admits (on the
   bytes a session may reach by the end of its turn, `CompressedKVCache.bytes_bound`, as the service's admission
   does), and the aggregate tokens/s of all of them decoding `--batch-decode` tokens together in one Scheduler
   batch, with the peak GPU memory of that run. The sessions are sliced from one full prefill of the prompt.

Only shapes and kernels matter for speed and bytes, so the weights are random and the retrieval heads are a
seeded random 16% of KV heads (what calibration kept on SmolLM2), in the model's dtype and, in a third variant,
in 8 bits (int8 + a float16 scale per 32 channels), in a fourth with 8-bit keys and 4-bit values.

    .venv/bin/python bench/bench_gpu.py [--lengths 8192 16384 32768] [--decode 64] [--fraction 0.16]
                                        [--capacity-length 8192] [--budget-sessions 4] [--batch-decode 32]

Without CUDA it prints a note and exits 0 (`make bench` runs every bench script); `--small --device cpu`
runs a 4-layer model through the same code (capacity length 4096 by default), as a smoke test of the script.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
from typing import Callable, TypeVar

import common  # first: puts the repository root on sys.path
import torch
from bench_batching import decode_together, derived, turn_bound
from bench_engine import measure
from transformers import LlamaConfig, LlamaForCausalLM

from services.engine import CompressionParams, Engine, HeadMap, LoadedModel
from services.engine.attention import flash_attn_func
from services.engine.evaluation import full_prefill
from services.engine.models import fingerprint

LLAMA_8B_SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0)
SMALL_SHAPE = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=32)
# Over twice the 1024-token window, so that map's store gives back its prefill headroom (KVBuffer.shrink) and is
# charged less than a full cache: at 2048 tokens both are charged about the same; at 512 the window keeps it all.
SMALL_CAPACITY_LENGTH = 4096
T = TypeVar("T")


class NoText:
    """The tokenizer of a random-weight model: the Scheduler streams text, and none of it would mean anything."""

    @staticmethod
    def decode(ids: list[int], skip_special_tokens: bool = False) -> str:
        return ""


def random_llama(shape: dict, max_len: int, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Random weights made directly on the device in `dtype` (no float32 copy of 8B parameters)."""
    config = LlamaConfig(**shape, max_position_embeddings=max_len, bos_token_id=1, eos_token_id=2)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return LoadedModel(model, NoText(), fingerprint(model), "random-llama", device, max_len)


def razor_maps(loaded: LoadedModel, fraction: float, seed: int) -> dict[str, HeadMap]:
    fp = loaded.fingerprint
    heads = [(layer, h) for layer in range(fp.n_layers) for h in range(fp.n_kv_heads)]
    kept = set(random.Random(seed).sample(heads, round(fraction * len(heads))))
    kv = [[h for h in range(fp.n_kv_heads) if (layer, h) in kept] for layer in range(fp.n_layers)]
    zeros = [[0.0] * fp.n_heads for _ in range(fp.n_layers)]
    pct = f"{len(kept) / len(heads):.0%}"

    def head_map(compression: CompressionParams) -> HeadMap:
        return HeadMap(fp, zeros, zeros, [], kv, compression, method="random-fraction")

    window = CompressionParams(sink=4, min_window=1024, ratio=1e9)
    return {f"razor {pct} KV heads, C=5 S0=256": head_map(CompressionParams(sink=4, min_window=256, ratio=5.0)),
            f"razor {pct} KV heads, window 1024": head_map(window),
            # int8 rows dequantised per step (kv_quant): what the shipped SmolLM2 map's storage costs on a GPU
            f"razor {pct} KV heads 8-bit, window 1024": head_map(dataclasses.replace(window, retrieval_bits=8)),
            # int8 keys and 4-bit values (two a byte), unpacked per step
            f"razor {pct} KV heads 8/4-bit, window 1024": head_map(window.stored_as("8/4")),
            # 6-bit keys (four in three bytes) and 4-bit values, unpacked per step
            f"razor {pct} KV heads 6/4-bit, window 1024": head_map(window.stored_as("6/4"))}


def with_peak(device: torch.device, work: Callable[[], T]) -> tuple[T, float]:
    """`work()` and the most GPU memory allocated while it ran, in GiB (nan off CUDA). Synchronized at both ends
    so no queued kernel runs into or out of it; the timings inside sync too (measure's, and every Scheduler step
    reads its sampled tokens back to the host)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = work()
    if cuda:
        torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


def run(engine: Engine, prompt: list[int], decode: int) -> dict:
    result, peak = with_peak(engine.device, lambda: measure(engine, prompt, decode))
    return {**result, "peak_gib": peak}


def random_prompt(n: int, loaded: LoadedModel, gen: torch.Generator) -> list[int]:
    return torch.randint(100, loaded.model.config.vocab_size, (n,), generator=gen).tolist()


def session_bound(engine: Engine, full_kv, ids: list[int], head_map: HeadMap, steps: int) -> int:
    """The KV bytes admission charges a session of `ids` under `head_map` for a `steps`-token turn."""
    return turn_bound(engine, derived(engine, full_kv, ids, head_map, len(ids)), steps)


def capacity_run(engine: Engine, full_kv, ids: list[int], head_map: HeadMap, budget: int,
                 steps: int) -> tuple[int, int, float, float]:
    """(bytes per session, sessions that fit `budget`, their aggregate decode tok/s together, peak GiB)."""
    one = session_bound(engine, full_kv, ids, head_map, steps)
    states = [derived(engine, full_kv, ids, head_map, len(ids)) for _ in range(budget // one)]
    tps, peak = with_peak(engine.device, lambda: decode_together(engine, states, steps))
    return one, len(states), tps, peak


def capacity_rows(engine: Engine, full_kv, ids: list[int], maps: dict[str, HeadMap], budget: int,
                  steps: int) -> list[list]:
    runs = {}
    for name, head_map in maps.items():
        runs[name] = capacity_run(engine, full_kv, ids, head_map, budget, steps)
        print(f"  capacity: {name}: {runs[name][1]} sessions, {runs[name][2]:.1f} tok/s", flush=True)
    _, base_fit, base_tps, _ = runs["full cache"]
    return [[name, common.mib(one), fit, f"{tps:.1f}", f"{fit / base_fit:.2f}x", f"{tps / base_tps:.2f}x",
             f"{peak:.2f}"] for name, (one, fit, tps, peak) in runs.items()]


def capacity_table(engine: Engine, maps: dict[str, HeadMap], ids: list[int], args) -> None:
    """The capacity table for sessions of `ids`, all sliced from one full prefill: one prompt's prefill memory
    and time (table 1 already prefills this long), not one prefill per session."""
    full_kv = full_prefill(engine, ids)
    warm = [derived(engine, full_kv, ids, hm, min(256, len(ids))) for hm in maps.values()]
    decode_together(engine, warm, 2)   # warm-up: the batched decode path's kernels and slabs
    budget = args.budget_sessions * session_bound(engine, full_kv, ids, maps["full cache"], args.batch_decode)
    rows = capacity_rows(engine, full_kv, ids, maps, budget, args.batch_decode)
    print(f"\nCapacity at equal KV memory: a budget of {budget / 2**20:.1f} MiB ({args.budget_sessions} full-cache "
          f"sessions), {len(ids)}-token sessions each decoding {args.batch_decode} tokens together:\n")
    print(common.table(["cache", "MiB per session (bound)", "sessions that fit", "aggregate tok/s",
                        "sessions vs full", "tok/s vs full", "peak GiB"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.16, help="share of KV heads kept in full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a 4-layer model (smoke test, e.g. on the CPU)")
    ap.add_argument("--capacity-length", type=int, default=None,
                    help=f"session length in the capacity table (default 8192; {SMALL_CAPACITY_LENGTH} with --small)")
    ap.add_argument("--budget-sessions", type=int, default=4, help="the KV budget, in full-cache sessions")
    ap.add_argument("--batch-decode", type=int, default=32, help="tokens each session decodes in the capacity run")
    args = ap.parse_args()
    capacity_length = args.capacity_length or (SMALL_CAPACITY_LENGTH if args.small else 8192)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; the GPU tables need the GPU machine (see docs/benchmarks.md).")
        return
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    max_len = max(max(args.lengths) + args.decode, capacity_length + args.batch_decode) + 64
    loaded = random_llama(SMALL_SHAPE if args.small else LLAMA_8B_SHAPE, max_len, device, dtype)
    maps = {"full cache": HeadMap.full(loaded.fingerprint), **razor_maps(loaded, args.fraction, seed=0)}
    engines = {name: Engine(loaded, hm) for name, hm in maps.items()}
    kernel = "flash-attn" if flash_attn_func is not None and device.type == "cuda" else "PyTorch SDPA + matmul LSE"
    print(common.header())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"model {loaded.fingerprint.id} ({dtype}) on {gpu}; local-head kernel: {kernel}\n", flush=True)
    for engine in engines.values():   # warm-up: kernels, allocator
        measure(engine, list(range(100, 356)), 2)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in args.lengths:
        prompt = random_prompt(n, loaded, gen)
        base = None
        for name, engine in engines.items():
            r = run(engine, prompt, args.decode)
            base = base or r
            rows.append([n, name, common.mib(r["bytes"]), f"{r['bytes'] / base['bytes']:.3f}",
                         f"{r['prefill_tps']:.0f}", f"{r['prefill_tps'] / base['prefill_tps']:.2f}x",
                         f"{r['decode_tps']:.1f}", f"{r['decode_tps'] / base['decode_tps']:.2f}x",
                         f"{r['peak_gib']:.2f}"])
            # the numbers in the progress line too: a run stopped at its time limit still reports the rows done
            print(f"  {n} tokens, {name}: bytes {r['bytes'] / base['bytes']:.3f} of full, prefill "
                  f"{r['prefill_tps']:.0f} tok/s, decode {r['decode_tps']:.1f} tok/s, peak {r['peak_gib']:.2f} GiB",
                  flush=True)
    print(common.table(["tokens", "cache", "KV MiB", "bytes / full", "prefill tok/s", "prefill vs full",
                        "decode tok/s", "decode vs full", "peak GiB"], rows, align="rlrrrrrrr"))
    # The full-cache engine prefills; the Scheduler runs each session under its own cache's head layout.
    capacity_table(engines["full cache"], maps, random_prompt(capacity_length, loaded, gen), args)


if __name__ == "__main__":
    main()
