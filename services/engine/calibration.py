"""Calibrated head selection: the fewest KV bytes that still answer like the full cache.

The paper's fixed fractions (15% + 1% of query heads, C = 5) do not transfer to a 135M model, and one
synthetic skill (a pass key in one repeated sentence) is not retrieval. Calibration measures instead:

1. Tasks of several retrieval FAMILIES (retrieval_tasks.py: codes, invented names, several facts, a fact after
   an intervening turn, facts at the edges) at several lengths, over varied prose from the corpus's
   calibration part (corpus.py), each prefilled once with full attention (task_bench.py). KL to the full
   cache on real text is measured beside them (and bounds the choice when `max_kl` is set).
2. The TARGET, per family and length, against the full cache on the same documents: accuracy within
   `max_accuracy_drop`, and at least `min_kept` of the tasks the full cache answers still answered.
3. A ranking of KV heads: by default learned gates (`ranking="gates"`, head_gates.py): one gate per KV head
   mixing full and local attention for the turn, trained on every calibration task to keep the answers'
   distribution under a growing L1 penalty, ranked by how long each gate survives; or the attention mass each
   head puts, from the answer's positions, on the fact in the document (`"attention"`, one forward per task,
   fact_attention.py); or (`"ablation"`) how much each task's answer log-prob drops when only that head is
   compressed (one scoring pass per head: ~10x dearer). The attention and ablation scores give each family
   one vote; the gates are trained on the families' tasks together.
4. The BYTES search: for every window, sink size, ratio C (1e9 = a fixed window) and storage of the retrieval
   heads (`bits`: 16, 8 = int8 with scales, "8/4" = 4-bit values or "6/4" = 6-bit keys too, kv_quant.py;
   bytes counted as against a 16-bit cache) and of the local heads' rows (`local_bits`, the same), the smallest
   k such that the top-k heads of the ranking (one vote per family) meet the target (binary search; a shape
   that cannot beat the cheapest point found so far at equal bytes is dropped after one probe). The cheapest
   point wins.
   With a byte budget (`max_bytes`) no point above it is tried; when none within it meets the target, the
   point keeping the largest share of the full cache's answers in its worst cell wins, and the record says
   the target was missed (`validated_on["target_met"]`): a map for a memory budget, honestly labelled.
5. Validation on held-out documents (the corpus's validation part, other seeds): while the choice misses the
   target there, ~3% more KV heads are added (the authors' own fallback; never past the byte budget). Then
   LEAVE ONE FAMILY OUT: for each family, the search is re-run without it (its ranking, gates retrained
   included, and its k from the other families only) and the result checked on the left-out family's
   held-out documents: does the selection generalise to a skill the search never saw?
   `calibration["validated_on"]` says which families and lengths held.
Every point tried is recorded in `HeadMap.calibration`; `variant_at(...)` picks another point of the curve.
Per-layer windows are not searched: `CompressionParams` has one window for every layer, and a window per layer
measured no better at equal bytes (`bench/bench_layer_windows.py`, docs/benchmarks.md 3.2f).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

from . import kv_quant
from .cache import CompressionParams
from .generation import Engine
from .fact_attention import fact_attention, one_vote_per_family
from .head_gates import GateParams, train_gates
from .headmap import HeadMap
from .retrieval_tasks import FAMILIES
from .task_bench import Progress, Target, TaskBench

KNOWN_FAMILIES = FAMILIES + ("passkey", "copy", "copy-edge")
FIXED = 1e9   # a ratio C this large keeps min_window tokens at every length: a fixed window
RANKINGS = ("gates", "attention", "ablation")


def _storages(name: str, labels: tuple) -> tuple:
    """`labels` as storage labels, sorted and unique (ValueError naming the storages there are)."""
    if not labels:
        raise ValueError(f"{name} must be some of 16, 8, \"8/4\" and \"6/4\", got {labels}")
    return tuple(kv_quant.storage_label(*s) for s in sorted({kv_quant.parse_storage(b) for b in labels}))


@dataclass(frozen=True)
class CalibrationParams:
    families: tuple[str, ...] = FAMILIES   # task families (retrieval_tasks.py); "copy" needs no tokenizer
    lengths: tuple[int, ...] = (400, 1000, 2000)   # document tokens: calibrate at the lengths you serve
    n_tasks: int = 2                   # per family and length
    n_validation: int = 3              # held-out tasks per family and length (0 = skip validation)
    seed: int = 1234                   # calibration documents; validation uses seed + 1000 and another text
    max_accuracy_drop: float = 0.02    # target, per family and length: accuracy >= the full cache's - this
    min_kept: float = 0.97             # target: of the full cache's correct answers, at least this kept
    max_kl: float | None = None        # and/or: mean KL(full || variant) on real-text continuations <= this
    kl_tokens: int = 32                # continuation tokens per KL document (one document per length)
    windows: tuple[int, ...] = (32, 64, 128)   # S0 (min_window) candidates
    sinks: tuple[int, ...] = (4,)              # N0 candidates
    ratios: tuple[float, ...] = (FIXED, 10.0)  # C candidates; FIXED = no growth with length
    bits: tuple = (16,)                        # retrieval heads' storage candidates: 16 (model dtype), 8 (int8),
                                               # "8/4" (int8 keys, 4-bit values), "6/4" (6-bit keys)
    local_bits: tuple = (16,)                  # the local heads' sink and window rows' storage candidates, as bits
    recent_rows: int = 0                       # every shape keeps these recent rows (CompressionParams; not
    local_recent_rows: int | None = None       # searched)
    leave_one_out: bool = True         # re-run the search without each family and check it on that family
    ranking: str = "gates"             # "gates": learned per-head gates over every task (head_gates.py)
                                       # "attention": mass on the fact (one forward per task; fact_attention.py)
                                       # "ablation": answer log-prob lost when one head is compressed (one per head)
    ablation_length: int | None = None  # attention / ablation ranking's tasks: this length's (None: the middle one)
    gates: GateParams = GateParams()   # gate training (ranking="gates"), at the middle window and the largest sink
    fold_gate_steps: int | None = None  # each leave-one-family-out fold's gate training (None: as `gates`): the
                                        # folds are checks, and seven trainings are most of a calibration's time
    max_bytes: float | None = None     # a byte budget (mean fraction of the full cache over `lengths`): no point
                                       # above it is chosen; when none within it meets the target, the one that
                                       # keeps the most answers is, and the record says the target was missed

    @classmethod
    def for_model(cls, loaded, **overrides) -> "CalibrationParams":
        """Every task family for a model with a tokenizer; copy tasks (more of them) for one without, whose one
        skill needs a short gate training (a model without a tokenizer is a test or random-weight model)."""
        if loaded.tokenizer is None:
            overrides = {"families": ("copy",), "n_tasks": 6, "n_validation": 10,
                         "gates": GateParams(steps=20), **overrides}
        else:   # the folds at half the steps: SmolLM2's six-family calibration in ~19 min, not ~25 (docs §5)
            steps = overrides.get("gates", GateParams()).steps
            overrides = {"fold_gate_steps": max(10, steps // 2), **overrides}
        return cls(**overrides)

    def __post_init__(self):
        for name in ("windows", "sinks", "lengths", "ratios"):
            object.__setattr__(self, name, tuple(sorted(set(getattr(self, name)))))
        for name in ("bits", "local_bits"):
            object.__setattr__(self, name, _storages(name, getattr(self, name)))
        object.__setattr__(self, "families", tuple(dict.fromkeys(self.families)))
        if not self.families or any(f not in KNOWN_FAMILIES for f in self.families):
            raise ValueError(f"families must be some of {KNOWN_FAMILIES}, got {self.families!r}")
        if not self.lengths or min(self.lengths) < 32 or self.n_tasks < 1 or self.n_validation < 0:
            raise ValueError("lengths must be >= 32 tokens, n_tasks >= 1 and n_validation >= 0")
        for name in ("max_accuracy_drop", "min_kept"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {getattr(self, name)}")
        if self.max_kl is not None and not self.max_kl > 0:
            raise ValueError(f"max_kl must be a positive number of nats (or None), got {self.max_kl}")
        if self.kl_tokens < 1:
            raise ValueError(f"kl_tokens must be >= 1, got {self.kl_tokens}")
        if not self.windows or min(self.windows) < 1 or not self.sinks or min(self.sinks) < 0:
            raise ValueError("windows must be positive token counts and sinks non-negative")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.ablation_length is not None and self.ablation_length not in self.lengths:
            raise ValueError(f"ablation_length must be one of lengths {self.lengths}, got {self.ablation_length}")
        if self.max_bytes is not None and not 0.0 < self.max_bytes <= 1.0:
            raise ValueError(f"max_bytes must be within (0, 1] of the full cache's bytes, got {self.max_bytes}")
        if not self.ratios or min(self.ratios) < 1:
            raise ValueError(f"ratios must be >= 1 (1e9 = a fixed window), got {self.ratios}")
        CompressionParams(recent_rows=self.recent_rows, local_recent_rows=self.local_recent_rows)   # their checks
        self.fold_gates()   # GateParams' checks, for fold_gate_steps

    def fold_gates(self) -> GateParams:
        """The gate training of each leave-one-family-out fold."""
        return self.gates if self.fold_gate_steps is None else replace(self.gates, steps=self.fold_gate_steps)

    def ablation_shape(self) -> CompressionParams:
        """Where single heads are ablated: the middle window at the largest ratio (fixed, when searched)."""
        return CompressionParams(sink=self.sinks[-1], min_window=self.windows[len(self.windows) // 2],
                                 ratio=self.ratios[-1])

    @property
    def target(self) -> Target:
        return Target(self.max_accuracy_drop, self.min_kept, self.max_kl)

    def shapes(self) -> list[CompressionParams]:
        """Every (window, sink, ratio, bits, local bits) to search, fewest local tokens first (cheap shapes set the
        bar), fewer bits before more (at equal heads, cheaper)."""
        recent = {"recent_rows": self.recent_rows, "local_recent_rows": self.local_recent_rows}
        shapes = [CompressionParams(sink=s, min_window=w, ratio=r, **recent).stored_as(b).local_stored_as(lb)
                  for w in self.windows for s in self.sinks for r in self.ratios for b in self.bits
                  for lb in self.local_bits]
        return sorted(shapes, key=lambda c: (c.window(max(self.lengths)) + c.sink, -c.ratio,
                                             c.retrieval_bits + c.value_bits, sum(c.local_storage_bits)))


Order = list[list[int]]   # KV heads [layer, head], most needed first


def calibrate(engine: Engine, base: HeadMap, params: CalibrationParams = CalibrationParams(),
              progress: Progress | None = None) -> HeadMap:
    """A head map at the fewest measured KV bytes that meets the target on every family and length."""
    start = time.perf_counter()
    report = progress or (lambda done, total, stage: None)
    bench = TaskBench(engine, params.families, params.lengths, params.n_tasks, params.seed, "calibration",
                      params.kl_tokens, report, "prefilling calibration tasks")
    shapes = params.shapes()
    rank = _ranker(bench, base, params, report)
    order = rank(params.families)
    candidates = []
    for i, shape in enumerate(shapes):
        _search_shape(bench, order, shape, params.target, candidates, params.max_bytes)
        report(i + 1, len(shapes), "searching head sets per window, sink and ratio")
    best = {**_pick(candidates), "measured_on": "calibration"}
    checks, held_out_full, lofo = [], None, []
    if params.n_validation:
        held_out = TaskBench(engine, params.families, params.lengths, params.n_validation, params.seed + 1000,
                             "validation", params.kl_tokens, report, "prefilling validation tasks")
        held_out_full = _rounded(held_out.full)
        best = _validate(held_out, order, best, params.target, checks, report,
                         _k_within(bench, order, _shape_of(best), params.max_bytes))
        if params.leave_one_out and len(params.families) > 1:
            lofo = _leave_one_out(bench, held_out, rank, best, params, report)
    chosen = bench.head_map(set(map(tuple, order[:best["k"]])), _shape_of(best))
    record = {"params": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()},
              "full": _rounded(bench.full), "full_accuracy": bench.full["accuracy"],
              "full_accuracy_by_length": bench.full["accuracy_by_length"], "full_logprob": bench.full["logprob"],
              "order": order, "candidates": candidates, "validation_full": held_out_full, "validation": checks,
              "leave_one_out": lofo, "chosen": best, "validated_on": _validated_on(params, best, lofo, held_out_full),
              "base_version": base.version}
    return replace(chosen, induction=base.induction, echo=base.echo, calibration=record,
                   method="razor+calibrated", version="", retrieval_q_heads=base.retrieval_q_heads,
                   method_params=base.method_params,
                   timings={**base.timings, "calibrate_s": round(time.perf_counter() - start, 3)})


def _is_full_cache(k: int, order: Order, shape: CompressionParams) -> bool:
    """Every head whole in the model's dtype: the full cache itself, which meets any target by definition (its
    measured flips are noise). Every head whole in 8 or 6 bits is not: it is measured like any other point."""
    return k >= len(order) and shape.storage() == 16


def _shape_of(point: dict) -> CompressionParams:
    shape = CompressionParams(sink=point["sink"], min_window=point["window"], ratio=point["ratio"],
                              recent_rows=point.get("recent_rows", 0), local_recent_rows=point.get("local_recent_rows"))
    return shape.stored_as(point.get("bits", 16)).local_stored_as(point.get("local_bits", 16))


def _ranker(bench: TaskBench, base: HeadMap, params: CalibrationParams, report: Progress
            ) -> Callable[..., Order]:
    """families -> their ranking of KV heads (leave-one-family-out asks for every family but one)."""
    if params.ranking == "gates":
        return lambda families, fold=False: _gate_ranking(bench, base, params, families, report,
                                                          params.fold_gates() if fold else params.gates)
    ablated = params.ablation_length or params.lengths[len(params.lengths) // 2]
    which = bench.indices(lengths=(ablated,))
    damage = (_ablation(bench, params.ablation_shape(), which, report) if params.ranking == "ablation"
              else _fact_attention(bench, which, report))
    return lambda families, fold=False: _ranking(bench, base, damage, families)


def _gate_ranking(bench: TaskBench, base: HeadMap, params: CalibrationParams, families, report: Progress,
                  gates: GateParams) -> Order:
    """KV heads by their gates' scores, trained (`gates`) on `families`' tasks (head_gates.py), most needed first."""
    which = bench.indices(families)
    shape = params.ablation_shape()
    scores = train_gates(bench.engine.model, [bench.tasks[i] for i in which], [bench.kvs[i] for i in which],
                         bench.fp.n_layers, bench.fp.n_kv_heads, shape.sink, shape.min_window, gates,
                         report)                                                  # [n_layers, n_kv_heads]
    return _ordered(bench, base, {head: float(scores[head]) for head in bench.all_heads})


def _ablation(bench: TaskBench, shape: CompressionParams, which: list[int], report: Progress) -> dict:
    """(layer, head) -> {task index: drop of its answer log-prob when only that head is compressed}."""
    everything = set(bench.all_heads)
    full = bench.answer_logprobs(everything, shape, which)
    damage = {}
    for i, head in enumerate(bench.all_heads):
        dropped = bench.answer_logprobs(everything - {head}, shape, which)
        damage[head] = {i: f - lp for i, f, lp in zip(which, full, dropped)}
        report(i + 1, len(bench.all_heads), "ablating KV heads")
    return damage


def _fact_attention(bench: TaskBench, which: list[int], report: Progress) -> dict:
    """(layer, head) -> {task index: attention mass from the answer onto the fact} (the same shape as
    `_ablation`'s, so either ranks heads)."""
    scores = {head: {} for head in bench.all_heads}
    for n, i in enumerate(which):
        mass = fact_attention(bench.engine, bench.tasks[i])                 # [n_layers, n_kv_heads] or None
        if mass is not None:
            for layer, h in bench.all_heads:
                scores[(layer, h)][i] = float(mass[layer, h])
        report(n + 1, len(which), "scoring heads' attention on the facts")
    return scores


def _ranking(bench: TaskBench, base: HeadMap, damage: dict, families) -> Order:
    """KV heads by their damage on `families`' tasks, one vote per family (`one_vote_per_family`: a family
    whose facts draw more attention does not outvote the others); ties: the profiler's higher score first."""
    which = [i for i in bench.indices(families) if i in damage[bench.all_heads[0]]]   # tasks the ranking saw
    by_family: dict = {}
    for i in which:
        per_head = by_family.setdefault(bench.cells[i][0], dict.fromkeys(bench.all_heads, 0.0))
        for head in bench.all_heads:
            per_head[head] += damage[head][i]
    return _ordered(bench, base, one_vote_per_family(by_family))


def _ordered(bench: TaskBench, base: HeadMap, scores: dict) -> Order:
    """KV heads by score, highest first; ties: the profiler's higher score first."""
    group = bench.fp.group_size

    def profile_score(head):
        layer, h = head
        return max(max(base.induction[layer][j], base.echo[layer][j]) for j in range(h * group, (h + 1) * group))

    ranked = sorted(bench.all_heads, key=lambda hd: (-round(scores[hd], 4), -profile_score(hd)))
    return [list(h) for h in ranked]


def _search_shape(bench: TaskBench, order: Order, shape: CompressionParams, target: Target,
                  candidates: list[dict], max_bytes: float | None = None) -> None:
    """The smallest k meeting the target at `shape`, among the k cheaper than the best point so far and
    within `max_bytes`. The first probe is the most heads allowed, so a shape that meets the target nowhere
    within the budget still leaves its best point among the candidates."""
    def tried(k: int) -> dict:
        point = _point(bench, order, k, shape)
        point = _rounded({**point, "meets": target.met_by(point, bench.full) or _is_full_cache(k, order, shape)})
        candidates.append(point)
        return point

    met = [c["bytes_fraction"] for c in candidates if c["meets"]]
    hi = _cheaper_than(bench, order, shape, min(met)) if met else len(order)
    hi = min(hi, _k_within(bench, order, shape, max_bytes))
    if hi < 0 or not tried(hi)["meets"]:
        return   # not even the most heads that stay cheaper than the best point meet the target
    lo = 0
    while lo < hi:
        k = (lo + hi) // 2
        if tried(k)["meets"]:
            hi = k
        else:
            lo = k + 1


def _cheaper_than(bench: TaskBench, order: Order, shape: CompressionParams, bound: float) -> int:
    """The most top-ranked heads kept full at `shape` whose mean bytes stay below `bound` (-1: none)."""
    def mean_bytes(k):
        hm = bench.head_map(set(map(tuple, order[:k])), shape)
        return sum(bench._bytes_fraction(hm, n) for n in bench.lengths) / len(bench.lengths)

    lo, hi = -1, len(order)          # bytes grow with k: the largest k with bytes < bound
    while lo < hi:
        k = (lo + hi + 1) // 2
        if mean_bytes(k) < bound:
            lo = k
        else:
            hi = k - 1
    return lo


def _k_within(bench: TaskBench, order: Order, shape: CompressionParams, max_bytes: float | None) -> int:
    """The most heads kept full at `shape` within the byte budget (-1: not even none; no budget: all)."""
    return len(order) if max_bytes is None else _cheaper_than(bench, order, shape, max_bytes + 1e-9)


def _point(bench: TaskBench, order: Order, k: int, shape: CompressionParams, families=None) -> dict:
    return {"k": k, **_shape_fields(shape), **bench.score(set(map(tuple, order[:k])), shape, families,
                                                           kl=families is None)}


def _shape_fields(shape: CompressionParams) -> dict:
    """A point's record of its shape, which `_shape_of` reads back: the recent rows as `to_dict` records them
    (a local count of 0 beside a retrieval count is kept, not read back as "as recent_rows")."""
    local = {} if shape.local_storage() == 16 else {"local_bits": shape.local_storage()}
    recent = {k: v for k, v in shape.to_dict().items() if k in ("recent_rows", "local_recent_rows")}
    return {"window": shape.min_window, "sink": shape.sink, "ratio": shape.ratio, "bits": shape.storage(),
            **local, **recent}


def _pick(candidates: list[dict]) -> dict:
    """The cheapest candidate meeting the target; within 2% of its bytes, the most sinks and widest window
    (safer), then fewest heads. None meeting it (only under a byte budget): the one that keeps the most."""
    if not candidates:
        raise ValueError("no window and sink searched fits max_bytes even with every head local: "
                         "raise max_bytes or search smaller windows")
    meeting = [c for c in candidates if c["meets"]]
    if not meeting:
        return max(candidates, key=_answers_kept)
    cheapest = min(c["bytes_fraction"] for c in meeting)
    near = [c for c in meeting if c["bytes_fraction"] <= cheapest * 1.02]
    return min(near, key=lambda c: (-c["sink"], -c["window"], c["k"]))


def _answers_kept(point: dict) -> tuple[float, float, float]:
    """How well a point answers like the full cache: its worst cell's share of the full cache's answers kept,
    then the mean share over cells, then its accuracy."""
    kept = [k for cells in point["kept_by_family"].values() for k in cells]
    return min(kept), sum(kept) / len(kept), point["accuracy"]


def _validate(held_out: TaskBench, order: Order, best: dict, target: Target, checks: list[dict],
              report: Progress, max_k: int) -> dict:
    """Confirm the choice on held-out documents; while it misses the target there, add ~3% of KV heads (the
    paper authors' own fallback), up to `max_k` (the byte budget's)."""
    step = max(1, math.ceil(0.03 * len(order)))
    k = best["k"]
    while True:
        point = _point(held_out, order, k, _shape_of(best))
        point["meets"] = target.met_by(point, held_out.full) or _is_full_cache(k, order, _shape_of(best))
        checks.append(_rounded(point))
        last = point["meets"] or k >= min(max_k, len(order))   # no more heads to add
        report(len(checks), len(checks) + (0 if last else 1), "validating on held-out documents")
        if last:   # the chosen point, as measured on the held-out documents
            return {**checks[-1], "measured_on": "held-out", "searched_k": best["k"]}
        k = min(len(order), max_k, k + step)


def _leave_one_out(bench: TaskBench, held_out: TaskBench, rank: Callable[..., Order], best: dict,
                   params: CalibrationParams, report: Progress) -> list[dict]:
    """Per family: rank and search on the OTHER families only, then check that family's held-out documents."""
    out, shape, k_all = [], _shape_of(best), best["k"]
    for i, family in enumerate(params.families):
        others = tuple(f for f in params.families if f != family)
        order = rank(others, fold=True)
        # a fold needing twice the heads is a miss anyway; under a budget the choice itself is the limit
        lo, hi = 0, min(len(order), 2 * k_all + 1 if best["meets"] else k_all)
        while lo < hi:
            k = (lo + hi) // 2
            if params.target.met_by(_point(bench, order, k, shape, others), bench.full):
                hi = k
            else:
                lo = k + 1
        unseen = _point(held_out, order, lo, shape, (family,))
        out.append(_rounded({"family": family, "k": lo, "met": params.target.met_by(unseen, held_out.full),
                             "accuracy_by_length": unseen["accuracy_by_family"][family],
                             "kept_by_length": unseen["kept_by_family"][family],
                             "full_accuracy_by_length": held_out.full["accuracy_by_family"][family]}))
        report(i + 1, len(params.families), "leave-one-family-out checks")
    return out


def _validated_on(params: CalibrationParams, best: dict, lofo: list[dict], held_out_full: dict | None) -> dict:
    held = best.get("measured_on") == "held-out" and best["meets"]
    return {"families": list(params.families) if held else [], "target_met": bool(best["meets"]),
            "max_bytes": params.max_bytes,
            "lengths": list(params.lengths), "documents": "corpus part 'validation', seed + 1000",
            "documents_per_family": params.n_validation * len(params.lengths),
            "undetected_loss_rate": _undetected_loss_rate(params.n_validation, held_out_full),
            "families_held_when_left_out": [x["family"] for x in lofo if x["met"]],
            "families_missed_when_left_out": [x["family"] for x in lofo if not x["met"]]}


def _undetected_loss_rate(n_per_cell: int, held_out_full: dict | None) -> dict[str, float]:
    """Per family, the share of the full cache's answers a map could lose and still show no loss on the held-out
    documents 1 time in 20: 1 - 0.05 ** (1 / answers). A few documents a cell cannot see a loss of several
    percent (docs/benchmarks.md 3.2u), and the record says so."""
    if held_out_full is None:
        return {}
    out = {}
    for family, accuracies in held_out_full["accuracy_by_family"].items():
        answers = round(sum(accuracies) * n_per_cell)
        out[family] = round(1 - 0.05 ** (1 / answers), 3) if answers else 1.0
    return out


def _rounded(point: dict) -> dict:
    def r(x):  # + 0.0 turns -0.0 into 0.0
        if isinstance(x, dict):
            return {k: r(v) for k, v in x.items()}
        if isinstance(x, list):
            return [r(v) for v in x]
        return round(x, 5) + 0.0 if isinstance(x, float) else x

    return r(point)


def variant_at(head_map: HeadMap, k: int, window: int, sink: int | None = None,
               ratio: float | None = None, bits: int | str | None = None,
               local_bits: int | str | None = None, recent_rows: int | None = None,
               local_recent_rows: int | None = None) -> HeadMap:
    """Another point of a calibrated map's curve: its top-k KV heads with another window (sink size, ratio,
    storages, recent rows), without re-profiling."""
    if not head_map.calibration:
        raise ValueError("this head map was not calibrated; it has no recorded head order")
    order = [tuple(h) for h in head_map.calibration["order"]]
    if not 0 <= k <= len(order):
        raise ValueError(f"k must be within 0..{len(order)}")
    fp = head_map.fingerprint
    heads = set(order[:k])
    kv = [[h for h in range(fp.n_kv_heads) if (layer, h) in heads] for layer in range(fp.n_layers)]
    c = head_map.compression
    compression = replace(c, min_window=window, sink=c.sink if sink is None else sink,
                          ratio=c.ratio if ratio is None else ratio).stored_as(c.storage() if bits is None else bits)
    compression = compression.local_stored_as(c.local_storage() if local_bits is None else local_bits)
    compression = compression if recent_rows is None else replace(compression, recent_rows=recent_rows)
    if local_recent_rows is not None:
        compression = replace(compression, local_recent_rows=local_recent_rows)
    return replace(head_map, retrieval_kv_heads=kv, version="", calibration=None,
                   method="razor+calibrated-variant", compression=compression)
