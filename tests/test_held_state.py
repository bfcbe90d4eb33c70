"""A problem's ``held_state``: where a running job keeps each layer, which placement prefers so
that a re-plan moves less state. Checked: the format's errors, the C++ core against the Python
twin, a hand case, that only device ids change, and the moves it saves."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from scheduler import _core
from scheduler.plan import PlanMemoryError, Problem, validate
from scheduler.planner import plan_problem
from scheduler.random_problem import random_problem
from scheduler.state_moves import held_state, layer_holders, move_between

_TIMING_KEYS = ("planner_ms", "core_ms", "backend")


def _without_timing(plan: dict) -> dict:
    return {k: v for k, v in plan.items() if k not in _TIMING_KEYS}


def _one_metaop(held: dict | None = None) -> dict:
    """One 4-layer MetaOp that runs on 2 of 8 devices (2 islands of 4)."""
    d = {"num_devices": 8, "island_size": 4,
         "metaops": [{"name": "head", "component": "head", "layers": 4,
                      "time_ms": {"1": 4.0, "2": 2.0}, "param_gb": 1.0}]}
    if held is not None:
        d["held_state"] = held
    return d


def _devices(plan: dict) -> set[int]:
    return {x for w in plan["waves"] for s in w["slices"] for x in s["devices"]}


# --- the format ---------------------------------------------------------------------------------

@pytest.mark.parametrize("held, words", [
    ({"tail": [[0]]}, "unknown component 'tail'"),
    ({"head": [[0]] * 5}, "at most 4 layers"),
    ({"head": [[8]]}, "held_state['head'][0]: expected device ids in [0, 8)"),
    ({"head": [[0], [-1]]}, "held_state['head'][1]"),
    ({"head": [[1, 1]]}, "a device appears twice"),
    ({"head": [["0"]]}, "expected device ids"),
    ({"head": 3}, "held_state['head']"),
    ([["head", [[0]]]], "held_state must map components"),
])
def test_bad_held_state_is_refused_naming_it(held, words):
    with pytest.raises(ValueError) as e:
        Problem.from_dict(_one_metaop(held))
    assert words in str(e.value)


def test_held_state_round_trips_and_survives_replace():
    p = Problem.from_dict(_one_metaop({"head": [[6, 5], [5, 6]]}))
    assert p.held_devices("head") == ((5, 6), (5, 6))
    assert p.held_devices("nothing") == ()
    d = p.to_dict()
    assert d["held_state"] == {"head": [[5, 6], [5, 6]]}
    assert Problem.from_dict(json.loads(json.dumps(d))) == p
    assert dataclasses.replace(p, num_devices=16).held_state == p.held_state
    assert "held_state" not in Problem.from_dict(_one_metaop()).to_dict()


def test_the_core_checks_held_arrays():
    args = dict(num_devices=4, island_size=4, names=["a"], layers=[2], counts=[[1]],
                times=[[1.0]], component=[0], param_gb=[1.0], activation_gb=[0.0],
                output_mb=[0.0], hidden_mb=[0.0], flows=[], device_memory_gb=-1.0,
                overlap_levels=False, least_idle=False, single_tuple=False, portfolio=False)
    assert _core.plan_core(**args, held=[[[3], [3]]])["waves"][0]["slices"][0]["devices"] == [3]
    for bad in ([[[4]]], [[[1, 0]]], [[[0]], [[0]]]):
        with pytest.raises(ValueError, match="held"):
            _core.plan_core(**args, held=bad)


def test_held_state_from_holders_keeps_the_problems_components_and_layers():
    holders = {("head", 0): {3, 1}, ("head", 2): {2}, ("head", 7): {0}, ("gone", 0): {1}}
    assert held_state(holders) == {"gone": [[1]], "head": [[1, 3], [], [2], [], [], [], [], [0]]}
    assert held_state(holders, _one_metaop()) == {"head": [[1, 3], [], [2]]}


# --- placement ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_placement_goes_where_the_state_is(backend):
    plain = plan_problem(Problem.from_dict(_one_metaop()), "spindle", backend)
    assert _devices(plain) == {0, 1}
    p = Problem.from_dict(_one_metaop({"head": [[5, 6]] * 4}))
    plan = plan_problem(p, "spindle", backend)
    validate(p, plan)
    assert _devices(plan) == {5, 6}
    assert move_between(p, layer_holders(p, plan), layer_holders(p, plan)) == 0.0
    # Half the layers held on 6 and 7: the island holding them, and 6 and 7 within it.
    p = Problem.from_dict(_one_metaop({"head": [[6, 7], [6, 7]]}))
    assert _devices(plan_problem(p, "spindle", backend)) == {6, 7}


def _running_state(rng: random.Random, d: dict) -> dict | None:
    """Where a job that ran this problem's plan on shuffled device ids keeps its layers."""
    p = Problem.from_dict(d)
    try:
        plan = plan_problem(p, "spindle", "cpp")
    except PlanMemoryError:
        return None
    ids = list(range(p.num_devices))
    rng.shuffle(ids)
    return {k: {ids[x] for x in v} for k, v in layer_holders(p, plan).items()}


def test_cpp_equals_python_with_held_state_on_random_problems():
    rng = random.Random(11)
    checked = 0
    for i in range(80):
        d = random_problem(rng, rng.randint(1, 20), rng.choice([2, 4, 8, 16, 32]),
                           island_size=rng.choice([1, 2, 4, 8]), memory=i % 3 == 0)
        holders = _running_state(rng, d)
        if holders is None:
            continue
        p = Problem.from_dict(dict(d, held_state=held_state(holders)))
        for method in ("spindle", "mtmm"):
            try:
                a = plan_problem(p, method, "cpp")
            except PlanMemoryError:
                with pytest.raises(PlanMemoryError):
                    plan_problem(p, method, "python")
                continue
            assert _without_timing(a) == _without_timing(plan_problem(p, method, "python")), (i, method)
            validate(p, a)
            checked += 1
    assert checked > 100


def _shape(plan: dict) -> list:
    """Each wave's time and slices (in any order), without their device ids."""
    return [(w["start_ms"], w["duration_ms"],
             sorted((s["metaop"], s["layer_begin"], s["layer_end"], len(s["devices"]))
                    for s in w["slices"])) for w in plan["waves"]]


def test_held_state_changes_device_ids_only_and_moves_less():
    """Without a memory limit placement cannot change the schedule: the same waves, slices and
    times, other devices. Over random problems whose state sits on shuffled devices, the moves
    to the held-aware plans total less than to the plans made without it."""
    rng = random.Random(5)
    plain_moves = aware_moves = 0.0
    fewer = more = 0
    for _ in range(40):
        d = random_problem(rng, rng.randint(2, 20), rng.choice([8, 16, 32]))
        for m in d["metaops"]:  # parameters to move, no memory limit
            m["param_gb"] = rng.choice([0.1, 1.0])
        holders = _running_state(rng, d)
        p0 = Problem.from_dict(d)
        p = Problem.from_dict(dict(d, held_state=held_state(holders)))
        for method in ("spindle", "mtmm"):
            plain, aware = plan_problem(p0, method), plan_problem(p, method)
            assert aware["makespan_ms"] == plain["makespan_ms"]
            assert _shape(aware) == _shape(plain)
            a = move_between(p0, holders, layer_holders(p0, plain))
            b = move_between(p0, holders, layer_holders(p0, aware))
            plain_moves, aware_moves = plain_moves + a, aware_moves + b
            fewer, more = fewer + (b < a), more + (b > a)
    # Greedy placement does not promise less on every problem (its largest groups choose
    # first), but on the whole it moves less, and less more often than more.
    assert aware_moves < plain_moves and fewer > more, (aware_moves, plain_moves, fewer, more)


# --- the command --------------------------------------------------------------------------------

def test_plan_command_near_a_running_plan(tmp_path, capsys):
    from scheduler import cli, zoo

    problem = zoo.build_problem("multitask-clip", 4, 8)
    (tmp_path / "p.json").write_text(json.dumps(problem))
    assert cli.main(["plan", str(tmp_path / "p.json"), "--method", "mtmm",
                     "-o", str(tmp_path / "running.json")]) == 0
    # The running job's own problem: its plan again, nothing to move.
    assert cli.main(["plan", str(tmp_path / "p.json"), "--method", "mtmm", "--near",
                     str(tmp_path / "running.json"), "-o", str(tmp_path / "new.json")]) == 0
    assert f"state move   0.000 ms from {tmp_path / 'running.json'}" in capsys.readouterr().out
    # Another mix of lengths: the move printed is the one to the plan written.
    longer = json.loads(json.dumps(problem))
    for m in longer["metaops"][:2]:
        m["time_ms"] = {n: 3 * t for n, t in m["time_ms"].items()}
    (tmp_path / "q.json").write_text(json.dumps(longer))
    assert cli.main(["plan", str(tmp_path / "q.json"), "--method", "mtmm", "--near",
                     str(tmp_path / "running.json"), "-o", str(tmp_path / "new.json"),
                     "--save-problem", str(tmp_path / "saved.json")]) == 0
    out = capsys.readouterr().out
    p = Problem.from_dict(longer)
    running = json.loads((tmp_path / "running.json").read_text())
    new = json.loads((tmp_path / "new.json").read_text())
    validate(p, new)
    from scheduler.state_moves import move_ms
    assert f"state move   {move_ms(p, running, new):.3f} ms" in out
    assert json.loads((tmp_path / "saved.json").read_text())["held_state"] == \
        held_state(layer_holders(p, running), longer)
    # Not a plan, or a plan of another problem: refused, naming --near.
    (tmp_path / "bad.json").write_text(json.dumps({"waves": [{"slices": [
        {"metaop": "nope", "layer_begin": 0, "layer_end": 1, "devices": [0]}]}]}))
    for bad in ("p.json", "bad.json"):
        assert cli.main(["plan", str(tmp_path / "p.json"), "--near", str(tmp_path / bad)]) == 1
        assert "--near" in capsys.readouterr().err


def test_plan_near_keeps_the_candidate_that_runs_and_moves_least():
    """Of the plans placed near the held state and not (both renamed), plan_near keeps the one
    with the least time x horizon + move; a held_state already in the problem is replaced."""
    from scheduler.simulate import simulate
    from scheduler.state_moves import plan_near, relabel_for_state

    rng = random.Random(3)
    picked_near = picked_plain = 0
    for _ in range(30):
        d = random_problem(rng, rng.randint(2, 16), rng.choice([8, 16]))
        for m in d["metaops"]:
            m["param_gb"] = rng.choice([0.1, 1.0])
        holders = _running_state(rng, d)
        p = Problem.from_dict(d)
        candidates = [relabel_for_state(p, plan_problem(pr, "mtmm"), holders)
                      for pr in (dict(d, held_state=held_state(holders)), d)]
        costs = [(simulate(d, c).iteration_ms, move_between(p, holders, layer_holders(p, c)))
                 for c in candidates]
        for horizon in (1, 1000):
            stale = dict(d, held_state={})  # replaced by the holders' state
            plan, ms, moving = plan_near(stale, holders, lambda pr: plan_problem(pr, "mtmm"),
                                         horizon_steps=horizon)
            best = min(range(2), key=lambda i: costs[i][0] * horizon + costs[i][1])
            assert plan["waves"] == candidates[best]["waves"] and (ms, moving) == costs[best]
            picked_near, picked_plain = picked_near + (best == 0), picked_plain + (best == 1)
    assert picked_near > picked_plain > 0, (picked_near, picked_plain)
