#!/usr/bin/env bash
# Every GPU check in one run: install, the whole test suite on the GPU, every benchmark.
# Writes info.json, tests.xml/tests.log, bench.json, bench.md under OUT (first argument, else
# $OUT, else bench/results/latest). Budget: well inside 8 minutes on an H100/H200.
#   bash bench/device_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/latest}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
start=$(date +%s)
stamp() { echo "[device_check +$(($(date +%s) - start))s] $*"; }

stamp "install"
if ! pip install --no-build-isolation --no-deps -e . >"$OUT_DIR/install.log" 2>&1; then
    tail -40 "$OUT_DIR/install.log"
    exit 1
fi
python -m scheduler.cli info --json | tee "$OUT_DIR/info.json"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT_DIR/nvidia-smi.csv" 2>&1

stamp "tests"
timeout 200 python -m pytest tests -m "gpu or not slow" -q -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml" \
    >"$OUT_DIR/tests.log" 2>&1
tests_rc=$?
tail -15 "$OUT_DIR/tests.log"

stamp "benchmarks (GPU ones; the CPU planner and gloo benchmarks run on the CPU machine)"
timeout 220 python -m pytest bench -m gpu -q -p no:cacheprovider --benchmark-json="$OUT_DIR/bench.json" \
    --benchmark-columns=median,iqr,rounds >"$OUT_DIR/bench.log" 2>&1
bench_rc=$?
tail -15 "$OUT_DIR/bench.log"
if [ -f "$OUT_DIR/bench.json" ]; then
    python bench/summarize.py "$OUT_DIR/bench.json" | tee "$OUT_DIR/bench.md"
fi

stamp "done: tests rc=$tests_rc, bench rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
