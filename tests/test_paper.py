"""The paper's grid, the placement and dynamic studies, the workload generator, the command."""

from __future__ import annotations

import json

import pytest

from scheduler import cli, paper
from scheduler.plan import validate


@pytest.fixture(scope="module")
def grid_rows():
    return paper.run_grid()


def test_rows_for_every_grid_point_and_method(grid_rows):
    from scheduler import zoo

    grid = zoo.paper_grid()
    assert {(r["model"], r["tasks"], r["gpus"], r["method"]) for r in grid_rows} == {
        (*g, m) for g in grid for m in paper.METHODS}
    assert len(grid_rows) == len(grid) * len(paper.METHODS)
    for r in grid_rows:
        assert set(r) >= {"model", "tasks", "gpus", "method", "iteration_ms", "speedup"}
        assert r["iteration_ms"] > 0 and r["speedup"] > 0
        parts = r["compute_ms"] + r["transfer_ms"] + r["sync_ms"]
        assert r["iteration_ms"] == pytest.approx(parts)
        if r["method"] == "sequential":
            assert r["speedup"] == 1.0
    clip = [r for r in grid_rows if (r["model"], r["tasks"], r["gpus"], r["method"])
            == ("multitask-clip", 10, 32, "spindle")]
    assert clip and clip[0]["published"] == 1.71
    assert paper.published_speedup("multitask-clip", 4, 8, "spindle") is None


def test_targets_and_markdown(grid_rows):
    targets = paper.check_targets(grid_rows)
    assert [t["target"].split()[0] for t in targets][:1] == ["spindle"]
    assert all(isinstance(t["holds"], bool) and t["detail"] for t in targets)
    text = paper.format_markdown(grid_rows, targets=targets)
    assert text.count("\n| multitask-clip |") == sum(r["model"] == "multitask-clip" for r in grid_rows)


def test_wave_rule_study_matches_the_planner_and_the_grid(grid_rows):
    from scheduler import zoo
    from scheduler.planner import plan_problem

    point = ("multitask-clip", 10, 32)
    (row,) = paper.wave_rule_study([point])
    problem = zoo.build_problem(*point)
    for rule, least_idle in (("paper", False), ("least_idle", True)):
        plan = plan_problem(problem, "spindle", least_idle=least_idle)
        assert row[rule]["makespan_ms"] == plan["makespan_ms"]
        assert row[rule]["over_cstar"] == pytest.approx(plan["makespan_ms"] / plan["relaxed_ms"])
    grid = {r["method"]: r for r in grid_rows if (r["model"], r["tasks"], r["gpus"]) == point}
    # The paper rule is the grid's spindle; C* is the level optimum the planner computed.
    assert row["paper"]["speedup"] == pytest.approx(grid["spindle"]["speedup"])
    assert row["paper"]["over_cstar"] == pytest.approx(grid["spindle"]["over_cstar"])
    assert row["relaxed_ms"] == pytest.approx(grid["spindle"]["relaxed_ms"])
    assert row["cstar_speedup"] == pytest.approx(
        grid["sequential"]["makespan_ms"] / grid["spindle"]["relaxed_ms"])
    assert grid["sequential"]["over_cstar"] is None  # the baselines have no C*
    text = paper.format_markdown(grid_rows, wave_rule=[row])
    assert "| multitask-clip | 10 | 32 | " + f"{row['cstar_speedup']:.2f}x |" in text


def test_check_targets_detects_a_broken_ordering():
    def row(method, ms):
        return {"model": "m", "tasks": 2, "gpus": 8, "method": method, "iteration_ms": ms}

    ok = [row("sequential", 10.0), row("distmm", 9.0), row("optimus", 8.0), row("spindle", 7.0),
          row("mtmm", 6.9)]
    assert all(t["holds"] for t in paper.check_targets(ok))
    broken = ok[:2] + [row("optimus", 9.5), row("spindle", 7.0), row("mtmm", 7.2)]
    first, mtmm = paper.check_targets(broken)
    assert not first["holds"] and "m/2/8" in first["detail"]
    assert not mtmm["holds"] and "+2.86%" in mtmm["detail"]


def test_unplaced_keeps_group_sizes_and_stays_valid_without_memory():
    from scheduler import zoo
    from scheduler.planner import plan_problem

    problem = zoo.build_problem("multitask-clip", 4, 8)
    problem.pop("device_memory_gb", None)
    plan = plan_problem(problem, method="spindle")
    naive = paper.unplaced(plan)
    validate(problem, naive)
    for w, v in zip(plan["waves"], naive["waves"]):
        assert sorted(len(s["devices"]) for s in w["slices"]) == sorted(len(s["devices"]) for s in v["slices"])


def test_placement_study_rows():
    rows = paper.placement_study(grid=[("multitask-clip", 4, 8)], methods=("spindle",))
    (r,) = rows
    assert r["placed_transfer_ms"] >= 0 and r["unplaced_transfer_ms"] >= 0
    assert 0 <= r["placed_fraction"] < 1


def test_workload_varies_lengths_and_tasks_deterministically():
    from scheduler.workload import Workload, WorkloadConfig

    cfg = WorkloadConfig(model="multitask-clip", tasks=4, gpus=8, p_leave=0.4, p_join=0.3, seed=3)
    a, b = Workload(cfg), Workload(cfg)
    specs = [a.next_spec() for _ in range(30)]
    assert [s.tasks for s in specs] == [b.next_spec().tasks for _ in range(30)]
    counts = [len(s.tasks) for s in specs]
    assert counts[0] == 4 and min(counts) >= 1 and min(counts) < 4
    nominal = {t.name: t.seq_lens for t in a.spec.tasks}
    lengths = {(t.name, c): set() for t in a.spec.tasks for c in t.seq_lens}
    for s in specs:
        for t in s.tasks:
            assert t.batch == next(x.batch for x in a.spec.tasks if x.name == t.name)
            for c, n in t.seq_lens.items():
                lengths[(t.name, c)].add(n)
                if a.spec.component(c).kind == "transformer" and nominal[t.name][c] >= 8:
                    assert n % 8 == 0
    assert any(len(v) > 3 for v in lengths.values())
    assert a.next_problem()["num_devices"] == 8
    with pytest.raises(ValueError, match="p_leave"):
        WorkloadConfig(p_leave=1.5)
    for name in ("gpus", "min_active", "quantum"):
        for bad in (0, 8.0, True):  # a bool is not a count
            with pytest.raises(ValueError, match=f"{name} must be a positive int, got {bad!r}"):
                WorkloadConfig(**{name: bad})


def test_dynamic_study_small():
    from scheduler.workload import WorkloadConfig

    cfg = WorkloadConfig(model="multitask-clip", tasks=4, gpus=8, seed=1)
    r = paper.dynamic_study(3, cfg, method="spindle")
    assert r["iterations"] == 3 and r["planning_total_ms"] > 0
    assert r["replan_total_ms"] > r["planning_total_ms"] and r["fixed_total_ms"] > 0
    assert r["throughput_gain"] == pytest.approx(r["fixed_total_ms"] / r["replan_total_ms"] - 1)
    # tasks leave and lengths change: the re-planned run moves state, and pays for it
    assert r["move_total_ms"] > 0
    assert r["gain_without_moves"] == pytest.approx(
        r["fixed_total_ms"] / (r["replan_total_ms"] - r["move_total_ms"]) - 1)
    assert r["paying_gain"] == pytest.approx(r["fixed_total_ms"] / r["paying_total_ms"] - 1)
    assert 0 <= r["paying_switches"] <= 3
    for bad in (0, True):
        with pytest.raises(ValueError, match=f"iterations must be a positive int, got {bad!r}"):
            paper.dynamic_study(bad, cfg)


def test_command_simulates_a_plan_and_draws_it(tmp_path, capsys):
    from scheduler import zoo
    from scheduler.planner import plan_problem

    problem = zoo.build_problem("multitask-clip", 4, 8)
    plan = plan_problem(problem, method="spindle")
    (tmp_path / "p.json").write_text(json.dumps(problem))
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    rc = cli.main(["simulate", str(tmp_path / "p.json"), str(tmp_path / "plan.json"), "--json",
                   "--trace", str(tmp_path / "t.json")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    # Every slice fits its wave, so simulated compute never exceeds the plan's makespan.
    assert 0 < out["compute_ms"] <= plan["makespan_ms"] * (1 + 1e-9)
    assert out["iteration_ms"] == pytest.approx(out["compute_ms"] + out["transfer_ms"] + out["sync_ms"])
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]


def test_command_dynamic_runs(tmp_path, capsys):
    rc = cli.main(["simulate", "--dynamic", "--iterations", "2", "--model", "multitask-clip",
                   "--tasks", "4", "--gpus", "8", "--quiet", "--json", str(tmp_path / "d.json")])
    assert rc == 0
    assert json.loads((tmp_path / "d.json").read_text())["iterations"] == 2
    out = capsys.readouterr().out
    assert "re-planning" in out and "placed near the held state" in out
    rc = cli.main(["simulate", "--dynamic", "--iterations", "2", "--model", "multitask-clip",
                   "--tasks", "4", "--gpus", "8", "--quiet", "--no-held-state",
                   "--json", str(tmp_path / "d.json")])
    assert rc == 0 and json.loads((tmp_path / "d.json").read_text())["held_aware"] is False
    assert "placed without the held state" in capsys.readouterr().out


def test_dynamic_study_without_change_costs_only_the_planning():
    from scheduler.workload import WorkloadConfig

    still = WorkloadConfig(model="multitask-clip", tasks=4, gpus=8, shift_sigma=0.0,
                           length_sigma=0.0, p_leave=0.0, quantum=1)
    r = paper.dynamic_study(2, still, method="mtmm")
    assert r["mean_active_tasks"] == 4
    assert r["fixed_total_ms"] == pytest.approx(r["replan_total_ms"] - r["planning_total_ms"])
    assert r["throughput_gain"] < 0
    assert r["move_total_ms"] == 0 and r["paying_switches"] == 0  # the same plan: nothing moves


def test_dynamic_study_placed_near_the_held_state_moves_less():
    """The same workload re-planned with and without ``held_state``: placement near the held
    state moves less over the run (Multitask-CLIP 10 tasks / 32 GPUs, 40 iterations)."""
    from scheduler.workload import WorkloadConfig

    cfg = WorkloadConfig(model="multitask-clip", tasks=10, gpus=32, seed=3)
    aware = paper.dynamic_study(40, cfg, method="mtmm", held_aware=True)
    unaware = paper.dynamic_study(40, cfg, method="mtmm", held_aware=False)
    assert aware["held_aware"] and not unaware["held_aware"]
    assert aware["fixed_total_ms"] == unaware["fixed_total_ms"]  # the same iterations
    assert aware["move_total_ms"] < unaware["move_total_ms"]
    assert aware["paying_move_total_ms"] < unaware["paying_move_total_ms"]
