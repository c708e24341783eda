"""Per-family head orders: can ANY static head set keep one retrieval skill within the byte goal?

For each family alone: KV-head gates trained on that family's tasks only (head_gates.py, calibration part, as
`bench_quality --orders gates` trains them on all five), then that family's share of the full cache's answers
kept on the bench part along its own order, at several head counts and fixed windows. An order trained on the
one skill it is scored on is the most favourable static selection this project can make for that skill: where
it misses the target at a byte fraction, a head map serving every family misses it there too.

Then the family orders merged, round-robin (each family's next head in turn, in `--families` order) and by
Borda count (mean rank), scored on every family: do per-family orders combine into one map?

    .venv/bin/python bench/bench_family_orders.py            # full size (~1 h on a 2-core CPU)
    .venv/bin/python bench/bench_family_orders.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import bench_quality as bq
import common

from services.engine import CompressionParams, Engine, HeadMap, load_model
from services.engine.evaluation import full_prefill, retrieval_tasks
from services.engine.head_gates import GateParams
from services.engine.headmap import shipped_head_map

Head = tuple[int, int]


def family_order(engine: Engine, family: str, args) -> list[Head]:
    """KV heads ranked by gates trained on `family`'s calibration-part tasks alone, most needed first."""
    return bq.gate_order(engine, args.lengths, args.gate_tasks, args.sink, args.gate_window,
                         GateParams(steps=args.gate_steps, batch=8), families=(family,))


class FamilyBench:
    """One family's bench-part tasks at every length, prefilled once; `kept` scores a head map on them."""

    def __init__(self, engine: Engine, family: str, args):
        self.engine, self.family, self.lengths = engine, family, args.lengths
        self.tasks = {n: retrieval_tasks(family, n, args.tasks, bq.BENCH_SEED + n, engine.tokenizer, part="bench")
                      for n in args.lengths}
        self.kvs = {n: [full_prefill(engine, t.document) for t in tasks] for n, tasks in self.tasks.items()}
        full = HeadMap.full(engine.loaded.fingerprint)
        self.full = {n: bq.evaluate(engine, self.tasks[n], self.kvs[n], full) for n in args.lengths}

    def kept(self, hm: HeadMap) -> dict:
        """{length: share of the full cache's answers kept} and the bytes fraction at the first length."""
        results = {n: bq.evaluate(self.engine, self.tasks[n], self.kvs[n], hm) for n in self.lengths}
        return {"kept": {n: bq.cell(r, self.full[n], self.family)[1] for n, r in results.items()},
                "bytes": results[self.lengths[0]]["bytes"],
                "answered_by_full": {n: sum(r["hits"][self.family]) for n, r in self.full.items()}}


def fixed(base: HeadMap, heads: list[Head], sink: int, window: int) -> HeadMap:
    return bq.make_map(base, heads, CompressionParams(sink=sink, min_window=window, ratio=1e9), "family-order")


def round_robin(orders: dict[str, list[Head]]) -> list[Head]:
    """Each family's next head not yet taken, in turn, until every head is."""
    merged, taken = [], set()
    iterators = [iter(order) for order in orders.values()]
    while len(merged) < len(next(iter(orders.values()))):
        for it in iterators:
            head = next((h for h in it if h not in taken), None)
            if head is not None:
                taken.add(head)
                merged.append(head)
    return merged


def borda(orders: dict[str, list[Head]]) -> list[Head]:
    """Every head by its summed rank over the families' orders (Borda count), best first."""
    heads = next(iter(orders.values()))
    return sorted(heads, key=lambda head: sum(order.index(head) for order in orders.values()))


def run(args) -> dict:
    """Every family's own order, then per family (one family's caches held at a time): its own frontier and
    the merged orders' points."""
    loaded = load_model("smollm2", "cpu")
    engine, shipped = Engine(loaded), shipped_head_map(loaded.fingerprint)
    orders = {family: family_order(engine, family, args) for family in args.families}
    print(f"  every family's gates trained ({args.clock})", flush=True)
    merges = {"round-robin": round_robin(orders), "borda": borda(orders)}
    results: dict = {"own": {}, "merged": {name: {} for name in merges}, "orders": orders}
    for family in args.families:
        bench = FamilyBench(engine, family, args)
        results["own"][family] = {f"{k},{w}": bench.kept(fixed(shipped, orders[family][:k], args.sink, w))
                                  for w in args.windows for k in args.ks}
        for name, order in merges.items():
            results["merged"][name][family] = {f"{k},{w}": bench.kept(fixed(shipped, order[:k], args.sink, w))
                                               for w in args.windows for k in args.merge_ks}
        print(f"  {family}: scored along its own and the merged orders ({args.clock})", flush=True)
    return results


def print_tables(results: dict, args) -> None:
    lengths = " / ".join(map(str, args.lengths))
    rows = [[family, key.split(",")[0], key.split(",")[1], f"{point['bytes']:.3f}",
             " / ".join(f"{point['kept'][n]:.0%}" for n in args.lengths)]
            for family, points in results["own"].items() for key, point in points.items()]
    print(f"\nEach family along its OWN gate order: share of the full cache's answers kept at {lengths} tokens\n")
    print(common.table(["family", "KV heads full", "window", f"bytes / full @{args.lengths[0]}", "kept"], rows))
    rows = [[name, key.split(",")[0], key.split(",")[1], f"{next(iter(per.values()))[key]['bytes']:.3f}",
             *[" / ".join(f"{per[f][key]['kept'][n]:.0%}" for n in args.lengths) for f in per]]
            for name, per in results["merged"].items() for key in next(iter(per.values()))]
    print(f"\nThe family orders merged, scored on every family (kept at {lengths} tokens)\n")
    print(common.table(["merge", "KV heads full", "window", "bytes / full", *args.families], rows))


def plot(results: dict, args, path: Path) -> None:
    """One panel per window: each family's lowest share kept over the lengths against bytes, along its order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.windows), figsize=(max(9, 5 * len(args.windows)), 4.4), sharey=True,
                             squeeze=False)
    for ax, w in zip(axes[0], args.windows):
        for i, (family, points) in enumerate(results["own"].items()):
            pts = [points[f"{k},{w}"] for k in args.ks]
            ax.plot([100 * p["bytes"] for p in pts], [min(p["kept"].values()) for p in pts], marker="os^vDx"[i % 6],
                    ms=4, label=family)
        ax.axvline(25, color="red", lw=0.8, ls="-.")
        ax.axhline(0.97, color="green", lw=0.8, ls=":")
        ax.set(xlabel="KV bytes kept (% of full)", title=f"each family's own gate order, fixed window {w}",
               ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of the full cache's answers kept (worst length)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"SmolLM2-135M: each retrieval skill along a head order trained on it alone, "
                 f"{args.tasks} documents per length\n(green: 97% of the full cache's answers kept; "
                 "red: 25% of the bytes)", fontsize=9)
    common.save_figure(fig, path)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: two families, 400 tokens, 2 tasks")
    ap.add_argument("--families", nargs="+", default=["multi", "passkey", "word", "digits", "turn", "edge"],
                    choices=bq.BENCH_FAMILIES, help="also the round-robin merge's order")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--tasks", type=int, default=12, help="bench tasks per family and length")
    ap.add_argument("--gate-tasks", type=int, default=8, help="gate-training tasks per family and length")
    ap.add_argument("--gate-steps", type=int, default=80, help="gate-training optimiser steps (of 8 tasks)")
    ap.add_argument("--gate-window", type=int, default=64)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 15, 20, 25, 30, 45])
    ap.add_argument("--merge-ks", type=int, nargs="+", default=[15, 18, 20, 22])
    ap.add_argument("--windows", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--json", default=None, help="results path (default: a temporary file)")
    ap.add_argument("--png", default=None, help="plot path (default docs/family-orders.png)")
    args = ap.parse_args()
    if args.quick:
        args.families, args.lengths, args.tasks, args.gate_tasks = ["digits", "passkey"], [400], 2, 1
        args.gate_steps, args.ks, args.merge_ks, args.windows = 10, [0, 15], [15], [64]
    args.png = common.plot_path(args, "family-orders.png")
    args.json = args.json or str(Path(tempfile.gettempdir()) / "family-orders.json")
    return args


def main() -> None:
    args = parse_args()
    common.begin(args)
    results = run(args)
    Path(args.json).write_text(json.dumps(results))
    print_tables(results, args)
    plot(results, args, Path(args.png))
    print(f"\nresults: {args.json}\nplot: {args.png}\nbench_family_orders: {args.clock}")


if __name__ == "__main__":
    main()
