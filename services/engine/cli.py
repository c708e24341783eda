"""razor-engine: profile a model, and generate with and without compression, printing KV bytes.

  python -m services.engine.cli [--model REF] profile [--calibrate [--max-kl X]] [--out map.json] [--png map.png]
  python -m services.engine.cli [--model REF] generate [--head-map map.json] --prompt TEXT
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from tqdm import tqdm

from . import kv_quant
from .cache import CompressionParams
from .calibration import KNOWN_FAMILIES, CalibrationParams
from .generation import Engine
from .headmap import HeadMap, shipped_head_map
from .models import load_model
from .profiling import ProfileParams, profile_model
from .sampling import SamplingParams


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def cmd_profile(args) -> int:
    params = ProfileParams(seq_len=args.seq_len, repeats=args.repeats, n_samples=args.samples, seed=args.seed,
                           induction_fraction=args.induction_fraction, echo_fraction=args.echo_fraction)
    compression = CompressionParams(args.sink, args.min_window, args.ratio, recent_rows=args.recent_rows,
                                    local_recent_rows=args.local_recent_rows).stored_as(
        args.retrieval_bits[0]).local_stored_as(args.local_bits[0])
    loaded = load_model(args.model, args.device)   # after the parameters: a bad one fails before the load
    bar = tqdm(total=1, desc="profiling", unit="step")

    current = {"stage": None}

    def progress(done: int, total: int, stage: str) -> None:
        if stage != current["stage"]:  # a new stage restarts the bar
            current["stage"] = stage
            bar.reset(total=total)
            bar.set_description(stage)
        bar.update(done - bar.n)

    overrides = {"families": tuple(args.families)} if args.families else {}
    if args.fold_gate_steps:
        overrides["fold_gate_steps"] = args.fold_gate_steps
    calibration = CalibrationParams.for_model(loaded, max_accuracy_drop=args.max_accuracy_drop, max_kl=args.max_kl,
                                              max_bytes=args.max_bytes, bits=tuple(args.retrieval_bits),
                                              local_bits=tuple(args.local_bits), recent_rows=args.recent_rows,
                                              local_recent_rows=args.local_recent_rows,
                                              **overrides) if args.calibrate else None
    head_map = profile_model(loaded, params, compression, progress, calibrate=calibration)
    bar.close()
    with open(args.out, "w") as f:
        f.write(head_map.to_json())
    if args.png:
        head_map.render_png(args.png)
    print(f"head map {head_map.version} for {loaded.fingerprint.id}: {len(head_map.retrieval_q_heads)} query heads, "
          f"{head_map.kv_fraction:.1%} of KV heads full -> {args.out}")
    return 0


def _load_map(args, loaded) -> HeadMap:
    if args.head_map:
        with open(args.head_map) as f:
            return HeadMap.from_json(f.read(), expect=loaded.fingerprint)
    shipped = shipped_head_map(loaded.fingerprint)
    if shipped is None:
        raise SystemExit("no head map for this model: run `razor-engine profile` first and pass --head-map")
    return shipped


def cmd_generate(args) -> int:
    loaded = load_model(args.model, args.device)
    compressed = _load_map(args, loaded)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    rows = []
    for name, hm in (("full cache", HeadMap.full(loaded.fingerprint)), ("razor", compressed)):
        engine = Engine(loaded, hm)
        ids = engine.encode(messages=[{"role": "user", "content": args.prompt}]) if args.chat else \
            engine.encode(text=args.prompt)
        start = time.perf_counter()
        state, result = engine.generate(ids, params, chat=args.chat)
        rows.append((name, state.stored_nbytes(), time.perf_counter() - start, result.text))
    full_bytes = rows[0][1]
    for name, nbytes, secs, text in rows:
        print(f"--- {name}: KV {_mib(nbytes)} ({nbytes / full_bytes:.1%} of full), {secs:.2f} s")
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="razor-engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model reference (empty = embedded SmolLM2)")
    p.add_argument("--device", default="auto")
    sub = p.add_subparsers(dest="cmd", required=True)
    prof = sub.add_parser("profile", help="score heads and write a head map")
    d = ProfileParams()
    prof.add_argument("--seq-len", type=int, default=d.seq_len)
    prof.add_argument("--repeats", type=int, default=d.repeats)
    prof.add_argument("--samples", type=int, default=d.n_samples)
    prof.add_argument("--seed", type=int, default=d.seed)
    prof.add_argument("--induction-fraction", type=float, default=d.induction_fraction)
    prof.add_argument("--echo-fraction", type=float, default=d.echo_fraction)
    c = CompressionParams()
    prof.add_argument("--sink", type=int, default=c.sink)
    prof.add_argument("--min-window", type=int, default=c.min_window)
    prof.add_argument("--ratio", type=float, default=c.ratio)
    prof.add_argument("--retrieval-bits", nargs="+", default=["16"],
                      choices=[str(kv_quant.storage_label(*s)) for s in kv_quant.STORAGES],
                      help="retrieval heads' storage: 16 = the model's dtype, 8 = int8 with scales (about half), "
                           "8/4 = int8 keys and 4-bit values (about 0.41), 6/4 = 6-bit keys and 4-bit values "
                           "(about 0.34); with --calibrate, every value given is "
                           "searched")
    prof.add_argument("--local-bits", nargs="+", default=["16"],
                      choices=[str(kv_quant.storage_label(*s)) for s in kv_quant.STORAGES],
                      help="the local heads' sink and window rows' storage, as --retrieval-bits (the compensation "
                           "token stays float32); with --calibrate, every value given is searched")
    prof.add_argument("--recent-rows", type=int, default=c.recent_rows,
                      help="the last this many tokens of a group stored in integers are also kept (and read) in the "
                           "model's dtype; a local group keeps at most its minimum window of them")
    prof.add_argument("--local-recent-rows", type=int, default=None,
                      help="the local group's own count of recent rows (default: as --recent-rows)")
    prof.add_argument("--fold-gate-steps", type=int, default=None,
                      help="gate-training steps of each leave-one-family-out check (default: half the first "
                           "training's)")
    prof.add_argument("--calibrate", action="store_true",
                      help="refine the selection with measured retrieval on five task families (see calibration.py)")
    cal = CalibrationParams()
    prof.add_argument("--max-accuracy-drop", type=float, default=cal.max_accuracy_drop,
                      help="calibration target: accuracy within this of the full cache per task family and length")
    prof.add_argument("--max-kl", type=float, default=cal.max_kl,
                      help="calibration target (also): mean KL to the full cache on real text below this (nats)")
    prof.add_argument("--families", nargs="+", choices=KNOWN_FAMILIES, default=None,
                      help=f"calibration task families (default: {' '.join(cal.families)})")
    prof.add_argument("--max-bytes", type=float, default=cal.max_bytes,
                      help="calibration budget: at most this fraction of the full cache's bytes; when no point "
                           "within it meets the target, the one keeping the most answers (recorded as a miss)")
    prof.add_argument("--out", default="headmap.json")
    prof.add_argument("--png", default="", help="also write the score heatmap here")
    gen = sub.add_parser("generate", help="generate with the full cache and with compression")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--head-map", default="", help="head map JSON (default: the shipped one)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return {"profile": cmd_profile, "generate": cmd_generate}[args.cmd](args)
    except ValueError as e:  # ModelLoadError, HeadMapError and bad parameters all say what to fix
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
