"""Where state lives and what moving it costs (scheduler/state_moves.py): the move estimate on
hand cases, the assignment solver against brute force, and renamed plans that are the same
plan (valid, the same simulated iteration) moving no more state, and on a small cluster as
little as the best of all renamings."""

from __future__ import annotations

import itertools
import random

import pytest

from scheduler import state_moves, zoo
from scheduler.plan import Problem, validate
from scheduler.planner import plan_problem
from scheduler.simulate import Cluster, simulate
from scheduler.state_moves import layer_holders, max_assignment, move_between, relabel_for_state
from test_executor import _s


def _brute(weight):
    n = len(weight)
    return max(sum(weight[r][c] for r, c in enumerate(p)) for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_max_assignment_is_the_best_of_all_permutations(n):
    rng = random.Random(n)
    for trial in range(30):
        pick = rng.random() if trial % 3 else rng.randint(0, 2)  # ties in every third
        weight = [[rng.uniform(-5, 5) if trial % 3 else float(rng.randint(0, 2)) for _ in range(n)]
                  for _ in range(n)]
        cols = max_assignment(weight)
        assert sorted(cols) == list(range(n)), pick
        assert sum(weight[r][c] for r, c in enumerate(cols)) == pytest.approx(_brute(weight), abs=1e-9)


def test_max_assignment_checks_its_matrix():
    assert max_assignment([]) == []
    with pytest.raises(ValueError, match="weight: expected a square matrix"):
        max_assignment([[1.0, 2.0], [3.0]])


def _small_problem() -> Problem:
    """Two components of 3 and 2 layers on 2 nodes of 2 devices."""
    return Problem.from_dict({
        "num_devices": 4, "island_size": 2, "flows": [["t/a", "t/b"]],
        "metaops": [
            {"name": "t/a", "task": "t", "component": "a", "layers": 3,
             "time_ms": {"1": 1.0, "2": 0.6}, "param_gb": 1.0, "output_mb": 5.0},
            {"name": "t/b", "task": "t", "component": "b", "layers": 2,
             "time_ms": {"1": 1.0, "2": 0.7, "4": 0.5}, "param_gb": 0.5},
        ]})


def _structure_keeping_renamings(nodes: list[list[int]]):
    """Every renaming that permutes whole nodes and devices inside nodes (equal node sizes)."""
    for order in itertools.permutations(range(len(nodes))):
        for inner in itertools.product(*(itertools.permutations(nodes[b]) for b in order)):
            rename = {}
            for a, devices in enumerate(inner):
                rename.update(zip(nodes[a], devices))
            yield rename


def _kept(problem, plan, held) -> float:
    param = problem.component_param_gb()
    return sum(param[c] * len(now & held.get((c, j), set()))
               for (c, j), now in layer_holders(problem, plan).items())


def _receive_seconds(problem, plan, held, cluster) -> float:
    """Summed over devices: the time each takes to receive the layers it runs and lacks, over
    NVLink where a holder shares its node, else the network (all of a layer's GB)."""
    param, node = problem.component_param_gb(), cluster.devices_per_node
    total = 0.0
    for (c, j), now in layer_holders(problem, plan).items():
        old = held.get((c, j), set())
        for d in now - old:
            near = any(o // node == d // node for o in old)
            total += param[c] / (cluster.intra_gbps if near else cluster.inter_gbps)
    return total


def test_relabel_moves_least_of_all_renamings_on_a_small_cluster():
    """The renaming minimises the summed receive time over every node- and device-permutation
    (or keeps the plan where that renaming's slowest receiver would be slower)."""
    problem = _small_problem()
    cluster = Cluster(devices_per_node=2)
    rng = random.Random(0)
    renamed_some = 0
    for _ in range(40):
        held = {(c, j): set(rng.sample(range(4), rng.randint(1, 3)))
                for c, layers in (("a", 3), ("b", 2)) for j in range(layers)}
        plan = {"waves": [
            {"slices": [{"metaop": "t/a", "layer_begin": 0, "layer_end": 2, "devices": [0, 3]},
                        {"metaop": "t/b", "layer_begin": 0, "layer_end": 1, "devices": [1]}]},
            {"slices": [{"metaop": "t/a", "layer_begin": 2, "layer_end": 3, "devices": [2]},
                        {"metaop": "t/b", "layer_begin": 1, "layer_end": 2, "devices": [0, 1, 3]}]}]}
        out = relabel_for_state(problem, plan, held, cluster)
        best = min(_receive_seconds(problem, {"waves": [
            {"slices": [{**s, "devices": [rename[d] for d in s["devices"]]} for s in w["slices"]]}
            for w in plan["waves"]]}, held, cluster)
            for rename in _structure_keeping_renamings([[0, 1], [2, 3]]))
        moved = move_between(problem, held, layer_holders(problem, out), cluster)
        assert moved <= move_between(problem, held, layer_holders(problem, plan), cluster) + 1e-12
        if out != plan:
            renamed_some += 1
            assert _receive_seconds(problem, out, held, cluster) == pytest.approx(best, rel=1e-12)
    assert renamed_some >= 10


@pytest.mark.parametrize("model,tasks,gpus", [("multitask-clip", 10, 32), ("qwen-val", 3, 64),
                                              ("ofasys", 7, 16)])
def test_a_renamed_plan_is_the_same_plan_and_moves_no_more(model, tasks, gpus):
    problem = Problem.from_dict(zoo.build_problem(model, tasks, gpus))
    running = plan_problem(problem, "spindle")
    held = layer_holders(problem, running)
    new = plan_problem(problem, "mtmm")
    renamed = relabel_for_state(problem, new, held)
    validate(problem, renamed)
    assert {k: v for k, v in renamed.items() if k != "waves"} == {k: v for k, v in new.items() if k != "waves"}
    a, b = simulate(problem, new), simulate(problem, renamed)
    assert b.iteration_ms == pytest.approx(a.iteration_ms, rel=1e-12)
    assert b.transfer_ms == pytest.approx(a.transfer_ms, rel=1e-12)
    assert _kept(problem, renamed, held) >= _kept(problem, new, held)
    assert move_between(problem, held, layer_holders(problem, renamed)) <= \
        move_between(problem, held, layer_holders(problem, new)) + 1e-9
    # the running plan renamed against itself moves nothing
    assert move_between(problem, held, layer_holders(problem, relabel_for_state(problem, running, held))) == 0.0


def _one_metaop_problem(**extra) -> dict:
    """One 2-layer MetaOp of component "a" (1 GB a layer) on 2 nodes of 2 devices."""
    return {"num_devices": 4, "island_size": 2, "flows": [], **extra,
            "metaops": [{"name": "t/a", "task": "t", "component": "a", "layers": 2,
                         "time_ms": {"1": 1.0, "2": 0.6}, "param_gb": 1.0}]}


def _on(*slices) -> dict:
    return {"waves": [{"slices": [_s("t/a", b, e, d)]} for b, e, d in slices]}


def test_move_ms_counts_the_new_holders_state_but_gradients_by_link():
    problem = _one_metaop_problem()
    moved = 1.0 - Cluster().grad_fraction  # a layer's GB, its gradient left behind
    old = _on((0, 2, [0]))
    # layer 0 to device 1 (device 0's node: NVLink), layer 1 to device 2 (the other node)
    new = _on((0, 1, [1]), (1, 2, [2]))
    assert state_moves.move_ms(problem, old, new) == pytest.approx(moved / 45.0 * 1e3)
    assert state_moves.move_ms(problem, old, _on((0, 2, [1]))) == pytest.approx(2 * moved / 150.0 * 1e3)
    assert state_moves.move_ms(problem, old, old) == 0.0
    # both devices of the other node share its network link; device 0 keeps its layers
    both = _on((0, 2, [0, 2, 3]))
    assert state_moves.move_ms(problem, old, both) == pytest.approx(4 * moved / 45.0 * 1e3)
    # sharded moments: each of the three holders counted a third of them
    sharded = _one_metaop_problem(optimizer_shard_fraction=0.5)
    assert state_moves.move_ms(sharded, old, both) == pytest.approx(4 * (moved - 0.5 + 0.5 / 3) / 45.0 * 1e3)
    # a slower network, a faster NVLink
    slow = Cluster(devices_per_node=2, inter_gbps=5.0, intra_gbps=500.0)
    assert state_moves.move_ms(problem, old, new, slow) == pytest.approx(moved / 5.0 * 1e3)
