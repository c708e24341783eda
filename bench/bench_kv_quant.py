"""Retrieval heads stored in 8 or 4 bits: more heads kept full within a quarter of the bytes?

At a quarter of a 16-bit cache's bytes a static map keeps about 20 of SmolLM2's 90 KV heads full (3.2d-f),
and there the losses are real; at about 45 heads only the full cache's near-ties are lost (3.2e). Stored in
8 bits, 45 heads cost what 23 cost in 16; in 4 bits, what 13 cost. This bench measures whether the answers
survive the rounding: the top k of a head order (`--order` JSON, e.g. `bench_layer_windows --save-order`; else
six-family gates trained here as `bench_layer_windows` trains them) kept full with their keys and values
rounded to `bits`-bit integers, symmetric, one float16 scale per `--group` channels of a row (per token and
head, after RoPE), every other head at sink + a fixed window in 16 bits with its compensation token.

Simulated (written before the engine stored integers; it now keeps retrieval heads in 8 bits with
`CompressionParams.retrieval_bits = 8`, and 4-bit values beside 8-bit keys with `retrieval_value_bits = 4`,
kv_quant.py; `bench_quality --bits 8` measures the 8-bit path; this bench also covers 4-bit keys, which the
engine does not store). Each document's cache is built from its full prefill as the
engine builds it, then the retrieval heads' rows are quantised and dequantised in place; the question turn's
own rows (and the "turn" family's interlude) stay unrounded, as a quantised store's recent rows would
(KIVI keeps a recent residual in full precision). Bytes are those a packed store would hold (integers, scales,
the 16-bit local rows and the float32 compensation token) against a 16-bit full cache.

    .venv/bin/python bench/bench_kv_quant.py --order bench/orders/order6.json   # full size (~25 min, 2-core CPU)
    .venv/bin/python bench/bench_kv_quant.py --quick                # smoke run
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import bench_quality as bq
import common
import torch

from services.engine import CompressionParams, Engine, HeadMap, evaluation, load_model
from services.engine.evaluation import full_prefill, retrieval_tasks
from services.engine.headmap import shipped_head_map

FULL_ITEMSIZE = 2    # bytes per element of the full cache the fractions compare with (bfloat16, as on a GPU)
SCALE_ITEMSIZE = 2   # float16 scales


@dataclass(frozen=True)
class Bits:
    keys: int
    values: int

    def __str__(self) -> str:
        return str(self.keys) if self.keys == self.values else f"{self.keys}/{self.values}"


def fake_quant(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """x: [..., D] rounded to `bits`-bit signed integers per `group` channels (symmetric absmax, a float16
    scale each) and back, in x's dtype."""
    shape = x.shape
    assert shape[-1] % group == 0, (shape, group)
    groups = x.float().reshape(*shape[:-1], shape[-1] // group, group)            # [..., D / group, group]
    qmax = 2 ** (bits - 1) - 1
    scale = (groups.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-8).half().float()
    return (torch.round(groups / scale).clamp(-qmax, qmax) * scale).reshape(shape).to(x.dtype)


def quantised(bits: Bits, group: int):
    """Within: every session `evaluation` builds holds its retrieval heads' keys and values rounded to
    `bits.keys` and `bits.values` bits (16: unrounded)."""
    def quantise(state) -> None:
        for layer in state.cache.layers:
            if layer.retrieval is None:
                continue
            for rows, b in ((layer.retrieval.keys, bits.keys), (layer.retrieval.values, bits.values)):
                if b < 16:
                    rows.copy_(fake_quant(rows, b, group))                     # a view of the store

    return bq.transformed_sessions(quantise)


def packed_nbytes(elements: int, bits: int, group: int) -> int:
    return (elements * bits // 8 + elements // group * SCALE_ITEMSIZE) if bits < 16 else elements * FULL_ITEMSIZE


def packed_fraction(state, bits: Bits, group: int) -> float:
    """Bytes a packed store of this cache would hold, as a fraction of a 16-bit full cache's."""
    held = full = 0
    for layer in state.cache.layers:
        head_dim = (layer.keys if layer.keys is not None else layer.local_keys).shape[-1]
        full += 2 * layer.n_kv_heads * layer.seq_len * head_dim * FULL_ITEMSIZE
        if layer.keys is not None:
            elements = layer.keys.numel()
            held += packed_nbytes(elements, bits.keys, group) + packed_nbytes(elements, bits.values, group)
        if layer.local_keys is not None:
            held += 2 * layer.local_keys.numel() * FULL_ITEMSIZE
        if layer.comp_keys is not None:
            held += 2 * layer.comp_keys.numel() * 4
    return held / full


def points(spec: list[str]) -> list[tuple[int, Bits]]:
    """'45:8' -> (45 KV heads full, keys and values in 8 bits); '45:8/4' -> keys in 8 bits, values in 4."""
    out = []
    for item in spec:
        k, bits = item.split(":")
        key_bits, _, value_bits = bits.partition("/")
        pair = Bits(int(key_bits), int(value_bits or key_bits))
        if not {pair.keys, pair.values} <= {4, 8, 16}:
            raise SystemExit(f"bits must be 4, 8 or 16 (unrounded), for keys/values, got {item!r}")
        out.append((int(k), pair))
    return out


def run(args) -> dict:
    loaded = load_model("smollm2", "cpu")
    engine, shipped = Engine(loaded), shipped_head_map(loaded.fingerprint)
    order = bq.saved_or_trained_order(engine, args)
    compression = CompressionParams(sink=args.sink, min_window=args.window, ratio=1e9)
    maps = {(k, bits): bq.make_map(shipped, order[:k], compression, "quantised") for k, bits in points(args.points)}
    full = HeadMap.full(loaded.fingerprint)
    results: dict = {"full": {}, "points": {f"{k}:{bits}": {} for k, bits in maps}}
    for n in args.lengths:
        tasks = [t for family in bq.BENCH_FAMILIES
                 for t in retrieval_tasks(family, n, args.tasks, bq.BENCH_SEED + n, engine.tokenizer, part="bench")]
        kvs = [full_prefill(engine, t.document) for t in tasks]
        results["full"][n] = bq.evaluate(engine, tasks, kvs, full)
        for (k, bits), hm in maps.items():
            with quantised(bits, args.group):
                result = bq.evaluate(engine, tasks, kvs, hm)
                state = evaluation.session_from_full(engine, tasks[0].document, kvs[0], hm)
            results["points"][f"{k}:{bits}"][n] = {**result, "bytes": packed_fraction(state, bits, args.group)}
            print(f"  {n} tokens: {k} heads in {bits} bits scored on {len(tasks)} tasks ({args.clock})", flush=True)
        del kvs
    return results


def kept(results: dict, key: str, family: str) -> list[float]:
    return [bq.cell(results["points"][key][n], results["full"][n], family)[1] for n in results["full"]]


def print_table(results: dict, args) -> None:
    lengths = " / ".join(map(str, results["full"]))
    answered = ", ".join(f"{f} {' / '.join(str(sum(results['full'][n]['hits'][f])) for n in results['full'])}"
                         for f in bq.BENCH_FAMILIES)
    rows = [[*key.split(":"), " / ".join(f"{per[n]['bytes']:.3f}" for n in results["full"]),
             *[" / ".join(f"{x:.0%}" for x in kept(results, key, f)) for f in bq.BENCH_FAMILIES]]
            for key, per in results["points"].items()]
    print(f"\nShare of the full cache's answers kept at {lengths} tokens ({args.tasks} documents per family and "
          f"length, window {args.window}, sink {args.sink}, groups of {args.group}; the full cache answers "
          f"{answered})\n")
    print(common.table(["KV heads full", "bits", f"bytes / 16-bit full @{lengths}", *bq.BENCH_FAMILIES], rows))


def summary(results: dict) -> dict:
    """{"k:bits": {"bytes": at the first length, "kept": {family: share kept at its worst length}}}: the plot's data."""
    first = next(iter(results["full"]))
    return {key: {"bytes": per[first]["bytes"], "kept": {f: min(kept(results, key, f)) for f in bq.BENCH_FAMILIES}}
            for key, per in results["points"].items()}


def plot(points: dict, args, path: Path) -> None:
    """Each family's worst-length share kept against the bytes, one column of markers per (heads, bits) point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(points, key=lambda key: points[key]["bytes"])
    x = [100 * points[key]["bytes"] for key in keys]
    fig, ax = plt.subplots(figsize=(9, 4.6))
    for i, family in enumerate(bq.BENCH_FAMILIES):
        ax.plot(x, [points[key]["kept"][family] for key in keys], "os^vDx"[i], ms=5, alpha=0.8, label=family)
    ax.plot(x, [min(points[key]["kept"].values()) for key in keys], "k_", ms=16, mew=2,
            label="worst family (not a curve: each point has its own heads and bits)")
    for xi, key in zip(x, keys):
        k, bits = key.split(":")
        ax.annotate(f"{k}@{bits}b", (xi, 1.01), fontsize=7, rotation=60, ha="left", va="bottom")
    ax.axvline(25, color="red", lw=0.8, ls="-.")
    ax.axhline(0.97, color="green", lw=0.8, ls=":")
    ax.set(xlabel=f"KV bytes kept at {args.lengths[0]} tokens (% of a 16-bit full cache)", ylim=(-0.03, 1.2),
           ylabel="share of the full cache's answers kept (worst length)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"SmolLM2-135M: retrieval heads in 16, 8 or 4 bits (k@bits), local heads sink {args.sink} + "
                 f"window {args.window}; {args.tasks} documents per family and length\n(green: 97% kept; red: "
                 "25% of the bytes)", fontsize=9)
    common.save_figure(fig, path)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 400 tokens, 2 tasks, three points")
    ap.add_argument("--points", nargs="+", default=["20:16", "45:16", "40:8", "45:8", "45:4", "60:4", "75:4", "90:8",
                                                     "90:4"], help="KV heads full:bits or :key bits/value bits (16 = unrounded)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--tasks", type=int, default=12, help="bench tasks per family and length")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--group", type=int, default=32, help="channels per scale (SmolLM2's heads have 64)")
    bq.add_order_args(ap)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--png", default=None, help="plot path (default docs/kv-quant.png)")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.tasks, args.points = [400], 2, ["20:16", "45:8", "45:4"]
        args.gate_tasks, args.gate_steps = 1, 10
    args.png = common.plot_path(args, "kv-quant.png")
    return args


def main() -> None:
    args = parse_args()
    common.begin(args)
    results = run(args)
    print_table(results, args)
    plot(summary(results), args, Path(args.png))
    print(f"\nplot: {args.png}\nbench_kv_quant: {args.clock}")


if __name__ == "__main__":
    main()
