"""Every bench script still imports against the engine's API: the benches run for minutes to hours and no CI
job runs them, so a name they import that the engine renamed would otherwise surface only at a bench's start."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
LIBRARIES = {"common", "kv_codebooks"}   # imported by the scripts, run by none
SCRIPTS = sorted(path.stem for path in BENCH.glob("*.py") if path.stem not in LIBRARIES)


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_imports_and_has_a_main(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module(name)
    assert callable(getattr(module, "main", None)), f"bench/{name}.py has no main()"
    assert module.__doc__, f"bench/{name}.py says nothing of what it measures"


def test_the_scripts_the_docs_cite_exist():
    root = BENCH.parent
    cited = {m for doc in ("docs/benchmarks.md", "README.md")
             for m in re.findall(r"bench/(\w+)\.py", (root / doc).read_text())}
    assert "bench_kv_quant" in cited
    assert sorted(name for name in cited if not (BENCH / f"{name}.py").exists()) == []


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_restore_bench_runs_a_random_model_through_redis(monkeypatch, capsys, dtype):
    """bench_restore's random-weight path (the GPU session's restore stage, here on bench_gpu's small shape):
    every map spills, restores and re-prefills, and the table shows each. In bfloat16 too, the GPU's dtype: a
    store that took the caches for float32 refused every bfloat16 spill, and the stage failed before any row.
    Each row is printed as soon as it is measured, before the table (a stage stopped at its limit keeps them)."""
    monkeypatch.syspath_prepend(str(BENCH))
    bench_restore = importlib.import_module("bench_restore")
    monkeypatch.setattr("sys.argv", ["bench_restore.py", "--model", "random-llama-small", "--lengths", "300",
                                     "--repeats", "1", "--io-repeats", "1", "--dtype", dtype])
    bench_restore.main()
    out = capsys.readouterr().out
    assert f"on cpu in {'float32' if dtype == 'auto' else dtype};" in out
    maps = ["razor 12% KV heads, C=5 S0=256", "razor 12% KV heads 8/4-bit, window 1024", "full cache"]
    rows = [line for line in out.splitlines() if line.startswith("| 300 |")]
    assert [row.split(" | ")[1] for row in rows] == maps
    early = [line.partition("): ")[2] for line in out.splitlines() if line.startswith("  ") and "done (" in line]
    assert early == rows


def test_gpu_session_script_parses_and_says_how_to_use_it():
    import subprocess

    script = BENCH / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "prepare | device" in usage.stderr
    # its `device` stages run these scripts and tests, which must exist
    for path in re.findall(r"(bench/\w+\.py|tests/\w+\.py)", script.read_text()):
        assert (BENCH.parent / path).exists(), path
    # the GPU stages' limits leave setup (15-30 s) a margin inside the run's timeout_s of 600, the per-call maximum,
    # which the script and the docs both name
    text = script.read_text()
    gpu_branch = text[text.index("    else\n        stage test_gpu"):]
    limits = [int(n) for n in re.findall(r"stage \w+ (\d+) ", gpu_branch)]
    assert len(limits) == 3 and sum(limits) <= 480, limits
    assert int(re.search(r"BUDGET_S:-(\d+)", text)[1]) <= 570
    for doc in (text, (BENCH.parent / "docs/benchmarks.md").read_text()):
        assert re.findall(r"timeout_s (\d+)", doc) and set(re.findall(r"timeout_s (\d+)", doc)) == {"600"}


def test_lost_documents_target_keeps_all_of_nothing_where_the_full_cache_answers_none(monkeypatch):
    """bench_lost_documents' target check, as task_bench's: kept is 1 where the full cache answers none."""
    monkeypatch.syspath_prepend(str(BENCH))
    meets = importlib.import_module("bench_lost_documents").meets
    assert meets([-1.0, -2.0], [-0.5, -1.0])              # nothing to keep, accuracy unchanged
    assert not meets([1.0, 2.0], [1.0, -1.0])              # half of what the full cache answered is lost


def test_lost_documents_results_pool_one_task_format_only(monkeypatch, tmp_path, capsys):
    """Surveys in the chat format and in the completion format are other tasks: --results refuses to pool them,
    and pools two draws of one format (a survey from before the format was recorded is completion-style)."""
    import json

    monkeypatch.syspath_prepend(str(BENCH))
    lost_documents = importlib.import_module("bench_lost_documents")
    margins = {"word": {"full cache": [1.0, -1.0], "m": [0.5, -0.5]}}
    survey = {"length": 400, "tasks": 2, "bytes": {"word": {"full cache": 1.0, "m": 0.25}}, "margins": margins}
    paths = []
    for name, seed, fmt in (("a", 1, None), ("b", 2, "completion"), ("c", 3, "chat")):
        run = {**survey, "seed": seed, **({"format": fmt} if fmt else {})}
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run))
    lost_documents.from_results(paths[:2], None, None)
    assert "word (2 of 4)" in capsys.readouterr().out                # two draws pooled
    with pytest.raises(SystemExit, match="one task format"):
        lost_documents.from_results(paths, None, None)


@pytest.mark.parametrize("name, argv, rows", [
    ("bench_concurrency", ["--model", "tiny-random", "--clients", "1", "2", "--requests", "2", "--new-tokens", "4",
                           "--prompt-words", "16", "--no-bound"], [r"\| 1 \| 2 \| 8 \| .* \| 1\.00x \|", r"\| 2 \| 2 \| 8 \|"]),
    ("bench_concurrency", ["--model", "tiny-random", "--clients", "1", "2", "--requests", "2", "--new-tokens", "4",
                           "--prompt-words", "16", "--no-bound", "--client-processes"],
     [r"clients as processes", r"\| 1 \| 2 \| 8 \| .* \| 1\.00x \|", r"\| 2 \| 2 \| 8 \|"]),
    ("bench_service", ["--lengths", "64", "--tokens", "4", "--repeats", "1"],
     [r"\| 64 \| \d+ \(\d+\) \|", r"\| 4 \| [\d.]+ \| [\d.]+ \| [\d.]+x \|"]),
    ("bench_replicas", ["--repeats", "2"], [r"\| request id registered \+ freed", r"\| at the other replica.* \| [\d.]+x \|"]),
])
def test_the_service_benches_run_end_to_end_on_the_tiny_model(name, argv, rows, monkeypatch, capsys):
    """The benches of the service (a real gRPC server and Redis, on tiny-random) run end to end with small
    settings, so one the service's API left behind fails here rather than at the start of a measurement. (The
    quality benches' --quick runs take 30-70 s each on SmolLM2: too long for CI; their imports are checked above.)"""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr("sys.argv", [f"{name}.py", *argv])
    importlib.import_module(name).main()
    out = capsys.readouterr().out
    assert all(re.search(row, out) for row in rows), out


def test_the_soak_bench_runs_end_to_end_on_the_tiny_model(monkeypatch, capsys, tmp_path):
    """bench_soak with sessions deleted every third turn, so creating, spilling and deleting all run; no turn may
    fail, and it draws its plot."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr("sys.argv", ["bench_soak.py", "--model", "tiny-random", "--turns", "40", "--every", "10",
                                     "--session-turns", "3", "--png", str(tmp_path / "soak.png")])
    importlib.import_module("bench_soak").main()
    out = capsys.readouterr().out
    assert "errors: none" in out
    assert re.search(r"\| redis_keys \| \d+\.0 \| \d+\.0 \|", out)
    assert (tmp_path / "soak.png").stat().st_size > 0
