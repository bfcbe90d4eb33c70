"""The GPU tooling under bench/ runs end to end on the CPU where it can, so that a kernel
change that breaks a script is caught here and not in a GPU session's scarce time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_grouped_gemm_sweep_smoke(tmp_path):
    """Every kernel the sweep launches (forward, dX, dW; pointer and descriptor builds) runs in
    the interpreter with the launcher's arguments and matches the reference; a candidate the
    kernel cannot compile becomes an error row, not a crash."""
    out = tmp_path / "sweep.json"
    proc = _run("bench/sweep_grouped_gemm.py", "--cpu-smoke", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["kernel"] in ("fwd", "dx", "dw")]
    assert {(r["kernel"], r["config"]["TMA"]) for r in ours} == {
        (k, tma) for k in ("fwd", "dx", "dw") for tma in (False, True)}
    failed = [r for r in ours if r["error"]]
    assert [(r["kernel"], r["config"]["BLOCK_M"]) for r in failed] == [("dw", 24)]
    for r in ours:
        if not r["error"]:
            assert r["max_rel_err"] is not None and r["max_rel_err"] < 1e-5, r


def test_host_overhead_script_without_a_gpu(tmp_path):
    """The script imports and says it has nothing to measure (it needs CUDA)."""
    proc = _run("bench/host_overhead.py", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No CUDA device" in proc.stdout
