"""mtmm planner: MetaOps, allocation, wavefront scheduling, placement, simulation, runtime."""

# The planner API, imported lazily so `import scheduler` stays cheap (no C++ core load).
_LAZY = {
    "plan_problem": "scheduler.planner",
    "validate": "scheduler.plan",
    "lower_bound": "scheduler.plan",
    "Problem": "scheduler.plan",
    "PlanError": "scheduler.plan",
    "PlanMemoryError": "scheduler.plan",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
