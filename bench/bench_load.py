"""Model load time: a GGUF file dequantised by transformers against its converted copy (services/engine/converted.py).

Every process that serves, profiles or tests the embedded SmolLM2 loads it: each replica and the worker at start,
the CLI, every test that starts a service. In one process, medians of `--repeats` loads of each (model and
tokenizer, float32 on the CPU, as `load_model` reads them), and the ratio:

    .venv/bin/python bench/bench_load.py                 # the embedded SmolLM2
    .venv/bin/python bench/bench_load.py --gguf path/to/model.gguf --repeats 1

The copy is written first if there is none (and that write is timed too).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import common  # first: puts the repository root on sys.path
import torch

from services.engine import converted, models


def timed(load) -> float:
    start = time.perf_counter()
    load()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="a .gguf file (default: the embedded SmolLM2's)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = args.gguf or models.embedded_model_dir() / models.EMBEDDED_GGUF
    print(common.header())
    first = timed(lambda: models._load_gguf(path))   # writes the copy where there is none
    copy = converted.lookup(path, models.gguf_converter())
    print(f"\n{path.name}: {path.stat().st_size / 2**20:.0f} MiB; its copy {copy} "
          f"({sum(f.stat().st_size for f in copy.iterdir()) / 2**20:.0f} MiB); first load {first:.1f} s\n")
    gguf = [timed(lambda: models._from_directory(path.parent, torch.float32, gguf_file=path.name))
            for _ in range(args.repeats)]
    from_copy = [timed(lambda: models._from_directory(copy, torch.float32)) for _ in range(args.repeats)]
    rows = [["dequantised from the GGUF file", f"{statistics.median(gguf):.2f}", "1.00x"],
            ["the converted copy", f"{statistics.median(from_copy):.2f}",
             f"{statistics.median(gguf) / statistics.median(from_copy):.1f}x"]]
    print(common.table(["load (model and tokenizer, float32)", "median s", "speed-up"], rows))


if __name__ == "__main__":
    main()
