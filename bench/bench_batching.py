"""Batched decoding over compressed caches: capacity in one KV budget, and decode-step cost against length.

1. Capacity: how many `--capacity-length`-token sessions decode together inside one KV budget (`--budget-sessions`
   full-cache sessions' worth), with the full-cache map, the shipped RazorAttention map, any `--compare` maps,
   and, for each map that keeps them in 16 bits, its heads with the retrieval heads stored in 8 bits (int8 +
   scales, `CompressionParams.retrieval_bits`). Each session is
   admitted on the bytes its cache may grow to by the end of the turn (`CompressedKVCache.bytes_bound`, as the
   service's admission does); every admitted session then decodes `--decode` tokens in one Scheduler batch, and
   the aggregate tokens/s at each map's own capacity is measured.
2. Step cost against session length: one session's decode step (ms, seated in a scheduler's decode slab) at each
   `--lengths` value, each map, and the storage work a step does: writing one token into the slab
   (every layer) against the `torch.cat` of every layer's groups that the first build did on every step.

Caches are derived from one full prefill of the longest length (`CompressedKVCache.from_full` on prefixes), so
the bench prefills once.

    .venv/bin/python bench/bench_batching.py [--lengths 1024 4096 8160] [--capacity-length 2048]
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import common  # first: puts the repository root on sys.path
import torch

from services.engine import (CompressedKVCache, Engine, HeadMap, SamplingParams, Scheduler, SchedulerConfig,
                             SessionState, TurnRequest, load_model)
from services.engine.evaluation import full_prefill
from services.engine.headmap import shipped_head_map
from services.engine.slab import DecodeSlab, size_class


def derived(engine: Engine, full_kv, ids: list[int], head_map: HeadMap, n: int) -> SessionState:
    """A session over the first `n` tokens of a fully prefilled document, compressed with `head_map`."""
    keys = [k[:, :, :n].clone() for k in full_kv[0]]
    values = [v[:, :, :n].clone() for v in full_kv[1]]
    cache = CompressedKVCache.from_full(keys, values, head_map.retrieval_kv_heads, head_map.compression)
    return SessionState(list(ids[:n]), cache, head_map.version, engine.loaded.fingerprint.id)


def turn_bound(engine: Engine, state: SessionState, new_tokens: int) -> int:
    fp = engine.loaded.fingerprint
    return state.cache.bytes_bound(state.seq_length + new_tokens, 1, fp.head_dim, engine.loaded.dtype.itemsize)


def decode_together(engine: Engine, states: list[SessionState], steps: int) -> float:
    """Aggregate generated tokens/s of all `states` decoding `steps` tokens in one batch."""
    scheduler = Scheduler(engine, SchedulerConfig(max_running=len(states), step_tokens=len(states) + 16))
    params = SamplingParams(max_new_tokens=steps + 1)
    results: list = []
    for state in states:   # one new token each: every session samples from the first step on
        scheduler.submit(TurnRequest(state, [state.token_ids[-1]], params, on_done=results.append))
    scheduler.step()       # untimed: the first token of each comes from that one-token "prefill"
    start = time.perf_counter()
    scheduler.run_until_idle()
    return sum(r.generated_tokens - 1 for r in results) / (time.perf_counter() - start)


def capacity_rows(engine: Engine, full_kv, ids, maps: dict, args) -> list[list]:
    n, steps = args.capacity_length, args.decode
    full_one = turn_bound(engine, derived(engine, full_kv, ids, maps["full cache"], n), steps)
    budget = args.budget_sessions * full_one
    rows = []
    for name, hm in maps.items():
        one = turn_bound(engine, derived(engine, full_kv, ids, hm, n), steps)
        fit = budget // one
        states = [derived(engine, full_kv, ids, hm, n) for _ in range(fit)]
        tps = decode_together(engine, states, steps)
        rows.append([name, f"{one / 2**20:.2f}", fit, f"{tps:.1f}"])
        print(f"  capacity: {name}: {fit} sessions, {tps:.1f} tok/s", flush=True)
    base_fit, base_tps = rows[0][2], float(rows[0][3])
    for row in rows:
        row += [f"{row[2] / base_fit:.2f}x", f"{float(row[3]) / base_tps:.2f}x"]
    return rows, budget


def step_ms(engine: Engine, state: SessionState, steps: int) -> float:
    """Median ms of `steps` decode steps of one session in a Scheduler (seated in a decode slab, as the service
    runs it); the median, as a busy shared machine makes single steps slow now and then."""
    scheduler = Scheduler(engine, SchedulerConfig(max_running=1, step_tokens=64))
    scheduler.submit(TurnRequest(state, [state.token_ids[-1]], SamplingParams(max_new_tokens=steps + 3)))
    scheduler.step()
    scheduler.step()       # untimed: the one-token "prefill", then the step that seats the session
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        scheduler.step()
        times.append(time.perf_counter() - start)
    scheduler.run_until_idle()
    return statistics.median(times) * 1e3


def storage_ms(engine: Engine, state: SessionState, repeats: int = 20) -> tuple[float, float]:
    """(ms per step writing one token into a decode slab, every layer; ms per step the first build's torch.cat
    of every layer's groups would copy)."""
    buffers = [b for layer in state.cache.layers for b in (layer.retrieval, layer.local) if b is not None]
    rows = [b.keys[:, :, -1:].clone() for b in buffers]            # one token's keys for each group
    start = time.perf_counter()
    for _ in range(repeats):
        for b, new in zip(buffers, rows):
            torch.cat([b.keys, new], dim=-2), torch.cat([b.values, new], dim=-2)
    cat_ms = (time.perf_counter() - start) / repeats * 1e3
    fp = engine.loaded.fingerprint
    slab = DecodeSlab(state.cache, size_class(state.seq_length + 2), fp.head_dim, engine.loaded.dtype, engine.device)
    slab.set_members([state.cache])
    slab.begin_step()
    token = torch.randn(1, fp.n_kv_heads, fp.head_dim, dtype=engine.loaded.dtype)   # [B, n_kv_heads, D]
    start = time.perf_counter()
    for _ in range(repeats):
        for layer_idx in range(fp.n_layers):
            slab.append(layer_idx, token, token)
    slab_ms = (time.perf_counter() - start) / repeats * 1e3
    slab.set_members([])
    return slab_ms, cat_ms


def length_rows(engine: Engine, full_kv, ids, maps: dict, args) -> list[list]:
    rows = []
    for n in args.lengths:
        row = [n]
        for name, hm in maps.items():
            state = derived(engine, full_kv, ids, hm, n)
            ms = step_ms(engine, state, args.steps)
            append_ms, cat_ms = storage_ms(engine, derived(engine, full_kv, ids, hm, n))
            row += [f"{state.stored_nbytes() / 2**20:.1f}", f"{ms:.1f}", f"{append_ms:.2f}", f"{cat_ms:.2f}"]
            print(f"  length {n}: {name}: {ms:.1f} ms/step", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8160],
                    help="session lengths; the longest leaves room for the timed steps in the 8k context")
    ap.add_argument("--capacity-length", type=int, default=2048)
    ap.add_argument("--budget-sessions", type=int, default=4, help="the budget, in full-cache sessions")
    ap.add_argument("--decode", type=int, default=16, help="tokens each session decodes in the capacity run")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per length")
    ap.add_argument("--compare", nargs="*", default=[], help="other head map JSONs to measure beside the shipped one")
    args = ap.parse_args()
    clock = common.Stopwatch()
    print(common.header())
    loaded = load_model(args.model, device="cpu")
    razor = shipped_head_map(loaded.fingerprint)
    maps = {"full cache": HeadMap.full(loaded.fingerprint, razor.compression.stored_as(16)),
            "razor (shipped map)": razor}
    for path in args.compare:
        other = HeadMap.from_json(Path(path).read_text(), expect=loaded.fingerprint)
        maps[f"map {other.version}"] = other
    for name, hm in list(maps.items())[1:]:   # the same heads with 8-bit retrieval rows, for comparison
        if hm.compression.retrieval_bits == 16:
            maps[f"{name}, retrieval heads in 8 bits"] = replace(
                hm, compression=hm.compression.stored_as(8), version="")
    engine = Engine(loaded, razor)
    longest = max(args.lengths + [args.capacity_length])
    ids = torch.randint(1000, 20000, (longest,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"prefilling {longest} tokens once ...", flush=True)
    full_kv = full_prefill(engine, ids)
    print(f"full prefill done ({clock})", flush=True)
    cap, budget = capacity_rows(engine, full_kv, ids, maps, args)
    print(f"\nCapacity in one KV budget of {budget / 2**20:.1f} MiB ({args.budget_sessions} full-cache sessions), "
          f"{args.capacity_length}-token sessions each decoding {args.decode} tokens together:\n")
    print(common.table(["map", "MiB per session (bound)", "sessions that fit", "aggregate tok/s",
                        "sessions vs full", "tok/s vs full"], cap))
    rows = length_rows(engine, full_kv, ids, maps, args)
    print("\nOne session's decode step against its length (ms, in a scheduler's decode slab), and the storage work "
          "per step: writing the token into the slab (now) vs torch.cat of every group (the first build):\n")
    cols = ["tokens"] + [f"{name}: {c}" for name in maps for c in ("KV MiB", "step ms", "append ms", "old cat ms")]
    print(common.table(cols, rows))
    print(f"\nbench_batching: {clock}")


if __name__ == "__main__":
    main()
