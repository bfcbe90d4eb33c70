"""The C++ core's DAG functions (scheduler._core) against hand-checked cases and a Python oracle."""

from __future__ import annotations

import random

import pytest

from scheduler import _core


def _levels_oracle(n, edges):
    # Longest-path depth by repeated relaxation: slow, obviously right on a DAG.
    level = [0] * n
    for _ in range(n):
        for u, v in edges:
            level[v] = max(level[v], level[u] + 1)
    return level


def test_diamond_levels():
    assert _core.metalevels(4, [(0, 1), (0, 2), (1, 3), (2, 3)]) == [0, 1, 1, 2]


def test_levels_use_longest_path():
    # 0 -> 2 directly and through 1: node 2 must sit below node 1.
    assert _core.metalevels(3, [(0, 1), (1, 2), (0, 2)]) == [0, 1, 2]


def test_isolated_nodes_and_empty_graph():
    assert _core.metalevels(3, []) == [0, 0, 0]
    assert _core.metalevels(0, []) == []


def test_topological_order_is_deterministic():
    assert _core.topological_order(4, [(2, 0), (3, 1)]) == [2, 0, 3, 1]


def test_random_dags_match_oracle():
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 40)
        perm = list(range(n))
        rng.shuffle(perm)  # a hidden topological order, so node ids are not already sorted
        edges = [(perm[i], perm[j]) for i in range(n) for j in range(i + 1, n) if rng.random() < 0.1]
        levels = _core.metalevels(n, edges)
        assert levels == _levels_oracle(n, edges)
        order = _core.topological_order(n, edges)
        pos = {v: i for i, v in enumerate(order)}
        assert sorted(order) == list(range(n))
        assert all(pos[u] < pos[v] for u, v in edges)


def test_cycle_is_a_value_error_naming_a_node():
    with pytest.raises(ValueError, match="cycle"):
        _core.metalevels(3, [(0, 1), (1, 2), (2, 1)])


def test_unknown_node_is_a_value_error():
    with pytest.raises(ValueError, match=r"edge 1 \(0 -> 5\)"):
        _core.metalevels(3, [(0, 1), (0, 5)])
    with pytest.raises(ValueError, match="num_nodes"):
        _core.metalevels(-1, [])
