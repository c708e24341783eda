"""Draw the map rows of a `bench_quality.py` run's printed table: per family and length, the share of the full
cache's answers each calibrated map keeps, with its bytes (docs/benchmarks.md 3.2i compares two shipped maps).

    .venv/bin/python bench/bench_quality.py ... --rows maps > run.log
    .venv/bin/python bench/plot_map_rows.py run.log --png docs/shipped-maps.png
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import common

ROW = re.compile(r"^\| (calibrated map \S+ \(\d+ KV heads\)) \| [^|]* \| ([^|]+) \|(.*)\|$")


def parse(log: str) -> tuple[list[str], dict[str, dict[str, list[float]]], dict[str, list[float]]]:
    """(lengths, {map: {family: kept per length}}, {map: bytes per length}) from the printed main table."""
    lengths = re.search(r"^\| variant \| KV heads full \| family \|(.*)\|$", log, re.M).group(1)
    lengths = [c.strip().lstrip("@") for c in lengths.split("|")]
    kept: dict[str, dict[str, list[float]]] = {}
    sizes: dict[str, list[float]] = {}
    for line in log.splitlines():
        m = ROW.match(line)
        if not m:
            continue
        name, family, cells = m.group(1), m.group(2).strip(), [c.strip() for c in m.group(3).split("|")]
        if family == "**bytes / full**":
            sizes[name] = [float(c) for c in cells]
        elif all("%)" in c for c in cells):   # a family's row: "accuracy (kept%)" per length
            kept.setdefault(name, {})[family] = [float(re.search(r"\((\d+)%\)", c).group(1)) / 100 for c in cells]
    return lengths, kept, sizes


def plot(lengths, kept, sizes, path: Path, shown: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(next(iter(kept.values())))
    fig, axes = plt.subplots(1, shown, figsize=(4 * shown, 3.6), sharey=True)
    width = 0.8 / len(kept)
    for ax, i in zip(axes, range(shown)):
        for j, (name, per_family) in enumerate(kept.items()):
            xs = [f + (j - (len(kept) - 1) / 2) * width for f in range(len(families))]
            ax.bar(xs, [per_family[f][i] for f in families], width,
                   label=f"{name.split(' (')[0].removeprefix('calibrated map ')}: {sizes[name][i]:.3f} of the bytes")
        ax.set(title=f"{lengths[i]} tokens", xticks=range(len(families)), ylim=(0, 1.05))
        ax.set_xticklabels(families, rotation=30)
        ax.axhline(0.97, color="red", lw=0.8, ls="-.")
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("share of the full cache's answers kept")
    fig.suptitle("SmolLM2-135M, 52 documents per family and length (red: the 97% goal)", fontsize=9)
    common.save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log", help="the printed output of a bench_quality.py run")
    ap.add_argument("--png", default="docs/shipped-maps.png")
    ap.add_argument("--lengths", type=int, default=3, help="how many of the table's lengths to draw (first ones)")
    args = ap.parse_args()
    lengths, kept, sizes = parse(Path(args.log).read_text())
    plot(lengths, kept, sizes, Path(args.png), min(args.lengths, len(lengths)))
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
