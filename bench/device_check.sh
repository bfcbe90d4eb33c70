#!/usr/bin/env bash
# Every GPU check in one run: install, the kernel tests and the GPU-marked tests, then each GPU
# benchmark in its own stage (its own time limit and JSON, so one slow stage loses nothing else).
# Writes info.json, nvidia-smi.csv, tests.{log,xml}, bench_<name>.{json,log,md} under OUT (first
# argument, else $OUT, else bench/results/latest). Budget: about 7 minutes on an H100/H200.
#   bash bench/device_check.sh [OUT_DIR] [STAGES]
# `python -m pip`: on some machines `pip` belongs to another interpreter than `python`.
# STAGES (default "tests varlen grouped_gemm train_step") picks stages for a rerun.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/latest}}
STAGES=${2:-"tests varlen grouped_gemm train_step"}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
start=$(date +%s)
stamp() { echo "[device_check +$(($(date +%s) - start))s] $*"; }
wants() { [[ " $STAGES " == *" $1 "* ]]; }
status=0

stamp "install"
if ! python -m pip install --no-build-isolation --no-deps -e . >"$OUT_DIR/install.log" 2>&1; then
    tail -40 "$OUT_DIR/install.log"
    exit 1
fi
python -m scheduler.cli info --json >"$OUT_DIR/info.json"
cat "$OUT_DIR/info.json"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT_DIR/nvidia-smi.csv" 2>&1
python -c "import numpy, triton, torch; print('numpy', numpy.__version__, 'cuda', torch.version.cuda)" \
    >>"$OUT_DIR/nvidia-smi.csv" 2>&1

if wants tests; then
    stamp "tests: the kernel files whole, and every gpu-marked test elsewhere"
    timeout 150 python -m pytest tests/test_varlen.py tests/test_grouped_gemm.py tests/test_nn.py \
        tests/test_costmodel.py tests/test_trainer.py -m "gpu or not slow" \
        -q -rfE --tb=short -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml" >"$OUT_DIR/tests.log" 2>&1
    rc=$?
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT_DIR/tests.log" | tail -30
    stamp "tests rc=$rc"
    [ "$rc" -eq 0 ] || status=1
fi

bench() {  # name, time limit (s), pytest selection...
    local name=$1 limit=$2
    shift 2
    stamp "bench $name"
    timeout "$limit" python -m pytest "$@" -m gpu -q -p no:cacheprovider --tb=short \
        --benchmark-json="$OUT_DIR/bench_$name.json" --benchmark-columns=median,iqr,rounds \
        >"$OUT_DIR/bench_$name.log" 2>&1
    local rc=$?
    tail -5 "$OUT_DIR/bench_$name.log"
    if [ -s "$OUT_DIR/bench_$name.json" ]; then
        python bench/summarize.py "$OUT_DIR/bench_$name.json" >"$OUT_DIR/bench_$name.md"
        cat "$OUT_DIR/bench_$name.md"
    fi
    stamp "bench $name rc=$rc"
    [ "$rc" -eq 0 ] || status=1
}
wants varlen && bench varlen 90 bench/bench_varlen.py
wants grouped_gemm && bench grouped_gemm 150 bench/bench_grouped_gemm.py
wants train_step && bench train_step 60 bench/bench_train_step.py

stamp "done: status=$status"
exit $status
