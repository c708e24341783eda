"""Why does a map lose a document's answer? For each named document of the quality bench, the answer's margin
(the answer token's log-prob minus the best other token's, the lowest over the answer's tokens: above 0, the
greedy answer is right) under the full cache, under the map, under the map with its integer rows kept in 16
bits, with its local windows doubled, with each local head made whole in turn, and with each whole head made
local in turn. So it says whether rounding, the window or the choice of heads loses the answer, which heads
would bring it back, and where the map's recorded order ranks them.

The documents are bench_quality's (bench part, seed 777000 + length, `--tasks` a family: a document's index
is the one bench_quality prints for the answers a map loses).

`--survey` instead scores several maps on every document of the families named, beside the full cache and the
bf16 noise floor: answers lost and gained, whether each family meets the issue's target, the full cache's margins
on the answers lost (near-ties or not), the margin's shift, each map's loss rate with its exact 95% interval, and
a plot per family. `--seed` draws other documents from the bench part; `--results` prints and plots saved surveys
again: surveys of the same documents side by side, the documents of other surveys of one length pooled.
`--chat` asks the same tasks in the model's chat template (retrieval_tasks: the service's format for an
Instruct model); surveys of the two formats are never pooled.

    .venv/bin/python bench/bench_lost_documents.py --map bench/results/map-e836427db1db61d9.headmap.json \\
        --family multi --length 1000 --tasks 40 --docs 14 22
    .venv/bin/python bench/bench_lost_documents.py --family digits word multi turn edge passkey --length 1000 \\
        --tasks 40 --survey services/engine/data/smollm2.headmap.json bench/results/map-*.headmap.json \\
        --plot docs/margins-1000.png --json margins.json
    .venv/bin/python bench/bench_lost_documents.py --results margins.json margins-seed-889000.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import common
import torch

from bench_quality import NOISE_ROW, documents_seed, heads_of, make_map
from services.engine import Engine, HeadMap, load_model
from services.engine.evaluation import answer_rows, full_prefill, held, retrieval_tasks, session_from_full
from services.engine.headmap import shipped_head_map
from services.engine.task_bench import Target

SHOWN = 8   # heads listed per document, the strongest effects first


def margin(logp: torch.Tensor, answer: list[int]) -> float:
    """[A, V] log-probs -> min over the answer's tokens of (its log-prob - the best other token's)."""
    target = torch.tensor(answer)                                                    # [A]
    right = logp.gather(1, target[:, None])[:, 0]                                    # [A]
    others = logp.scatter(1, target[:, None], float("-inf")).max(-1).values          # [A]
    return float((right - others).min())


def variants(hm: HeadMap, length: int) -> dict[str, HeadMap]:
    """Name -> map: the map, its rows in 16 bits, its window at `length` doubled, without the compensation token,
    each local head whole and each whole head local (the last two named by the head, "+L.H" and "-L.H")."""
    fp, c, heads = hm.fingerprint, hm.compression, set(heads_of(hm))
    local = [(layer, h) for layer in range(fp.n_layers) for h in range(fp.n_kv_heads) if (layer, h) not in heads]
    out = {"full cache": HeadMap.full(fp), "map": hm,
           "map, rows in 16 bits": make_map(hm, heads, c.stored_as(16).local_stored_as(16), "diagnostic"),
           "map, window x2": make_map(hm, heads, replace(c, min_window=2 * c.window(length), ratio=1e9),
                                      "diagnostic"),
           "map, no compensation token": make_map(hm, heads, replace(c, compensation=False), "diagnostic")}
    out |= {f"+{layer}.{h}": make_map(hm, heads | {(layer, h)}, c, "diagnostic") for layer, h in local}
    out |= {f"-{layer}.{h}": make_map(hm, heads - {(layer, h)}, c, "diagnostic") for layer, h in sorted(heads)}
    return out


def diagnose(engine: Engine, task, maps: dict[str, HeadMap]) -> dict[str, tuple[float, list[int]]]:
    """Name -> (answer margin, greedy tokens where the answer's are) for one task under every map."""
    kv = full_prefill(engine, task.document)
    names = list(maps)
    rows = answer_rows(engine, [task] * len(names), [kv] * len(names), [maps[n] for n in names])
    return {n: (margin(row, task.answer), row.argmax(-1).tolist()) for n, row in zip(names, rows)}


def report(engine: Engine, index: int, task, result: dict, rank: dict) -> list[str]:
    decode = engine.tokenizer.decode
    lines = [f"\n### document #{index} (depth {task.depth:.2f}, answer {task.answer_text!r})", ""]
    for name in ("full cache", "map", "map, rows in 16 bits", "map, window x2", "map, no compensation token"):
        m, greedy = result[name]
        lines.append(f"- {name}: margin {m:+.3f}, greedy {decode(greedy)!r}")
    base = result["map"][0]
    for sign, what in (("+", "local heads made whole, the margin's gain"),
                       ("-", "whole heads made local, the margin's loss")):
        moves = sorted(((m - base, n) for n, (m, _) in result.items() if n[0] == sign), reverse=sign == "+")
        flipped = sum((base + d > 0) != (base > 0) for d, _ in moves)
        lines.append(f"- {what} ({flipped} of {len(moves)} flip the answer): " + ", ".join(
            f"{n} {d:+.3f} (rank {rank.get(n[1:], '-')})" for d, n in moves[:SHOWN]))
    return lines


def survey(engine: Engine, tasks: list, maps: dict[str, HeadMap]) -> tuple[dict[str, list[float]], dict]:
    """(name -> the answer margin of every task, name -> bytes / 16-bit full cache on the first document):
    the full cache, the bf16 noise floor and each map."""
    fp = engine.loaded.fingerprint
    hms = {"full cache": HeadMap.full(fp), NOISE_ROW: HeadMap.full(fp), **maps}
    margins: dict[str, list[float]] = {n: [] for n in hms}
    for i, task in enumerate(tasks):
        kv = full_prefill(engine, task.document)
        rows = answer_rows(engine, [task] * len(hms), [kv, held(kv)] + [kv] * len(maps), list(hms.values()))
        for n, row in zip(hms, rows):
            margins[n].append(margin(row, task.answer))
        if i == 0:
            nbytes = {n: session_from_full(engine, task.document, kv, hm).cache.bytes_fraction()
                      for n, hm in hms.items()}
        print(f"  {i + 1}/{len(tasks)} documents", flush=True)
    return margins, nbytes


def survey_table(margins: dict[str, list[float]], nbytes: dict, one_family: bool = True) -> str:
    """Per map: bytes, answers lost / gained, whether the family meets the target (the target is per family: "-"
    for families pooled), the full cache's margins on the lost ones, the margin's shift."""
    full = margins["full cache"]
    rows = []
    for name, ms in margins.items():
        lost, gained = flips(full, ms)
        shifts = sorted(m - f for f, m in zip(full, ms) if f > 0) or [float("nan")]   # none answered: no shift
        rows.append([name, f"{nbytes[name]:.3f}", f"{len(lost)} / {gained}",
                     ("met" if meets(full, ms) else "missed") if one_family else "-",
                     ", ".join(f"{f:.2f}" for f in sorted(lost)) or "-",
                     f"{statistics.median(shifts):+.3f}", f"{shifts[len(shifts) // 10]:+.3f}"])
    near = sum(0 < f < 0.25 for f in full)
    return (f"full cache: {sum(f > 0 for f in full)} of {len(full)} answered, {near} of them by a margin under "
            f"0.25\n\n" + common.table(["map", "bytes / 16-bit full", "lost / gained", "target",
                                           "full-cache margins of the lost", "median shift (answered)",
                                           "10th percentile shift"], rows, "lrrllrr"))


def flips(full: list[float], margins: list[float]) -> tuple[list[float], int]:
    """(the full cache's margins on the answers a variant loses, how many answers it gains)."""
    return [f for f, m in zip(full, margins) if f > 0 >= m], sum(f <= 0 < m for f, m in zip(full, margins))


def family_cell(full: list[float], margins: list[float]) -> str:
    """'lost / gained', marked x where the family misses the target."""
    lost, gained = flips(full, margins)
    return f"{len(lost)} / {gained}" + ("" if meets(full, margins) else " x")


def meets(full: list[float], margins: list[float], target: Target = Target()) -> bool:
    """The issue's target on one family's documents: accuracy within 2 points of the full cache's, and at least
    97% of the full cache's answers kept (`task_bench.Target`)."""
    answered = [m > 0 for f, m in zip(full, margins) if f > 0]
    point = {"accuracy_by_family": {"": [sum(m > 0 for m in margins) / len(margins)]},
             "kept_by_family": {"": [sum(answered) / len(answered) if answered else 1.0]}}   # as task_bench
    return target.met_by(point, {"accuracy_by_family": {"": [sum(f > 0 for f in full) / len(full)]}})


def losses(by_family: dict[str, dict[str, list[float]]], name: str) -> tuple[int, int]:
    """(answers the map loses, answers the full cache gives), every family pooled."""
    full = [f for margins in by_family.values() for f in margins["full cache"]]
    lost, _ = flips(full, [m for margins in by_family.values() for m in margins[name]])
    return len(lost), sum(f > 0 for f in full)


def loss_rate(by_family: dict[str, dict[str, list[float]]], name: str) -> str:
    """Answers lost over the full cache's answers, every family pooled, with its exact 95% interval."""
    lost, answered = losses(by_family, name)
    low, high = clopper_pearson(lost, answered)
    return f"{lost} / {answered} = {lost / answered:.1%} [{low:.1%}, {high:.1%}]"


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact binomial interval for k events in n trials, by bisection on the binomial tails (no scipy here)."""
    def at_least(p: float, j: int) -> float:   # P(X >= j), increasing in p
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(j, n + 1))

    def solve(f, want: float) -> float:   # f increasing in p
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < want else (lo, mid)
        return (lo + hi) / 2

    low = 0.0 if k == 0 else solve(lambda p: at_least(p, k), alpha / 2)
    high = 1.0 if k == n else solve(lambda p: at_least(p, k + 1), 1 - alpha / 2)   # P(X <= k) = alpha / 2
    return low, high


def plot_survey(by_family: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    """One panel a family: each variant's answer margin against the full cache's, document by document."""
    import matplotlib.pyplot as plt

    cols = min(3, len(by_family))
    rows = -(-len(by_family) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.2 * rows), squeeze=False)
    for ax, (family, margins) in zip(axes.flat, by_family.items()):
        full = margins["full cache"]
        names = [name for name in margins if name != "full cache"]
        for i, name in enumerate(names):   # tab20 and two markers: a dozen maps stay apart
            ax.scatter(full, margins[name], s=10, color=plt.cm.tab20(i % 20), marker="o^"[i % 2], label=name[:72])
        lo, hi = min(full) - 0.5, max(full) + 0.5
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.axhline(0, color="black", lw=0.8)
        ax.axvline(0, color="black", lw=0.8)
        ax.set(xlabel="margin, full cache (nats)", ylabel="margin, variant (nats)", title=family)
    for ax in list(axes.flat)[len(by_family):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=2)
    fig.suptitle(title)
    common.save_figure(fig, path, rect=(0, 0.06 + 0.02 * len(labels) / 2, 1, 1))


def plot_frontier(by_family: dict, nbytes: dict, path: Path, title: str) -> None:
    """Each map's share of the full cache's answers lost (every family pooled, and each family apart) against its
    bytes, with the pooled share's exact 95% interval; the target's 3% and the issue's quarter of the bytes drawn."""
    import matplotlib.pyplot as plt

    first = next(iter(by_family.values()))
    names = [n for n in first if n != "full cache"]
    fig, ax = plt.subplots(figsize=(11, 5))
    for i, name in enumerate(names):   # tab20 and two markers, as plot_survey
        color = plt.cm.tab20(i % 20)
        x = statistics.mean(b[name] for b in nbytes.values())
        lost, answered = losses(by_family, name)
        low, high = clopper_pearson(lost, answered)
        rate = lost / answered
        ax.errorbar([x], [100 * rate], yerr=[[100 * (rate - low)], [100 * (high - rate)]], fmt="o^"[i % 2],
                    capsize=3, color=color, label=name[:72])
        for family, margins in by_family.items():
            kept = [m > 0 for f, m in zip(margins["full cache"], margins[name]) if f > 0]
            ax.scatter([x], [100 * (1 - sum(kept) / max(1, len(kept)))], s=9, marker="_", color=color)
    ax.axhline(3, color="grey", ls="--", lw=0.8)
    ax.axvline(0.25, color="grey", ls=":", lw=0.8)
    ax.set(xlabel="bytes / 16-bit full cache", ylabel="full-cache answers lost (%)", title=title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    common.save_figure(fig, path)


def recorded_rank(hm: HeadMap, fallback: HeadMap) -> dict[str, int]:
    """'L.H' -> its 1-based rank in the map's recorded calibration order (the shipped map's for variants)."""
    order = (hm.calibration or fallback.calibration or {}).get("order", [])
    return {f"{layer}.{h}": i + 1 for i, (layer, h) in enumerate(order)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--map", type=Path, help="head map JSON (default: the shipped map)")
    ap.add_argument("--family", nargs="+", default=["multi"], help="the family (with --survey: families)")
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--tasks", type=int, default=40, help="documents a family, as bench_quality's --tasks")
    ap.add_argument("--seed", type=int, help="the documents' seed (default: bench_quality's, 777000 + length); "
                                             "another seed draws other documents from the bench part")
    ap.add_argument("--chat", action="store_true",
                    help="the tasks in the model's chat template, as the service sends an Instruct model's turns "
                         "(default: completion-style text)")
    ap.add_argument("--docs", type=int, nargs="+", default=[14],
                    help="indices of the documents to diagnose (default: multi #14 at 1,000 tokens, which the "
                         "shipped map loses)")
    ap.add_argument("--survey", type=Path, nargs="+",
                    help="instead: these maps' margins on every document of the family, against the full cache's")
    ap.add_argument("--plot", type=Path, help="with --survey: margins against the full cache's, drawn here")
    ap.add_argument("--frontier", type=Path,
                    help="with --survey or --results: each map's answers lost against its bytes, drawn here")
    ap.add_argument("--json", type=Path, help="write every margin here")
    ap.add_argument("--results", type=Path, nargs="+",
                    help="print (and --plot) --survey JSONs without running; several of one length are pooled")
    args = ap.parse_args()
    if args.results:
        return from_results(args.results, args.plot, args.frontier)
    print(common.header(), flush=True)
    loaded = load_model("smollm2", "cpu")
    shipped = shipped_head_map(loaded.fingerprint)
    hm = HeadMap.from_json(args.map.read_text(), expect=loaded.fingerprint) if args.map else shipped
    engine = Engine(loaded)
    if args.survey:
        return run_survey(engine, args)
    tasks = bench_tasks(engine, args.family[0], args)
    maps, rank, out = variants(hm, args.length), recorded_rank(hm, shipped), {}
    print(f"map {hm.version}: {len(heads_of(hm))} whole KV heads, {hm.compression.to_dict()}; "
          f"{len(maps)} variants a document", flush=True)
    for i in args.docs:
        start = time.perf_counter()
        out[i] = diagnose(engine, tasks[i], maps)
        print("\n".join(report(engine, i, tasks[i], out[i], rank)), flush=True)
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"map": hm.version, "family": args.family[0], "length": args.length,
                                         "margins": {i: {n: m for n, (m, _) in r.items()} for i, r in out.items()}},
                                        indent=1))


def bench_tasks(engine: Engine, family: str, args) -> list:
    return retrieval_tasks(family, args.length, args.tasks, documents_seed(args.length, args.seed), engine.tokenizer,
                           part="bench", chat=args.chat)


def task_format(chat: bool) -> str:
    return "chat" if chat else "completion"


def label(hm: HeadMap) -> str:
    c = hm.compression
    recent = "" if not any(c.recent) else ", recent rows {}/{}".format(*c.recent)
    return f"{hm.version} ({len(heads_of(hm))} heads {c.storage()}, local {c.local_storage()}{recent})"


def run_survey(engine: Engine, args) -> None:
    fp = engine.loaded.fingerprint
    maps = {label(hm): hm for hm in (HeadMap.from_json(path.read_text(), expect=fp) for path in args.survey)}
    print(f"tasks: {task_format(args.chat)} format, {args.tasks} documents a family, seed "
          f"{documents_seed(args.length, args.seed)}", flush=True)
    by_family, nbytes = {}, {}   # family -> map -> margins, and bytes on the family's first document
    for family in args.family:
        by_family[family], nbytes[family] = survey(engine, bench_tasks(engine, family, args), maps)
        print(f"\n#### {family}, {args.length} tokens\n\n{survey_table(by_family[family], nbytes[family])}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"length": args.length, "tasks": args.tasks,
                                         "seed": documents_seed(args.length, args.seed),
                                         "format": task_format(args.chat),
                                         "bytes": nbytes,
                                         "margins": by_family}, indent=1))
    summarise(by_family, nbytes, args.length, args.tasks, args.plot, args.frontier, task_format(args.chat))


def summarise(by_family: dict, nbytes: dict, length: int, tasks: int, plot: Path | None,
              frontier: Path | None = None, fmt: str = "completion") -> None:
    """Every family pooled (bytes: the mean of the families' first documents), each map's families that miss the
    target and its pooled loss rate, and the plot."""
    first = next(iter(by_family.values()))
    if len(by_family) > 1:
        pooled = {n: [m for margins in by_family.values() for m in margins[n]] for n in first}
        mean_bytes = {n: statistics.mean(b[n] for b in nbytes.values()) for n in first}
        print(f"\n#### every family, {length} tokens\n\n{survey_table(pooled, mean_bytes, False)}", flush=True)
    names = [name for name in first if name != "full cache"]
    rows = [[name, *(family_cell(m["full cache"], m[name]) for m in by_family.values()), loss_rate(by_family, name)]
            for name in names]
    answered = [f"{family} ({sum(f > 0 for f in m['full cache'])} of {len(m['full cache'])})"
                for family, m in by_family.items()]
    print(f"\n#### the target per map and family, {length} tokens: answers lost / gained (x: the family misses "
          f"it)\n\n" + common.table(["map", *answered, "answers lost / the full cache's (95% interval)"], rows,
                                        "l" + "r" * len(answered) + "l"))
    drawn = ", chat format" if fmt == "chat" else ""
    if plot:
        plot_survey(by_family, plot, f"answer margins, {length} tokens, {tasks} documents a family{drawn}")
    if frontier:
        plot_frontier(by_family, nbytes, frontier, f"answers lost, {length} tokens, {tasks} documents a family"
                                                   f"{drawn}\n(dots: families pooled, 95% interval; dashes: each family)")


def from_results(paths: list[Path], plot: Path | None, frontier: Path | None) -> None:
    """Print the tables of --json surveys and draw their plots, without running anything. Surveys of the same
    documents (seed and count) put their maps side by side; surveys of other documents at the same length are
    pooled: each family's documents put together, for the maps every set of documents has."""
    runs = [json.loads(path.read_text()) for path in paths]
    lengths = {run["length"] for run in runs}
    if len(lengths) > 1:
        raise SystemExit(f"--results: pool surveys of one length, not {sorted(lengths)}")
    formats = {run.get("format", "completion") for run in runs}
    if len(formats) > 1:
        raise SystemExit(f"--results: pool surveys of one task format, not {sorted(formats)}")
    draws: dict[tuple, list[dict]] = {}
    for run in runs:
        draws.setdefault((documents_seed(run["length"], run.get("seed")), run["tasks"]), []).append(run)
    margins, nbytes = pooled_runs([side_by_side(same) for same in draws.values()])
    for family, by_map in margins.items():
        print(f"\n#### {family}, {runs[0]['length']} tokens\n\n{survey_table(by_map, nbytes[family])}")
    tasks = sum(tasks for _, tasks in draws)
    summarise(margins, nbytes, runs[0]["length"], tasks, plot, frontier, formats.pop())


def side_by_side(runs: list[dict]) -> dict:
    """Surveys of the same documents as one: the families they all have, with every map of each."""
    families = shared_families(runs)
    for family in families:   # the same documents: the same full-cache margins
        if any(run["margins"][family]["full cache"] != runs[0]["margins"][family]["full cache"] for run in runs):
            raise SystemExit(f"--results: surveys of seed {runs[0].get('seed')} differ on {family}'s full cache")
    return {**runs[0], "margins": {f: {n: m for run in runs for n, m in run["margins"][f].items()} for f in families},
            "bytes": {f: {n: b for run in runs for n, b in run["bytes"][f].items()} for f in families}}


def pooled_runs(runs: list[dict]) -> tuple[dict, dict]:
    """(family -> map -> margins over every run's documents, family -> map -> the first run's bytes), for the
    families and maps every run has."""
    margins, nbytes = {}, {}
    for family in shared_families(runs):
        names = [n for n in runs[0]["margins"][family] if all(n in run["margins"][family] for run in runs)]
        margins[family] = {n: [m for run in runs for m in run["margins"][family][n]] for n in names}
        nbytes[family] = {n: runs[0]["bytes"][family][n] for n in names}
    return margins, nbytes


def shared_families(runs: list[dict]) -> list[str]:
    """The families every survey scored, in the first survey's order."""
    return [f for f in runs[0]["margins"] if all(f in run["margins"] for run in runs)]


if __name__ == "__main__":
    main()
