"""The systems Spindle was compared with, as plans in the issue-5 format.

* `plan_sequential`: tasks one after another, every MetaOp on the whole cluster (the largest
  valid count <= N), as Megatron-LM and DeepSpeed run a multi-task model.
* `plan_distmm`: DistMM-MT. Tasks one after another; inside a task the MetaOps that can run
  together (ready at the same time) split the devices in proportion to their work.
* `plan_optimus`: Spindle-Optimus. Each task gets a fixed device group by greedy marginal gain
  (Optimus' rule) and all tasks run concurrently, each running its MetaOps one by one.
* `plan_uniform`: MetaLevel by MetaLevel, the unfinished MetaOps of the level split the devices
  evenly (re-split whenever one finishes).

All of them execute on the same wave model as Spindle (data moves only between waves, every
group in a wave runs one slice), so the comparison isolates the allocation policy. A wave lasts
as long as its shortest remaining MetaOp; the others run the whole layers that fit (a MetaOp
whose next layer does not fit sits the wave out). Plans pass `scheduler.plan.validate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .plan import Problem

__all__ = ["plan_distmm", "plan_optimus", "plan_sequential", "plan_uniform"]


def _problem(problem) -> Problem:
    if isinstance(problem, Problem):
        return problem
    if isinstance(problem, Mapping):
        return Problem.from_dict(problem)
    raise TypeError(f"problem must be a Problem or a problem dict, got {type(problem).__name__}")


def _largest_count(p: Problem, i: int, limit: int) -> int | None:
    """The largest usable count of MetaOp i that is <= limit (None if there is none)."""
    fits = [c for c in p.usable_counts(i) if c <= limit]
    return fits[-1] if fits else None


class _Builder:
    """Accumulates waves and tracks progress (layers done, which MetaOps are ready)."""

    def __init__(self, p: Problem):
        self.p = p
        n = len(p.metaops)
        self.done = [0] * n
        self.succ: list[list[int]] = [[] for _ in range(n)]
        self.waiting = [0] * n  # predecessors not yet finished
        for s, t in p.flows:
            self.succ[s].append(t)
            self.waiting[t] += 1
        self.levels = p.levels()
        # Deterministic topological position: by MetaLevel, then index.
        self.topo = sorted(range(n), key=lambda i: (self.levels[i], i))
        self.pos = {i: k for k, i in enumerate(self.topo)}
        self.finished_before: set[int] = set()  # MetaOps complete before the next wave
        self.ready_set = {i for i in range(n) if self.waiting[i] == 0}
        self.waves: list[dict] = []
        self.now = 0.0

    def remaining(self, i: int) -> int:
        return self.p.metaops[i].layers - self.done[i]

    def finished(self, i: int) -> bool:
        return i in self.finished_before

    def ready(self, i: int) -> bool:
        return i in self.ready_set

    def ready_ops(self) -> list[int]:
        """Unfinished MetaOps whose predecessors are all finished, in topological position."""
        return sorted(self.ready_set, key=self.pos.__getitem__)

    def all_done(self) -> bool:
        return len(self.finished_before) == len(self.p.metaops)

    def wave(self, assign: list[tuple[int, list[int]]]) -> None:
        """One wave: MetaOp i on devices D for each (i, D). The wave is as long as the shortest
        remaining MetaOp; every other runs the whole layers that fit. An empty assign runs the
        first ready MetaOp alone on its largest count, so a policy never stalls (e.g. when a
        flow between tasks blocks every task's next MetaOp)."""
        assign = [(i, d) for i, d in assign if d]
        if not assign:
            i = self.ready_ops()[0]
            assign = [(i, list(range(_largest_count(self.p, i, self.p.num_devices))))]
        for i, devices in assign:
            assert self.ready(i) and len(devices) in self.p.metaops[i].time_ms, (i, devices)
        per_layer = [self.p.metaops[i].time_ms[len(d)] for i, d in assign]
        d_ms = min(self.remaining(i) * t for (i, _), t in zip(assign, per_layer))
        slices, duration = [], 0.0
        for (i, devices), t in zip(assign, per_layer):
            layers = min(self.remaining(i), math.floor(d_ms / t * (1 + 1e-12)))
            if layers == 0:
                continue
            slices.append({"metaop": self.p.metaops[i].name, "layer_begin": self.done[i],
                           "layer_end": self.done[i] + layers, "devices": sorted(devices)})
            duration = max(duration, layers * t)
            self.done[i] += layers
        assert slices, "the shortest MetaOp always runs"
        self.waves.append({"start_ms": self.now, "duration_ms": duration, "slices": slices})
        self.now += duration
        for i, _ in assign:
            if self.remaining(i) == 0:
                self.finished_before.add(i)
                self.ready_set.discard(i)
                for v in self.succ[i]:
                    self.waiting[v] -= 1
                    if self.waiting[v] == 0:
                        self.ready_set.add(v)

    def plan(self, method: str) -> dict:
        return {"method": method, "makespan_ms": self.now, "waves": self.waves}


def _task_rank(p: Problem) -> dict[str, int]:
    rank: dict[str, int] = {}
    for m in p.metaops:
        rank.setdefault(m.task, len(rank))
    return rank


def _current_task_ready(b: _Builder, rank: dict[str, int]) -> list[int]:
    """Ready MetaOps of the earliest task (by first appearance) that has any ready."""
    ready = b.ready_ops()
    if not ready:
        return []
    task = min((b.p.metaops[i].task for i in ready), key=rank.__getitem__)
    return [i for i in ready if b.p.metaops[i].task == task]


# --- sequential ------------------------------------------------------------------------------


def plan_sequential(problem) -> dict:
    """Tasks one after another; each MetaOp alone on the largest valid count <= N."""
    p = _problem(problem)
    b, rank = _Builder(p), _task_rank(p)
    while not b.all_done():
        i = _current_task_ready(b, rank)[0]
        b.wave([(i, list(range(_largest_count(p, i, p.num_devices))))])
    return b.plan("sequential")


# --- DistMM-MT -------------------------------------------------------------------------------


def _split(p: Problem, b: _Builder, ops: list[int], share: dict[int, float]) -> dict[int, int]:
    """Device counts for `ops`: the largest valid count <= its share (at least its smallest),
    trimmed to fit N, then leftover devices go to the longest-running MetaOps. Ops that do not
    fit at their smallest count are left out (they run in a later group)."""
    N = p.num_devices
    chosen, used = [], 0
    for i in sorted(ops, key=lambda i: -share[i]):
        c0 = p.usable_counts(i)[0]
        if used + c0 <= N:
            chosen.append(i)
            used += c0
    n = {i: _largest_count(p, i, max(share[i], p.usable_counts(i)[0])) for i in chosen}

    def finish_ms(i, c):
        return b.remaining(i) * p.metaops[i].time_ms[c]

    while sum(n.values()) > N:  # smallest counts pushed the sum over N: trim the most over-served
        i = max((i for i in chosen if n[i] > p.usable_counts(i)[0]), key=lambda i: n[i] - share[i])
        n[i] = _largest_count(p, i, n[i] - 1)
    while True:  # hand leftover devices to the slowest MetaOp that can use them
        free = N - sum(n.values())
        grown = False
        for i in sorted(chosen, key=lambda i: -finish_ms(i, n[i])):
            bigger = _largest_count(p, i, n[i] + free)
            if bigger is not None and bigger > n[i] and finish_ms(i, bigger) < finish_ms(i, n[i]):
                n[i] = bigger
                grown = True
                break
        if not grown:
            return n


def _blocks(order: list[int], counts: dict[int, int]) -> list[tuple[int, list[int]]]:
    out, nxt = [], 0
    for i in order:
        out.append((i, list(range(nxt, nxt + counts[i]))))
        nxt += counts[i]
    return out


def plan_distmm(problem) -> dict:
    """Tasks one after another; inside a task, the MetaOps ready together split the devices in
    proportion to their work (device-time at their smallest count) and keep that split until
    all of them finish."""
    p = _problem(problem)
    b, rank = _Builder(p), _task_rank(p)
    N = p.num_devices
    while not b.all_done():
        group = _current_task_ready(b, rank)
        work = {}
        for i in group:
            c0 = p.usable_counts(i)[0]
            work[i] = b.remaining(i) * c0 * p.metaops[i].time_ms[c0]
        total = sum(work.values())
        counts = _split(p, b, group, {i: N * work[i] / total for i in group})
        assign = _blocks([i for i in group if i in counts], counts)
        while any(not b.finished(i) for i, _ in assign):
            b.wave([(i, d) for i, d in assign if not b.finished(i)])
    return b.plan("distmm")


# --- Spindle-Optimus -------------------------------------------------------------------------


def _task_time(p: Problem, b: _Builder, ops: list[int], g: int) -> float:
    """A task's remaining time running its MetaOps one by one on g devices (inf if one of
    them cannot run on g)."""
    total = 0.0
    for i in ops:
        if b.finished(i):
            continue
        c = _largest_count(p, i, g)
        if c is None:
            return math.inf
        total += b.remaining(i) * p.metaops[i].time_ms[c]
    return total


def _optimus_groups(p: Problem, b: _Builder, tasks: list[str], ops_of: dict[str, list[int]]
                    ) -> dict[str, int]:
    """Optimus' greedy: start every task at its smallest feasible group, then repeatedly give
    devices to the task with the largest time saved per added device."""
    g = {t: max(p.usable_counts(i)[0] for i in ops_of[t] if not b.finished(i)) for t in tasks}
    sizes = {t: sorted({c for i in ops_of[t] if not b.finished(i) for c in p.usable_counts(i)})
             for t in tasks}
    time_at = {(t, c): _task_time(p, b, ops_of[t], c) for t in tasks for c in sizes[t]}
    free = p.num_devices - sum(g.values())
    while free > 0:
        best = None  # (gain per device, task, new size)
        for t in tasks:
            now = time_at[t, g[t]]
            for size in sizes[t]:
                if not g[t] < size <= g[t] + free:
                    continue
                gain = (now - time_at[t, size]) / (size - g[t])
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, t, size)
        if best is None:
            break
        _, t, size = best
        free -= size - g[t]
        g[t] = size
    return g


def plan_optimus(problem) -> dict:
    """Tasks run concurrently on disjoint device groups sized by greedy marginal gain; inside
    its group a task runs its MetaOps one at a time on the largest valid count that fits.
    Like Optimus, the groups are re-allocated whenever a task finishes. When the tasks'
    smallest groups exceed N, the later tasks (in order of appearance) wait."""
    p = _problem(problem)
    b, rank = _Builder(p), _task_rank(p)
    ops_of: dict[str, list[int]] = {t: [] for t in rank}
    for i in b.topo:
        ops_of[p.metaops[i].task].append(i)

    def unfinished(t):
        return any(not b.finished(i) for i in ops_of[t])

    while not b.all_done():
        active, used = [], 0
        for t in filter(unfinished, rank):
            need = max(p.usable_counts(i)[0] for i in ops_of[t] if not b.finished(i))
            if used + need <= p.num_devices:
                active.append(t)
                used += need
        g = _optimus_groups(p, b, active, ops_of)
        first, nxt = {}, 0
        for t in active:
            first[t] = nxt
            nxt += g[t]
        while all(unfinished(t) for t in active):
            assign = []
            for t in active:
                i = next(i for i in ops_of[t] if not b.finished(i))
                if b.ready(i):
                    c = _largest_count(p, i, g[t])
                    assign.append((i, list(range(first[t], first[t] + c))))
            b.wave(assign)
    return b.plan("optimus")


# --- uniform ---------------------------------------------------------------------------------


def _even_split(p: Problem, ops: list[int]) -> dict[int, int]:
    """Split N evenly: each MetaOp gets the largest valid count <= its even share of what is
    left (MetaOps with a large smallest count first); ops that no longer fit are left out."""
    left, n = p.num_devices, {}
    order = sorted(ops, key=lambda i: (-p.usable_counts(i)[0], i))
    for k, i in enumerate(order):
        share = left // (len(order) - k)
        c = _largest_count(p, i, share)
        if c is None and p.usable_counts(i)[0] <= left:
            c = p.usable_counts(i)[0]
        if c is not None:
            n[i] = c
            left -= c
    return n


def plan_uniform(problem) -> dict:
    """MetaLevel by MetaLevel; in every wave the level's unfinished MetaOps split the devices
    evenly (devices of a finished MetaOp are re-split among the rest)."""
    p = _problem(problem)
    b = _Builder(p)
    levels = b.levels
    while not b.all_done():
        # The lowest unfinished level is entirely ready: everything below it is finished.
        ready = b.ready_ops()
        level = min(levels[i] for i in ready)
        ops = [i for i in ready if levels[i] == level]
        counts = _even_split(p, ops)
        b.wave(_blocks([i for i in ops if i in counts], counts))
    return b.plan("uniform")
