"""The CLI as a person uses it: a separate process talking to a real server."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.inference.cli", "--target", target, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_generate_continue_sessions_info(start_server):
    target = start_server().target
    out = cli(target, "generate", "Once upon a time", "--max-new-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["generated_tokens"] == 4 and reply["finish_reason"] == "length"
    streamed = cli(target, "continue", reply["session_id"], " and then", "--max-new-tokens", "3")
    assert streamed.returncode == 0 and "finish length" in streamed.stderr and "cached" in streamed.stderr
    listed = [json.loads(line) for line in cli(target, "sessions").stdout.splitlines()]
    assert [s["sessionId"] for s in listed] == [reply["session_id"]]
    info = json.loads(cli(target, "info").stdout)
    assert info["modelRef"] == "tiny-random" and info["memory"]["redisReachable"]
    bad = cli(target, "continue", "no-such-session", "hi")
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
    updated = json.loads(cli(target, "update", reply["session_id"], "--ttl", "600", "--pin").stdout)
    assert updated["ttlS"] == 600 and updated["pinned"]
    load = json.loads(cli(target, "load").stdout)
    assert load["residentSessions"] == 1 and load["pinnedSessions"] == 1
