"""Token selection inside full heads: more heads, each keeping part of the document, at the same bytes?

At a quarter of the bytes the shipped map keeps 32 KV heads whole (8-bit rows) and the losses that remain are
real (docs 3.2h-j: word and multi answers); more whole heads cost bytes the goal does not have. This bench
measures, before anything is built, whether heads that keep only the document tokens their prefill found
salient (H2O, SnapKV) spend the same bytes better. A plan such as `16+64@0.25` keeps the top 16 heads of the
order whole and the next 64 at a quarter of the document's tokens each (the sinks, the last `--recent`
tokens, and the most salient of the rest); every other head stays local (sink + window + compensation, as the
map says). Scores, per KV head (the max over its query heads), from one probe forward over the document:

  snap   mean attention from the document's last 32 queries, max-pooled over 7 neighbours (SnapKV)
  h2o    mean attention a token receives from the queries that see it (H2O's accumulation, per query)
  norm   the key's L2 norm, lowest kept (low-norm keys draw attention; needs no probe)

The question comes a turn later, so no score can see it: that is what the bench tests. Simulated: each
document's cache is built from its full prefill as the engine builds it (retrieval heads in the map's bits),
then the unselected rows of a partly kept head are masked out of its attention (the rows stay in storage, so
the bytes are counted as a store that dropped them would hold: the same row bytes, fewer rows). Scored on
the bench part (seeds 777000 + length) as `bench_quality` scores: answers kept, lost / gained against the
full cache with McNemar's p, bytes against a 16-bit full cache.

    .venv/bin/python bench/bench_token_selection.py            # full size (~2 h on a 2-core CPU: 1k ~30 min, 2k ~1.5 h)
    .venv/bin/python bench/bench_token_selection.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import bench_kv_quant as bkq
import bench_quality as bq
import common
import torch
import torch.nn.functional as F

from services.engine import HeadMap, attention, evaluation, hf, kv_quant, load_model
from services.engine.evaluation import full_prefill, retrieval_tasks
from services.engine.generation import Engine
from services.engine.headmap import shipped_head_map
from services.engine.task_bench import Target

SCORES = ("snap", "h2o", "norm")
OBS, POOL = 32, 7   # SnapKV's observation window (the document's last queries) and pooling kernel


# --- plans -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    whole: int          # top heads of the order kept whole
    partial: int        # the next heads, each keeping `fraction` of the document's tokens
    fraction: float
    score: str          # how a partly kept head picks its tokens
    bits: bkq.Bits | None = None   # keys / values rounded to these bits (simulated); None: the map's own store

    @classmethod
    def parse(cls, text: str, score: str, bits: bkq.Bits | None = None) -> "Plan":
        """'32' (whole heads only) or '16+64@0.25'."""
        whole, _, rest = text.partition("+")
        partial, _, fraction = rest.partition("@")
        return cls(int(whole), int(partial or 0), float(fraction or 1.0), score if partial else "-", bits)

    @property
    def name(self) -> str:
        # Without `bits` the names are those of earlier runs' JSON, so `--results` can merge them.
        stored = "" if self.bits is None else f", {self.bits} bits"
        if not self.partial:
            return f"{self.whole} whole{stored}"
        return f"{self.whole} whole + {self.partial} at {self.fraction:g} ({self.score}){stored}"


# --- scores ------------------------------------------------------------------------------------------
class SaliencyProbe:
    """Receives each layer's attention probabilities over the document; keeps per KV head the snap and h2o
    scores of every token ([n_kv_heads, N] each, the max over the head's query heads)."""

    def __init__(self, n_layers: int, group: int):
        self.group = group
        self.snap: list = [None] * n_layers
        self.h2o: list = [None] * n_layers

    def record(self, layer_idx: int, probs: torch.Tensor) -> None:
        p = probs[0].float()                                                    # [Hq, N, N]
        n = p.shape[-1]
        snap = F.max_pool1d(p[:, -OBS:].mean(1, keepdim=True), POOL, 1, POOL // 2)[:, 0]   # [Hq, N]
        h2o = p.sum(1) / torch.arange(n, 0, -1, device=p.device)                 # key j is seen by n - j rows
        self.snap[layer_idx] = self._per_kv_head(snap)
        self.h2o[layer_idx] = self._per_kv_head(h2o)

    def _per_kv_head(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, self.group, x.shape[-1]).amax(1).cpu()                # [Hkv, N]


@torch.no_grad()
def saliency(engine: Engine, ids: list[int], full_kv, probed: bool) -> dict[str, list[torch.Tensor]]:
    """{score: per layer [n_kv_heads, N]}, higher = keep first. The probe forward (eager attention, the
    costliest step per document) runs only when `probed`: a plan scores by snap or h2o."""
    norm = [-k[0].float().norm(dim=-1).cpu() for k in full_kv[0]]              # [Hkv, N]: low norm first
    if not probed:
        return {"norm": norm}
    fp = engine.loaded.fingerprint
    probe = SaliencyProbe(fp.n_layers, fp.group_size)
    hf.probe_forward(engine.model, torch.tensor([ids], device=engine.device), probe)
    return {"snap": probe.snap, "h2o": probe.h2o, "norm": norm}


def kept_rows(score: torch.Tensor, n_keep: int, sink: int, recent: int) -> torch.Tensor:
    """score: [N] -> bool [N]: the sinks, the last `recent` tokens, and the best-scored of the rest, `n_keep`
    in all (never fewer than the sinks and the recent tokens)."""
    n = score.shape[0]
    keep = torch.zeros(n, dtype=torch.bool)
    keep[:sink] = True
    keep[max(sink, n - recent):] = True
    extra = n_keep - int(keep.sum())
    if extra > 0:
        middle = score.masked_fill(keep, float("-inf"))
        keep[middle.topk(min(extra, int((~keep).sum()))).indices] = True
    return keep


# --- the simulated cache -------------------------------------------------------------------------------
def plan_map(base: HeadMap, order: list, plan: Plan) -> HeadMap:
    # Rounded rows are simulated on a 16-bit store (an int8 store's `values` is a dequantised copy)
    compression = base.compression if plan.bits is None else base.compression.stored_as(16)
    return bq.make_map(base, order[:plan.whole + plan.partial], compression, "token-selection")


def partial_heads(order: list, plan: Plan) -> set:
    return set(order[plan.whole:plan.whole + plan.partial])


def select_tokens(plan: Plan, partial: set, scores: dict, sink: int, recent: int):
    """Within: every session `evaluation` builds carries, on each layer with partly kept heads, `kept`
    ([r, N] bool over its retrieval heads' document rows) for `masked_attention` to read."""
    def mark(state) -> None:
        per_layer = scores[tuple(state.token_ids)][plan.score] if plan.partial else None
        for layer_idx, layer in enumerate(state.cache.layers):
            n = layer.retrieval_length()
            kept = torch.ones(len(layer.retrieval_heads), n, dtype=torch.bool)
            for i, h in enumerate(layer.retrieval_heads):
                if (layer_idx, h) in partial:
                    kept[i] = kept_rows(per_layer[layer_idx][h], round(plan.fraction * n), sink, recent)
            layer.kept = kept if not kept.all() else None

    return bq.transformed_sessions(mark)


@contextmanager
def masked_attention():
    """Within: retrieval heads attend only to their `kept` document rows (and every row after the document)."""
    original = attention.split_cache_attention

    def masked(query, layer, scale):
        # The retrieval heads' output is computed twice (unmasked, then masked): a bench's price for leaving
        # the engine's kernels untouched.
        out = original(query, layer, scale)
        kept = getattr(layer, "kept", None)
        if kept is None:
            return out
        group = query.shape[1] // layer.n_kv_heads
        q_idx = attention._query_heads(layer.retrieval_heads, group, query.device)
        keys, values = layer.keys, layer.values                                  # [1, r, S, D]
        q_len, kv_len = query.shape[-2], keys.shape[-2]
        rows = F.pad(kept, (0, kv_len - kept.shape[1]), value=True).to(query.device)      # [r, S]
        allowed = attention.causal_mask(q_len, kv_len, query.device) & rows[:, None]      # [r, Q, S]
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(~allowed, float("-inf"))
        out[:, q_idx] = F.scaled_dot_product_attention(query[:, q_idx], keys, values, scale=scale, enable_gqa=True,
                                                       attn_mask=bias.repeat_interleave(group, 0)[None])
        return out

    attention.split_cache_attention = masked
    try:
        yield
    finally:
        attention.split_cache_attention = original


def bytes_fraction(state, bits: bkq.Bits | None) -> float:
    """Bytes against a 16-bit full cache, the masked rows of partly kept heads counted as dropped; with
    `bits`, the retrieval rows as a packed store of those bits would hold them."""
    cache = state.cache
    dropped = 0
    for layer in cache.layers:
        kept = getattr(layer, "kept", None)
        if kept is not None:
            dropped += int((~kept).sum()) * row_pair_nbytes(layer, bits)
    full = sum(layer.full_nbytes_at(2) for layer in cache.layers)
    held = cache.bytes_fraction(2) if bits is None else bkq.packed_fraction(state, bkq.Point(0, bits), kv_quant.GROUP)
    return held - dropped / full


def row_pair_nbytes(layer, bits: bkq.Bits | None) -> int:
    """Bytes of one token's key and value in one retrieval head of `layer`."""
    head_dim = layer.retrieval_or_local().head_dim
    if bits is None:
        return layer.params.retrieval_row_nbytes(head_dim, 2)   # the map's own store (8/4 maps included)
    return bkq.rows_nbytes(head_dim, bits, kv_quant.GROUP)


# --- scoring -----------------------------------------------------------------------------------------
def score(engine: Engine, tasks, kvs, hm: HeadMap, plan: Plan, partial: set, scores: dict, args) -> dict:
    rounded = bkq.quantised(bkq.Point(0, plan.bits), kv_quant.GROUP) if plan.bits is not None else nullcontext()
    with rounded, select_tokens(plan, partial, scores, hm.compression.sink, args.recent), masked_attention():
        result = bq.evaluate(engine, tasks, kvs, hm)
        state = evaluation.session_from_full(engine, tasks[0].document, kvs[0], hm)
    return {**result, "bytes": bytes_fraction(state, plan.bits)}


def run_length(engine: Engine, length: int, plans: list, base: HeadMap, order: list, args) -> dict:
    seed = bq.documents_seed(length, args.seed)
    tasks = [t for family in args.families
             for t in retrieval_tasks(family, length, args.tasks, seed, engine.tokenizer, part="bench")]
    full, points = None, dict.fromkeys(p.name for p in plans)
    maps = {p.name: plan_map(base, order, p) for p in plans}
    probed = any(p.partial and p.score != "norm" for p in plans)
    for start in range(0, len(tasks), args.chunk):
        chunk = tasks[start:start + args.chunk]
        kvs = [full_prefill(engine, t.document) for t in chunk]
        scores = {tuple(t.document): saliency(engine, t.document, kv, probed) for t, kv in zip(chunk, kvs)}
        full = bq.merged(full, bq.evaluate(engine, chunk, kvs, HeadMap.full(base.fingerprint)))
        for p in plans:
            part = score(engine, chunk, kvs, maps[p.name], p, partial_heads(order, p), scores, args)
            points[p.name] = bq.merged(points[p.name], part)
        print(f"  {length} tokens: {start + len(chunk)}/{len(tasks)} tasks ({args.clock})", flush=True)
    return {"full": full, "points": points, "seed": seed}


# --- report ------------------------------------------------------------------------------------------
def per_length(results: dict, plan: Plan, fmt, sep: str = " / ") -> str:
    """fmt(result, full cache's result) at every length, joined; '-' where a merged run did not score the plan."""
    return sep.join(fmt(results[n]["points"][plan.name], results[n]["full"]) if plan.name in results[n]["points"]
                    else "-" for n in results)


def flips_cell(result: dict, full: dict) -> str:
    lost, gained = bq.flips(result, full)
    return f"{lost}/{gained} (p {bq.mcnemar_p(lost, gained):.2g})"


def kept_cell(result: dict, full: dict, family: str) -> str:
    """Share of the full cache's answers kept, x where the family misses the target (`task_bench.Target`)."""
    if family not in result["hits"]:
        return "-"
    (accuracy, kept), full_accuracy = bq.cell(result, full, family), bq.cell(full, full, family)[0]
    met = Target().met_by({"accuracy_by_family": {family: [accuracy]}, "kept_by_family": {family: [kept]}},
                          {"accuracy_by_family": {family: [full_accuracy]}})
    return f"{kept:.0%}" + ("" if met else " x")


def print_tables(results: dict, plans: list) -> None:
    rows = []
    for p in plans:
        kept = [per_length(results, p, lambda r, full, fam=fam: kept_cell(r, full, fam)) for fam in bq.BENCH_FAMILIES]
        rows.append([p.name, per_length(results, p, lambda r, _: f"{r['bytes']:.3f}"), *kept,
                     per_length(results, p, flips_cell, " · ")])
    answered = ", ".join(f"{f} {' / '.join(str(sum(results[n]['full']['hits'][f])) for n in results)}"
                         for f in bq.BENCH_FAMILIES if all(f in results[n]["full"]["hits"] for n in results))
    at = " / ".join(map(str, results))
    seeds = " / ".join(str(results[n].get("seed", bq.documents_seed(n))) for n in results)
    print(f"\nShare of the full cache's answers kept at {at} tokens, documents of seed {seeds} "
          f"(the full cache answers {answered}); "
          f"answers lost / gained over every family scored, McNemar p; x: the family misses the target\n")
    print(common.table(["plan", f"bytes / 16-bit full @{at}", *bq.BENCH_FAMILIES, "lost / gained"], rows))


def plot(results: dict, plans: list, path: Path) -> None:
    """Answers lost (all families, every length) against bytes (mean over lengths), one point per plan."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, p in enumerate(plans):
        per = [(results[n]["points"][p.name], results[n]["full"]) for n in results if p.name in results[n]["points"]]
        if not per:
            continue
        x = sum(r["bytes"] for r, _ in per) / len(per)
        lost, gained = (sum(bq.flips(r, full)[j] for r, full in per) for j in (0, 1))
        color = f"C{i % 10}"
        scored = [n for n in results if p.name in results[n]["points"]]
        label = p.name if len(scored) == len(results) else f"{p.name}, {', '.join(map(str, scored))} only"
        ax.scatter(x, lost, marker="o" if not p.partial else "^", color=color, label=label)
        ax.scatter(x, gained, marker="x", color=color)
    ax.axvline(0.25, color="red", lw=0.8, ls="-.")
    ax.set_yscale("symlog", linthresh=10, linscale=2)
    ax.set_ylim(-0.5, None)
    ticks = [0, 2, 4, 6, 8, 10, 20, 50, 100, 200]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("bytes / 16-bit full cache (mean over lengths)")
    ax.set_ylabel("full-cache answers lost (filled), gained (x)\nall families and lengths")
    ax.legend(fontsize=6, loc="upper right")
    ax.grid(alpha=0.3)
    ax.set_title(f"SmolLM2-135M: whole heads against partly kept heads ({', '.join(map(str, results))} tokens; "
                 "red: a quarter of the bytes)", fontsize=9)
    common.save_figure(fig, path)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 400 tokens, 1 task a family, 3 plans")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--tasks", type=int, default=40, help="bench tasks per family and length")
    ap.add_argument("--seed", type=int, help="the documents' seed (default 777000 + length, bench_quality's); "
                                             "another seed draws other documents from the bench part")
    ap.add_argument("--families", nargs="+", default=list(bq.BENCH_FAMILIES), choices=bq.BENCH_FAMILIES,
                    help="the families scored (default: every one)")
    ap.add_argument("--chunk", type=int, default=20, help="tasks prefilled (and held in memory) at a time")
    ap.add_argument("--plans", nargs="+", default=["32", "40", "0+64@0.5", "16+64@0.25", "32+32@0.25"],
                    help="WHOLE or WHOLE+PARTIAL@FRACTION (heads of the order, most needed first)")
    ap.add_argument("--scores", nargs="+", default=["snap", "h2o"], choices=SCORES,
                    help="each plan with partly kept heads is scored once per score")
    ap.add_argument("--bits", default="", help="KEYS/VALUES (e.g. 8/4): every kept head's rows rounded to these "
                                               "bits, simulated (default: the map's own store)")
    ap.add_argument("--recent", type=int, default=64, help="last document tokens a partly kept head always keeps")
    ap.add_argument("--map", default="", help="head map JSON whose compression and recorded order are used "
                                              "(default: the shipped map)")
    ap.add_argument("--order", default="", help="a JSON head order instead of the map's recorded one")
    ap.add_argument("--results", nargs="+", default=[],
                    help="JSON results: one path is written after a run; if every path exists, they are read (and "
                         "their lengths merged) instead of running")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--png", default=None, help="plot path (default docs/token-selection.png)")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.tasks, args.chunk = [400], 1, 6
        args.plans, args.scores = ["8", "4+8@0.5"], ["snap", "norm"]
    args.png = common.plot_path(args, "token-selection.png")
    return args


def plans_of(args) -> list[Plan]:
    bits = bkq.parse_bits(args.bits) if args.bits else None
    if bits is not None and (bits.key_mode in bkq.PRE_ROPE or bits.value_rank):
        raise SystemExit(f"--bits {args.bits}: rows rounded before RoPE or on a subspace are bench_kv_quant's only")
    plans = []
    for text in args.plans:
        for s in (args.scores if "+" in text else ["-"]):
            plans.append(Plan.parse(text, s, bits))
    return plans


def load_results(path: str) -> dict:
    return {int(n): r for n, r in json.loads(Path(path).read_text()).items()}


def main() -> None:
    args = parse_args()
    common.begin(args)
    plans = plans_of(args)
    if args.results and all(Path(path).exists() for path in args.results):
        results = {n: r for path in args.results for n, r in load_results(path).items()}
    else:
        loaded = load_model("smollm2", "cpu")
        engine = Engine(loaded)
        base = (HeadMap.from_json(Path(args.map).read_text(), expect=loaded.fingerprint) if args.map
                else shipped_head_map(loaded.fingerprint))
        order = bq.read_order(args.order) if args.order else [tuple(h) for h in base.calibration["order"]]
        print(f"map {base.version}: {base.compression}; order's top {max(p.whole + p.partial for p in plans)} "
              f"heads used", flush=True)
        results = {n: run_length(engine, n, plans, base, order, args) for n in args.lengths}
        if args.results:
            Path(args.results[0]).write_text(json.dumps(results))
    print_tables(results, plans)
    plot(results, plans, Path(args.png))
    print(f"\nplot: {args.png}\nbench_token_selection: {args.clock}")


if __name__ == "__main__":
    main()
