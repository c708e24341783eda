"""The razor-engine command line: profile a model, then generate with and without compression."""
from __future__ import annotations

import json
import subprocess
import sys

from services.engine import cli


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


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    # In process (cli.main is what the console script runs; the test above runs it as a process): three
    # interpreters starting torch and transformers cost ~25 s on a slow 2-core machine.
    out = str(tmp_path / "x.json")
    cases = [(["--model", "tiny-random", "profile", "--induction-fraction", "2", "--out", out],
              "induction_fraction must be within 0..1"),
             (["--model", "tiny-random", "profile", "--calibrate", "--families", "copy", "--max-bytes", "2",
               "--out", out], "max_bytes must be within (0, 1]"),
             (["--model", str(tmp_path / "missing"), "generate", "--prompt", "hi"], "does not exist")]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err
