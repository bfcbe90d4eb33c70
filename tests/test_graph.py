"""Op graph, Spindle contraction (C++ core vs Python twin vs a literal oracle), to_problem."""

from __future__ import annotations

import random

import pytest

from scheduler import _core
from scheduler.graph import (
    Component,
    ModelSpec,
    OpGraph,
    OpNode,
    Task,
    build_op_graph,
    contract,
    contract_python,
    to_problem,
)
from scheduler.plan import Problem


def _merge_until_fixpoint(n, keys, edges):
    """The paper's definition, literally: while some edge i -> j of the current (contracted)
    graph has out-degree(i) = 1, in-degree(j) = 1 and equal keys, merge j into i. Returns the
    partition as chains, so it is independent of the one-pass algorithm under test."""
    chain = {v: [v] for v in range(n)}  # representative -> nodes in order
    rep = list(range(n))
    multi = {}
    for u, v in edges:
        multi[(u, v)] = multi.get((u, v), 0) + 1
    while True:
        cur = {}
        for (u, v), k in multi.items():
            a, b = rep[u], rep[v]
            if a != b:
                cur[(a, b)] = cur.get((a, b), 0) + k
        out_deg, in_deg = {}, {}
        for (a, b), k in cur.items():
            out_deg[a] = out_deg.get(a, 0) + k
            in_deg[b] = in_deg.get(b, 0) + k
        pick = next(((a, b) for (a, b) in sorted(cur) if out_deg[a] == 1 and in_deg[b] == 1
                     and keys[a] == keys[b]), None)
        if pick is None:
            return sorted(chain.values()), sorted(cur)
        a, b = pick
        chain[a] += chain.pop(b)
        for v in chain[a]:
            rep[v] = a


def _random_dag(rng, n, p_edge, n_keys):
    perm = list(range(n))
    rng.shuffle(perm)  # hidden topological order, so node ids are not already sorted
    edges = []
    for i in range(n):
        if i + 1 < n and rng.random() < 0.7:  # many chains, so merges happen
            edges.append((perm[i], perm[i + 1]))
        for j in range(i + 2, n):
            if rng.random() < p_edge:
                edges.append((perm[i], perm[j]))
    rng.shuffle(edges)
    keys = [rng.randrange(n_keys) for _ in range(n)]
    return keys, edges


# --- contraction on raw graphs ---------------------------------------------------------------


@pytest.mark.parametrize("impl", ["cpp", "python"])
def test_contract_hand_checked(impl):
    f = _core.contract if impl == "cpp" else contract_python
    # A chain of 5 with keys a a b b b: two MetaOps of 2 and 3 operators.
    chain = [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert f(5, [0, 0, 1, 1, 1], chain) == ([[0, 1], [2, 3, 4]], [(0, 1)])
    # Diamond of identical operators: branching blocks every merge.
    assert f(4, [7] * 4, [(0, 1), (0, 2), (1, 3), (2, 3)]) == (
        [[0], [1], [2], [3]], [(0, 1), (0, 2), (1, 3), (2, 3)])
    # 0 -> 1 -> 2 plus 0 -> 2: 1 -> 2 is not contractible (2 has in-degree 2), nor 0 -> 1.
    assert f(3, [0, 0, 0], [(0, 1), (1, 2), (0, 2)]) == ([[0], [1], [2]], [(0, 1), (0, 2), (1, 2)])
    # Parallel edges count towards the degrees.
    assert f(2, [0, 0], [(0, 1), (0, 1)]) == ([[0], [1]], [(0, 1)])
    # Nodes listed against the chain order: groups still follow the chain.
    assert f(3, [0, 0, 0], [(2, 0), (1, 2)]) == ([[1, 2, 0]], [])
    assert f(0, [], []) == ([], [])


def test_contract_matches_literal_definition_and_twin():
    rng = random.Random(11)
    for trial in range(300):
        n = rng.randint(1, 40)
        keys, edges = _random_dag(rng, n, p_edge=rng.choice([0.0, 0.02, 0.1]),
                                  n_keys=rng.randint(1, 3))
        groups, meta = _core.contract(n, keys, edges)
        assert (groups, meta) == contract_python(n, keys, edges), trial
        want_chains, want_edges = _merge_until_fixpoint(n, keys, edges)
        assert sorted(groups) == want_chains, trial
        # The oracle names a group by its first node.
        assert sorted((groups[a][0], groups[b][0]) for a, b in meta) == want_edges
        assert all(a < b for a, b in meta)  # groups are numbered in topological order


@pytest.mark.parametrize("impl", ["cpp", "python"])
def test_contract_bad_input(impl):
    f = _core.contract if impl == "cpp" else contract_python
    with pytest.raises(ValueError, match="cycle"):
        f(3, [0, 0, 0], [(0, 1), (1, 2), (2, 0)])
    with pytest.raises(ValueError, match=r"edge 1 \(1 -> 9\)"):
        f(3, [0, 0, 0], [(0, 1), (1, 9)])
    with pytest.raises(ValueError, match="keys has 2 entries for 3 nodes"):
        f(3, [0, 0], [])


# --- declarations and the op graph -----------------------------------------------------------


def _two_task_spec():
    comps = (Component("enc", 4, 64, 4), Component("txt", 3, 32, 2),
             Component("loss", 1, 32, kind="loss"))
    tasks = (Task("a", 8, {"enc": 10, "txt": 5, "loss": 1}, (("enc", "loss"), ("txt", "loss"))),
             Task("b", 6, {"enc": 12, "loss": 1}, (("enc", "loss"),)))
    return ModelSpec("toy", comps, tasks)


def test_build_op_graph_and_contract_a_model():
    spec = _two_task_spec()
    g = build_op_graph(spec)
    assert len(g.nodes) == (4 + 3 + 1) + (4 + 1)
    enc_type = ("transformer", "enc", 64, 4, None, False)
    assert g.nodes[0] == OpNode("a", "enc", 0, enc_type, (8, 10, 64))
    assert len(g.edges) == (3 + 2 + 2) + (3 + 1)
    for backend in ("cpp", "python"):
        mg = contract(g, backend=backend)
        assert [(m.name, m.layers) for m in mg.metaops] == [
            ("a/enc", 4), ("a/txt", 3), ("a/loss", 1), ("b/enc", 4), ("b/loss", 1)]
        names = [m.name for m in mg.metaops]
        assert [(names[u], names[v]) for u, v in mg.edges] == [
            ("a/enc", "a/loss"), ("a/txt", "a/loss"), ("b/enc", "b/loss")]
        assert mg.levels == (0, 0, 1, 0, 1)
        # The same component in two tasks: two MetaOps that share its parameters.
        assert {m.component for m in mg.metaops if m.name.endswith("/enc")} == {"enc"}


def test_adjacent_identical_components_stay_separate():
    # Two components with the same layer shape chained in one task: the component name is
    # part of the operator type, so each stays its own MetaOp (its own parameters).
    spec = ModelSpec("twin", (Component("x", 2, 16, 2), Component("y", 3, 16, 2)),
                     (Task("t", 4, {"x": 8, "y": 8}, (("x", "y"),)),))
    mg = contract(build_op_graph(spec))
    assert [(m.name, m.layers) for m in mg.metaops] == [("t/x", 2), ("t/y", 3)]


def test_hand_built_graph_names_split_metaops():
    # One task's component split by a branch: the pieces are numbered.
    kind = ("transformer", "c", 8, 1, None, False)
    nodes = [OpNode("t", "c", k, kind, (1, 1, 8)) for k in range(4)]
    g = OpGraph(nodes, [(0, 1), (0, 2), (1, 3), (2, 3)])
    names = [m.name for m in contract(g).metaops]
    assert names == ["t/c.1", "t/c.2", "t/c.3", "t/c.4"]
    with pytest.raises(ValueError, match="backend"):
        contract(g, backend="fortran")


def test_declaration_errors_name_the_field():
    with pytest.raises(ValueError, match="layers"):
        Component("c", 0, 8, 1)
    with pytest.raises(ValueError, match="heads"):
        Component("c", 1, 10, 3)
    with pytest.raises(ValueError, match="kind"):
        Component("c", 1, 8, 1, kind="conv")
    with pytest.raises(ValueError, match="Component.name"):
        Component("a/b", 1, 8, 1)
    with pytest.raises(ValueError, match="batch"):
        Task("t", 0, {"c": 1})
    with pytest.raises(ValueError, match=r"seq_lens\['c'\]"):
        Task("t", 1, {"c": 0})
    with pytest.raises(ValueError, match="not in seq_lens"):
        Task("t", 1, {"c": 1}, (("c", "d"),))
    with pytest.raises(ValueError, match="unknown component 'zz'"):
        ModelSpec("m", (Component("c", 1, 8, 1),), (Task("t", 1, {"zz": 1}),))
    with pytest.raises(ValueError, match="duplicate component"):
        ModelSpec("m", (Component("c", 1, 8, 1), Component("c", 2, 8, 1)),
                  (Task("t", 1, {"c": 1}),))
    with pytest.raises(ValueError, match="cycle"):
        spec = ModelSpec("m", (Component("c", 1, 8, 1), Component("d", 1, 8, 1)),
                         (Task("t", 1, {"c": 1, "d": 1}, (("c", "d"), ("d", "c"))),))
        contract(build_op_graph(spec))


# --- to_problem ------------------------------------------------------------------------------


def test_to_problem_is_a_valid_problem():
    spec = _two_task_spec()
    d = to_problem(spec, num_devices=4, island_size=2)
    p = Problem.from_dict(d)
    assert p.num_devices == 4 and p.island_size == 2
    assert [m.name for m in p.metaops] == ["a/enc", "a/txt", "a/loss", "b/enc", "b/loss"]
    # Valid counts: divisors of the task's batch, at most N (batch 8 -> 1,2,4; batch 6 -> 1,2,3).
    assert p.metaops[0].counts == (1, 2, 4)
    assert p.metaops[3].counts == (1, 2, 3)
    assert d["flows"] == [["a/enc", "a/loss"], ["a/txt", "a/loss"], ["b/enc", "b/loss"]]
    assert p.levels() == [0, 0, 1, 0, 1]
    for m in p.metaops:
        times = [m.time_ms[c] for c in m.counts]
        assert all(x >= y for x, y in zip(times, times[1:]))
    assert d["metaops"][0]["param_gb"] == pytest.approx((4 * 64 * 64 + 2 * 64 * 256) * 16 / 1e9)
    assert "device_memory_gb" not in d
    assert to_problem(spec, 4, device_memory_gb=80)["device_memory_gb"] == 80


def test_to_problem_uses_the_given_cost():
    class Flat:
        def time_table(self, c, batch, seq, max_devices):
            return {1: float(c.hidden)}

    d = to_problem(_two_task_spec(), 2, cost=Flat())
    assert [m["time_ms"] for m in d["metaops"][:2]] == [{"1": 64.0}, {"1": 32.0}]
    with pytest.raises(ValueError, match="num_devices"):
        to_problem(_two_task_spec(), 0)
