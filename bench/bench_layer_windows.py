"""Per-layer windows at equal bytes: does a window per layer beat one window for every layer?

Issue 14 asks to search per-layer windows "if measured better at equal bytes" (PyramidKV and Ada-KV give
layers different budgets). The engine keeps one window for every layer (`CompressionParams`), so this bench
measures before anything is built: the top-k KV heads of a six-family gate order (`bench_quality.gate_order`,
calibration part) kept full, every other head with sink + a window of its LAYER, at the same local-token
budget as one window W for all: sum over layers of (local heads x window) is held equal. Schedules:

  uniform    W in every layer (what the engine does)
  pyramid    windows falling linearly from the first layer to the last (PyramidKV: lower layers attend wider)
  inverted   rising linearly (the opposite bet)
  measured   from attention: on calibration-part tasks, each local head's attention mass from the question onto
             document tokens outside sink + window, per layer and window; windows are handed out 8 tokens at a
             time to the layer whose local heads' uncovered mass falls most per token (greedy, Ada-KV's idea
             per layer)

Every family of `bench_quality` is scored on the bench part (seeds 777000 + length) at each schedule: the
share of the full cache's answers kept, and the bytes. Per-layer windows exist only on the scoring path here
(`layer_windows` sets each layer's window on the caches `evaluation` builds; prefill + a teacher-forced turn
never reach the decode slab).

    .venv/bin/python bench/bench_layer_windows.py            # full size (~40 min on a 2-core CPU)
    .venv/bin/python bench/bench_layer_windows.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import bench_quality as bq
import common
import torch

from services.engine import CompressionParams, Engine, HeadMap, evaluation, hf, load_model
from services.engine.evaluation import full_prefill, retrieval_tasks
from services.engine.headmap import shipped_head_map

SCHEDULES = ("uniform", "pyramid", "inverted", "measured")
STEP = 8   # tokens: the measured schedule's grain


# --- per-layer windows on the scoring path --------------------------------------------------------------
def layer_windows(windows: list[int]):
    """Within: every cache `evaluation` builds from a full prefill keeps `windows[layer]` recent tokens in that
    layer's local heads (from then on too: each layer's compress uses its own). The map's own window must be
    the largest, so nothing a layer keeps was dropped first; a second compress folds the rest into the
    compensation token (a running mean, so the same as compressing once)."""
    def per_layer(state) -> None:
        for layer, window in zip(state.cache.layers, windows):
            assert layer.params.min_window >= window, (layer.params, window)
            layer.params = replace(layer.params, min_window=window)
            layer.compress()

    return bq.transformed_sessions(per_layer)


# --- schedules ---------------------------------------------------------------------------------------
def local_counts(heads: set, n_layers: int, n_kv_heads: int) -> list[int]:
    return [sum((layer, h) not in heads for h in range(n_kv_heads)) for layer in range(n_layers)]


def linear(counts: list[int], window: int, falling: bool) -> list[int]:
    """Windows linear in the layer index, the far end at window/4, the weighted mean `window` (equal bytes)."""
    n, low = len(counts), window / 4
    t = [i / (n - 1) for i in range(n)]
    t = t if falling else t[::-1]                                 # t = 1 at the narrow end
    total = sum(counts)
    high = (window * total - low * sum(c * x for c, x in zip(counts, t))) / sum(c * (1 - x) for c, x in zip(counts, t))
    return [max(1, round(high + (low - high) * x)) for x in t]


def measured(window: int, uncovered: torch.Tensor, heads: set) -> list[int]:
    """Greedy: STEP tokens at a time to the layer whose local heads' uncovered mass falls most per token.
    uncovered: [n_layers, n_kv_heads, n_steps] mass outside sink + w for w = 0, STEP, 2 STEP, ..."""
    n_layers, n_kv_heads, n_steps = uncovered.shape
    counts = local_counts(heads, n_layers, n_kv_heads)
    local = torch.tensor([[(layer, h) not in heads for h in range(n_kv_heads)] for layer in range(n_layers)])
    per_layer = (uncovered * local[..., None]).sum(1)                              # [n_layers, n_steps]
    budget = window * sum(counts)
    steps = [1] * n_layers                                                          # every layer keeps >= STEP
    spent = STEP * sum(counts)
    while True:
        gains = [(per_layer[l, s] - per_layer[l, s + 1]) / counts[l] if counts[l] and s + 1 < n_steps else -1.0
                 for l, s in enumerate(steps)]
        best = max(range(n_layers), key=lambda l: gains[l])
        if gains[best] < 0 or spent + STEP * counts[best] > budget:
            break
        steps[best] += 1
        spent += STEP * counts[best]
    return [STEP * s for s in steps]


class UncoveredProbe:
    """Receives each layer's attention probabilities; keeps, per query head, the mass the question's rows put
    on document tokens outside sink + w (w on a grid of STEP), i.e. what a local head would not see."""

    def __init__(self, n_layers: int, n_heads: int, doc_len: int, rows: list[int], sink: int, n_steps: int):
        self.mass = torch.zeros(n_layers, n_heads, n_steps)
        self.rows, self.doc_len, self.sink, self.n_steps = torch.tensor(rows), doc_len, sink, n_steps

    def record(self, layer_idx: int, probs: torch.Tensor) -> None:
        # probs: [1, Hq, N, N] -> mass on document keys sink..doc_len, nearest the document's end first
        doc = probs[0][:, self.rows, self.sink:self.doc_len].float().mean(1).flip(-1)   # [Hq, doc_len - sink]
        seen = torch.nn.functional.pad(doc.cumsum(-1), (1, 0))                          # [Hq, doc_len - sink + 1]
        grid = torch.arange(self.n_steps) * STEP
        total = seen[:, -1:]
        self.mass[layer_idx] = (total - seen[:, grid.clamp(max=seen.shape[1] - 1)]).cpu()


@torch.no_grad()
def uncovered_mass(engine: Engine, families, length: int, n: int, sink: int, max_window: int) -> torch.Tensor:
    """[n_layers, n_kv_heads, n_steps]: per KV head (max over its query heads), the mean over calibration-part
    tasks of the question's attention mass outside sink + w, for w = 0, STEP, ..., max_window."""
    fp, n_steps = engine.loaded.fingerprint, max_window // STEP + 1
    masses = []
    for family in families:
        for task in retrieval_tasks(family, length, n, bq.RANK_SEED + 7, engine.tokenizer, part="calibration"):
            ids = list(task.document) + list(task.interlude) + list(task.question)
            first = len(task.document) + len(task.interlude)
            probe = UncoveredProbe(fp.n_layers, fp.n_heads, len(task.document), list(range(first, len(ids))), sink,
                                   n_steps)
            hf.probe_forward(engine.model, torch.tensor([ids], device=engine.device), probe)
            masses.append(probe.mass.view(fp.n_layers, fp.n_kv_heads, fp.group_size, n_steps).amax(2))
    return torch.stack(masses).mean(0)


def schedule(name: str, heads: set, window: int, uncovered: torch.Tensor) -> list[int]:
    n_layers, n_kv_heads, _ = uncovered.shape
    if name == "uniform":
        return [window] * n_layers
    if name == "measured":
        return measured(window, uncovered, heads)
    return linear(local_counts(heads, n_layers, n_kv_heads), window, falling=name == "pyramid")


# --- scoring -----------------------------------------------------------------------------------------
def score(engine: Engine, tasks, kvs, hm: HeadMap, windows: list[int]) -> dict:
    with layer_windows(windows):
        result = bq.evaluate(engine, tasks, kvs, hm)
        state = evaluation.session_from_full(engine, tasks[0].document, kvs[0], hm)
    return {**result, "bytes": state.stored_nbytes() / state.full_nbytes()}


def run(args) -> dict:
    loaded = load_model("smollm2", "cpu")
    engine, shipped = Engine(loaded), shipped_head_map(loaded.fingerprint)
    order = bq.saved_or_trained_order(engine, args)
    print(f"  order ready ({args.clock})", flush=True)
    uncovered = uncovered_mass(engine, bq.BENCH_FAMILIES, args.measure_length, args.measure_tasks, args.sink,
                               args.max_window)
    print(f"  uncovered mass measured ({args.clock})", flush=True)
    plans = {}
    for k in args.ks:
        heads = set(order[:k])
        for w in args.windows:
            for name in SCHEDULES:
                windows = schedule(name, heads, w, uncovered)
                compression = CompressionParams(sink=args.sink, min_window=max(windows), ratio=1e9)
                plans[f"{k},{w},{name}"] = (bq.make_map(shipped, order[:k], compression, "layer-windows"), windows)
    full = HeadMap.full(loaded.fingerprint)
    results = {"order": order, "windows": {key: w for key, (_, w) in plans.items()}, "points": {}, "full": {}}
    for n in args.lengths:
        tasks = [t for family in bq.BENCH_FAMILIES
                 for t in retrieval_tasks(family, n, args.tasks, bq.BENCH_SEED + n, engine.tokenizer, part="bench")]
        kvs = [full_prefill(engine, t.document) for t in tasks]
        results["full"][n] = bq.evaluate(engine, tasks, kvs, full)
        for key, (hm, windows) in plans.items():
            results["points"].setdefault(key, {})[n] = score(engine, tasks, kvs, hm, windows)
        print(f"  {n} tokens: {len(plans)} schedules scored on {len(tasks)} tasks ({args.clock})", flush=True)
        del kvs
    return results


def load_results(path: str) -> dict:
    """Results as `run` returns them, from JSON (whose keys are strings: lengths back to ints)."""
    results = json.loads(Path(path).read_text())
    results["full"] = {int(n): r for n, r in results["full"].items()}
    results["points"] = {key: {int(n): r for n, r in per.items()} for key, per in results["points"].items()}
    results["order"] = [tuple(h) for h in results["order"]]
    return results


# --- report ------------------------------------------------------------------------------------------
def kept(results: dict, key: str, family: str) -> list[float]:
    return [bq.cell(results["points"][key][n], results["full"][n], family)[1] for n in results["full"]]


def print_tables(results: dict, args) -> None:
    lengths = " / ".join(map(str, results["full"]))
    rows = []
    for key, per_length in results["points"].items():
        k, w, name = key.split(",")
        bytes_ = " / ".join(f"{per_length[n]['bytes']:.3f}" for n in results["full"])
        rows.append([k, w, name, bytes_, *[" / ".join(f"{x:.0%}" for x in kept(results, key, f))
                                           for f in bq.BENCH_FAMILIES]])
    answered = ", ".join(f"{f} {' / '.join(str(sum(results['full'][n]['hits'][f])) for n in results['full'])}"
                         for f in bq.BENCH_FAMILIES)
    print(f"\nShare of the full cache's answers kept at {lengths} tokens ({args.tasks} documents per family and "
          f"length; the full cache answers {answered})\n")
    print(common.table(["KV heads full", "mean window", "schedule", f"bytes / full @{lengths}", *bq.BENCH_FAMILIES],
                       rows, "rrl" + "r" * (1 + len(bq.BENCH_FAMILIES))))
    print("\nWindows per layer (first layer first):")
    for key, windows in results["windows"].items():
        print(f"  {key}: {windows}")


def plot(results: dict, args, path: Path) -> None:
    """One panel per (heads, window): each family's worst-length share kept, per schedule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(tuple(key.split(",")[:2]) for key in results["points"]))
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 4), sharey=True, squeeze=False)
    width = 0.8 / len(SCHEDULES)
    for ax, (k, w) in zip(axes[0], cases):
        for i, name in enumerate(SCHEDULES):
            worst = [min(kept(results, f"{k},{w},{name}", f)) for f in bq.BENCH_FAMILIES]
            ax.bar([j + i * width for j in range(len(worst))], worst, width, label=name)
        ax.axhline(0.97, color="green", lw=0.8, ls=":")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bq.BENCH_FAMILIES))], bq.BENCH_FAMILIES, fontsize=7)
        b = results["points"][f"{k},{w},uniform"][next(iter(results["full"]))]["bytes"]
        ax.set_title(f"{k} KV heads full, mean window {w}\n({b:.2f} of the bytes at {next(iter(results['full']))} tokens)",
                     fontsize=8)
        ax.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("share of the full cache's answers kept (worst length)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("SmolLM2-135M: one window for every layer against a window per layer, at equal bytes "
                 "(green: 97% kept)", fontsize=9)
    common.save_figure(fig, path)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 400 tokens, 2 tasks, one point")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--tasks", type=int, default=12, help="bench tasks per family and length")
    ap.add_argument("--ks", type=int, nargs="+", default=[15, 20], help="KV heads kept full (top of the order)")
    ap.add_argument("--windows", type=int, nargs="+", default=[32, 64], help="mean local windows (equal bytes)")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--max-window", type=int, default=512, help="widest window the measured schedule may give")
    ap.add_argument("--measure-length", type=int, default=1000, help="tasks the measured schedule is fitted on")
    ap.add_argument("--measure-tasks", type=int, default=2, help="per family (calibration part)")
    bq.add_order_args(ap)
    ap.add_argument("--save-order", default="", help="write the order used as JSON here")
    ap.add_argument("--results", default="", help="JSON results: written after a run; if present, read instead "
                                                   "of running (tables and plot only)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--png", default=None, help="plot path (default docs/layer-windows.png)")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.tasks, args.ks, args.windows = [400], 2, [15], [32]
        args.gate_tasks, args.gate_steps, args.measure_length, args.measure_tasks = 1, 10, 400, 1
        args.max_window = 128
    args.png = common.plot_path(args, "layer-windows.png")
    return args


def main() -> None:
    args = parse_args()
    common.begin(args)
    results = load_results(args.results) if args.results and Path(args.results).exists() else run(args)
    if args.results:
        Path(args.results).write_text(json.dumps(results))
    if args.save_order:
        Path(args.save_order).write_text(json.dumps(results["order"]))
    print_tables(results, args)
    plot(results, args, Path(args.png))
    print(f"\nplot: {args.png}\nbench_layer_windows: {args.clock}")


if __name__ == "__main__":
    main()
