"""KV bytes per session, full cache vs RazorServe, and how many sessions fit in a byte budget.

Only shapes matter for bytes, so no model runs: each cache is a real `CompressedKVCache` filled with
`append` + `compress` from zero K/V tensors of the model's shapes (one shared [1, n_kv_heads, N, D] tensor per
length; the cache copies only what it keeps). The full-cache baseline is the same cache's `full_nbytes()`,
checked once against a real all-heads-full cache.

    .venv/bin/python bench/bench_memory.py [--lengths 1024 2048 4096 8192] [--budgets-gib 1 8]
"""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

import common  # first: puts the repository root on sys.path
import torch

from services.engine import CompressedKVCache, CompressionParams, HeadMap
from services.engine.headmap import SHIPPED_DIR
from services.engine.profiling import ProfileParams, select_heads

FIXED_64 = CompressionParams(sink=4, min_window=64, ratio=1e9)  # the issue-7 / bench_quality setting


@dataclass(frozen=True)
class Shapes:
    name: str
    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype


@dataclass(frozen=True)
class Variant:
    name: str
    retrieval_kv_heads: list
    compression: CompressionParams


def cache_bytes(shapes: Shapes, variant: Variant, seq_len: int) -> tuple[int, int]:
    """(bytes kept, bytes a full cache would hold) after a prefill of `seq_len` tokens. Kept bytes exclude the
    storage headroom (at most a quarter + 16 rows per group, reported by `nbytes()` and counted by the budget)."""
    kv = torch.zeros(1, shapes.n_kv_heads, seq_len, shapes.head_dim, dtype=shapes.dtype)
    cache = CompressedKVCache(variant.retrieval_kv_heads, shapes.n_kv_heads, variant.compression)
    for layer_idx in range(shapes.n_layers):
        cache.append(layer_idx, kv, kv)
    cache.compress()
    return cache.stored_nbytes(), cache.full_nbytes()


def check_full_baseline(shapes: Shapes) -> None:
    every = Variant("full", [list(range(shapes.n_kv_heads))] * shapes.n_layers, CompressionParams())
    held, full = cache_bytes(shapes, every, 256)
    assert held == full, (held, full)


def smollm2_variants() -> tuple[Shapes, list[Variant]]:
    """SmolLM2-135M (float32 caches, as the engine loads it) with the shipped head map's selections."""
    shipped = HeadMap.from_json((SHIPPED_DIR / "smollm2.headmap.json").read_text())
    fp = shipped.fingerprint
    _, paper_kv = select_heads(torch.tensor(shipped.induction), torch.tensor(shipped.echo), ProfileParams(), fp)
    shapes = Shapes("SmolLM2-135M", fp.n_layers, fp.n_kv_heads, fp.head_dim, torch.float32)
    variants = [Variant(f"paper selection, C={CompressionParams().ratio:g} S0={CompressionParams().min_window}",
                        paper_kv, CompressionParams()),
                Variant("paper selection, window 64", paper_kv, FIXED_64)]
    if shipped.calibration:
        c = shipped.compression
        variants.append(Variant(f"calibrated (shipped), window {c.min_window}" +
                                (f" C={c.ratio:g}" if c.ratio < 1e6 else ""), shipped.retrieval_kv_heads, c))
    variants.append(Variant("window only (no full heads), window 64", [[] for _ in range(fp.n_layers)], FIXED_64))
    return shapes, variants


def llama_variants(fraction: float, seed: int) -> tuple[Shapes, list[Variant]]:
    """An 8B-class shape (32 layers, 32 query heads, 8 KV heads, 128 dims, bf16) with random full KV heads."""
    shapes = Shapes("Llama 32x32q/8kv x128 bf16", 32, 8, 128, torch.bfloat16)
    heads = [(layer, h) for layer in range(shapes.n_layers) for h in range(shapes.n_kv_heads)]
    chosen = set(random.Random(seed).sample(heads, round(fraction * len(heads))))
    kv = [[h for h in range(shapes.n_kv_heads) if (layer, h) in chosen] for layer in range(shapes.n_layers)]
    pct = f"{len(chosen) / len(heads):.0%}"
    return shapes, [Variant(f"{pct} KV heads full, C=5 S0=256", kv, CompressionParams()),
                    Variant(f"{pct} KV heads full, window 64", kv, FIXED_64),
                    Variant(f"{pct} KV heads full, paper S0=4000 C=5", kv,
                            CompressionParams(min_window=4000, ratio=5.0))]


def rows_for(shapes: Shapes, variants: list[Variant], lengths: list[int], budgets_gib: list[float]) -> list[list]:
    """One row per length and cache; `capacity` = sessions that fit relative to the full cache (full / held)."""
    rows = []
    for n in lengths:
        full = None
        for v in variants:
            held, full_bytes = cache_bytes(shapes, v, n)
            if full is None:  # the baseline row, measured in the same run
                full = full_bytes
                rows.append([shapes.name, n, "full cache", common.mib(full), "1.000", "0%", "1.00x",
                             *[int(b * 2**30 // full) for b in budgets_gib]])
            assert full_bytes == full
            rows.append([shapes.name, n, v.name, common.mib(held), f"{held / full:.3f}", f"{1 - held / full:.0%}",
                         f"{full / held:.2f}x", *[int(b * 2**30 // held) for b in budgets_gib]])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--budgets-gib", type=float, nargs="+", default=[1.0, 8.0])
    ap.add_argument("--llama-fraction", type=float, default=0.16, help="fraction of KV heads kept full")
    ap.add_argument("--seed", type=int, default=0, help="random KV-head selection of the Llama config")
    args = ap.parse_args()
    clock = common.Stopwatch()
    print(common.header())
    budgets = [f"sessions in {b:g} GiB" for b in args.budgets_gib]
    columns = ["model", "tokens", "cache", "KV MiB", "bytes / full", "saved", "capacity vs full", *budgets]
    rows = []
    for shapes, variants in (smollm2_variants(), llama_variants(args.llama_fraction, args.seed)):
        check_full_baseline(shapes)
        rows += rows_for(shapes, variants, args.lengths, args.budgets_gib)
    print("\nKV bytes per session (prefill of N tokens; compensation tokens included; model weights excluded)\n")
    print(common.table(columns, rows, align="lrl" + "r" * (len(columns) - 3)))
    print(f"\nbench_memory: {clock}")


if __name__ == "__main__":
    main()
