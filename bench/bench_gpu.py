"""Issue 6 §2 on a GPU: prefill and decode speed, KV bytes and peak memory of a random-weight Llama
(32 layers, 32 query / 8 KV heads x 128, bf16 — a Llama-3-8B shape) at 8k–32k tokens, full cache vs
RazorAttention, in the same process. Only shapes and kernels matter for speed and bytes, so the weights
are random and the retrieval heads are a seeded random 16% of KV heads (what calibration keeps on SmolLM2).

    .venv/bin/python bench/bench_gpu.py [--lengths 8192 16384 32768] [--decode 64] [--fraction 0.16]

Without CUDA it prints a note and exits 0 (`make bench` runs every bench script); `--small --device cpu`
runs a 4-layer model through the same code, as a smoke test of the script.
"""
from __future__ import annotations

import argparse
import random

import common  # first: puts the repository root on sys.path
import torch
from bench_engine import measure
from transformers import LlamaConfig, LlamaForCausalLM

from services.engine import CompressionParams, Engine, HeadMap, LoadedModel
from services.engine.attention import flash_attn_func
from services.engine.models import fingerprint

LLAMA_8B_SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0)
SMALL_SHAPE = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=32)


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
    return LoadedModel(model, None, fingerprint(model), "random-llama", device, max_len)


def razor_maps(loaded: LoadedModel, fraction: float, seed: int) -> dict[str, HeadMap]:
    fp = loaded.fingerprint
    heads = [(layer, h) for layer in range(fp.n_layers) for h in range(fp.n_kv_heads)]
    kept = set(random.Random(seed).sample(heads, round(fraction * len(heads))))
    kv = [[h for h in range(fp.n_kv_heads) if (layer, h) in kept] for layer in range(fp.n_layers)]
    zeros = [[0.0] * fp.n_heads for _ in range(fp.n_layers)]
    pct = f"{len(kept) / len(heads):.0%}"

    def head_map(compression: CompressionParams) -> HeadMap:
        return HeadMap(fp, zeros, zeros, [], kv, compression, method="random-fraction")

    return {f"razor {pct} KV heads, C=5 S0=256": head_map(CompressionParams(sink=4, min_window=256, ratio=5.0)),
            f"razor {pct} KV heads, window 1024": head_map(CompressionParams(sink=4, min_window=1024, ratio=1e9))}


def run(engine: Engine, prompt: list[int], decode: int) -> dict:
    cuda = engine.model.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = measure(engine, prompt, decode)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.16, help="share of KV heads kept in full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a 4-layer model (smoke test, e.g. on the CPU)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; the GPU tables need the GPU machine (see docs/benchmarks.md).")
        return
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = random_llama(SMALL_SHAPE if args.small else LLAMA_8B_SHAPE, max(args.lengths) + args.decode + 64,
                          device, dtype)
    engines = {"full cache": Engine(loaded, HeadMap.full(loaded.fingerprint))}
    engines.update({name: Engine(loaded, hm) for name, hm in razor_maps(loaded, args.fraction, seed=0).items()})
    kernel = "flash-attn" if flash_attn_func is not None and device.type == "cuda" else "PyTorch SDPA + matmul LSE"
    print(common.header())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"model {loaded.fingerprint.id} ({dtype}) on {gpu}; local-head kernel: {kernel}\n", flush=True)
    for engine in engines.values():   # warm-up: kernels, allocator
        measure(engine, list(range(100, 356)), 2)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in args.lengths:
        prompt = torch.randint(100, loaded.model.config.vocab_size, (n,), generator=gen).tolist()
        base = None
        for name, engine in engines.items():
            r = run(engine, prompt, args.decode)
            base = base or r
            rows.append([n, name, common.mib(r["bytes"]), f"{r['bytes'] / base['bytes']:.3f}",
                         f"{r['prefill_tps']:.0f}", f"{r['prefill_tps'] / base['prefill_tps']:.2f}x",
                         f"{r['decode_tps']:.1f}", f"{r['decode_tps'] / base['decode_tps']:.2f}x",
                         f"{r['peak_gib']:.2f}"])
            print(f"  {n} tokens, {name}: done", flush=True)
    print(common.table(["tokens", "cache", "KV MiB", "bytes / full", "prefill tok/s", "prefill vs full",
                        "decode tok/s", "decode vs full", "peak GiB"], rows, align="rlrrrrrrr"))


if __name__ == "__main__":
    main()
