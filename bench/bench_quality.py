"""Quality on the embedded SmolLM2: passkey retrieval and KL to the full cache, full vs compressed variants.

Each passkey document is prefilled ONCE with full attention (`full_prefill`); every variant is derived from that
cache (`session_from_full`) and the question is asked in a continued turn, so the answer comes from the
compressed cache. Compressed rows use the issue-7 setting: 4 sinks and a FIXED window of 64 (C = 1e9).

Table 1 (greedy generation, `answer_generated`): full cache; the paper's selection (induction 15% + echo 1% of
query heads, widened to KV heads); window only (StreamingLLM: sinks + window, no full heads, no compensation);
the paper's selection without the compensation token; random KV heads at the paper's KV-head count; the
calibrated map. Plus mean KL(full || variant) over continuations of real text (`continuation_kl`).
Table 2 (sweep at one length, teacher-forced `score_answer`: correct iff every answer token is the argmax):
the fraction of KV heads kept by three rankings (paper induction score, calibrated order, random) and the
window; plotted as accuracy against KV bytes kept.

    .venv/bin/python bench/bench_quality.py            # full size (~10 min on 2 idle cores)
    .venv/bin/python bench/bench_quality.py --quick    # smoke run (~1-2 min)
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import common
import torch

from services.engine import CalibrationParams, CompressionParams, Engine, HeadMap, calibrate, load_model
from services.engine.evaluation import (answer_generated, continuation_kl, full_prefill, real_text, retrieval_tasks,
                                        score_answer, session_from_full)
from services.engine.headmap import shipped_head_map
from services.engine.profiling import ProfileParams, select_heads

FIXED_64 = CompressionParams(sink=4, min_window=64, ratio=1e9)


class Maps:
    """Head maps over one model: a KV-head set + compression -> a cached `HeadMap`."""

    def __init__(self, base: HeadMap):
        self.base, self.fp = base, base.fingerprint
        self.all_heads = [(layer, h) for layer in range(self.fp.n_layers) for h in range(self.fp.n_kv_heads)]

    def make(self, heads, compression: CompressionParams, method: str) -> HeadMap:
        heads = set(map(tuple, heads))
        kv = [[h for h in range(self.fp.n_kv_heads) if (layer, h) in heads] for layer in range(self.fp.n_layers)]
        return HeadMap(self.fp, self.base.induction, self.base.echo, [], kv, compression, method=method)

    def heads_of(self, hm: HeadMap) -> list[tuple[int, int]]:
        return [(layer, h) for layer, hs in enumerate(hm.retrieval_kv_heads) for h in hs]

    def paper_ranking(self) -> list[tuple[int, int]]:
        """KV heads by the max induction score of their query heads (ties: echo), as the paper's GQA rule."""
        g = self.fp.group_size

        def score(head):
            layer, h = head
            q = range(h * g, (h + 1) * g)
            return (max(self.base.induction[layer][j] for j in q), max(self.base.echo[layer][j] for j in q))
        return sorted(self.all_heads, key=score, reverse=True)

    def random_ranking(self, seed: int) -> list[tuple[int, int]]:
        order = list(self.all_heads)
        random.Random(seed).shuffle(order)
        return order


def calibrated_map(engine: Engine, shipped: HeadMap, paper: HeadMap, path: str,
                   quick: bool) -> tuple[HeadMap, str]:
    """One from `path`, else the shipped map when it is calibrated, else calibrate here (and say so)."""
    if path:
        return HeadMap.from_json(Path(path).read_text(), expect=shipped.fingerprint), f"from {path}"
    if shipped.calibration:
        return shipped, "the shipped map"
    # Calibration prefills its own tasks (seed 1234, never the bench's keys); a smoke run uses a tiny one.
    params = CalibrationParams(ratio=1e9, windows=(64,), **(dict(lengths=(400,), n_tasks=2) if quick else {}))
    start = time.perf_counter()
    hm = calibrate(engine, paper, params)
    return hm, (f"calibrated in this run with {params} in {time.perf_counter() - start:.0f} s "
                "(the shipped map is not calibrated)")


def main_rows(maps: Maps, shipped: HeadMap, calibrated: HeadMap, seed: int) -> dict[str, HeadMap]:
    fp = maps.fp
    _, paper_kv = select_heads(torch.tensor(shipped.induction), torch.tensor(shipped.echo), ProfileParams(), fp)
    paper_heads = [(layer, h) for layer, hs in enumerate(paper_kv) for h in hs]
    no_comp = replace(FIXED_64, compensation=False)
    c = calibrated.compression
    return {
        "full cache": HeadMap.full(fp, FIXED_64),
        "RazorServe, paper selection": maps.make(paper_heads, FIXED_64, "paper"),
        "window only (StreamingLLM)": maps.make([], no_comp, "window-only"),
        "paper selection, no compensation": maps.make(paper_heads, no_comp, "paper-no-comp"),
        "random KV heads, same count": maps.make(maps.random_ranking(seed)[:len(paper_heads)], FIXED_64, "random"),
        f"RazorServe calibrated (window {c.min_window}{'' if c.ratio >= 1e6 else f', C={c.ratio:g}'})": calibrated,
    }


def sweep_maps(maps: Maps, rows: dict[str, HeadMap], calibrated: HeadMap, fractions, windows,
               draws: int, seed: int) -> list[tuple[str, float, int, HeadMap]]:
    """(curve, fraction or window, KV heads full, map) for the fraction and window sweeps."""
    n = len(maps.all_heads)
    rankings = {"paper ranking": maps.paper_ranking()}
    if calibrated.calibration:
        rankings["calibrated ranking"] = [tuple(h) for h in calibrated.calibration["order"]]
    rankings.update({f"random ranking #{d}": maps.random_ranking(seed + d) for d in range(draws)})
    points = []
    for name, order in rankings.items():
        for f in fractions:
            k = round(f * n)
            points.append((name, f, k, maps.make(order[:k], FIXED_64, "sweep")))  # one method: equal sets run once
    selections = {"window only": ([], replace(FIXED_64, compensation=False)),
                  "paper selection": (maps.heads_of(rows["RazorServe, paper selection"]), FIXED_64),
                  "calibrated selection": (maps.heads_of(calibrated),
                                           replace(FIXED_64, sink=calibrated.compression.sink))}
    for name, (heads, comp) in selections.items():
        for w in windows:
            hm = maps.make(heads, replace(comp, min_window=w), "sweep")
            points.append((name + ", window sweep", w, len(heads), hm))
    return points


def run(engine: Engine, rows: dict, sweep: list, args) -> tuple[dict, dict]:
    """Prefill each document once; -> per-row {length: (hits, bytes fractions)}, per-sweep-map results."""
    tok = engine.tokenizer
    table = {name: {} for name in rows}
    memo: dict[str, list] = {}  # map version -> teacher-forced results (identical sweep points run once)
    for length in args.lengths:
        for task in retrieval_tasks("passkey", length, args.keys, args.seed + length, tok):
            kv = full_prefill(engine, task.document)
            full_bytes = session_from_full(engine, task.document, kv, rows["full cache"]).stored_nbytes()
            for name, hm in rows.items():
                hit, nbytes = answer_generated(engine, task, kv, hm)
                table[name].setdefault(length, []).append((hit, nbytes / full_bytes))
            if length != args.sweep_length:
                continue
            for _, _, _, hm in sweep:
                if len(memo.setdefault(hm.version, [])) < len(table["full cache"][length]):
                    nbytes = session_from_full(engine, task.document, kv, hm).stored_nbytes()
                    memo[hm.version].append((*score_answer(engine, task, kv, hm), nbytes / full_bytes))
        print(f"  passkey at {length} tokens done ({args.keys} keys, {args.clock})", flush=True)
    return table, memo


def mean_kl(engine: Engine, rows: dict, args) -> dict[str, float]:
    kls = {name: [] for name in rows}
    span = args.kl_context + args.kl_continuation
    for i in range(args.kl_texts):
        ids = real_text(engine.tokenizer, span, offset=i * span)
        context, continuation = ids[:args.kl_context], ids[args.kl_context:]
        kv = full_prefill(engine, context)
        for name, hm in rows.items():
            kls[name].append(continuation_kl(engine, context, continuation, kv, hm))
    return {name: statistics.mean(v) for name, v in kls.items()}


def print_tables(rows: dict, table: dict, kl: dict, sweep: list, memo: dict, args) -> None:
    full_acc = {n: statistics.mean(h for h, _ in table["full cache"][n]) for n in args.lengths}
    cols = ["variant", "KV heads full", *[f"acc @{n}" for n in args.lengths], "acc / full (mean)",
            *[f"bytes/full @{n}" for n in args.lengths], "mean KL (nats)"]
    out = []
    for name, hm in rows.items():
        accs = [statistics.mean(h for h, _ in table[name][n]) for n in args.lengths]
        ratio = statistics.mean(a / full_acc[n] for a, n in zip(accs, args.lengths) if full_acc[n] > 0)
        out.append([name, f"{hm.kv_fraction:.0%}", *[f"{a:.2f}" for a in accs], f"{ratio:.2f}",
                    *[f"{statistics.mean(b for _, b in table[name][n]):.3f}" for n in args.lengths],
                    f"{kl[name]:.3f}"])
    print(f"\nPasskey retrieval, greedy answer from the compressed cache ({args.keys} keys per length, depths "
          f"10-90%, seed {args.seed}+length); KL over {args.kl_texts} real-text continuations of "
          f"{args.kl_continuation} tokens after {args.kl_context}\n")
    print(common.table(cols, out))
    print(f"\nSweep at {args.sweep_length} tokens: teacher-forced passkey accuracy (all answer tokens argmax) "
          "against KV bytes kept; fractions at window 64\n")
    sweep_out = []
    for curve, x, k, hm in sweep:
        res = memo[hm.version]
        sweep_out.append([curve, f"{x:g}", f"{k} ({hm.kv_fraction:.0%})",
                          f"{statistics.mean(r[2] for r in res):.3f}", f"{statistics.mean(r[1] for r in res):.2f}",
                          f"{statistics.mean(r[0] for r in res):.2f}"])
    print(common.table(["curve", "fraction / window", "KV heads full", "bytes/full", "accuracy",
                        "answer log-prob"], sweep_out))


def plot(sweep: list, memo: dict, rows: dict, table: dict, args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list] = {}
    for curve, x, _, hm in sweep:
        res = memo[hm.version]
        key = "random ranking (mean)" if curve.startswith("random ranking") else curve
        curves.setdefault(key, {}).setdefault(x, []).append(
            (statistics.mean(r[2] for r in res), statistics.mean(r[1] for r in res)))
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (key, by_x) in enumerate(curves.items()):
        pts = sorted((statistics.mean(b for b, _ in v), statistics.mean(a for _, a in v)) for v in by_x.values())
        ax.plot([100 * b for b, _ in pts], [a for _, a in pts], "--" if "window" in key else "-",
                marker="os^vDP"[i % 6], markersize=7 - i % 3, alpha=0.85, label=key)
    n = args.sweep_length
    full = statistics.mean(h for h, _ in table["full cache"][n])
    ax.axhline(full, color="gray", lw=0.8, ls=":", label=f"full cache (generated) {full:.2f}")
    ax.set(xlabel=f"KV bytes kept (% of full cache, {n}-token documents)", ylabel="passkey accuracy",
           title=f"SmolLM2-135M passkey at {n} tokens: accuracy vs KV bytes (sink 4; fractions at window 64)",
           ylim=(-0.03, 1.03))
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 length, 3 keys, a small sweep")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[400, 800, 1200])
    ap.add_argument("--keys", type=int, default=20, help="passkeys per length")
    ap.add_argument("--seed", type=int, default=2024, help="task seed (calibration used 1234)")
    ap.add_argument("--sweep-length", type=int, default=800)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0, .1, .2, .3, .4, .6, 1])
    ap.add_argument("--windows", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--random-draws", type=int, default=2, help="random rankings averaged in the sweep")
    ap.add_argument("--kl-texts", type=int, default=4)
    ap.add_argument("--kl-context", type=int, default=800)
    ap.add_argument("--kl-continuation", type=int, default=64)
    ap.add_argument("--calibrated-map", default="", help="a calibrated head map JSON (default: the shipped map)")
    ap.add_argument("--png", default=None, help="plot path (default docs/quality-vs-bytes.png; --quick: a temp file)")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.keys, args.sweep_length = [400], 3, 400
        args.fractions, args.windows, args.random_draws = [0, .3, 1], [64], 1
        args.kl_texts, args.kl_context = 1, 400
    if args.sweep_length not in args.lengths:
        raise SystemExit(f"--sweep-length {args.sweep_length} must be one of --lengths {args.lengths}")
    if args.png is None:
        args.png = (Path(tempfile.gettempdir()) / "quality-vs-bytes-quick.png" if args.quick
                    else common.DOCS / "quality-vs-bytes.png")
    return args


def main() -> None:
    args = parse_args()
    clock = args.clock = common.Stopwatch()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(common.header())
    loaded = load_model("smollm2", "cpu")
    engine = Engine(loaded)
    shipped = shipped_head_map(loaded.fingerprint)
    if shipped is None:
        raise SystemExit("no shipped head map for the embedded SmolLM2")
    maps = Maps(shipped)
    paper = main_rows(maps, shipped, shipped, args.seed)["RazorServe, paper selection"]
    calibrated, source = calibrated_map(engine, shipped, paper, args.calibrated_map, args.quick)
    rows = main_rows(maps, shipped, calibrated, args.seed)
    print(f"calibrated map: {source}; {calibrated.kv_fraction:.0%} of KV heads full ({clock})", flush=True)
    sweep = sweep_maps(maps, rows, calibrated, args.fractions, args.windows, args.random_draws, args.seed)
    table, memo = run(engine, rows, sweep, args)
    kl = mean_kl(engine, rows, args)
    print(f"  KL done ({clock})", flush=True)
    print_tables(rows, table, kl, sweep, memo, args)
    plot(sweep, memo, rows, table, args, Path(args.png))
    print(f"\nplot: {args.png}\nbench_quality: {clock}")


if __name__ == "__main__":
    main()
