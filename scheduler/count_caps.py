"""mtmm's memory fallback: plan again under caps on each component's device counts.

The allocation gives a MetaOp the count that makes its level fastest, whatever its memory, so a
deep component run on all N devices leaves each of them holding every one of its layers (and
their optimizer state). Capping the component's counts makes slices of fewer devices, each
holding fewer layers. A capped problem's plans are plans of the problem itself (they use a
subset of its valid counts), so the caller validates the result against the original.

Search, when the uncapped plan does not fit memory (docs/planner.md, section 7):
1. one cap on every component, each usable count below the largest in turn; keep the fastest
   plan that fits (the larger cap on a tie);
2. from there, one component at a time (least parameter memory first, then by name), try each
   other cap and no cap; keep a change when the plan fits and is strictly faster; repeat the
   sweep while it improves, within ``MAX_REFINE_PLANS`` plans.
The makespan is not monotonic in the caps (placement is greedy), hence the exhaustive first
step. Deterministic: the same caps on either back end.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from .plan import PlanMemoryError, Problem

__all__ = ["MAX_REFINE_PLANS", "WHAT_IT_DOES", "count_capped", "plan_under_count_caps"]

# What the fallback does, for messages that suggest it where a plan was refused for memory.
WHAT_IT_DOES = "caps components' device counts until a plan fits, where one does"

# The per-component sweeps stop after this many plans (a problem of thousands of components
# would otherwise plan for minutes); the zoo models need about 200.
MAX_REFINE_PLANS = 400


def count_capped(p: Problem, caps: Mapping[str, int]) -> Problem:
    """``p`` with the device counts above ``caps[component]`` left out of that component's
    MetaOps (a MetaOp whose smallest count is larger keeps that one alone); components not in
    ``caps`` keep every count."""
    metaops = []
    for m in p.metaops:
        cap = caps.get(m.component)
        times = m.time_ms if cap is None else {n: t for n, t in m.time_ms.items() if n <= cap}
        times = times or {m.counts[0]: m.time_ms[m.counts[0]]}
        metaops.append(m if len(times) == len(m.time_ms) else dataclasses.replace(m, time_ms=times))
    return dataclasses.replace(p, metaops=tuple(metaops))


def _own_counts(p: Problem) -> dict[str, list[int]]:
    """Each component's usable counts (over its MetaOps), descending, in order of first
    appearance: caps between two of them give the same problem."""
    own: dict[str, set[int]] = {}
    for i, m in enumerate(p.metaops):
        own.setdefault(m.component, set()).update(p.usable_counts(i))
    return {c: sorted(counts, reverse=True) for c, counts in own.items()}


def plan_under_count_caps(p: Problem, plan_once: Callable[[Problem], dict]) -> dict:
    """``plan_once(p)``; when it raises PlanMemoryError, the best plan under count caps (module
    docstring), with ``count_cap`` = {component: cap} (None when uncapped) and ``core_ms``
    summed over the plans that fit. Other errors propagate; when nothing fits, a
    PlanMemoryError: the uncapped one's message with the caps tried."""
    try:
        plan = plan_once(p)
        plan["count_cap"] = None
        return plan
    except PlanMemoryError as e:
        error = e
    core_ms = 0.0

    def attempt(caps: dict[str, int]) -> dict | None:
        nonlocal core_ms
        try:
            plan = plan_once(count_capped(p, caps))
        except PlanMemoryError:
            return None
        core_ms += plan["core_ms"]
        return plan

    own = _own_counts(p)
    best, best_caps, tried = None, {}, set()
    for value in sorted({n for counts in own.values() for n in counts}, reverse=True)[1:]:
        # the same cap on every component, as the widest count it leaves (none: no cap)
        caps = {c: next((n for n in counts if n <= value), counts[-1]) for c, counts in own.items()}
        caps = {c: n for c, n in caps.items() if n < own[c][0]}
        if not caps or tuple(caps.items()) in tried:  # none: the uncapped problem again
            continue
        tried.add(tuple(caps.items()))
        plan = attempt(caps)
        if plan is not None and (best is None or plan["makespan_ms"] < best["makespan_ms"]):
            best, best_caps = plan, caps
    if best is None:
        raise PlanMemoryError(f"{error} (and with every component's devices capped at each "
                              "smaller count)")

    param = p.component_param_gb()
    layers = p.component_layers()
    order = sorted(own, key=lambda c: (param[c] * layers[c], c))
    budget, improved = MAX_REFINE_PLANS, True
    while improved and budget > 0:
        improved = False
        for c in order:
            for cap in (None, *own[c][1:]):
                if cap == best_caps.get(c) or budget == 0:
                    continue
                caps = {k: v for k, v in best_caps.items() if k != c}
                if cap is not None:
                    caps[c] = cap
                budget -= 1
                plan = attempt(caps)
                if plan is not None and plan["makespan_ms"] < best["makespan_ms"]:
                    best, best_caps, improved = plan, caps, True
    assert best_caps, "a plan that fits only without caps would have fit uncapped"
    best["count_cap"] = {c: best_caps[c] for c in own if c in best_caps}
    best["core_ms"] = core_ms
    return best
