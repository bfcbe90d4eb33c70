"""The Spindle planner in plain Python: the twin of the C++ core (cpp/planner.cpp).

Written for clarity; it is the test oracle for the C++ core and the speed baseline. Both back
ends take the same arrays (``CoreInput``) and must return the same schedule: same waves, slices
and device lists, and bit-identical floats. That is why every float below is computed by the
same operations in the same order as in C++ (sums left to right in index order, no library
transcendental), and why every choice has an explicit tie-break (docs/planner.md lists them).

Steps: MetaLevels -> per level, bisection for the relaxed optimum C* -> bi-point
discretisation into (count, layers) tuples -> wavefront scheduling with resource extension ->
placement of every wave onto device ids (scheduler/reference_placement.py: islands, flows,
shared parameters, memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .plan import PlanMemoryError, Problem
from .reference_placement import Placer, layers_fitting

__all__ = ["CoreInput", "Schedule", "core_input", "plan_core"]

_BISECTION_STEPS = 200


@dataclass
class CoreInput:
    """A problem as flat arrays; exactly what cpp/planner.hpp's ``CoreInput`` holds."""

    num_devices: int
    island_size: int
    names: list[str]
    layers: list[int]
    counts: list[list[int]]        # usable valid counts (<= num_devices), ascending
    times: list[list[float]]       # times[m][j]: ms of one layer on counts[m][j] devices
    component: list[int]           # component id of each MetaOp (ids by first appearance)
    param_gb: list[float]          # per component: per-layer parameter memory
    activation_gb: list[float]     # per MetaOp: activations of one layer, whole batch
    output_mb: list[float]         # per MetaOp
    hidden_mb: list[float]         # per MetaOp: between two of its layers (default output_mb)
    flows: list[tuple[int, int]]
    device_memory_gb: float        # < 0: unlimited
    shard_fraction: float = 0.0    # of param_gb: optimizer state sharded among a layer's holders
    # held[c][j]: the devices holding layer j of component c now, ascending (Problem.held_state);
    # [] when the problem gives none
    held: list[list[list[int]]] = field(default_factory=list)


@dataclass
class Schedule:
    """The planner's output before it becomes a plan dict."""

    waves: list[tuple[float, float, list[tuple[int, int, int, list[int]]]]]  # start, dur, slices
    level_cstar: list[float]
    relaxed_ms: float
    lower_bound_ms: float
    makespan_ms: float
    levels: list[int] = field(default_factory=list)
    # overlap_levels, least_idle, single_tuple, fastest, defer_short
    variant: tuple[bool, bool, bool, bool, bool] = (False, False, False, False, False)


def core_input(problem: Problem) -> CoreInput:
    comp_ids: dict[str, int] = {}
    for m in problem.metaops:
        comp_ids.setdefault(m.component, len(comp_ids))
    param = problem.component_param_gb()
    counts = [list(problem.usable_counts(i)) for i in range(len(problem.metaops))]
    return CoreInput(
        num_devices=problem.num_devices,
        island_size=problem.island_size,
        names=[m.name for m in problem.metaops],
        layers=[m.layers for m in problem.metaops],
        counts=counts,
        times=[[m.time_ms[c] for c in cs] for m, cs in zip(problem.metaops, counts)],
        component=[comp_ids[m.component] for m in problem.metaops],
        param_gb=[param[c] for c in comp_ids],
        activation_gb=[m.activation_gb for m in problem.metaops],
        output_mb=[m.output_mb for m in problem.metaops],
        hidden_mb=[m.output_mb if m.hidden_mb is None else m.hidden_mb for m in problem.metaops],
        flows=list(problem.flows),
        device_memory_gb=-1.0 if problem.device_memory_gb is None
        else float(problem.device_memory_gb),
        shard_fraction=float(problem.optimizer_shard_fraction),
        held=[[list(d) for d in problem.held_devices(c)] for c in comp_ids]
        if problem.held_state else [],
    )


# --- MetaLevels and the lower bound -------------------------------------------------------

def _levels(n: int, flows) -> tuple[list[int], list[int]]:
    """Longest-path depth and a topological order (Kahn, smallest ready index first)."""
    import heapq

    succ: list[list[int]] = [[] for _ in range(n)]
    indeg = [0] * n
    for s, t in flows:
        succ[s].append(t)
        indeg[t] += 1
    ready = [v for v in range(n) if indeg[v] == 0]
    heapq.heapify(ready)
    order, level = [], [0] * n
    while ready:
        u = heapq.heappop(ready)
        order.append(u)
        for v in succ[u]:
            level[v] = max(level[v], level[u] + 1)
            indeg[v] -= 1
            if indeg[v] == 0:
                heapq.heappush(ready, v)
    if len(order) != n:
        raise ValueError("the flows have a cycle")
    return level, order


def _lower_bound(inp: CoreInput, order: list[int], preds: list[list[int]]) -> float:
    n = len(inp.layers)
    fastest = [min(t * inp.layers[m] for t in inp.times[m]) for m in range(n)]
    device_time = 0.0
    for m in range(n):
        device_time += min(c * t * inp.layers[m] for c, t in zip(inp.counts[m], inp.times[m]))
    finish = [0.0] * n
    for v in order:
        finish[v] = fastest[v] + max((finish[u] for u in preds[v]), default=0.0)
    return max(max(finish), device_time / inp.num_devices)


# --- allocation: bisection for C*, bi-point discretisation ----------------------------------

def _devices_for(counts: list[int], f: list[float], C: float) -> float:
    """Relaxed inverse of f(n) = layers * T(n): the (real) device count that finishes in C.

    Linear between valid counts; below the smallest count the MetaOp time-shares a device
    group, so device-time is held constant: n = c0 * f0 / C. On a plateau the smallest count
    is taken. C below the fastest time is never asked for (bisection starts above it).
    """
    if C >= f[0]:
        return counts[0] * f[0] / C
    # j: the last index with f[j] > C (f never increases, so such indices form a prefix).
    j = 0
    while j + 1 < len(f) and f[j + 1] > C:
        j += 1
    if j + 1 == len(f):
        return float(counts[j])
    return counts[j] + (counts[j + 1] - counts[j]) * (f[j] - C) / (f[j] - f[j + 1])


def _level_cstar(inp: CoreInput, members: list[int]) -> float:
    """C* of the MetaLevel whose MetaOps are ``members`` (ascending indices)."""
    f = {m: [t * inp.layers[m] for t in inp.times[m]] for m in members}
    N = inp.num_devices

    def total(C: float) -> float:
        s = 0.0
        for m in members:
            s += _devices_for(inp.counts[m], f[m], C)
        return s

    lo = max(f[m][-1] for m in members)
    hi = 0.0
    for m in members:
        hi += f[m][0]
    hi = max(hi, lo)
    if total(lo) <= N:
        return lo
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if total(mid) > N:
            lo = mid
        else:
            hi = mid
    return hi


def _bipoint(inp: CoreInput, m: int, C: float) -> list[list[int]]:
    """(count index, layers) tuples of MetaOp m for the level optimum C, in execution order:
    the lower count first. l_hi solves T(hi) l_hi + T(lo) (L - l_hi) = C, rounded half up."""
    L = inp.layers[m]
    f = [t * L for t in inp.times[m]]
    if C >= f[0]:
        return [[0, L]]
    j = 0
    while j + 1 < len(f) and f[j + 1] > C:
        j += 1
    if j + 1 == len(f):
        return [[j, L]]
    t_lo, t_hi = inp.times[m][j], inp.times[m][j + 1]
    l_hi = math.floor((f[j] - C) / (t_lo - t_hi) + 0.5)
    l_hi = min(max(l_hi, 0), L)
    return [[ci, layers] for ci, layers in ((j, L - l_hi), (j + 1, l_hi)) if layers > 0]


# --- wavefront scheduling --------------------------------------------------------------------

_IDLE_CANDIDATES = 8


def _least_idle_length(inp: CoreInput, groups, D0: float, rem_layers) -> float:
    """mtmm's wave length. Candidates: D0 (the shortest tuple, the paper's choice) and the
    smallest few longer ends of a group's tuple or of one layer of a group (at most
    _IDLE_CANDIDATES in all, ascending). Picks the one that leaves the smallest fraction of the
    groups' device-time idle; ties: the shorter. Every candidate is >= D0, so a tuple still ends in
    each wave."""
    ends = []
    for m, ci in groups:
        T = inp.times[m][ci]
        for e in (rem_layers(m) * T, T):
            if e > D0:
                ends.append(e)
    cands = [D0] + sorted(set(ends))[:_IDLE_CANDIDATES - 1]
    best, best_frac = D0, 0.0
    for i, D in enumerate(cands):
        idle = 0.0
        for m, ci in groups:
            T = inp.times[m][ci]
            idle += inp.counts[m][ci] * (D - layers_fitting(D, T, rem_layers(m)) * T)
        frac = idle / D
        if i == 0 or frac < best_frac:
            best, best_frac = D, frac
    return best


# The variants the portfolio tries, in order: (overlap_levels, least_idle, single_tuple,
# fastest, defer_short). The first plan with the smallest makespan wins. bench/bench_planner.py
# measures each variant alone; docs/planner.md records why these five.
PORTFOLIO = (
    (False, True, True, False, False),
    (True, True, True, False, False),
    (True, False, True, False, False),
    (False, False, False, True, False),
    (False, True, True, False, True),
)


def _short(priority: float, top: float) -> bool:
    """defer_short: a candidate whose priority is under half the highest candidate's would keep
    its devices busy for less than half of what the wave's longest work still needs; it waits
    for devices that nothing longer can use."""
    return 2.0 * priority < top


def plan_core(inp: CoreInput, overlap_levels: bool = False, least_idle: bool = False,
              single_tuple: bool = False, portfolio: bool = False,
              defer_short: bool = False) -> Schedule:
    """Plan one iteration.

    ``overlap_levels``: a MetaOp becomes ready as soon as its own predecessors are done (else:
    levels run one after another, as in the paper). ``least_idle``: wave length by
    ``_least_idle_length`` (else the shortest tuple, the paper). ``single_tuple``: each MetaOp
    keeps only the bi-point tuple with more layers, for all its layers (fewer wave boundaries,
    so less slack from slicing at layer granularity). ``defer_short``: a candidate whose
    priority is under half the top candidate's joins a wave only after resource extension, on
    devices left idle (docs/planner.md, section 4). ``portfolio``: plan every variant of
    PORTFOLIO (the flags above are then ignored) and return the one with the smallest makespan;
    variants that run out of memory are skipped.
    """
    if not portfolio:
        return _plan_once(inp, overlap_levels, least_idle, single_tuple, False,
                          defer_short=defer_short)
    best, error = None, None
    for *flags, defer in PORTFOLIO:
        # Branch and bound: a variant stops as soon as it cannot beat the best plan so far
        # (it returns None); the result is the same as planning every variant to the end.
        bound = math.inf if best is None else best.makespan_ms
        try:
            s = _plan_once(inp, *flags, bound=bound, defer_short=defer)
        except ValueError as e:
            error = error or e
            continue
        if s is not None and (best is None or s.makespan_ms < best.makespan_ms):
            best = s
    if best is None:
        raise error
    return best


def _propose(inp: CoreInput, cands: list[int], tuples, cur, groups: list[list[int]],
             free: int) -> int:
    """Each candidate's current tuple joins ``groups`` in order while its count fits the free
    devices; returns the devices left free."""
    for m in cands:
        if free == 0:
            break
        n = inp.counts[m][tuples[m][cur[m]][0]]
        if n <= free:
            groups.append([m, tuples[m][cur[m]][0]])
            free -= n
    return free


def _plan_once(inp: CoreInput, overlap_levels: bool, least_idle: bool, single_tuple: bool,
               fastest: bool, bound: float = math.inf,
               defer_short: bool = False) -> Schedule | None:
    """One variant. ``fastest``: every MetaOp as one tuple at its largest count (no bisection:
    the plan the portfolio falls back to when splitting devices does not pay). Returns None
    as soon as the plan's end reaches ``bound`` with work left (it cannot beat it)."""
    n_ops = len(inp.layers)
    N = inp.num_devices
    level, order = _levels(n_ops, inp.flows)
    succ: list[list[int]] = [[] for _ in range(n_ops)]
    preds: list[list[int]] = [[] for _ in range(n_ops)]
    for s, t in inp.flows:
        succ[s].append(t)
        preds[t].append(s)
    num_levels = max(level) + 1
    members: list[list[int]] = [[] for _ in range(num_levels)]
    for m in range(n_ops):
        members[level[m]].append(m)

    cstar = [_level_cstar(inp, members[lv]) for lv in range(num_levels)]
    relaxed = 0.0
    for c in cstar:
        relaxed += c
    if fastest:
        tuples = [[[len(inp.counts[m]) - 1, inp.layers[m]]] for m in range(n_ops)]
    else:
        tuples = [_bipoint(inp, m, cstar[level[m]]) for m in range(n_ops)]
        if single_tuple:
            for m, t in enumerate(tuples):
                if len(t) == 2:  # the tuple with more layers (ties: the lower count) takes all
                    tuples[m] = [[t[0][0] if t[0][1] >= t[1][1] else t[1][0], inp.layers[m]]]
    cur = [0] * n_ops          # index of the current tuple
    done = [0] * n_ops         # layers finished

    def rem_time(m: int) -> float:
        s = 0.0
        for ci, layers in tuples[m][cur[m]:]:
            s += layers * inp.times[m][ci]
        return s

    # Priority tail: the longest chain of successors' (tuple) time; only when levels overlap.
    tail = [0.0] * n_ops
    if overlap_levels:
        for m in reversed(order):
            for s in succ[m]:
                tail[m] = max(tail[m], rem_time(s) + tail[s])

    pred_left = [len(preds[m]) for m in range(n_ops)]
    finished = [False] * n_ops
    placer = Placer(inp, preds)
    waves = []
    t_now = 0.0
    current_level = 0
    remaining = n_ops
    while remaining > 0:
        if overlap_levels:
            cands = [m for m in range(n_ops) if not finished[m] and pred_left[m] == 0]
        else:
            while all(finished[m] for m in members[current_level]):
                current_level += 1
            cands = [m for m in members[current_level] if not finished[m]]
        cands.sort(key=lambda m: (-(rem_time(m) + tail[m]), m))
        late: list[int] = []
        if defer_short:
            top = rem_time(cands[0]) + tail[cands[0]]
            late = [m for m in cands if _short(rem_time(m) + tail[m], top)]
            cands = [m for m in cands if not _short(rem_time(m) + tail[m], top)]
        # Propose each candidate's current tuple, highest priority first, while it fits.
        groups: list[list[int]] = []
        free = _propose(inp, cands, tuples, cur, groups, N)
        # Resource extension: grow the group with the most remaining time of its tuple to its
        # next valid count, one step at a time, while devices stay idle; only a step that makes
        # the layer faster counts (a flat time curve gains nothing). Ties: earlier group.
        while free > 0:
            best, best_r = None, 0.0
            for g in groups:
                m, ci = g
                if (ci + 1 < len(inp.counts[m]) and inp.times[m][ci + 1] < inp.times[m][ci]
                        and inp.counts[m][ci + 1] - inp.counts[m][ci] <= free):
                    r = tuples[m][cur[m]][1] * inp.times[m][ci]
                    if best is None or r > best_r:
                        best, best_r = g, r
            if best is None:
                break
            m, ci = best
            free -= inp.counts[m][ci + 1] - inp.counts[m][ci]
            best[1] = ci + 1
        # defer_short: the short candidates take the devices nothing longer could use.
        free = _propose(inp, late, tuples, cur, groups, free)
        # The wave lasts until the first group finishes its tuple; the others are sliced.
        D = min(tuples[m][cur[m]][1] * inp.times[m][ci] for m, ci in groups)
        if least_idle:
            D = _least_idle_length(inp, groups, D, lambda m: tuples[m][cur[m]][1])
        sized = []
        for m, ci in groups:
            k = layers_fitting(D, inp.times[m][ci], tuples[m][cur[m]][1])
            if k > 0:
                sized.append((m, ci, k))
        placed = placer.place_wave(len(waves), sized, done, lambda m: tuples[m][cur[m]][1], D)
        if not placed:
            m = sized[0][0]
            n = inp.counts[m][0]
            raise PlanMemoryError(
                f"cannot fit in memory: MetaOp '{inp.names[m]}' (layers from {done[m]}) does not "
                f"fit the free memory of {'any device' if n == 1 else f'any {n} devices'} "
                f"(device_memory_gb = {inp.device_memory_gb:g})")
        duration = 0.0
        slices = []
        for m, ci, k, devs in placed:
            duration = max(duration, k * inp.times[m][ci])
            slices.append((m, done[m], done[m] + k, sorted(devs)))
            done[m] += k
            tuples[m][cur[m]][1] -= k
            if tuples[m][cur[m]][1] == 0:
                cur[m] += 1
                if cur[m] == len(tuples[m]):
                    finished[m] = True
                    remaining -= 1
                    for s in succ[m]:
                        pred_left[s] -= 1
        waves.append((t_now, duration, slices))
        t_now += duration
        if t_now >= bound and remaining > 0:
            return None
    return Schedule(waves=waves, level_cstar=cstar, relaxed_ms=relaxed,
                    lower_bound_ms=_lower_bound(inp, order, preds), makespan_ms=t_now,
                    levels=level,
                    variant=(overlap_levels, least_idle, single_tuple, fastest, defer_short))
