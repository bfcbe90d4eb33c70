"""The four baselines: hand-checked small cases, every zoo problem, random DAGs; all validate."""

from __future__ import annotations

import random

import pytest

from scheduler import baselines, zoo
from scheduler.plan import Problem, lower_bound, validate

METHODS = ("sequential", "distmm", "optimus", "uniform")


def _plan(method, problem):
    return getattr(baselines, f"plan_{method}")(problem)


def _op(name, layers, base_ms, counts, task=None):
    """A MetaOp that scales perfectly: time_ms[n] = base_ms / n."""
    return {"name": name, "task": task or name.split("/")[0], "component": name, "layers": layers,
            "time_ms": {str(n): base_ms / n for n in counts}}


def _problem(n, metaops, flows=()):
    return {"num_devices": n, "island_size": n, "metaops": metaops,
            "flows": [list(f) for f in flows]}


# --- hand-checked ----------------------------------------------------------------------------


def test_sequential_uses_the_largest_count_and_sums():
    # N = 6 but the counts stop at 4: every MetaOp runs on 4 devices, one after another.
    prob = _problem(6, [_op("t/a", 3, 8.0, (1, 2, 4)), _op("t/b", 2, 4.0, (1, 2, 4)),
                        _op("u/c", 5, 2.0, (1, 2, 4, 8))], [("t/a", "t/b")])
    plan = baselines.plan_sequential(prob)
    validate(prob, plan)
    assert plan["makespan_ms"] == pytest.approx(3 * 2.0 + 2 * 1.0 + 5 * 0.5)
    assert [[s["devices"] for s in w["slices"]] for w in plan["waves"]] == [
        [[0, 1, 2, 3]], [[0, 1, 2, 3]], [[0, 1, 2, 3]]]
    assert plan["method"] == "sequential"


def test_uniform_splits_evenly():
    prob = _problem(4, [_op("t/a", 4, 8.0, (1, 2, 4)), _op("t/b", 4, 8.0, (1, 2, 4)),
                        _op("t/c", 1, 1.0, (1, 2, 4))], [("t/a", "t/c"), ("t/b", "t/c")])
    plan = baselines.plan_uniform(prob)
    validate(prob, plan)
    first = plan["waves"][0]["slices"]
    assert [(s["metaop"], s["devices"]) for s in first] == [("t/a", [0, 1]), ("t/b", [2, 3])]
    assert plan["makespan_ms"] == pytest.approx(4 * 4.0 + 1 * 0.25)


def test_uniform_resplits_when_a_metaop_finishes():
    prob = _problem(4, [_op("t/a", 8, 8.0, (1, 2, 4)), _op("t/b", 2, 8.0, (1, 2, 4))])
    plan = baselines.plan_uniform(prob)
    validate(prob, plan)
    # Wave 1: both on 2 devices for 8 ms (b done, a 2 of 8 layers); then a alone on 4.
    assert plan["makespan_ms"] == pytest.approx(2 * 4.0 + 6 * 2.0)


def test_distmm_splits_in_proportion_to_work():
    # One task: a has 3x the work of b, so a gets 3 devices and b 1; both finish at 12 ms; the
    # loss runs after on all 4; the second task runs after the first.
    prob = _problem(4, [_op("t/a", 6, 6.0, (1, 2, 3, 4)), _op("t/b", 2, 6.0, (1, 2, 3, 4)),
                        _op("t/loss", 1, 1.0, (1, 2, 4)), _op("u/x", 1, 4.0, (1, 2, 4))],
                    [("t/a", "t/loss"), ("t/b", "t/loss")])
    plan = baselines.plan_distmm(prob)
    validate(prob, plan)
    w0 = plan["waves"][0]
    assert {s["metaop"]: len(s["devices"]) for s in w0["slices"]} == {"t/a": 3, "t/b": 1}
    assert w0["duration_ms"] == pytest.approx(12.0)
    assert [s["metaop"] for w in plan["waves"][1:] for s in w["slices"]] == ["t/loss", "u/x"]
    assert plan["makespan_ms"] == pytest.approx(12.0 + 0.25 + 1.0)


def test_optimus_greedy_marginal_gain_and_reallocation():
    # Tasks a (4 x 8/n ms) and b (4 x 4/n ms) on 4 devices. Greedy from 1 + 1: a -> 2 saves
    # 16 ms per device, then b -> 2 saves 8 (a -> 3 only 5.3). After 8 ms b is done and a
    # (2 layers left) gets all 4 devices: 2 x 2 ms. Makespan 12 ms.
    prob = _problem(4, [_op("a/x", 4, 8.0, (1, 2, 3, 4)), _op("b/y", 4, 4.0, (1, 2, 3, 4))])
    plan = baselines.plan_optimus(prob)
    validate(prob, plan)
    w0 = {s["metaop"]: (s["layer_end"], len(s["devices"])) for s in plan["waves"][0]["slices"]}
    assert w0 == {"a/x": (2, 2), "b/y": (4, 2)}
    assert plan["makespan_ms"] == pytest.approx(12.0)


def test_more_metaops_than_devices_and_large_smallest_counts():
    ops = [_op(f"t{k}/m", 2, 3.0 + k, (2, 4)) for k in range(5)]
    prob = _problem(3, ops, [("t0/m", "t1/m")])  # a flow across tasks too
    for method in METHODS:
        plan = _plan(method, prob)
        validate(prob, plan)
        assert all(len(s["devices"]) == 2 for w in plan["waves"] for s in w["slices"])


@pytest.mark.parametrize("method", METHODS)
def test_problem_dict_or_object(method):
    d = _problem(2, [_op("t/a", 1, 2.0, (1, 2))])
    assert _plan(method, d) == _plan(method, Problem.from_dict(d))
    with pytest.raises(TypeError, match="problem"):
        _plan(method, [1, 2])


# --- zoo and random problems -----------------------------------------------------------------


@pytest.mark.parametrize("model, tasks, gpus", zoo.paper_grid())
def test_zoo_plans_validate(model, tasks, gpus):
    prob = Problem.from_dict(zoo.build_problem(model, tasks, gpus))
    lb = lower_bound(prob)
    for method in METHODS:
        plan = _plan(method, prob)
        validate(prob, plan)
        assert plan["makespan_ms"] >= lb * (1 - 1e-9)
    # Sequential is exactly the sum of layers x time on all N devices (every zoo batch is a
    # multiple of 64, so N is a valid count).
    seq = baselines.plan_sequential(prob)
    want = sum(m.layers * m.time_ms[gpus] for m in prob.metaops)
    assert seq["makespan_ms"] == pytest.approx(want)


def _random_problem(rng):
    n_ops = rng.randint(1, 40)
    N = rng.choice([1, 2, 3, 4, 8, 12, 16, 64])
    tasks = [f"t{k}" for k in range(rng.randint(1, 6))]
    ops = []
    for i in range(n_ops):
        counts = sorted(rng.sample(range(1, 2 * N + 1), rng.randint(1, min(6, 2 * N))))
        if counts[0] > N:
            counts[0] = rng.randint(1, N)
            counts = sorted(set(counts))
        t1 = rng.uniform(0.1, 20.0)
        times, t = {}, t1
        for c in counts:
            t = min(t, t1 / c ** rng.uniform(0.0, 1.0))  # monotone, sometimes flat
            times[str(c)] = t
        ops.append({"name": f"m{i}", "task": rng.choice(tasks), "component": f"c{i % 5}",
                    "layers": rng.randint(1, 12), "time_ms": times})
    flows = [[f"m{i}", f"m{j}"] for i in range(n_ops) for j in range(i + 1, n_ops)
             if rng.random() < 2.0 / n_ops]
    return {"num_devices": N, "island_size": min(N, 8), "metaops": ops, "flows": flows}


def test_random_problems_validate():
    rng = random.Random(5)
    for trial in range(150):
        prob = Problem.from_dict(_random_problem(rng))
        lb = lower_bound(prob)
        for method in METHODS:
            plan = _plan(method, prob)
            validate(prob, plan)
            assert plan["makespan_ms"] >= lb * (1 - 1e-9), (trial, method)


@pytest.mark.parametrize("method", METHODS)
def test_a_baseline_plan_over_device_memory_is_a_plan_memory_error(method):
    """The baselines place without looking at memory. Under a limit their plan is returned
    when it fits, as without one, and refused with PlanMemoryError (the planner's class for
    running out of memory, with the device and its GB) when it does not."""
    from scheduler.plan import PlanMemoryError, memory_per_device
    from scheduler.planner import plan_problem

    d = zoo.build_problem("qwen-val", 3, 64, activation_checkpointing=True,
                          optimizer_sharding=True)
    free = plan_problem(d, method)
    peak = max(memory_per_device(d, free))
    roomy = plan_problem(dict(d, device_memory_gb=peak), method)
    assert roomy["waves"] == free["waves"]
    with pytest.raises(PlanMemoryError, match=rf"cannot fit in memory: the {method} plan .* puts "
                                              rf"{peak:.6g} GB on device \d+, more than"):
        plan_problem(dict(d, device_memory_gb=peak * 0.99), method)
