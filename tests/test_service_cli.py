"""The CLI as a person uses it: a separate process talking to a real server."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.settings import Settings
from services.stack import _banner
from tests.test_auth import _ca_signed_cert

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


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_cli_over_tls_with_a_ca_signed_certificate(start_server, tmp_path):
    ca, cert, key = _ca_signed_cert(tmp_path, "razor.internal")
    server = start_server(tls_cert=cert, tls_key=key)
    tls = ("--ca-cert", ca, "--server-name", "razor.internal")
    info = cli(server.target, *tls, "info")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["modelRef"] == "tiny-random"
    unnamed = cli(server.target, "--ca-cert", ca, "--timeout", "5", "info")   # the certificate names no address
    assert unnamed.returncode == 1 and "UNAVAILABLE" in unnamed.stderr
    plain = cli(server.target, "--server-name", "razor.internal", "info")
    assert plain.returncode == 1 and "add --tls or --ca-cert" in plain.stderr
    missing = cli(server.target, "--ca-cert", str(tmp_path / "missing.pem"), "info")
    assert missing.returncode == 1 and "cannot read CA certificate" in missing.stderr
    banner = _banner(server.target, "redis://", False, Settings(tls_cert=cert, tls_key=key, tls_ca_cert=ca,
                                                                tls_server_name="razor.internal"), [], tmp_path)
    assert f"--target {server.target} --ca-cert {ca} --server-name razor.internal info" in banner
