"""Problem/plan formats (scheduler.plan): parsing, bad input, validate, lower bound, memory."""

from __future__ import annotations

import copy

import pytest

from scheduler.plan import MetaOpSpec, PlanError, Problem, lower_bound, memory_per_device, validate


def _problem(**over) -> dict:
    d = {
        "num_devices": 4, "island_size": 2,
        "metaops": [
            {"name": "t1/vision", "task": "t1", "component": "vision", "layers": 4,
             "time_ms": {"1": 4.0, "2": 2.2, "4": 1.3}, "param_gb": 0.5, "activation_gb": 2.0,
             "output_mb": 10.0, "hidden_mb": 40.0},
            {"name": "t2/vision", "task": "t2", "component": "vision", "layers": 2,
             "time_ms": {"1": 2.0, "2": 1.1}, "param_gb": 0.5, "activation_gb": 1.0},
            {"name": "t1/loss", "task": "t1", "component": "loss", "layers": 1,
             "time_ms": {"1": 0.5}},
        ],
        "flows": [["t1/vision", "t1/loss"]],
    }
    d.update(over)
    return d


def _plan() -> dict:
    # wave 0: t1/vision layers 0-2 on 2 devices (4.4 ms), t2/vision both layers on 2 devices
    # wave 1: t1/vision layers 2-4 on all 4 devices (2.6 ms); wave 2: the loss
    return {
        "makespan_ms": 7.5,
        "waves": [
            {"start_ms": 0.0, "duration_ms": 4.4, "slices": [
                {"metaop": "t1/vision", "layer_begin": 0, "layer_end": 2, "devices": [0, 1]},
                {"metaop": "t2/vision", "layer_begin": 0, "layer_end": 2, "devices": [2, 3]}]},
            {"start_ms": 4.4, "duration_ms": 2.6, "slices": [
                {"metaop": "t1/vision", "layer_begin": 2, "layer_end": 4,
                 "devices": [0, 1, 2, 3]}]},
            {"start_ms": 7.0, "duration_ms": 0.5, "slices": [
                {"metaop": "t1/loss", "layer_begin": 0, "layer_end": 1, "devices": [3]}]},
        ],
    }


# --- parsing ---------------------------------------------------------------------------------

def test_round_trip_and_queries():
    p = Problem.from_dict(_problem())
    assert Problem.from_dict(p.to_dict()) == p
    assert p.index("t1/loss") == 2
    assert p.levels() == [0, 0, 1]
    assert p.metaops[0].counts == (1, 2, 4)
    assert p.flows == ((0, 2),)
    assert p.component_param_gb() == {"vision": 0.5, "loss": 0.0}
    assert p.metaops[0].hidden_mb == 40.0 and p.metaops[1].hidden_mb is None
    assert "hidden_mb" not in p.to_dict()["metaops"][1]


def test_counts_above_num_devices_are_kept_but_not_usable():
    d = _problem(num_devices=2)
    p = Problem.from_dict(d)
    assert p.metaops[0].counts == (1, 2, 4)
    assert p.usable_counts(0) == (1, 2)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["flows"].append(["t1/loss", "t1/vision"]), r"cycle.*t1/"),
    (lambda d: d["flows"].append(["t1/vision", "nope"]), r"unknown MetaOp 'nope'"),
    (lambda d: d["metaops"][1].update(time_ms={"8": 1.0}), r"t2/vision.*no valid device count"),
    (lambda d: d["metaops"][0].update(time_ms={"1": -1.0}), r"t1/vision.*positive"),
    (lambda d: d["metaops"][0].update(time_ms={"1": 0.0}), r"t1/vision.*positive"),
    (lambda d: d["metaops"][0].update(time_ms={"1": 1.0, "2": 1.5}), r"t1/vision.*non-monotonic"),
    (lambda d: d["metaops"][0].update(layers=0), r"t1/vision.*layers"),
    (lambda d: d["metaops"][0].update(time_ms={"x": 1.0}), r"t1/vision.*not a device count"),
    (lambda d: d["metaops"][0].update(time_ms={"0": 1.0}), r"t1/vision.*>= 1"),
    (lambda d: d["metaops"][0].update(time_ms={}), r"t1/vision.*time_ms"),
    (lambda d: d["metaops"][0].update(param_gb=-1), r"t1/vision.*param_gb"),
    (lambda d: d["metaops"][0].update(hidden_mb=float("nan")), r"t1/vision.*hidden_mb"),
    (lambda d: d["metaops"][2].update(name="t1/vision"), r"t1/vision.*twice"),
    (lambda d: d["metaops"][0].update(colour="red"), r"t1/vision.*unknown keys"),
    (lambda d: d.update(num_devices=0), r"num_devices"),
    (lambda d: d.update(island_size=0), r"island_size"),
    (lambda d: d.update(device_memory_gb=-5), r"device_memory_gb"),
    (lambda d: d.update(metaops=[], flows=[]), r"at least one"),
    (lambda d: d.update(extra=1), r"unknown keys"),
])
def test_bad_input_is_a_value_error_naming_the_problem(mutate, match):
    d = _problem()
    mutate(d)
    with pytest.raises(ValueError, match=match):
        Problem.from_dict(d)


def test_self_loop_is_a_cycle():
    d = _problem(flows=[["t1/loss", "t1/loss"]])
    with pytest.raises(ValueError, match="cycle.*t1/loss"):
        Problem.from_dict(d)


def test_equal_times_at_larger_counts_are_allowed():
    m = MetaOpSpec("a", "t", "c", 3, {1: 2.0, 2: 2.0, 4: 1.0})
    assert m.counts == (1, 2, 4)


# --- validate --------------------------------------------------------------------------------

def test_hand_plan_is_valid():
    validate(_problem(), _plan())


def _broken(fn):
    plan = copy.deepcopy(_plan())
    fn(plan)
    return plan


@pytest.mark.parametrize("mutate, match", [
    (lambda p: p["waves"][1].update(start_ms=4.0), r"wave 1 starts .* before wave 0 ends"),
    (lambda p: p["waves"][0]["slices"][1].update(devices=[1, 2]), r"devices \[1\] already busy"),
    (lambda p: p["waves"][2]["slices"][0].update(devices=[4]), r"outside \[0, 4\)"),
    (lambda p: p["waves"][2]["slices"][0].update(devices=[3, 3]), r"appears twice"),
    (lambda p: p["waves"][1]["slices"][0].update(devices=[0, 1, 2]), r"3 devices is not a valid"),
    (lambda p: p["waves"][0].update(duration_ms=4.0), r"longer than the wave"),
    (lambda p: p["waves"][1]["slices"][0].update(layer_begin=3), r"starts at layer 3, expected 2"),
    (lambda p: p["waves"][1]["slices"][0].update(layer_end=3), r"3 of 4 layers"),
    (lambda p: p["waves"][1]["slices"][0].update(layer_end=5), r"not a non-empty range"),
    (lambda p: p["waves"][0]["slices"].append(
        {"metaop": "t2/vision", "layer_begin": 2, "layer_end": 2, "devices": [3]}),
     r"more than one slice"),
    (lambda p: p["waves"][0]["slices"].append(
        {"metaop": "ghost", "layer_begin": 0, "layer_end": 1, "devices": [3]}), r"unknown MetaOp"),
    (lambda p: p.update(makespan_ms=8.0), r"makespan_ms = 8.0 but the last wave ends at 7.5"),
    (lambda p: p.pop("waves"), r"list 'waves'"),
])
def test_validate_catches_each_broken_invariant(mutate, match):
    with pytest.raises(PlanError, match=match):
        validate(_problem(), _broken(mutate))


def test_validate_catches_a_flow_violation():
    plan = _broken(lambda p: None)
    # Move the loss into wave 1, next to the vision layers it depends on.
    loss = plan["waves"].pop(2)["slices"][0]
    plan["waves"][1]["slices"] = [dict(plan["waves"][1]["slices"][0], devices=[0, 1])]
    plan["waves"][1]["duration_ms"] = 4.4
    plan["waves"][1]["slices"].append(dict(loss, devices=[3]))
    plan["makespan_ms"] = 8.8
    with pytest.raises(PlanError, match=r"flow 't1/vision' -> 't1/loss'"):
        validate(_problem(), plan)


def test_memory_model_and_limit():
    plan = _plan()
    used = memory_per_device(_problem(), plan)
    # Devices 0, 1: vision layers 0-3 (params 4 x 0.5, shared with t2/vision's layers 0-1 only
    # on devices 2, 3) + activations 2 x 2.0 / 2 + 2 x 2.0 / 4.
    assert used[0] == pytest.approx(4 * 0.5 + 2.0 + 1.0)
    # Devices 2, 3: t2/vision layers 0-1 (params 2 x 0.5, then t1/vision layers 2-3 add 2 x 0.5:
    # layers 0-1 of component "vision" are held once) + activations 2 x 1.0 / 2 + 2 x 2.0 / 4.
    assert used[2] == pytest.approx(4 * 0.5 + 1.0 + 1.0)
    assert used[3] == pytest.approx(used[2])  # the loss has no memory
    validate(_problem(device_memory_gb=5.0), plan)
    with pytest.raises(PlanError, match=r"device 0 holds 5 GB, more than device_memory_gb = 4.9"):
        validate(_problem(device_memory_gb=4.9), plan)


def test_memory_model_with_sharded_optimizer_state():
    """optimizer_shard_fraction 0.75: each holder of a layer keeps a quarter of its param_gb
    plus its share of the other three quarters among the layer's holders over the whole plan.
    Here t2/vision runs on device 2 alone, so vision layers 0-1 have 3 holders (0, 1, 2) and
    layers 2-3 four."""
    plan = _plan()
    plan["waves"][0]["slices"][1]["devices"] = [2]
    used = memory_per_device(_problem(optimizer_shard_fraction=0.75), plan)
    layer = {3: 0.5 * (0.25 + 0.75 / 3), 4: 0.5 * (0.25 + 0.75 / 4)}
    assert used[0] == pytest.approx(2 * layer[3] + 2 * layer[4] + 2 * 2.0 / 2 + 2 * 2.0 / 4)
    assert used[2] == pytest.approx(2 * layer[3] + 2 * layer[4] + 2 * 1.0 / 1 + 2 * 2.0 / 4)
    assert used[3] == pytest.approx(2 * layer[4] + 2 * 2.0 / 4)
    plain = memory_per_device(_problem(), plan)
    assert all(u < p for u, p in zip(used, plain))
    with pytest.raises(PlanError, match="more than device_memory_gb"):
        validate(_problem(optimizer_shard_fraction=0.75, device_memory_gb=3.9), plan)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "0.5", True])
def test_bad_shard_fraction_is_named(bad):
    with pytest.raises(ValueError, match="optimizer_shard_fraction must be a number in"):
        Problem.from_dict(_problem(optimizer_shard_fraction=bad))


def test_shard_fraction_round_trips():
    p = Problem.from_dict(_problem(optimizer_shard_fraction=0.75))
    assert Problem.from_dict(p.to_dict()) == p and p.to_dict()["optimizer_shard_fraction"] == 0.75
    assert "optimizer_shard_fraction" not in Problem.from_dict(_problem()).to_dict()


# --- lower bound -----------------------------------------------------------------------------

def test_lower_bound_critical_path():
    # Critical path: t1/vision at 4 devices (4 x 1.3) then the loss (0.5) = 5.7; device-time:
    # min over n of n T(n) L: 4 x 4.0 + 2 x 2.0 + 0.5 = 20.5, / 4 = 5.125.
    assert lower_bound(_problem()) == pytest.approx(5.7)


def test_lower_bound_device_time():
    d = _problem(num_devices=2)
    # Critical path: 4 x 2.2 + 0.5 = 9.3; device-time 20.5 / 2 = 10.25.
    assert lower_bound(d) == pytest.approx(10.25)
    assert lower_bound(Problem.from_dict(d)) == lower_bound(d)
