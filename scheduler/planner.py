"""The planner API: ``plan_problem(problem, method, backend, **options) -> plan dict``.

Methods:
  ``spindle``  the paper's algorithm (per-level allocation, wavefront scheduling, placement),
               MetaLevels concatenated in time;
  ``mtmm``     mtmm's best: a portfolio of spindle variants (``least_idle`` wave lengths,
               ``single_tuple`` allocation, ``overlap_levels``: a MetaOp starts as soon as its
               own predecessors are done, with critical-path priority; ``defer_short``: short
               MetaOps take only the devices left idle; and every MetaOp at its fastest count),
               keeping the plan with the smallest makespan; and when the plan does not fit
               device memory, the same under caps on each component's device counts
               (``memory_fallback``, scheduler/count_caps.py);
  ``sequential``, ``distmm``, ``optimus``, ``uniform``: the baselines (scheduler.baselines).
Back ends for spindle/mtmm: ``cpp`` (scheduler._core) and ``python`` (scheduler.reference); they
return the same plan. Every plan is checked with ``plan.validate`` before it is returned.
"""

from __future__ import annotations

import gc
import time
import weakref
from typing import Any, Mapping

from .count_caps import plan_under_count_caps
from .plan import (_REL_TOL, PlanMemoryError, Problem, lower_bound, memory_per_device,
                   validate)
from .reference import CoreInput, core_input, plan_core

__all__ = ["METHODS", "BACKENDS", "DEFAULT_OPTIONS", "plan_problem", "check_memory"]

METHODS = ("spindle", "mtmm", "sequential", "distmm", "optimus", "uniform")
BACKENDS = ("cpp", "python")
# mtmm's portfolio plans with and without overlap_levels and keeps the better plan. Alone
# (portfolio=False), overlap_levels is off by default: it loses on every zoo model and wins
# on deep random DAGs (bench/bench_planner.py's ablation; numbers in docs/planner.md).
# memory_fallback: see scheduler/count_caps.py.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "spindle": {"overlap_levels": False, "least_idle": False, "single_tuple": False,
                "defer_short": False, "portfolio": False, "memory_fallback": False},
    "mtmm": {"overlap_levels": False, "least_idle": True, "single_tuple": True,
             "defer_short": False, "portfolio": True, "memory_fallback": True},
}


def check_memory(p: Problem) -> None:
    """Reject problems that cannot fit in device memory under any plan (PlanMemoryError naming
    the MetaOp): one layer on the largest usable count must fit one device, and everything must
    fit all devices together."""
    cap = p.device_memory_gb
    if cap is None:
        return
    param = p.component_param_gb()
    f = p.optimizer_shard_fraction
    total = 0.0
    worst, worst_gb = None, -1.0
    for i, m in enumerate(p.metaops):
        n_max = p.usable_counts(i)[-1]
        # a layer's own parameters with its optimizer state sharded n_max ways at best
        own = param[m.component] * ((1.0 - f) + f / n_max)
        need = own + m.activation_gb / n_max
        if need > cap:
            raise PlanMemoryError(
                f"MetaOp {m.name!r} cannot fit in memory: one layer needs {need:.6g} GB per "
                f"device even on {n_max} devices (param_gb {own:.6g} + "
                f"activation_gb {m.activation_gb:.6g} / {n_max}), device_memory_gb = {cap}")
        total += m.layers * m.activation_gb
        if m.layers * (m.activation_gb + param[m.component]) > worst_gb:
            worst, worst_gb = m.name, m.layers * (m.activation_gb + param[m.component])
    for c, layers in p.component_layers().items():
        total += layers * param[c]
    if total > cap * p.num_devices:
        raise PlanMemoryError(
            f"the problem cannot fit in memory: it needs at least {total:.6g} GB, the "
            f"{p.num_devices} devices hold {cap * p.num_devices:.6g} GB (largest MetaOp: "
            f"{worst!r}, {worst_gb:.6g} GB)")


_VARIANT_KEYS = ("overlap_levels", "least_idle", "single_tuple", "fastest", "defer_short")


def _fields(waves: list, sched_like) -> dict:
    return {
        "makespan_ms": sched_like["makespan_ms"],
        "lower_bound_ms": sched_like["lower_bound_ms"],
        "relaxed_ms": sched_like["relaxed_ms"],
        "level_cstar_ms": list(sched_like["level_cstar"]),
        "variant": dict(zip(_VARIANT_KEYS, sched_like["variant"])),
        "waves": waves,
    }


# id(problem) -> (weak reference, {"python": CoreInput, "cpp": _core.PlannerInput}). Kept off
# the Problem itself so that copying or pickling a Problem never meets the C++ handle.
_INPUTS: dict[int, tuple[weakref.ref, dict]] = {}


def _cached_input(p: Problem, backend: str):
    """The core's input arrays for ``p``, built once per Problem object (it is frozen, so they
    never go stale; the entry leaves with the Problem): ``reference.CoreInput`` for the Python
    twin, ``_core.PlannerInput`` (the same arrays already converted to C++) for the C++ core."""
    key = id(p)
    entry = _INPUTS.get(key)
    if entry is None or entry[0]() is not p:
        entry = (weakref.ref(p, lambda _, key=key: _INPUTS.pop(key, None)), {})
        _INPUTS[key] = entry
    cache = entry[1]
    inp = cache.get(backend)
    if inp is None:
        inp = cache.get("python") or core_input(p)
        cache["python"] = inp
        if backend == "cpp":
            from . import _core

            inp = _core.PlannerInput(
                inp.num_devices, inp.island_size, inp.names, inp.layers, inp.counts, inp.times,
                inp.component, inp.param_gb, inp.activation_gb, inp.output_mb, inp.hidden_mb,
                inp.flows, inp.device_memory_gb, inp.shard_fraction, inp.held)
            cache["cpp"] = inp
    return inp


_CORE = None  # scheduler._core, imported on first use (it is only needed by the C++ back end)


def _run_cpp(inp, method: str, opts: dict) -> tuple[dict, float]:
    """(plan, core_ms): the C++ core builds the plan dict itself, in _fields' layout after
    method, backend and options, so nothing is copied here."""
    global _CORE
    if _CORE is None:
        from . import _core

        _CORE = _core
    try:
        return _CORE.plan(inp, method, "cpp", opts, opts["overlap_levels"], opts["least_idle"],
                          opts["single_tuple"], opts["portfolio"], opts["defer_short"])
    except _CORE.PlanMemoryError as e:  # one class for both back ends
        raise PlanMemoryError(str(e)) from None


def _run_python(inp: CoreInput, opts: dict) -> tuple[dict, float]:
    t0 = time.perf_counter()
    sched = plan_core(inp, overlap_levels=bool(opts["overlap_levels"]),
                      least_idle=bool(opts["least_idle"]),
                      single_tuple=bool(opts["single_tuple"]), portfolio=bool(opts["portfolio"]),
                      defer_short=bool(opts["defer_short"]))
    core_ms = (time.perf_counter() - t0) * 1e3
    names = inp.names
    waves = [
        {"start_ms": start, "duration_ms": dur,
         "slices": [{"metaop": names[m], "layer_begin": b, "layer_end": e, "devices": d}
                    for m, b, e, d in slices]}
        for start, dur, slices in sched.waves
    ]
    return _fields(waves, vars(sched)), core_ms


def _plan_core(p: Problem, method: str, backend: str, opts: dict) -> dict:
    """One spindle/mtmm plan of ``p`` on ``backend`` (PlanMemoryError when it does not fit
    memory)."""
    gc_was_on = gc.isenabled()
    gc.disable()  # building a large plan must not trigger collections of what it builds
    try:
        t0 = time.perf_counter()
        inp = _cached_input(p, backend)
        if backend == "cpp":
            plan, core_ms = _run_cpp(inp, method, opts)
        else:
            fields, core_ms = _run_python(inp, opts)
            plan = {"method": method, "backend": backend, "options": opts, **fields}
        plan["planner_ms"] = (time.perf_counter() - t0) * 1e3
        plan["core_ms"] = core_ms
    finally:
        if gc_was_on:
            gc.enable()
    return plan


def _plan_with_fallback(p: Problem, method: str, backend: str, opts: dict) -> dict:
    """count_caps.plan_under_count_caps over the core; the lower bound stays ``p``'s own and
    planner_ms counts every plan tried."""
    t0 = time.perf_counter()
    plan = plan_under_count_caps(p, lambda q: _plan_core(q, method, backend, opts))
    if plan["count_cap"] is not None:
        plan["lower_bound_ms"] = lower_bound(p)
        plan["planner_ms"] = (time.perf_counter() - t0) * 1e3
    return plan


def _check_baseline_memory(p: Problem, plan: dict, method: str) -> None:
    """The baselines place without looking at memory: PlanMemoryError when their plan puts
    more than ``device_memory_gb`` on a device (``plan.memory_per_device``, as validate
    counts it)."""
    used = memory_per_device(p, plan)
    worst = max(range(len(used)), key=used.__getitem__)
    if used[worst] > p.device_memory_gb * (1 + _REL_TOL):  # validate's slack
        raise PlanMemoryError(
            f"cannot fit in memory: the {method} plan (placed without looking at memory) puts "
            f"{used[worst]:.6g} GB on device {worst}, more than device_memory_gb = "
            f"{p.device_memory_gb}")


def plan_problem(problem: Mapping | Problem, method: str = "spindle", backend: str = "cpp",
                 *, check: bool = True, **options) -> dict:
    """Plan one training iteration of ``problem`` (a problem dict or ``Problem``).

    Args:
        problem: the problem (docs/formats.md).
        method: one of ``METHODS``.
        backend: ``"cpp"`` or ``"python"`` (spindle and mtmm only; the baselines are Python).
        check: validate the plan before returning it (on by default; benchmarks of very large
            problems may turn it off, the tests never do).
        **options: spindle/mtmm only: ``overlap_levels``, ``least_idle``, ``single_tuple``,
            ``defer_short``, ``portfolio``, ``memory_fallback`` (bools; defaults in
            DEFAULT_OPTIONS, meanings in docs/planner.md).

    Returns:
        The plan dict (docs/formats.md) with ``method``, ``backend``, ``options``,
        ``makespan_ms``, ``lower_bound_ms``, ``relaxed_ms`` (spindle/mtmm), ``planner_ms`` (the
        planning call: core plus conversion to the plan dict, not parsing or validation),
        ``core_ms`` (the algorithm alone), ``waves`` and (spindle/mtmm) ``count_cap``: None,
        or {component: the most devices its slices were allowed} from the memory fallback.

    Raises:
        PlanMemoryError (a ValueError): no plan fits ``device_memory_gb`` (naming the MetaOp), or
            a baseline's plan, placed without looking at memory, does not.
        ValueError: bad problem (naming the MetaOp and why), an unknown method or backend.
        TypeError: an unknown option.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    p = problem if isinstance(problem, Problem) else Problem.from_dict(problem)
    check_memory(p)
    if method in DEFAULT_OPTIONS:
        unknown = set(options) - set(DEFAULT_OPTIONS[method])
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)} for method {method!r}; "
                            f"known: {sorted(DEFAULT_OPTIONS[method])}")
        for key, value in options.items():
            if not isinstance(value, bool):
                raise TypeError(f"option {key!r} must be a bool, got {value!r}")
        opts = {**DEFAULT_OPTIONS[method], **options}
        if opts["memory_fallback"] and p.device_memory_gb is not None:
            plan = _plan_with_fallback(p, method, backend, opts)
        else:
            plan = _plan_core(p, method, backend, opts)
        plan.setdefault("count_cap", None)
    else:
        if options:
            raise TypeError(f"method {method!r} takes no options, got {sorted(options)}")
        from . import baselines

        t0 = time.perf_counter()
        plan = dict(getattr(baselines, f"plan_{method}")(p))
        elapsed = (time.perf_counter() - t0) * 1e3
        plan.setdefault("method", method)
        plan.setdefault("backend", "python")
        plan.setdefault("planner_ms", elapsed)
        plan.setdefault("lower_bound_ms", lower_bound(p))
        if "makespan_ms" not in plan:
            plan["makespan_ms"] = max((w["start_ms"] + w["duration_ms"] for w in plan["waves"]),
                                      default=0.0)
        if p.device_memory_gb is not None:
            _check_baseline_memory(p, plan, method)
    if check:
        validate(p, plan)
    return plan
