"""Spill and restore bandwidth (a script, not a test): a session's KV cache written to and read back from
Redis, in ms and GB/s, against re-prefilling the same history (what a service without spill would do).

Per history length and head map (the shipped RazorAttention map and the full cache), in one process:
  encode      codec.encode of the session's tensors (header, sha256, chunks)
  write       Spill.write: one MULTI/EXEC with every chunk
  read        Spill.read: header and chunks, one HMGET per batch of chunks (spill.READ_BATCH_BYTES)
  per-chunk   the read as it was before batching, one round trip per chunk, on the same connection
              (each read is timed after an untimed one of its kind: both find memory in the same state;
              on this VM where fresh pages land moves a read by up to 2x, so the two share one connection)
  restore     SessionStore.load end to end: read, checksum, tensors rebuilt on the model's device
  re-prefill  Engine.generate of the same history with max_new_tokens=1
GB/s is 10^9 bytes of encoded blob per second. Medians of --repeats re-prefills and --io-repeats spills and
restores, interleaved; the two reads alternate which goes first.

    .venv/bin/python bench/bench_restore.py                       # SmolLM2, 1024 and 4096 tokens
    .venv/bin/python bench/bench_restore.py --lengths 512 2048 --repeats 5 --dtype float32
    python3 bench/bench_restore.py --model random-llama-8b --device cuda --lengths 8192   # issue 15, on a GPU

`random-llama-8b` is bench_gpu's random-weight Llama-3-8B shape (bf16 on CUDA), with bench_gpu's 16%-of-KV-heads
maps in place of the shipped one and random token ids as the history; `random-llama-small` is its 4-layer shape,
a CPU smoke test of the same path.
"""
from __future__ import annotations

import argparse
import statistics
import time

import bench_gpu
import common  # also puts the repository root on sys.path
import redis
import torch
from redis.utils import HIREDIS_AVAILABLE

from services.engine import (CompressionParams, Engine, HeadMap, LoadedModel, SamplingParams, SessionState,  # noqa: E402
                             load_model)
from services.engine.models import resolve_dtype  # noqa: E402
from services.engine.headmap import shipped_head_map  # noqa: E402
from services.inference import codec  # noqa: E402
from services.inference.sessions import SessionStore  # noqa: E402
from services.inference.spilled_header import ModelShape  # noqa: E402
from services.inference import spill as spill_module  # noqa: E402
from services.inference.spill import READ_BATCH_BYTES, Spill  # noqa: E402

TEXT = ("In the long history of the valley, the river changed its course many times, and each time the "
        "villages along its banks moved with it, carrying their stories, their songs and their names. ")


def clock(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


COLUMNS = ["history tokens", "head map", "KV MiB (full)", "blob MiB / chunks", "encode ms", "write ms", "write GB/s",
           "read ms", "read GB/s", "per-chunk read ms", "restore ms", "restore GB/s", "re-prefill ms",
           "re-prefill / restore"]
ALIGN = "ll" + "r" * 12
RANDOM_MODELS = {"random-llama-8b": bench_gpu.LLAMA_8B_SHAPE, "random-llama-small": bench_gpu.SMALL_SHAPE}
RANDOM_MAPS = ("C=5 S0=256", "8/4-bit, window 1024")   # of bench_gpu.razor_maps: the paper's shape, the stored one


def history_ids(engine: Engine, length: int) -> list[int]:
    if isinstance(engine.loaded.tokenizer, bench_gpu.NoText):   # a random model: random ids, as bench_gpu's
        return bench_gpu.random_prompt(length, engine.loaded, torch.Generator().manual_seed(length))
    ids = engine.encode(text=TEXT * (length // 20 + 1))
    return ids[:length]


def model(args) -> LoadedModel:
    if args.model not in RANDOM_MODELS:
        return load_model(args.model, device=args.device, dtype=args.dtype)
    device = torch.device(args.device)
    return bench_gpu.random_llama(RANDOM_MODELS[args.model], max(args.lengths) + 64, device,
                                  resolve_dtype(args.dtype, device))


def head_maps(loaded: LoadedModel, random_model: bool) -> dict[str, HeadMap]:
    """The compressed maps first, then the full cache."""
    full = {"full cache": HeadMap.full(loaded.fingerprint, CompressionParams())}
    if random_model:
        maps = bench_gpu.razor_maps(loaded, 0.16, seed=0)
        return {name: hm for name, hm in maps.items() if name.endswith(RANDOM_MAPS)} | full
    shipped = shipped_head_map(loaded.fingerprint)
    return full if shipped is None else {f"razor ({shipped.kv_fraction:.0%} KV heads)": shipped, **full}


def measure(engine: Engine, store: SessionStore, spill: Spill, ids: list[int], repeats: int,
            io_repeats: int) -> dict:
    one = SamplingParams(max_new_tokens=1)
    dt, (state, _) = clock(lambda: engine.generate(ids, one))   # the session, and the first re-prefill sample
    tensors, state_meta = state.to_tensors()
    times: dict[str, list[float]] = {k: [] for k in ("encode", "write", "read", "per_chunk", "restore", "prefill")}
    times["prefill"].append(dt)
    encoded = None
    for i in range(max(repeats, io_repeats)):
        dt, encoded = clock(lambda: codec.encode(tensors, {"state": state_meta}))
        times["encode"].append(dt)
        times["write"].append(clock(lambda: spill.write("bench", encoded))[0])
        reads = [("read", lambda: spill.read("bench")),
                 ("per_chunk", lambda: (encoded.header, per_chunk_read(spill, "bench", len(encoded.chunks))))]
        for name, read in reads[:: 1 if i % 2 == 0 else -1]:   # alternate which read goes first
            # Each timed read follows an untimed one of its own kind, so both find the allocator in the same
            # state: otherwise faulting in fresh pages for the blob (here up to 2x the read) lands on one of them.
            read()
            dt, (header, chunks) = clock(read)
            assert header == encoded.header and chunks == encoded.chunks
            times[name].append(dt)
            del header, chunks
        # The service's path: spill through the store (budget 0), then load it back.
        sid = store.create()
        store.put(sid, state)
        store.release(sid)
        store.settle()
        store.acquire(sid)
        dt, restored = clock(lambda: store.load(sid, lambda n: None))
        times["restore"].append(dt)
        assert isinstance(restored, SessionState) and restored.token_ids == state.token_ids
        del restored
        store.release(sid)
        store.delete(sid)
        if len(times["prefill"]) < repeats:
            times["prefill"].append(clock(lambda: engine.generate(ids, one))[0])
    spill.delete("bench")
    med = {k: statistics.median(v) for k, v in times.items()}
    med.update(blob=encoded.nbytes, chunks=len(encoded.chunks), kv=state.nbytes(), full_kv=state.full_nbytes())
    return med


def per_chunk_read(spill: Spill, sid: str, n_chunks: int) -> list:
    """The read before batching, one round trip per chunk: the same Spill, connection and parser, with
    batches of one chunk (an HMGET of one field, which measured the same as the HGET it replaces)."""
    saved = spill_module.READ_BATCH_BYTES
    spill_module.READ_BATCH_BYTES = 1
    try:
        return spill.read_chunks(sid, n_chunks)
    finally:
        spill_module.READ_BATCH_BYTES = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (default), tiny-random, a path, or "
                   f"{' / '.join(RANDOM_MODELS)} (bench_gpu's shapes, random weights)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="history lengths in tokens")
    p.add_argument("--repeats", type=int, default=3, help="re-prefill samples per row")
    p.add_argument("--io-repeats", type=int, default=7, help="spill and restore samples per row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, bfloat16 or float16")
    p.add_argument("--redis-url", default="", help="use this Redis instead of a private one")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0 = torch's default); 1 leaves a core to redis-server, and on a small "
                        "shared machine more threads slowed prefill down, which would flatter restore")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    watch = common.Stopwatch()
    loaded = model(args)
    maps = head_maps(loaded, args.model in RANDOM_MODELS)
    proc, url = (None, args.redis_url) if args.redis_url else common.start_redis()
    try:
        spill = Spill(url, ttl_s=600, timeout_s=30.0)
        print(common.header())
        print(f"\nmodel {loaded.ref} ({loaded.fingerprint.id}) on {loaded.device} in {loaded.dtype_name}; "
              f"Redis {redis.Redis.from_url(url).info('server')['redis_version']} ({'given' if proc is None else 'private, loopback'}), "
              f"reads batched by {READ_BATCH_BYTES / 2**20:.0f} MiB, redis-py parser "
              f"{'hiredis' if HIREDIS_AVAILABLE else 'pure Python'}; "
              f"medians of {args.repeats} re-prefills and {args.io_repeats} spills and restores; "
              f"GB/s = 10^9 encoded blob bytes per second\n")
        rows = []
        for name, head_map in maps.items():
            engine = Engine(loaded, head_map)
            # As the server builds it (services/inference/server.py): the caches' dtype goes into each spill's
            # header and a restore refuses any other, so without it a bfloat16 (CUDA) session could not come back.
            store = SessionStore(spill, loaded.fingerprint.id, loaded.device, 0, dtype=loaded.dtype_name,
                                 shape=ModelShape.of(loaded))
            engine.generate(history_ids(engine, 128), SamplingParams(max_new_tokens=4))   # warm-up
            for length in args.lengths:
                ids = history_ids(engine, length)
                m = measure(engine, store, spill, ids, args.repeats, args.io_repeats)
                gbps = lambda s: m["blob"] / s / 1e9   # noqa: E731
                rows.append([len(ids), name, f"{common.mib(m['kv'])} ({common.mib(m['full_kv'])})",
                             f"{common.mib(m['blob'])} / {m['chunks']}", f"{m['encode'] * 1e3:.1f}",
                             f"{m['write'] * 1e3:.1f}", f"{gbps(m['write']):.2f}", f"{m['read'] * 1e3:.1f}",
                             f"{gbps(m['read']):.2f}", f"{m['per_chunk'] * 1e3:.1f}", f"{m['restore'] * 1e3:.1f}",
                             f"{gbps(m['restore']):.2f}", f"{m['prefill'] * 1e3:.1f}",
                             f"{m['prefill'] / m['restore']:.1f}x"])
                # the row as soon as it is measured: a run stopped at its time limit still reports the rows done
                print(f"  {name}, {len(ids)} tokens, done ({watch}): "
                      f"{common.table(COLUMNS, rows[-1:], ALIGN).splitlines()[-1]}", flush=True)
        print()
        print(common.table(COLUMNS, rows, ALIGN))
        print(f"\n{watch}")
    finally:
        if proc is not None:
            proc.kill()


if __name__ == "__main__":
    main()
