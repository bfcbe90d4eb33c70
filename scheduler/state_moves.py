"""Where a job keeps each layer's state, what moving it to a new plan costs, and renaming a
plan's devices so that it moves the least.

A plan decides which devices hold each layer's weights and optimizer state
(:func:`layer_holders`). Switching plans (``scheduler.plan_switch``) gives every new holder
what it lacks; :func:`move_between` prices that on the simulator's cluster.

On identical devices in identical nodes, a plan stays the same plan (the same times, the same
links for every transfer) when whole nodes are permuted and devices are permuted inside their
node. A planner knows nothing of where the running job keeps its state; among those renamings,
:func:`relabel_for_state` picks one that moves little:

1. for every pair (new node a, old node b), the best matching of a's devices to b's, a pair
   (x, y) weighed by the time y would take to receive what x runs and y lacks (NVLink when a
   holder is in b, else the network): an assignment problem, solved exactly;
2. the best matching of new nodes to old nodes of the same size, weighed by step 1;
3. the renaming if the move it prices (:func:`move_between`, whose slowest device or node
   decides) is no longer than the plan's own, else the plan as it is.

Assignments are solved by the Hungarian method (Kuhn-Munkres with potentials, O(n^3)) on a
node's devices or the node count, so planning time hardly changes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from scheduler.plan import PlanMemoryError, Problem
from scheduler.simulate import Cluster, simulate


def layer_holders(problem: Problem, plan: Mapping) -> dict[tuple[str, int], set[int]]:
    """{(component, layer): devices that run it} under ``plan`` (MetaOps of ``problem``)."""
    out: dict[tuple[str, int], set[int]] = {}
    for wave in plan["waves"]:
        for s in wave["slices"]:
            c = problem.metaops[problem.index(s["metaop"])].component
            for j in range(s["layer_begin"], s["layer_end"]):
                out.setdefault((c, j), set()).update(s["devices"])
    return out


def held_state(holders: Mapping[tuple[str, int], set[int]],
               problem: Problem | Mapping | None = None) -> dict[str, list[list[int]]]:
    """``holders`` ({(component, layer): devices}, e.g. :func:`layer_holders`) as a problem's
    ``held_state`` ({component: [devices of layer 0, layer 1, ...]}), which the planner's
    placement prefers: a plan made with it moves less when the job switches to it. Given
    ``problem``, only its components, up to their layer count (a step's problem may leave
    out tasks whose layers the job still holds)."""
    limit = None
    if problem is not None:
        limit = (problem if isinstance(problem, Problem) else Problem.from_dict(problem)).component_layers()
    out: dict[str, list[list[int]]] = {}
    for (c, j), devices in sorted(holders.items()):
        if limit is not None and j >= limit.get(c, 0):
            continue
        layers = out.setdefault(c, [])
        layers.extend([] for _ in range(j + 1 - len(layers)))
        layers[j] = sorted(devices)
    return out


def move_ms(problem: Problem | Mapping, old_plan: Mapping, new_plan: Mapping,
            cluster: Cluster | None = None) -> float:
    """The simulator's estimate of switching from ``old_plan`` to ``new_plan``, ms
    (:func:`move_between` of the two plans' holders)."""
    p = problem if isinstance(problem, Problem) else Problem.from_dict(problem)
    return move_between(p, layer_holders(p, old_plan), layer_holders(p, new_plan), cluster)


def move_between(problem: Problem, before: Mapping[tuple[str, int], set[int]],
                 after: Mapping[tuple[str, int], set[int]], cluster: Cluster | None = None) -> float:
    """ms to give every device in ``after`` the layers ``before`` did not put on it: each
    receives a layer's ``param_gb`` but its gradient (the cluster's ``grad_fraction``), with
    the ``optimizer_shard_fraction`` part going to one holder only (counted 1/H on each of
    the H). Over NVLink where a holder in ``before`` shares its node, else over its node's
    network link; devices and nodes receive at once, so the slowest decides. Layers absent
    from ``after`` stay where they are; owners changing among the same holders (sharded
    moments) are not counted."""
    cluster = cluster or Cluster(devices_per_node=problem.island_size)
    param = problem.component_param_gb()
    f = problem.optimizer_shard_fraction
    node = cluster.devices_per_node
    intra = [0.0] * problem.num_devices
    inter: dict[int, float] = {}
    for (c, j), now in after.items():
        old = before.get((c, j), set())
        gb = param[c] * (1.0 - cluster.grad_fraction - f + f / len(now))
        old_nodes = {o // node for o in old}
        for d in now - old:
            if d // node in old_nodes:
                intra[d] += gb
            else:
                inter[d // node] = inter.get(d // node, 0.0) + gb
    worst = max([g / cluster.intra_gbps for g in intra] + [g / cluster.inter_gbps for g in inter.values()])
    return worst * 1e3


def max_assignment(weight: Sequence[Sequence[float]]) -> list[int]:
    """For a square matrix, the column of each row in an assignment of rows to distinct
    columns with the largest total weight."""
    n = len(weight)
    if any(len(row) != n for row in weight):
        raise ValueError(f"weight: expected a square matrix, got {n} rows of lengths "
                         f"{sorted({len(row) for row in weight})}")
    if n == 0:
        return []
    top = max(max(row) for row in weight)
    cost = [[top - w for w in row] for row in weight]  # minimise cost = maximise weight
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match = [0] * (n + 1)  # match[j]: the row (1-based) assigned to column j, 0: none
    way = [0] * (n + 1)
    for i in range(1, n + 1):
        # --- grow a shortest augmenting path from row i ----------------------------------
        match[0], j0 = i, 0
        best = [inf] * (n + 1)
        used = [False] * (n + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = match[j0], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < best[j]:
                        best[j], way[j] = reduced, j0
                    if best[j] < delta:
                        delta, j1 = best[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    best[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        # --- flip the path ------------------------------------------------------------------
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    out = [0] * n
    for j in range(1, n + 1):
        out[match[j] - 1] = j - 1
    return out


def _nodes(num_devices: int, per_node: int) -> list[list[int]]:
    return [list(range(s, min(s + per_node, num_devices))) for s in range(0, num_devices, per_node)]


def relabel_for_state(problem: Problem, plan: Mapping, held: Mapping[tuple[str, int], set[int]],
                      cluster: Cluster | None = None) -> dict:
    """``plan`` with its devices renamed (nodes permuted, devices permuted inside nodes) to move
    the least state from ``held`` ({(component, layer): devices keeping its state}); the plan
    itself where no renaming moves less. ``cluster``: default
    ``Cluster(devices_per_node=problem.island_size)``. The plan's times and transfers are
    unchanged; its other keys are kept."""
    cluster = cluster or Cluster(devices_per_node=problem.island_size)
    per_node, n = cluster.devices_per_node, problem.num_devices
    param = problem.component_param_gb()
    needs = layer_holders(problem, plan)
    layers = sorted(set(needs) | set(held))
    # runs_DL[x, l]: GB of layer l that new device x runs; lacks_LD[l, y]: seconds per GB for
    # old device y to receive layer l (0 where it holds it; NVLink where a holder shares its
    # node, else the network)
    runs_DL = np.zeros((n, len(layers)))
    lacks_LD = np.zeros((len(layers), n))
    node_of = np.arange(n) // per_node
    for i, layer in enumerate(layers):
        runs_DL[list(needs.get(layer, ())), i] = param[layer[0]]
        keep = np.zeros(n, dtype=bool)
        keep[list(held.get(layer, ()))] = True
        near = np.zeros(node_of[-1] + 1, dtype=bool)
        near[node_of[keep]] = True
        near = near[node_of]
        lacks_LD[i] = np.where(keep, 0.0, np.where(near, 1.0 / cluster.intra_gbps, 1.0 / cluster.inter_gbps))
    seconds_DD = runs_DL @ lacks_LD  # [x, y]: what y would take to receive what x runs
    nodes = _nodes(n, per_node)
    inside: dict[tuple[int, int], tuple[float, list[int]]] = {}
    for a, new_node in enumerate(nodes):
        for b, old_node in enumerate(nodes):
            if len(new_node) == len(old_node):
                w = (-seconds_DD[np.ix_(new_node, old_node)]).tolist()
                cols = max_assignment(w)
                inside[a, b] = (sum(w[r][c] for r, c in enumerate(cols)), cols)
    rename = list(range(problem.num_devices))
    for size in sorted({len(node) for node in nodes}):
        group = [a for a, node in enumerate(nodes) if len(node) == size]
        cols = max_assignment([[inside[a, b][0] for b in group] for a in group])
        for r, c in enumerate(cols):
            a, b = group[r], group[c]
            for x, y in enumerate(inside[a, b][1]):
                rename[nodes[a][x]] = nodes[b][y]
    out = dict(plan)
    out["waves"] = [{**wave, "slices": [{**s, "devices": [rename[d] for d in s["devices"]]}
                                        for s in wave["slices"]]} for wave in plan["waves"]]
    renamed = layer_holders(problem, out)
    if move_between(problem, held, renamed, cluster) > move_between(problem, held, needs, cluster):
        return dict(plan)
    return out


def plan_near(problem: Mapping, holders: Mapping[tuple[str, int], set[int]], plan_fn,
              cluster: Cluster | None = None, horizon_steps: int = 1) -> tuple[dict, float, float]:
    """The plan a job whose layers are at ``holders`` should switch to for ``problem`` (a
    problem dict): of ``plan_fn(problem with held_state)`` and ``plan_fn(problem)``, each
    renamed (:func:`relabel_for_state`), the one with the least simulated iteration times
    ``horizon_steps`` plus its move. Placing near the held state usually moves less, but not
    always: the move's slowest receiver decides, and greedy placement only adds up MB.
    Returns (plan, its simulated iteration ms, its move ms)."""
    problem = {k: v for k, v in problem.items() if k != "held_state"}  # the plain candidate's
    p = Problem.from_dict(problem)
    components = p.component_param_gb()
    # layers of components the problem leaves out stay where they are: nothing to weigh
    holders = {k: v for k, v in holders.items() if k[0] in components}
    best, error = None, None
    for candidate in (dict(problem, held_state=held_state(holders, p)), problem):
        try:
            plan = relabel_for_state(p, plan_fn(candidate), holders, cluster)
        except PlanMemoryError as e:  # the other may fit
            error = error or e
            continue
        ms = simulate(problem, plan, cluster).iteration_ms
        moving = move_between(p, holders, layer_holders(p, plan), cluster)
        if best is None or ms * horizon_steps + moving < best[1] * horizon_steps + best[2]:
            best = (plan, ms, moving)
    if best is None:
        raise error
    return best
