"""The GPU tooling under bench/ runs end to end on the CPU where it can, so that a kernel
change that breaks a script is caught here and not in a GPU session's scarce time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow  # about 45 s: the sweep's configs compiled and run in the interpreter
def test_grouped_gemm_sweep_smoke(tmp_path):
    """Every kernel the sweep launches (forward, dX, dW; pointer and descriptor builds; dW also
    persistent and flattened) runs in the interpreter with the launcher's arguments and
    matches the reference; a candidate the kernel cannot compile becomes an error row, not a
    crash."""
    out = tmp_path / "sweep.json"
    proc = _run("bench/sweep_grouped_gemm.py", "--cpu-smoke", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["kernel"] in ("fwd", "dx", "dw")]
    assert {(r["kernel"], r["config"]["TMA"]) for r in ours} == {
        (k, tma) for k in ("fwd", "dx", "dw") for tma in (False, True)}
    persistent_dw = {r["config"]["TMA"] for r in ours
                     if r["kernel"] == "dw" and r["config"].get("PROGS_PER_SM")}
    assert persistent_dw == {False, True}
    flattened_dw = {r["config"]["TMA"] for r in ours
                    if r["kernel"] == "dw" and r["config"].get("FLATTEN") and not r["error"]}
    assert flattened_dw == {False, True}
    failed = [r for r in ours if r["error"]]
    assert [(r["kernel"], r["config"]["BLOCK_M"]) for r in failed] == [("dw", 24)]
    for r in ours:
        if not r["error"]:
            assert r["max_rel_err"] is not None and r["max_rel_err"] < 1e-5, r
    # the whole backward, timed as the op runs it (no second stream without a GPU)
    backward = {r["kernel"]: r for r in rows if r["kernel"].endswith("_bwd")}
    assert backward["mtmm_api_bwd"]["ms"] is not None and not backward["mtmm_api_bwd"]["error"]
    assert "whole backward (dX + dW)" in proc.stdout


def test_host_overhead_script_without_a_gpu(tmp_path):
    """The script imports and says it has nothing to measure (it needs CUDA)."""
    proc = _run("bench/host_overhead.py", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No CUDA device" in proc.stdout


def test_timings_on_the_cpu():
    """Latency and pipelined timings are wall times on a CPU; kernel time needs a GPU."""
    sys.path.insert(0, str(ROOT / "bench"))
    import device_timing as T

    calls = []
    assert T.latency_ms(lambda: calls.append(1), warmup=1, reps=3) >= 0
    assert len(calls) == 4
    assert T.pipelined_ms(lambda: calls.append(1), warmup=1, reps=5, rounds=2) >= 0
    assert len(calls) == 4 + 1 + 10
    if not T.HAS_CUDA:
        assert T.kernel_ms(lambda: None) is None


def test_summary_ratios_per_timing_basis():
    """mtmm against the fastest peer of its case on each basis; the ceiling is no peer, and
    runs without kernel times (the first GPU runs) leave those cells empty."""
    sys.path.insert(0, str(ROOT / "bench"))
    import summarize as S

    def row(method, device, pipelined=None, kernel=None):
        info = {"case": "c fwd", "method": method, "device_ms": device}
        if pipelined is not None:
            info.update(pipelined_ms=pipelined, kernel_ms=kernel, kernel_tflops=1.0,
                        kernel_fraction_of_ceiling=0.5)
        return {"name": method, "stats": {"median": device / 1e3}, "extra_info": info}

    data = {"benchmarks": [row("torch_grouped_mm", 1.0, 0.5, 0.4), row("loop", 2.0, 0.3, 0.3),
                           row("dense", 0.1, 0.1, 0.1), row("mtmm", 2.0, 0.25, 0.2)]}
    [(case, method, peer, ratios)] = S.speedups(data)
    assert (case, method, peer) == ("c fwd", "mtmm", "torch_grouped_mm")
    assert ratios == {"latency": 0.5, "pipelined": 0.3 / 0.25, "kernel": 0.3 / 0.2}
    text = S.summarize(data)
    assert "| c fwd | mtmm | torch_grouped_mm | 0.50x | 1.20x | 1.50x |" in text
    old = {"benchmarks": [row("loop", 2.0), row("mtmm", 1.0)]}
    assert "| c fwd | mtmm | loop | 2.00x | - | - |" in S.summarize(old)
    # a forward + backward's kernel time by kernel, largest first; one-kernel calls left out
    data["benchmarks"][-1]["extra_info"]["kernels_ms"] = {"_fwd": 0.05, "_dw": 0.1, "_dx": 0.05}
    data["benchmarks"][0]["extra_info"]["kernels_ms"] = {"cutlass": 0.4}
    assert S.by_kernel(data)[-1] == "| c fwd | mtmm | _dw 0.1000; _fwd 0.0500; _dx 0.0500 |"
    assert "| c fwd | mtmm | _dw 0.1000" in S.summarize(data)


def test_interleaved_timings_rotate_and_summarise():
    """Methods timed in alternation: every method every round, the order rotated from round to
    round; the summary reads mtmm against its fastest peer and the dense ceiling, and keeps
    these rows out of the per-method tables."""
    sys.path.insert(0, str(ROOT / "bench"))
    import device_timing as T
    import summarize as S

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = T.interleaved_ms(fns, rounds=3, warmup=1, block_ms=0.0)
    assert set(times) == {"a", "b", "c"} and all(t >= 0 for t in times.values())
    timed = calls[3 + 9:]  # after the warmup and the probe of each method's latency
    blocks = [timed[i:i + 3] for i in range(0, len(timed), 3)]  # 3 calls per block (minimum)
    assert [b[0] for b in blocks] == list("abc" "bca" "cab")
    assert all(len(set(b)) == 1 for b in blocks)

    def row(case, times):
        return {"name": "i", "stats": {"median": 1e-3},
                "extra_info": {"case": case, "method": "interleaved", "interleaved_ms": times}}

    data = {"benchmarks": [row("c fwd", {"mtmm": 2.0, "torch_grouped_mm": 3.0, "dense": 1.5}),
                           row("d fwd", {"mtmm_by_ids": 1.0, "sort": 2.0, "other": 4.0})]}
    # the latencies in alternation of the first (runs before 2026-11-28 have none)
    data["benchmarks"][0]["extra_info"]["interleaved_latency_ms"] = {
        "mtmm": 4.0, "torch_grouped_mm": 5.0, "dense": 1.0}
    assert S.interleaved(data) == [("c fwd", "mtmm", "torch_grouped_mm", 1.5, 0.75, 1.25),
                                   ("d fwd", "mtmm_by_ids", "sort", 2.0, None, None)]
    text = S.summarize(data)
    assert "| c fwd | mtmm | torch_grouped_mm | 1.50x | 75% | 1.25x |" in text
    assert "| d fwd | mtmm_by_ids | sort | 2.00x | - | - |" in text
    assert "| i |" not in text  # not a method row

    # lone calls in alternation: each round every method's calls, in the rotated order
    calls.clear()
    latencies = T.interleaved_latency_ms(fns, rounds=3, warmup=1, calls=2)
    assert set(latencies) == {"a", "b", "c"} and all(t >= 0 for t in latencies.values())
    timed = calls[3:]
    assert [timed[i] for i in range(0, len(timed), 2)] == list("abc" "bca" "cab")
    assert all(timed[i] == timed[i + 1] for i in range(0, len(timed), 2))


def test_gpu_test_shards_read_a_crashed_shards_log(tmp_path):
    """A shard that crashed wrote no JUnit XML: its verbose log gives the outcomes, test ids
    with spaces included, and the test it crashed in stays not finished."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_tests
    finally:
        sys.path.remove(str(ROOT / "bench"))
    log = tmp_path / "shard0.log"
    log.write_text(
        "tests/a.py::test_bad[x type] PASSED                       [ 50%]\n"
        "tests/a.py::test_plain FAILED                             [ 60%]\n"
        "tests/a.py::test_skip[1-2] SKIPPED (needs a GPU)          [ 70%]\n"
        "tests/a.py::test_crash Fatal Python error: Segmentation fault\n")
    assert gpu_tests.outcomes(tmp_path / "shard0.xml", log) == {
        "tests/a.py::test_bad[x type]": "passed", "tests/a.py::test_plain": "failed",
        "tests/a.py::test_skip[1-2]": "skipped"}


def test_targets_basis_by_basis():
    """Issue 4's targets read from a benchmark JSON: each case against torch (1.3x on the
    small groups), the large cases against dense, by ids against sort + grouped_mm + unsort;
    every basis the run has, alternated ones included, and the bases that meet each."""
    sys.path.insert(0, str(ROOT / "bench"))
    import targets

    def row(case, method, latency, pipelined, kernel):
        return {"extra_info": {"case": case, "method": method, "device_ms": latency,
                               "pipelined_ms": pipelined, "kernel_ms": kernel}}

    data = {"benchmarks": [
        row("equal8_k4096 fwd", "mtmm", 1.0, 1.0, 1.0),
        row("equal8_k4096 fwd", "torch_grouped_mm", 0.9, 1.1, 1.2),
        row("equal8_k4096 fwd", "dense", 0.9, 0.9, 0.95),
        row("equal8_k4096 fwd", "mtmm_python", 9.0, 9.0, 9.0),  # not the op's default path
        row("lognormal32_k1024 fwd+bwd", "mtmm", 2.0, 1.0, 1.0),
        row("lognormal32_k1024 fwd+bwd", "torch_grouped_mm", 2.4, 1.4, 1.2),
        row("lognormal32_k1024 by_ids fwd", "mtmm_by_ids", 1.0, 1.0, 1.0),
        row("lognormal32_k1024 by_ids fwd", "sort_torch_grouped_mm_unsort", 2.0, 1.2, 3.0),
        {"extra_info": {"case": "lognormal32_k1024 fwd+bwd", "method": "interleaved",
                        "interleaved_ms": {"mtmm": 1.0, "torch_grouped_mm": 1.5, "dense": 0.8},
                        "interleaved_latency_ms": {"mtmm": 2.0, "torch_grouped_mm": 2.5}}},
    ]}
    rows = {(r["target"], r["case"]): r for r in targets.verdict(data)}
    vs_torch = rows[(">= 1.0x torch._grouped_mm", "equal8_k4096 fwd")]
    assert vs_torch["ratios"] == {"latency": 0.9, "pipelined": 1.1, "kernel": 1.2}
    assert vs_torch["met"] == ["pipelined", "kernel"]
    assert rows[(">= 90% of dense", "equal8_k4096 fwd")]["met"] == ["latency", "pipelined",
                                                                     "kernel"]
    small = rows[(">= 1.3x torch._grouped_mm", "lognormal32_k1024 fwd+bwd")]
    assert small["ratios"] == pytest.approx({"latency": 1.2, "pipelined": 1.4, "kernel": 1.2,
                                             "alternated": 1.5, "alternated latency": 1.25})
    assert small["met"] == ["pipelined", "alternated"]
    assert (">= 90% of dense", "lognormal32_k1024 fwd+bwd") not in rows  # a small case
    by_ids = rows[("by ids >= 1.3x sort + grouped_mm + unsort", "lognormal32_k1024 by_ids fwd")]
    assert by_ids["met"] == ["latency", "kernel"]
    text = targets.markdown(list(rows.values()))
    assert "| >= 1.0x torch._grouped_mm | equal8_k4096 fwd | 0.90x | 1.10x | 1.20x | - | - | " \
           "pipelined, kernel |" in text
    assert "| >= 90% of dense | equal8_k4096 fwd | 90% | 90% | 95% | - | - | all bases |" in text


def test_memory_check_script_without_a_gpu(tmp_path):
    """bench/memory_check.py (the device check's "memory" stage) trains every case and writes
    its table; on a CPU the peaks are None and the estimates grow with the model."""
    out = tmp_path / "memory.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU path
    proc = subprocess.run([sys.executable, "bench/memory_check.py", "--steps", "1", "--json",
                           str(out), "--markdown", str(tmp_path / "memory.md")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and all(r["peak_gb"] is None for r in rows)
    est = {(r["model"], bool(r["options"]), r["checkpointing"]): r["estimate_gb"] for r in rows}
    for model in ("tiny-clip", "tiny-val"):
        assert est[model, True, False] > 10 * est[model, False, False]
        assert est[model, True, True] < est[model, True, False]  # checkpointed activations
    assert "| tiny-val | hidden=512, layers=4 | True |" in (tmp_path / "memory.md").read_text()


def test_planner_memory_bench_runs(tmp_path):
    """bench/bench_planner_memory.py on a few random problems: every method's row, and
    QWen-VAL's table with the fallback's plan at 40 GB."""
    out = tmp_path / "mem.json"
    proc = _run("bench/bench_planner_memory.py", "--problems", "8", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {r["method"] for r in data["random"]} == {
        "spindle", "mtmm, no fallback", "mtmm, one cap for all", "mtmm"}
    qwen = {(r["memory_gb"], r["method"]): r for r in data["qwen_val"]}
    assert qwen[40.0, "spindle"]["makespan_ms"] is None
    assert qwen[40.0, "mtmm"]["count_cap"]["llm"] < 64 and qwen[40.0, "mtmm"]["simulated_ms"] > 0


def test_replan_bench_prices_both_plans_on_the_real_lengths(tmp_path):
    """bench/bench_replan.py: the declared plan and the re-planned one are simulated on the
    same real lengths, the move is priced between them, and the rows reach the JSON."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_replan
    finally:
        sys.path.pop(0)
    from scheduler import zoo
    from scheduler.graph import to_problem
    from scheduler.planner import plan_problem
    from scheduler.simulate import simulate

    row = bench_replan.one("multitask-clip", 4, 8, 0.5, 1, "mtmm")
    spec = zoo.model_spec("multitask-clip", 4)
    real = to_problem(bench_replan.misdeclared(spec, 0.5, 1), 8, island_size=8)
    assert real != to_problem(spec, 8, island_size=8)
    running = plan_problem(to_problem(spec, 8, island_size=8), "mtmm")
    assert row["declared_ms"] == pytest.approx(simulate(real, running).iteration_ms, rel=1e-12)
    # the re-planned plan: of the plans placed near the running one's state and not, both
    # renamed, the one whose time plus move is least (replan.reconsider's choice)
    from scheduler.plan import Problem
    from scheduler.state_moves import held_state, layer_holders, move_between, relabel_for_state

    p = Problem.from_dict(real)
    held = layer_holders(p, running)
    costs = []
    for problem in (dict(real, held_state=held_state(held, real)), real):
        plan = relabel_for_state(p, plan_problem(problem, "mtmm"), held)
        costs.append((simulate(real, plan).iteration_ms, move_between(p, held, layer_holders(p, plan))))
    assert (row["replanned_ms"], row["move_ms"]) == pytest.approx(min(costs, key=sum), rel=1e-12)
    assert (row["move_near_ms"], row["move_unaware_ms"]) == pytest.approx(
        (costs[0][1], costs[1][1]), rel=1e-12)
    assert 0 <= row["move_unaware_ms"] <= row["move_unrenamed_ms"] + 1e-9  # renaming never moves more
    out = tmp_path / "r.json"
    assert bench_replan.main(["--seeds", "1", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["rows"]) == len(zoo.paper_grid())
