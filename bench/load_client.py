"""One load-generating client in a process of its own, for `bench_concurrency.py --client-processes`.

Clients as threads of the server's process share its two cores and its GIL with the server's handler threads, so
at 16-32 clients the bench partly measures its own clients. Here each client is a process that imports only the
gRPC client (no torch): it connects, says `ready` on stdout, waits for a line on stdin, streams its requests one
after another and prints one JSON object: each request's timings and the monotonic clock at its end (one clock for
every process on the machine, so the parent can take the level's wall time from its own `go`).

    .venv/bin/python bench/load_client.py --target 127.0.0.1:50051 --first 0 --requests 2   # then type a line
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import common  # noqa: F401  # first: puts the repository root on sys.path (imports no torch)
from services.inference.client import RazorClient

TOPICS = ("rivers", "mountains", "old libraries", "the night sky", "harbours", "glaciers", "orchards", "deserts",
          "lighthouses", "forests", "trains", "islands", "markets", "bridges", "volcanoes", "gardens")


def prompt_for(i: int, words: int) -> str:
    """About `words` words, different for every request (nothing is shared or cached between requests)."""
    base = (f"Write a short, friendly paragraph about {TOPICS[i % len(TOPICS)]}. Keep it simple and concrete, "
            "describe what one sees, hears and feels there, and why people like to visit. ").split()
    return " ".join((base * (words // len(base) + 1))[:words]) + f" (request {i})"


def one_request(client: RazorClient, prompt: str, new_tokens: int) -> dict:
    start = time.perf_counter()
    arrivals = []
    generated = prompt_tokens = 0
    for msg in client.stream_generate(prompt=prompt, max_new_tokens=new_tokens, keep_session=False):
        if msg.HasField("chunk"):
            arrivals.append(time.perf_counter())
        if msg.HasField("completion"):
            generated, prompt_tokens = msg.completion.usage.generated_tokens, msg.completion.usage.prompt_tokens
    return {"latency": time.perf_counter() - start, "ttft": (arrivals[0] - start) if arrivals else 0.0,
            "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])], "generated": generated, "prompt": prompt_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help="host:port of the service")
    ap.add_argument("--first", type=int, required=True, help="the first request's number (its prompt)")
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--words", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    with RazorClient(args.target, timeout_s=600) as client:
        client.server_info()   # connected before the clock starts
        print("ready", flush=True)
        sys.stdin.readline()
        results = [one_request(client, prompt_for(args.first + r, args.words), args.new_tokens)
                   for r in range(args.requests)]
    print(json.dumps({"results": results, "end": time.monotonic()}), flush=True)


if __name__ == "__main__":
    main()
