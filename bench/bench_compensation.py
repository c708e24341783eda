"""More than one compensation token: do local heads that summarise what they dropped in m centroids keep answers
that one mean loses?

RazorAttention's local heads fold every token they drop into one compensation token (the mean key and value,
weighted by their count: paper eq. 4-5). At a quarter of the bytes, maps of whole heads lose multi answers
(docs 3.2u) that every head whole keeps. This bench keeps each map's heads and rows and replaces each local
head's one token by `m` centroids of the tokens it dropped, each its keys' and values' mean with its count:
k-means over the dropped keys (`kmeans`) or `m` runs of consecutive tokens (`segments`). Attention merges them
as it merges the one token (log-sum-exp, each centroid weighted by its count); tokens dropped later (the "turn"
family's interlude) stay in one more centroid, recovered exactly from the engine's running mean. Centroids are
counted as two 16-bit rows each (at 1,000 tokens, 32 centroids in 30 local heads add 0.011 of the bytes).

Simulated: the engine keeps one compensation token. The centroids are built from each document's full prefill
and read by a patched `attention.merge_compensation` (every scored turn is a multi-token forward, which merges
there).

    .venv/bin/python bench/bench_compensation.py --quick
    .venv/bin/python bench/bench_compensation.py --lengths 1000 --tasks 80 --seed 889000 --families multi \\
        --maps services/engine/data/smollm2.headmap.json --centroids 8 32 --cluster kmeans segments   # docs 3.2x
"""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

import bench_quality as bq
import common
import torch
from bench_lost_documents import label

from services.engine import Engine, HeadMap, attention, evaluation, load_model
from services.engine.evaluation import full_prefill, retrieval_tasks

KMEANS_STEPS = 10
CENTROID_ITEMSIZE = 2   # a centroid's key and value counted as 16-bit rows


def centroids(keys: torch.Tensor, values: torch.Tensor, m: int, cluster: str):
    """keys, values: [n, D] one head's dropped rows -> (keys [m', D], values [m', D], counts [m']) float32, m' <= m
    (empty clusters dropped)."""
    n = keys.shape[0]
    if cluster == "segments" or n <= m:
        labels = torch.arange(n) * min(m, n) // n
    else:
        labels = kmeans_labels(keys.float(), m)
    one_hot = torch.nn.functional.one_hot(labels, m).float()                            # [n, m]
    counts = one_hot.sum(0)                                                             # [m]
    kept = counts > 0
    mean = lambda rows: (one_hot.T @ rows.float())[kept] / counts[kept, None]           # noqa: E731
    return mean(keys), mean(values), counts[kept]


def kmeans_labels(x: torch.Tensor, m: int) -> torch.Tensor:
    """Lloyd's k-means on x [n, D], seeded by m rows evenly spread over the positions -> labels [n]."""
    centres = x[torch.linspace(0, x.shape[0] - 1, m).long()].clone()                  # [m, D]
    for _ in range(KMEANS_STEPS):
        one_hot = torch.nn.functional.one_hot(torch.cdist(x, centres).argmin(-1), m).float()   # [n, m]
        counts = one_hot.sum(0)
        kept = counts > 0                                                              # an empty cluster stays put
        centres[kept] = (one_hot.T @ x)[kept] / counts[kept, None]
    return torch.cdist(x, centres).argmin(-1)


class CentroidRegistry:
    """Each compensated layer's centroids, found by its compensation key tensor (which the engine updates in
    place, so the tensor stays the layer's for the session's life)."""

    def __init__(self):
        self.by_tensor: dict[int, tuple] = {}

    def add(self, layer, keys: list, values: list, counts: list) -> None:
        """Per local head, [m_h, D] keys and values and [m_h] counts, padded to one m with count 0."""
        m = max(len(c) for c in counts)
        pad = lambda t: torch.cat([t, t.new_zeros(m - t.shape[0], *t.shape[1:])])        # noqa: E731
        self.by_tensor[id(layer.comp_keys)] = (layer.comp_keys, torch.stack([pad(k) for k in keys])[None],
                                               torch.stack([pad(v) for v in values])[None],
                                               torch.stack([pad(c) for c in counts]))

    def get(self, comp_keys):
        found = self.by_tensor.get(id(comp_keys))
        return found[1:] if found is not None and found[0] is comp_keys else None


def add_centroids(registry: CentroidRegistry, state, full_kv, m: int, cluster: str) -> None:
    """Centroids of every local head's dropped rows, from the document's full keys and values."""
    keys, values = full_kv
    for i, layer in enumerate(state.cache.layers):
        if not layer.comp_count:
            continue
        sink = min(layer.params.sink, layer.local_length())
        window = layer.local_length() - sink
        dropped = slice(sink, layer.seq_len - window)                                   # the positions folded
        assert dropped.stop - dropped.start == layer.comp_count, (dropped, layer.comp_count)
        per_head = [centroids(keys[i][0, h, dropped], values[i][0, h, dropped], m, cluster) for h in layer.local_heads]
        registry.add(layer, *zip(*per_head))


def merge_centroids(out, lse, q, comp_k, comp_v, count, scale, found):
    """attention.merge_compensation with `found` (keys, values [1, l, m, D], counts [l, m]) in place of the one
    token; what the running mean holds beyond them (tokens dropped after they were built) is one more."""
    keys, values, counts = found
    count = torch.as_tensor(float(count))
    extra = (count - counts.sum(-1)).clamp(min=0)                                        # [l]
    rest = lambda mean, parts: ((count * mean[0, :, 0] - (counts[..., None] * parts[0]).sum(1))   # noqa: E731
                                / extra.clamp(min=1)[:, None])
    keys = torch.cat([keys, rest(comp_k, keys)[None, :, None]], 2)                       # [1, l, m + 1, D]
    values = torch.cat([values, rest(comp_v, values)[None, :, None]], 2)
    counts = torch.cat([counts, extra[:, None]], 1)                                      # [l, m + 1]
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # [1, Hq, m + 1, D]
    log_counts = torch.log(counts).repeat_interleave(group, 0)[None, :, None]            # [1, Hq, 1, m + 1]
    logits = q.float() @ keys.transpose(-1, -2) * scale + log_counts                     # [1, Hq, Q, m + 1]
    total = torch.logaddexp(lse.float(), torch.logsumexp(logits, -1))                    # [1, Hq, Q]
    merged = out.float() * torch.exp(lse.float() - total)[..., None] + torch.exp(logits - total[..., None]) @ values
    return merged.to(out.dtype)


@contextmanager
def with_centroids(m: int, cluster: str):
    """Within: every session evaluation builds has its local heads' compensation in `m` centroids."""
    registry, original = CentroidRegistry(), attention.merge_compensation

    def merge(out, lse, q, comp_k, comp_v, count, scale):
        found = registry.get(comp_k)
        if found is None:
            return original(out, lse, q, comp_k, comp_v, count, scale)
        return merge_centroids(out, lse, q, comp_k, comp_v, count, scale, found)

    attention.merge_compensation = merge
    try:
        with bq.transformed_sessions(lambda state, kv: add_centroids(registry, state, kv, m, cluster), with_full=True):
            yield
    finally:
        attention.merge_compensation = original


def centroid_bytes(state, m: int) -> float:
    """The centroids' bytes as a share of a 16-bit full cache's (two 16-bit rows each, per local head)."""
    layers = state.cache.layers
    extra = sum(len(layer.local_heads) * min(m, layer.comp_count) * 2 * layer.retrieval_or_local().head_dim
                for layer in layers if layer.comp_count) * CENTROID_ITEMSIZE
    return extra / sum(layer.full_nbytes_at(CENTROID_ITEMSIZE) for layer in layers)


def variants(maps: dict[str, HeadMap], args) -> dict[str, tuple]:
    """{label: (head map, m or 0, cluster)}: each map as the engine keeps it, then with every m and clustering."""
    out = {}
    for name, hm in maps.items():
        out[name] = (hm, 0, "")
        for cluster in args.cluster:
            for m in args.centroids:
                out[f"{name} + {m} {cluster}"] = (hm, m, cluster)
    return out


def score(engine, hm: HeadMap, m: int, cluster: str, tasks, kvs) -> dict:
    if not m:
        return bq.evaluate(engine, tasks, kvs, hm)
    with with_centroids(m, cluster):
        result = bq.evaluate(engine, tasks, kvs, hm)
    state = evaluation.session_from_full(engine, tasks[0].document, kvs[0], hm)
    result["bytes"] += centroid_bytes(state, m)
    return result


def run(args) -> dict:
    loaded = load_model("smollm2", "cpu")
    engine, fp = Engine(loaded), loaded.fingerprint
    maps = {label(hm): hm for hm in (HeadMap.from_json(Path(p).read_text(), expect=fp) for p in args.maps)}
    plan = variants(maps, args)
    results: dict = {"full": {}, "points": {key: {} for key in plan},
                     "seeds": {n: bq.documents_seed(n, args.seed) for n in args.lengths}}
    for n in args.lengths:
        tasks = [t for family in args.families
                 for t in retrieval_tasks(family, n, args.tasks, results["seeds"][n], engine.tokenizer, part="bench")]
        for start in range(0, len(tasks), args.chunk):
            chunk = tasks[start:start + args.chunk]
            kvs = [full_prefill(engine, t.document) for t in chunk]
            results["full"][n] = bq.merged(results["full"].get(n), bq.evaluate(engine, chunk, kvs, HeadMap.full(fp)))
            for key, (hm, m, cluster) in plan.items():
                results["points"][key][n] = bq.merged(results["points"][key].get(n),
                                                      score(engine, hm, m, cluster, chunk, kvs))
            print(f"  {n} tokens: {start + len(chunk)}/{len(tasks)} tasks, {len(plan)} variants ({args.clock})",
                  flush=True)
            del kvs
    return results


def print_table(results: dict, args) -> None:
    first = next(iter(results["full"].values()))
    families = [f for f in bq.BENCH_FAMILIES if f in first["hits"]]
    lengths = " / ".join(map(str, results["full"]))
    rows = []
    for key, per in results["points"].items():
        cells = [" / ".join(f"{bq.cell(per[n], results['full'][n], f)[1]:.0%}" for n in results["full"])
                 for f in families]
        flips = [bq.flips(per[n], results["full"][n]) for n in results["full"]]
        rows.append([key, " / ".join(f"{per[n]['bytes']:.3f}" for n in results["full"]), *cells,
                     " · ".join(f"{lost}/{gained} (p {bq.mcnemar_p(lost, gained):.2g})" for lost, gained in flips)])
    answered = ", ".join(f"{f} {' / '.join(str(sum(results['full'][n]['hits'][f])) for n in results['full'])}"
                         for f in families)
    print(f"\nShare of the full cache's answers kept at {lengths} tokens ({args.tasks} documents a family, seeds "
          f"{' / '.join(str(s) for s in results['seeds'].values())}; the full cache answers {answered})\n")
    print(common.table(["map (+ centroids)", f"bytes / 16-bit full @{lengths}", *families, "lost / gained"], rows))


def plot(results: dict, path: Path) -> None:
    """Answers lost against the bytes at the first length, one colour per map, its centroid variants labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = next(iter(results["full"]))
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = {}
    for key, per in results["points"].items():
        lost, _ = bq.flips(per[n], results["full"][n])
        name, _, variant = key.partition(" + ")
        colour = colours.setdefault(name, f"C{len(colours)}")
        ax.plot(100 * per[n]["bytes"], lost, "o" if variant else "s", color=colour,
                label=None if variant else name)
        below = variant.endswith("segments")   # kmeans above, segments below: the two often coincide
        ax.annotate(variant or "one token", (100 * per[n]["bytes"], lost), xytext=(4, -10 if below else 4),
                    textcoords="offset points", fontsize=7)
    ax.legend(fontsize=7, loc="upper right")
    ax.set(xlabel=f"KV bytes kept at {n} tokens (% of a 16-bit full cache)",
           ylabel="answers lost against the full cache", ylim=(-0.5, None))
    ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M: each map's local heads with one compensation token, then m centroids", fontsize=9)
    common.save_figure(fig, path)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 400 tokens, 2 tasks a family, m = 4")
    ap.add_argument("--maps", nargs="+", default=["services/engine/data/smollm2.headmap.json"],
                    help="head map JSON files (the engine's storage, as shipped or from bench/results)")
    ap.add_argument("--centroids", type=int, nargs="+", default=[8, 32], help="centroids a local head (m)")
    ap.add_argument("--cluster", nargs="+", default=["kmeans"], choices=["kmeans", "segments"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000])
    ap.add_argument("--tasks", type=int, default=40, help="bench documents a family and length")
    ap.add_argument("--seed", type=int, help="the documents' seed (default bench_quality's 777000 + length)")
    ap.add_argument("--families", nargs="+", default=list(bq.BENCH_FAMILIES), choices=bq.BENCH_FAMILIES)
    ap.add_argument("--chunk", type=int, default=20, help="documents prefilled (and held in memory) at a time")
    ap.add_argument("--results", default=None, help="JSON results: written after a run, or read if it exists")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--png", default=None, help="plot path (default docs/compensation-centroids.png)")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.tasks, args.centroids, args.families = [400], 2, [4], ["multi", "passkey"]
    args.png = common.plot_path(args, "compensation-centroids.png")
    return args


def main() -> None:
    args = parse_args()
    common.begin(args)
    if args.results and Path(args.results).exists():
        results = json.loads(Path(args.results).read_text())
    else:
        results = run(args)
        if args.results:
            Path(args.results).write_text(json.dumps(results))
    print_table(results, args)
    plot(results, Path(args.png))
    print(f"\nplot: {args.png}\nbench_compensation: {args.clock}")


if __name__ == "__main__":
    main()
