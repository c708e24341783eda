"""Quality on the embedded SmolLM2: six retrieval families at several lengths, full cache vs compressed variants.

The five families of varied prose (retrieval_tasks.py) and the pass key in one repeated sentence. Documents
come from the corpus's BENCH part (calibration searched on another part and validated on a third)
with seeds calibration never used. Each document is prefilled ONCE with full attention; every variant is
derived from that cache and the question is asked in a later turn (the "turn" family caches an intervening
turn first), so answers come from the compressed cache. A task counts as answered when every answer token is
the model's greedy choice (teacher-forced, batched: what greedy generation would produce first).

Table 1 (per family x length): the full cache; the full cache with its keys and values rounded to bfloat16
(an innocuous perturbation: the answers it loses are the noise floor of "kept"); the paper's selection
(induction 15% + echo 1% of query heads, widened to KV heads, C = 5, S0 = 256, the engine's default
compression); window only (no full heads, the calibrated map's window, no compensation); random KV heads at the
calibrated map's count and compression (equal bytes); the calibrated map (the shipped one unless
`--calibrated-map` names another). Accuracy, kept (of the full cache's
answers, the fraction still answered) and bytes.
Table 2 / plot: the frontier, accuracy against bytes at several fixed windows, per family, at the frontier
lengths, along head orders ranked here on tasks of the calibration part: learned gates (`head_gates`, how
calibration ranks by default), the heads' attention on the facts (`fact_attention`, every family one vote)
and the calibrated map's recorded order (`--orders gates attention recorded`).
The lowest per-family margin to the full cache decides whether a point meets the target. `--bits 8` (or 8/4,
6/4) keeps the frontier's retrieval heads in integers with scales (kv_quant.py), its bytes counted as against a
16-bit full cache;
`--rows maps` (or `full`) skips the baseline rows when only the maps and the frontier are wanted.

Tasks are prefilled `--chunk` at a time and every map is scored on a chunk before the next, so the number of
tasks is bounded by time, not memory.

    .venv/bin/python bench/bench_quality.py            # full size
    .venv/bin/python bench/bench_quality.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable

import common
import torch

from services.engine import CompressionParams, Engine, HeadMap, evaluation, kv_quant, load_model
from services.engine.evaluation import (FAMILIES, full_prefill, held, retrieval_tasks, score_answers,
                                       session_from_full)
from services.engine.fact_attention import fact_attention, one_vote_per_family
from services.engine.head_gates import GateParams, train_gates
from services.engine.headmap import shipped_head_map
from services.engine.profiling import ProfileParams, select_heads

BENCH_SEED = 777_000   # calibration uses 1234 (+1000 for validation) on other corpus parts
RANK_SEED = 555_000    # the attention ranking's tasks (calibration part, never the bench's)
NOISE_ROW = "full cache, keys/values rounded to bf16"   # `evaluation.held`: the noise floor of "kept"
# Scored: calibration's five families and the pass key in one repeated sentence (the previous bench's skill:
# repetitive documents, where a map tuned on varied prose alone can fail).
BENCH_FAMILIES = FAMILIES + ("passkey",)


def documents_seed(length: int, seed: int | None = None) -> int:
    """The bench documents' seed: 777000 + length unless another seed of the bench part was asked for."""
    return BENCH_SEED + length if seed is None else seed


def make_map(base: HeadMap, heads, compression: CompressionParams, method: str) -> HeadMap:
    fp, heads = base.fingerprint, set(map(tuple, heads))
    kv = [[h for h in range(fp.n_kv_heads) if (layer, h) in heads] for layer in range(fp.n_layers)]
    return HeadMap(fp, base.induction, base.echo, [], kv, compression, method=method)


def all_kv_heads(fp) -> list[tuple[int, int]]:
    return [(layer, h) for layer in range(fp.n_layers) for h in range(fp.n_kv_heads)]


def heads_of(hm: HeadMap) -> list[tuple[int, int]]:
    return [(layer, h) for layer, hs in enumerate(hm.retrieval_kv_heads) for h in hs]


def variants(calibrated: HeadMap, seed: int, others: tuple[HeadMap, ...] = ()) -> dict[str, HeadMap]:
    """The table's rows; `others`: more calibrated maps to compare (the shipped one, when another is tried)."""
    fp = calibrated.fingerprint
    profile = torch.tensor(calibrated.induction), torch.tensor(calibrated.echo)
    _, paper_kv = select_heads(*profile, ProfileParams(), fp)
    paper = [(layer, h) for layer, hs in enumerate(paper_kv) for h in hs]
    everything = all_kv_heads(fp)
    random.Random(seed).shuffle(everything)
    c = calibrated.compression
    return {"full cache": HeadMap.full(fp), NOISE_ROW: HeadMap.full(fp),
            "paper selection (C=5, S0=256)": make_map(calibrated, paper, CompressionParams(), "paper"),
            f"window only ({c.sink}+{c.min_window})": make_map(calibrated, [], replace(c, compensation=False),
                                                               "window"),
            "random KV heads, equal bytes": make_map(calibrated, everything[:len(heads_of(calibrated))], c,
                                                     "random"),
            **{f"calibrated map {hm.version} ({len(heads_of(hm))} KV heads)": hm for hm in (*others, calibrated)}}


def frontier_maps(shipped: HeadMap, orders: dict[str, list], ks, windows,
                  bits=("16",)) -> list[tuple[str, int, int, HeadMap]]:
    """(order name, k, window, map): the top `k` heads of each order kept full (in each storage of `bits`, 16, 8,
    8/4 or 6/4: a point's order name says any but 16), the rest at a fixed window."""
    c = replace(shipped.compression, ratio=1e9)
    return [(name if str(b) == "16" else f"{name} {b}-bit", k, w,
             make_map(shipped, order[:k], replace(c, min_window=w).stored_as(b), "frontier"))
            for name, order in orders.items() for b in bits for w in windows for k in ks]


def attention_order(engine: Engine, length: int, n: int) -> list[tuple[int, int]]:
    """KV heads ranked by their attention on the facts (fact_attention.py) over `n` tasks per family of the
    CALIBRATION part, one vote per family, as calibration ranks them."""
    fp = engine.loaded.fingerprint
    heads = all_kv_heads(fp)
    by_family = {}
    for family in FAMILIES:
        masses = [m for t in retrieval_tasks(family, length, n, RANK_SEED, engine.tokenizer, part="calibration")
                  if (m := fact_attention(engine, t)) is not None]                 # [n_layers, n_kv_heads] each
        mean = torch.stack(masses).mean(0)
        by_family[family] = {head: float(mean[head]) for head in heads}
        print(f"  ranked heads on {len(masses)} {family} tasks", flush=True)
    votes = one_vote_per_family(by_family)
    return sorted(heads, key=lambda head: -votes[head])


def gate_order(engine: Engine, lengths: list[int], n: int, sink: int, window: int,
               params: GateParams, families: tuple[str, ...] = FAMILIES) -> list[tuple[int, int]]:
    """KV heads ranked by learned gates (head_gates.py, as calibration ranks them by default), trained on `n`
    tasks per family (of `families`) and length of the CALIBRATION part."""
    fp = engine.loaded.fingerprint
    tasks = [t for family in families for length in lengths
             for t in retrieval_tasks(family, length, n, RANK_SEED + length, engine.tokenizer, part="calibration")]
    kvs = [held(full_prefill(engine, t.document)) for t in tasks]
    print(f"  prefilled {len(tasks)} gate-training tasks ({sink}+{window}) ", flush=True)

    def progress(done, total, stage):
        if done % 25 == 0 or done == total:
            print(f"  {stage}: step {done}/{total}", flush=True)

    scores = train_gates(engine.model, tasks, kvs, fp.n_layers, fp.n_kv_heads, sink, window, params, progress)
    return sorted(all_kv_heads(fp), key=lambda head: -float(scores[head]))


def read_order(path: str) -> list[tuple[int, int]]:
    """A head order saved as JSON ([[layer, KV head], ...], most needed first)."""
    return [tuple(h) for h in json.loads(Path(path).read_text())]


def add_order_args(ap: argparse.ArgumentParser) -> None:
    """`--order` (a saved head order) or the gate training that makes one (`saved_or_trained_order`)."""
    ap.add_argument("--order", default="", help="a JSON head order (else six-family gates are trained here)")
    ap.add_argument("--gate-tasks", type=int, default=8, help="gate-training tasks per family and length")
    ap.add_argument("--gate-steps", type=int, default=80, help="gate-training optimiser steps (of 8 tasks)")
    ap.add_argument("--gate-window", type=int, default=64)


def saved_or_trained_order(engine: Engine, args) -> list[tuple[int, int]]:
    """`args.order`'s head order, or gates trained on all six bench families (calibration part) at `args.sink`."""
    if args.order:
        return read_order(args.order)
    return gate_order(engine, args.lengths, args.gate_tasks, args.sink, args.gate_window,
                      GateParams(steps=args.gate_steps, batch=8), families=BENCH_FAMILIES)


@contextmanager
def transformed_sessions(transform: Callable[..., None], with_full: bool = False):
    """Within: every session `evaluation` builds from a full prefill goes through `transform` before its turn
    is scored (a bench's prototype of a cache the engine does not build: a window per layer, quantised rows);
    `with_full`: `transform(state, full_kv)`, for a prototype that reads the rows the cache dropped."""
    original = evaluation.session_from_full

    def transformed(engine, ids, full_kv, head_map):
        state = original(engine, ids, full_kv, head_map)
        if with_full:
            transform(state, full_kv)
        else:
            transform(state)
        return state

    evaluation.session_from_full = transformed
    try:
        yield
    finally:
        evaluation.session_from_full = original


def evaluate(engine: Engine, tasks, kvs, hm: HeadMap) -> dict:
    """{family: hits per task} and the bytes fraction (first task) for one map on one chunk of tasks."""
    hits = [hit for _, hit in score_answers(engine, tasks, kvs, hm)]
    by_family: dict[str, list[bool]] = {}
    for task, hit in zip(tasks, hits):
        by_family.setdefault(task.kind, []).append(hit)
    state = session_from_full(engine, tasks[0].document, kvs[0], hm)
    return {"hits": by_family, "bytes": state.cache.bytes_fraction()}


def merged(into: dict | None, part: dict) -> dict:
    """Two chunks' `evaluate` results as one (hits appended per family; bytes from the first chunk)."""
    if into is None:
        return part
    for family, hits in part["hits"].items():
        into["hits"].setdefault(family, []).extend(hits)
    return into


def run_length(engine: Engine, length: int, n: int, rows: dict, frontier: list, args) -> tuple[dict, dict]:
    """Every row and (at the frontier lengths) every frontier point on `n` tasks per family, prefilled
    `args.chunk` at a time: each chunk's full caches are dropped before the next (2k tokens is 92 MiB each)."""
    tasks = [t for family in BENCH_FAMILIES
             for t in retrieval_tasks(family, length, n, BENCH_SEED + length, engine.tokenizer, part="bench")]
    points = [((name, k, w), hm) for name, k, w, hm in frontier] if length in args.frontier_lengths else []
    table: dict = dict.fromkeys(rows)
    sweep: dict = dict.fromkeys(key for key, _ in points)
    for start in range(0, len(tasks), args.chunk):
        chunk = tasks[start:start + args.chunk]
        kvs = [full_prefill(engine, t.document) for t in chunk]
        for name, hm in rows.items():
            chunk_kvs = [held(kv) for kv in kvs] if name == NOISE_ROW else kvs   # bf16, cast back on use
            table[name] = merged(table[name], evaluate(engine, chunk, chunk_kvs, hm))
        for key, hm in points:
            sweep[key] = merged(sweep[key], evaluate(engine, chunk, kvs, hm))
        print(f"  {length} tokens: {start + len(chunk)}/{len(tasks)} tasks ({args.clock})", flush=True)
    return table, sweep


def cell(result: dict, full: dict, family: str) -> tuple[float, float]:
    """(accuracy, kept) of one family: kept = of the full cache's answers, the fraction still answered."""
    hits, full_hits = result["hits"][family], full["hits"][family]
    answered = [h for h, f in zip(hits, full_hits) if f]
    return statistics.mean(hits), (statistics.mean(answered) if answered else 1.0)


def flips(result: dict, full: dict, families=None) -> tuple[int, int]:
    """(answers the full cache gives that this variant loses, answers it gives that the full cache does not), over
    `families` (default: every family the variant was scored on): "kept" counts only the first; the two together
    tell a loss from noise (McNemar's pairs)."""
    families = result["hits"] if families is None else families
    pairs = [(h, f) for family in families for h, f in zip(result["hits"][family], full["hits"][family])]
    return sum(f and not h for h, f in pairs), sum(h and not f for h, f in pairs)


def lost_documents(result: dict, full: dict, family: str) -> list[int]:
    """Which of a family's documents (their index in the bench) the full cache answers and this variant does not:
    the same few lost by every map are fragile answers, not a map's loss."""
    return [i for i, (h, f) in enumerate(zip(result["hits"][family], full["hits"][family])) if f and not h]


def mcnemar_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar test: how likely a split of the discordant documents at least this uneven is if a
    variant were as likely to gain an answer as to lose one (i.e. if it only added noise)."""
    n = lost + gained
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1))
    return min(1.0, 2 * tail / 2 ** n) if n else 1.0


def print_losses(rows: dict, tables: dict) -> None:
    """Per family and length: answers lost / gained against the full cache, and McNemar's p (small: a real loss)."""
    out = []
    for name in rows:
        if name == "full cache":
            continue
        for family in BENCH_FAMILIES:
            cells = [(*flips(table[name], table["full cache"], (family,)),
                      lost_documents(table[name], table["full cache"], family)) for table in tables.values()]
            out.append([name, family, *[f"{lost} / {gained} (p {mcnemar_p(lost, gained):.2g})"
                                        + (f" lost #{', #'.join(map(str, which))}" if which else "")
                                        for lost, gained, which in cells]])
    print("\nLost or noise: answers lost / gained against the full cache, exact McNemar p (two-sided; a small p "
          "says the losses are not the flips a variant that only adds noise would make)\n")
    print(common.table(["variant", "family", *[f"@{n}" for n in tables]], out))


def meets(result: dict, full: dict) -> bool:
    for family in BENCH_FAMILIES:
        acc, kept = cell(result, full, family)
        if acc < statistics.mean(full["hits"][family]) - 0.02 - 1e-9 or kept < 0.97 - 1e-9:
            return False
    return True


def print_main(rows: dict, tables: dict, args) -> None:
    cols = ["variant", "KV heads full", "family", *[f"@{n}" for n in tables]]
    out = []
    for name, hm in rows.items():
        for family in BENCH_FAMILIES:
            cells = []
            for length, table in tables.items():
                acc, kept = cell(table[name], table["full cache"], family)
                cells.append(f"{acc:.2f}" if name == "full cache" else f"{acc:.2f} ({kept:.0%})")
            out.append([name, f"{hm.kv_fraction:.0%}", family, *cells])
        bytes_ = [f"{table[name]['bytes']:.3f}" for table in tables.values()]
        target = ["meets" if meets(t[name], t["full cache"]) else "misses" for t in tables.values()]
        out.append([name, "", "**bytes / full**", *bytes_])
        out.append([name, "", "answers lost / gained", *["%d / %d" % flips(t[name], t["full cache"])
                                                         for t in tables.values()]])
        out.append([name, "", "target", *target])
    print(f"\nPer family: accuracy (in brackets: of the full cache's answers, the fraction kept); "
          f"{args.tasks} tasks per family per length up to 2,000 tokens, {args.long_tasks} at 4k and 8k\n")
    print(common.table(cols, out))


def print_frontier(frontier: list, sweeps: dict, tables: dict, args) -> list[dict]:
    points = []
    for name, k, w, hm in frontier:
        per = {n: sweeps[n][(name, k, w)] for n in args.frontier_lengths}
        worst = min(min(cell(r, tables[n]["full cache"], f)[0] - statistics.mean(tables[n]["full cache"]["hits"][f])
                        for f in BENCH_FAMILIES) for n, r in per.items())
        kept = min(min(cell(r, tables[n]["full cache"], f)[1] for f in BENCH_FAMILIES) for n, r in per.items())
        points.append({"order": name, "k": k, "window": w, "bytes": statistics.mean(r["bytes"] for r in per.values()),
                       "worst_margin": worst, "worst_kept": kept,
                       "meets": all(meets(r, tables[n]["full cache"]) for n, r in per.items()),
                       "acc": {f: statistics.mean(cell(r, tables[n]["full cache"], f)[0] for n, r in per.items())
                               for f in BENCH_FAMILIES},
                       "kept": {f: min(cell(r, tables[n]["full cache"], f)[1] for n, r in per.items())
                                for f in BENCH_FAMILIES},
                       "flips": [sum(x) for x in zip(*(flips(r, tables[n]["full cache"]) for n, r in per.items()))]})
    cols = ["head order", "KV heads full", "window", "bytes / full",
            *[f"{f} (kept)" for f in BENCH_FAMILIES], "answers lost / gained", "worst family vs full", "target"]
    print(f"\nFrontier at {' and '.join(map(str, args.frontier_lengths))} tokens (fixed windows; accuracy averaged "
          "over those lengths, in brackets the lowest share of the full cache's answers kept)\n")
    print(common.table(cols, [[p["order"], p["k"], p["window"], f"{p['bytes']:.3f}",
                               *[f"{p['acc'][f]:.2f} ({p['kept'][f]:.0%})" for f in BENCH_FAMILIES],
                               "%d / %d" % tuple(p["flips"]), f"{p['worst_margin']:+.2f}",
                               "meets" if p["meets"] else ""] for p in points]))
    return points


def plot(points: list[dict], args, path: Path) -> None:
    """One panel per (head order, window): each family's accuracy against the bytes kept."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orders = list(dict.fromkeys(p["order"] for p in points))
    width = max(9, 5 * len(args.windows))   # one panel is too narrow for the title
    fig, axes = plt.subplots(len(orders), len(args.windows), figsize=(width, 4 * len(orders)),
                             sharey=True, squeeze=False)
    for row, order in zip(axes, orders):
        for ax, w in zip(row, args.windows):
            pts = sorted((p for p in points if p["window"] == w and p["order"] == order), key=lambda p: p["bytes"])
            _plot_panel(ax, pts, f"{order} order, fixed window {w}")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (teacher-forced greedy)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"SmolLM2-135M: accuracy against KV bytes, {' and '.join(map(str, args.frontier_lengths))}-token "
                 f"documents, {args.tasks} per family and length\n(green: the first point meeting the target "
                 "on every family; red: the goal of 25% of the bytes)", fontsize=9)
    common.save_figure(fig, path)


def _plot_panel(ax, pts: list[dict], title: str) -> None:
    x = [100 * p["bytes"] for p in pts]
    for i, family in enumerate(BENCH_FAMILIES):
        ax.plot(x, [p["acc"][family] for p in pts], marker="os^vDx"[i], ms=4, alpha=0.8, label=family)
    ax.plot(x, [p["worst_kept"] for p in pts], "k--", lw=1, label="worst family: share of full's answers kept")
    meeting = [p for p in pts if p["meets"]]
    if meeting:
        ax.axvline(100 * meeting[0]["bytes"], color="green", lw=0.8, ls=":")
    ax.axvline(25, color="red", lw=0.8, ls="-.")
    ax.set(xlabel="KV bytes kept (% of full)", title=title, ylim=(-0.03, 1.03))
    ax.grid(alpha=0.3)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 400 tokens, 2 tasks, a small frontier")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[400, 1000, 2000])
    ap.add_argument("--long-lengths", type=int, nargs="*", default=[4000, 8000])
    ap.add_argument("--tasks", type=int, default=6, help="tasks per family per length")
    ap.add_argument("--long-tasks", type=int, default=2, help="tasks per family at the long lengths")
    ap.add_argument("--seed", type=int, default=2024, help="random-heads draw")
    ap.add_argument("--frontier-lengths", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 6, 10, 14, 18, 22, 26, 30, 36, 45, 60, 90])
    ap.add_argument("--windows", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--bits", nargs="+", default=["16"],
                    choices=[str(kv_quant.storage_label(*s)) for s in kv_quant.STORAGES],
                    help="the frontier's retrieval-head storage (8 = int8 with scales, 8/4 and 6/4 keys / values "
                         "bits; bytes counted as 16-bit)")
    ap.add_argument("--rows", default="all", choices=["all", "maps", "noise", "full"],
                    help="table rows besides the frontier: all; the full cache and the calibrated map(s); those and "
                         "the bf16 noise floor; the full cache alone (the bf16, paper, window and random rows cost a "
                         "scoring pass each)")
    ap.add_argument("--calibrated-map", default="", help="a calibrated head map JSON (default: the shipped map)")
    ap.add_argument("--orders", nargs="*", default=["gates"], choices=["gates", "attention", "recorded"],
                    help="frontier head orders: learned gates and/or attention on the facts (both ranked here, "
                         "calibration part) and/or the map's recorded calibration order")
    ap.add_argument("--order-file", default="",
                    help="also a frontier order from a JSON list of [layer, KV head], most needed first (e.g. "
                         "bench_layer_windows --save-order); its name in the tables is the file's stem")
    ap.add_argument("--rank-tasks", type=int, default=6, help="tasks per family that rank heads by attention")
    ap.add_argument("--rank-length", type=int, default=1000, help="their document length")
    ap.add_argument("--gate-tasks", type=int, default=8, help="gate-training tasks per family and length")
    ap.add_argument("--gate-window", type=int, default=64, help="the local window the gates train against")
    ap.add_argument("--gate-steps", type=int, default=150, help="gate-training optimiser steps (of 8 tasks)")
    ap.add_argument("--chunk", type=int, default=20, help="tasks prefilled (and held in memory) at a time")
    ap.add_argument("--png", default=None, help="plot path (default docs/quality-vs-bytes.png)")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.long_lengths, args.tasks, args.frontier_lengths = [400], [], 2, [400]
        args.ks, args.windows, args.rank_tasks, args.rank_length = [0, 14, 90], [64], 1, 400
        args.gate_tasks, args.gate_steps = 1, 20
    args.png = common.plot_path(args, "quality-vs-bytes.png")
    return args


def main() -> None:
    args = parse_args()
    common.begin(args)
    loaded = load_model("smollm2", "cpu")
    engine = Engine(loaded)
    calibrated = (HeadMap.from_json(Path(args.calibrated_map).read_text(), expect=loaded.fingerprint)
                  if args.calibrated_map else shipped_head_map(loaded.fingerprint))
    if calibrated is None:
        raise SystemExit("no calibrated head map for the embedded SmolLM2")
    if not calibrated.calibration and "recorded" in args.orders:   # a variant_at map: measurable, but no order
        raise SystemExit(f"map {calibrated.version} records no calibration order: leave 'recorded' out of --orders")
    print(f"map {calibrated.version}: {len(heads_of(calibrated))} KV heads full, {calibrated.compression}",
          flush=True)
    in_release = shipped_head_map(loaded.fingerprint)
    also = (in_release,) if in_release and in_release.version != calibrated.version else ()
    rows = variants(calibrated, args.seed, also)
    if args.rows != "all":
        rows = {name: hm for name, hm in rows.items()
                if name == "full cache" or (args.rows != "full" and name.startswith("calibrated map"))
                or (args.rows == "noise" and name == NOISE_ROW)}
    orders = {"recorded": [tuple(h) for h in calibrated.calibration["order"]]} if "recorded" in args.orders else {}
    if "attention" in args.orders:
        orders = {"attention": attention_order(engine, args.rank_length, args.rank_tasks), **orders}
    if "gates" in args.orders:
        lengths = [n for n in args.lengths if n <= 2000]
        orders = {"gates": gate_order(engine, lengths, args.gate_tasks, calibrated.compression.sink, args.gate_window,
                                      GateParams(steps=args.gate_steps, batch=8)),
                  **orders}
    if args.order_file:
        orders[Path(args.order_file).stem] = read_order(args.order_file)
    frontier = frontier_maps(calibrated, orders, args.ks, args.windows, args.bits)
    tables, sweeps = {}, {}
    for length in args.lengths + args.long_lengths:
        n = args.tasks if length in args.lengths else args.long_tasks
        tables[length], sweeps[length] = run_length(engine, length, n, rows, frontier, args)
    print_main(rows, tables, args)
    print_losses(rows, tables)
    points = print_frontier(frontier, sweeps, tables, args)
    if points:
        plot(points, args, Path(args.png))
    print(f"\nplot: {args.png}\nbench_quality: {args.clock}")


if __name__ == "__main__":
    main()
