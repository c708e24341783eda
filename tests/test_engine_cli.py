"""The razor-engine command line: profile a model, then generate with and without compression."""
from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "services.engine.cli", "--model", "tiny-random", *args],
                          capture_output=True, text=True, timeout=300)


def test_profile_then_generate_prints_kv_bytes(tmp_path):
    out, png = tmp_path / "map.json", tmp_path / "map.png"
    done = run_cli("profile", "--seq-len", "16", "--samples", "1", "--min-window", "8", "--ratio", "1e9",
                   "--out", str(out), "--png", str(png))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["fingerprint"]["n_layers"] == 4 and png.stat().st_size > 0
    done = run_cli("generate", "--head-map", str(out), "--prompt", "one two three four " * 20,
                   "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("--- ")]
    assert lines[0].startswith("--- full cache: KV") and "(100.0% of full)" in lines[0]
    razor_pct = float(lines[1].split("(")[1].split("%")[0])
    assert lines[1].startswith("--- razor: KV") and razor_pct < 100.0


def test_bad_input_is_a_clear_error(tmp_path):
    done = run_cli("profile", "--induction-fraction", "2", "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2 and "induction_fraction must be within 0..1" in done.stderr
    done = run_cli("profile", "--calibrate", "--families", "copy", "--max-bytes", "2",
                   "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2 and "max_bytes must be within (0, 1]" in done.stderr
    done = subprocess.run([sys.executable, "-m", "services.engine.cli", "--model", str(tmp_path / "missing"),
                           "generate", "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "does not exist" in done.stderr
