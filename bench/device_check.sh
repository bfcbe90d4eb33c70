#!/usr/bin/env bash
# Every GPU check in one run: install, the GPU tests, then each GPU benchmark in its own stage
# (its own time limit and JSON, so one slow stage loses nothing else); optionally the varlen
# tile sweep, a grouped-GEMM config sweep and a profile of the slow paths.
#   bash bench/device_check.sh [OUT_DIR] [STAGES]
# STAGES (default "cpp_errors tests grouped_gemm host dw_sweep", what the open grouped-GEMM
# issue needs; also "varlen", "varlen_sweep", "train_step", "sweep", "memory" and "profile")
# picks stages; they run in the order cpp_errors tests varlen grouped_gemm varlen_sweep
# train_step host dw_sweep sweep memory profile. Before the first benchmark, a check of the persistent dW configs
# (~30 s) decides whether the autotuner may take them (MTMM_DW_FLATTEN, MTMM_DW_BALANCED).
# "cpp_errors" (~40 s) records which ways of raising from a C++ extension crash on this machine
# (bench/cpp_error_check.py). Everything goes to OUT_DIR/work; OUT_DIR itself gets three files
# (the device tool brings back only a few): results.tar.gz (all of work/, refreshed after every
# stage), summary.md (every table and the test summary) and info.json. The default stages'
# limits add up to about 12 minutes (cpp_errors 120 s, tests 150 s per shard, the persistent dW
# check 150 s, grouped_gemm 210 s, host 60 s, dw_sweep 100 s; run 5 on an H200 took 261 s for
# tests, grouped_gemm and host), so a run cut short by the device's limit brings back the
# stages it finished and loses the last ones. Most of the test
# time is Triton compiling, spread over TEST_SHARDS pytest processes, each limited to
# TEST_LIMIT seconds.
# "host" (the small grouped GEMM's and the pack's host time, layer by layer) takes ~30 s,
# "varlen" ~75 s, "varlen_sweep" up to 90 s, "dw_sweep" (the dW kernel's configs on the
# 32-small-groups and equal-groups cases) up to 100 s, "sweep" ~2 minutes, "memory" (the
# planner's memory estimate against torch.cuda.max_memory_allocated, bench/memory_check.py)
# up to 120 s, "profile" ~30 s.
# `python -m pip`: on some machines `pip` belongs to another interpreter than `python`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/latest}}
STAGES=${2:-"cpp_errors tests grouped_gemm host dw_sweep"}
mkdir -p "$OUT_DIR/work"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
W="$OUT_DIR/work"
start=$(date +%s)
stamp() { echo "[device_check +$(($(date +%s) - start))s] $*" | tee -a "$W/stages.log"; }
wants() { [[ " $STAGES " == *" $1 "* ]]; }
status=0
bundle() {
    cat "$W"/cpp_errors.txt "$W"/tests_summary.txt "$W"/*.md >"$OUT_DIR/summary.md" 2>/dev/null
    tar -czf "$OUT_DIR/results.tar.gz" -C "$W" . 2>/dev/null
}
trap bundle EXIT

stamp "install"
if ! python -m pip install --no-build-isolation --no-deps -e . >"$W/install.log" 2>&1; then
    tail -40 "$W/install.log"
    exit 1
fi
# The grouped GEMM's C++ launch path is built on first use; build it once here (about a
# minute), not in a test shard or inside a benchmark.
stamp "build the C++ launch path"
if ! python -c "import sys; from mtmm_kernels import _cpp_launch as c; sys.exit(c.extension() is None)" \
        >"$W/cpp_launch_build.log" 2>&1; then
    tail -20 "$W/cpp_launch_build.log"
    status=1
fi
python -m scheduler.cli info --json >"$OUT_DIR/info.json"
cat "$OUT_DIR/info.json"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import numpy, triton, torch; print('numpy', numpy.__version__, 'cuda', torch.version.cuda)"
} >"$W/versions.txt" 2>&1

if wants cpp_errors; then
    stamp "cpp_errors"
    timeout 120 python bench/cpp_error_check.py "$W/cpp_errors.json" >"$W/cpp_errors.txt" 2>&1 \
        || status=1
    cat "$W/cpp_errors.txt"
    bundle
fi

if wants tests; then
    # The kernel test files whole and the GPU-marked tests elsewhere, dealt to parallel pytest
    # shards (most of the time is Triton compiling, one core per process).
    stamp "tests"
    python bench/gpu_tests.py "$W/tests" --shards "${TEST_SHARDS:-8}" --limit "${TEST_LIMIT:-150}" \
        tests/test_varlen.py tests/test_grouped_gemm.py tests/test_nn.py tests/test_group_sort.py \
        tests/test_direct_launch.py tests/test_cpp_launch.py \
        >"$W/tests_kernels.txt" 2>&1
    rc_kernels=$?
    python bench/gpu_tests.py "$W/tests_gpu_marked" -m gpu --shards 2 --limit "${TEST_LIMIT:-150}" \
        tests/test_costmodel.py tests/test_trainer.py tests/test_plan_switch.py \
        >"$W/tests_gpu_marked.txt" 2>&1
    rc_marked=$?
    { echo "## GPU tests"; cat "$W/tests_kernels.txt" "$W/tests_gpu_marked.txt"; } >"$W/tests_summary.txt"
    cat "$W/tests_summary.txt"
    [ "$rc_kernels" -eq 0 ] && [ "$rc_marked" -eq 0 ] || status=1
    stamp "tests done"
    bundle
fi

# The persistent dW configs' flattened loop and balanced tile order, the one-program-per-tile
# descriptor dW's descriptors bounded at the group's end row, the dW stores through dw's
# descriptor and the warp-specialized forward and dW configs were added to the autotuner
# without a GPU. Where a config's GPU test fails, the
# benchmarks run without what it has: a flattened config failing switches the flattened
# configs off (MTMM_DW_FLATTEN=0), a loop-per-tile one the balanced order
# (MTMM_DW_BALANCED=0: the group order run 5 measured), a bounded-descriptor one the bounds
# (MTMM_DW_BOUNDED=0: descriptors over all rows, as run 5 measured), a TMA-store one those
# configs (MTMM_DW_TMA_STORE=0), a warp-specialized one those configs (MTMM_WS=0; a
# specialized kernel that deadlocks shows as a time-out); a crash, a time-out or a skip, all
# five (the tests skip without Hopper, the WS ones before Triton 3.6). So a broken build
# cannot take the measurements down with it (~45 s once the tests have compiled them).
if wants grouped_gemm || wants host || wants train_step; then
    stamp "persistent dW check"
    timeout 150 python -m pytest -q -rfE -p no:cacheprovider -m gpu tests/test_grouped_gemm.py \
        -k "test_bf16_persistent_dw_configs or test_bf16_bounded_dw_descriptors or test_bf16_tma_store_dw_configs or test_bf16_warp_specialized_configs" \
        >"$W/dw_persistent_check.log" 2>&1
    rc=$?
    log="$W/dw_persistent_check.log"
    if [ "$rc" -eq 0 ] && grep -q " passed" "$log" && ! grep -q "skipped" "$log"; then
        echo "New builds (persistent dW, bounded descriptors, TMA stores, warp specialization): GPU tests passed, all offered to the autotuner." \
            >"$W/dw_persistent.md"
    else
        status=1
        off=""
        switch_off() {  # a switch, the failed test ids that turn it off (a crash, a time-out
            # or a skip turns off every switch)
            if [ "$rc" -ne 1 ] || grep -q "skipped" "$log" \
                    || grep -E "^(FAILED|ERROR) .*($2)" "$log" >/dev/null; then
                export "$1=0"
                off="${off:+$off }$1=0"
            fi
        }
        switch_off MTMM_DW_FLATTEN 'persistent_dw_configs\[.* flat\]'
        switch_off MTMM_DW_BALANCED 'persistent_dw_configs\[.* loop\]'
        switch_off MTMM_DW_BOUNDED 'bounded_dw_descriptors'
        switch_off MTMM_DW_TMA_STORE 'tma_store_dw_configs|\[[^]]* store '
        switch_off MTMM_WS 'warp_specialized_configs'
        { echo "New builds (persistent dW, bounded descriptors, TMA stores, warp specialization): GPU tests not passed (rc=$rc), benchmarks ran with" \
               "${off:-no switch (no failure named a config)}:"
          echo '```'; tail -25 "$log"; echo '```'; } >"$W/dw_persistent.md"
    fi
    stamp "$(head -1 "$W/dw_persistent.md")"
fi

bench() {  # name, time limit (s), pytest selection...
    local name=$1 limit=$2
    shift 2
    stamp "bench $name"
    timeout "$limit" python -m pytest "$@" -m gpu -q -p no:cacheprovider --tb=short \
        --benchmark-json="$W/bench_$name.json" --benchmark-columns=median,iqr,rounds \
        >"$W/bench_$name.log" 2>&1
    local rc=$?
    tail -3 "$W/bench_$name.log"
    if [ -s "$W/bench_$name.json" ]; then
        python bench/summarize.py "$W/bench_$name.json" >"$W/bench_$name.md"
    fi
    stamp "bench $name rc=$rc"
    [ "$rc" -eq 0 ] || status=1
    bundle
}
# In order of need: the targets first, then the sweeps that pick defaults, then checks of
# what is already met. Each benchmark also records pipelined and CUPTI kernel times.
wants varlen && bench varlen 75 bench/bench_varlen.py -k "not sweep"
# (its autotuner times up to 14 forward and 22 dW configs per key on first use)
wants grouped_gemm && bench grouped_gemm 210 bench/bench_grouped_gemm.py
if [ -s "$W/bench_grouped_gemm.json" ]; then  # issue 4's targets, basis by basis
    python bench/targets.py "$W/bench_grouped_gemm.json" >"$W/targets.md" 2>&1 && cat "$W/targets.md"
    bundle
fi
wants varlen_sweep && bench varlen_sweep 90 bench/bench_varlen.py -k sweep
wants train_step && bench train_step 35 bench/bench_train_step.py

if wants host; then
    stamp "host overhead"
    timeout 60 python bench/host_overhead.py "$W/host" >"$W/host_overhead.log" 2>&1 || status=1
    tail -25 "$W/host_overhead.log"
    bundle
fi
if wants dw_sweep; then
    stamp "sweep dW configs"
    timeout 100 python bench/sweep_grouped_gemm.py "$W/sweep_dw.json" --max-seconds 85 \
        --kernels dw --cases lognormal32_k1024,equal8_k4096 >"$W/sweep_dw.log" 2>&1 || status=1
    tail -30 "$W/sweep_dw.log"
    bundle
fi
if wants sweep; then
    stamp "sweep grouped_gemm configs"
    timeout 120 python bench/sweep_grouped_gemm.py "$W/sweep_grouped_gemm.json" --max-seconds 100 \
        >"$W/sweep_grouped_gemm.log" 2>&1 || status=1
    tail -30 "$W/sweep_grouped_gemm.log"
fi
if wants memory; then  # the planner's memory estimate against CUDA's peak (~60 s)
    stamp "memory estimate check"
    timeout 120 python bench/memory_check.py --json "$W/memory_check.json" \
        --markdown "$W/memory_check.md" >"$W/memory_check.log" 2>&1 || status=1
    tail -12 "$W/memory_check.log"
    bundle
fi
if wants profile; then
    stamp "profile"
    timeout 90 python bench/profile_gpu.py "$W/profile" >"$W/profile.log" 2>&1 || status=1
    tail -20 "$W/profile.log"
fi

stamp "done: status=$status"
exit $status
