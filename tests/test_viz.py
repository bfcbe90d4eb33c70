"""Plan pictures: the Gantt PNG is drawn; the trace is valid Trace Event Format JSON."""

from __future__ import annotations

import json

import pytest

from scheduler import viz
from scheduler.simulate import simulate

PROBLEM = {"num_devices": 4, "island_size": 2, "metaops": [
    {"name": "t1/vision", "task": "t1", "component": "vision", "layers": 4,
     "time_ms": {"1": 8.0, "2": 4.5}, "param_gb": 0.4, "output_mb": 30.0},
    {"name": "t2/vision", "task": "t2", "component": "vision", "layers": 4,
     "time_ms": {"1": 1.5, "2": 1.0}, "param_gb": 0.4, "output_mb": 10.0},
    {"name": "t1/loss", "task": "t1", "component": "loss", "layers": 1, "time_ms": {"1": 1.0}}],
    "flows": [["t1/vision", "t1/loss"]]}
PLAN = {"method": "hand", "waves": [
    {"start_ms": 0.0, "duration_ms": 18.0, "slices": [
        {"metaop": "t1/vision", "layer_begin": 0, "layer_end": 4, "devices": [0, 1]},
        {"metaop": "t2/vision", "layer_begin": 0, "layer_end": 4, "devices": [3]}]},
    {"start_ms": 18.0, "duration_ms": 1.0, "slices": [
        {"metaop": "t1/loss", "layer_begin": 0, "layer_end": 1, "devices": [2]}]}]}


def test_trace_is_trace_event_format_with_one_event_per_slice_per_device(tmp_path):
    path = tmp_path / "plan.json"
    viz.save_trace(PROBLEM, PLAN, path)
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    for e in events:
        assert e["ph"] in ("X", "M")
        assert isinstance(e["name"], str) and isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] == "X":
            assert e["ts"] >= 0 and e["dur"] >= 0
    compute = [e for e in events if e.get("cat") == "compute"]
    slices = [(s["metaop"], d) for w in PLAN["waves"] for s in w["slices"] for d in s["devices"]]
    assert sorted((e["name"], e["tid"]) for e in compute) == sorted(slices)
    sim = simulate(PROBLEM, PLAN)
    loss = next(e for e in compute if e["name"] == "t1/loss")
    # The loss waits for the vision output: it starts after wave 0 and the transfer into wave 1.
    assert loss["ts"] == pytest.approx(sim.waves[1].compute_start_ms * 1e3)
    assert loss["pid"] == 1  # device 2 is on node 1 (island of 2)
    assert any(e.get("cat") == "transfer" for e in events)
    sync = [e for e in events if e.get("cat") == "grad_sync"]
    # Vision is shared by t1 on devices 0-1 and t2 on device 3: synchronised over those three.
    assert sorted(e["tid"] for e in sync) == [0, 1, 3]
    assert trace["otherData"]["iteration_ms"] == pytest.approx(sim.iteration_ms)


def test_gantt_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plan.png"
    viz.save_gantt(PROBLEM, PLAN, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000


def test_plan_command_draws_gantt_and_trace(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from scheduler import cli

    png, trace = tmp_path / "plan.png", tmp_path / "plan.json"
    rc = cli.main(["plan", "--model", "multitask-clip", "--tasks", "4", "--gpus", "8",
                   "--gantt", str(png), "--trace", str(trace)])
    assert rc == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "compute" for e in events)
