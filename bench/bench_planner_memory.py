"""Plans under a device memory limit: how often spindle, mtmm without its memory fallback and
mtmm refuse, and what the fallback's plans cost (CPU, no timing: plan quality only).

Random problems: ``scheduler.random_problem(..., memory=True)`` (memory about 3x what a plan
needs at least, ignoring parameter replication), then the same problems at half that memory,
and at half with 3/4 of every ``param_gb`` optimizer state sharded among the layer's holders.
QWen-VAL (3 tasks, 64 devices, checkpointed activations, sharded optimizer state) at 80, 40,
32, 24 and 16 GB per device. For each plan: refused or makespan, and the makespan over the
same problem's mtmm plan without a memory limit.

    python bench/bench_planner_memory.py [--json OUT.json] [--problems 200]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from scheduler import count_caps
from scheduler.plan import PlanMemoryError, Problem
from scheduler.planner import check_memory, plan_problem
from scheduler.random_problem import random_problem
from scheduler.simulate import simulate

METHODS = {"spindle": ("spindle", {}), "mtmm, no fallback": ("mtmm", {"memory_fallback": False}),
           "mtmm, one cap for all": ("mtmm", {}), "mtmm": ("mtmm", {})}


def _makespan_of(name: str, problem) -> tuple[float | None, dict | None, float]:
    """``name``'s makespan; "one cap for all" is the fallback without its per-component sweeps
    (an ablation: count_caps.MAX_REFINE_PLANS set to 0 for the call)."""
    method, options = METHODS[name]
    if not name.endswith("one cap for all"):
        return _makespan(problem, method, options)
    saved, count_caps.MAX_REFINE_PLANS = count_caps.MAX_REFINE_PLANS, 0
    try:
        return _makespan(problem, method, options)
    finally:
        count_caps.MAX_REFINE_PLANS = saved


def _makespan(problem, method: str, options: dict) -> tuple[float | None, dict | None, float]:
    """(makespan ms, count_cap, planner ms); (None, None, ms) when refused for memory."""
    plan, ms = _plan(problem, method, options)
    return (None, None, ms) if plan is None else (plan["makespan_ms"], plan["count_cap"], ms)


def _plan(problem, method: str, options: dict) -> tuple[dict | None, float]:
    t0 = time.perf_counter()
    try:
        plan = plan_problem(problem, method, **options)
    except PlanMemoryError:
        return None, (time.perf_counter() - t0) * 1e3
    return plan, plan["planner_ms"]


def random_rows(n_problems: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    problems = []
    for _ in range(n_problems):
        d = random_problem(rng, rng.randint(2, 20), rng.choice([4, 8, 16, 32]), memory=True)
        problems.append(d)
    rows = []
    # the last: 3/4 of every param_gb optimizer state sharded among each layer's holders
    for scale, shard in ((1.0, 0.0), (0.5, 0.0), (0.5, 0.75)):
        stats = {name: {"refused": 0, "ratios": [], "capped": 0} for name in METHODS}
        considered = 0
        for d in problems:
            d = dict(d, device_memory_gb=d["device_memory_gb"] * scale,
                     optimizer_shard_fraction=shard)
            try:
                check_memory(Problem.from_dict(d))
            except PlanMemoryError:
                continue  # cannot fit under any plan: no planner can do better than refuse
            free = plan_problem(dict(d, device_memory_gb=None), "mtmm")["makespan_ms"]
            considered += 1
            for name in METHODS:
                ms, cap, _ = _makespan_of(name, d)
                s = stats[name]
                if ms is None:
                    s["refused"] += 1
                else:
                    s["ratios"].append(ms / free)
                    s["capped"] += cap is not None
        for name, s in stats.items():
            rows.append({
                "memory": f"{scale:g}x" + (f", sharded {shard:g}" if shard else ""),
                "method": name, "problems": considered,
                "refused": s["refused"], "refused_pct": 100.0 * s["refused"] / considered,
                "capped": s["capped"],
                "median_over_unlimited": statistics.median(s["ratios"]) if s["ratios"] else None,
            })
    return rows


def qwen_rows() -> list[dict]:
    from scheduler import zoo

    free = plan_problem(zoo.build_problem("qwen-val", 3, 64), "mtmm")["makespan_ms"]
    rows = []
    for gb in (80.0, 40.0, 32.0, 24.0, 16.0):
        d = zoo.build_problem("qwen-val", 3, 64, device_memory_gb=gb,
                              activation_checkpointing=True, optimizer_sharding=True)
        for name in METHODS:
            ms, cap, planner_ms = _makespan_of(name, d)
            sim = None
            if ms is not None:  # the plan priced with its transfers and gradient syncs
                plan = plan_problem(count_caps.count_capped(Problem.from_dict(d), cap or {}),
                                    METHODS[name][0], memory_fallback=False)
                assert plan["makespan_ms"] == ms
                sim = simulate(d, plan).iteration_ms
            rows.append({"memory_gb": gb, "method": name, "makespan_ms": ms, "count_cap": cap,
                         "over_unlimited": None if ms is None else ms / free,
                         "simulated_ms": sim, "planner_ms": planner_ms})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--problems", type=int, default=200, help="random problems (default 200)")
    args = ap.parse_args(argv)
    rand, qwen = random_rows(args.problems), qwen_rows()
    print("| memory | method | problems | refused | capped plans | median makespan / unlimited |")
    print("|---|---|---|---|---|---|")
    for r in rand:
        med = "-" if r["median_over_unlimited"] is None else f"{r['median_over_unlimited']:.3f}"
        print(f"| {r['memory']} | {r['method']} | {r['problems']} | {r['refused']} "
              f"({r['refused_pct']:.0f}%) | {r['capped']} | {med} |")
    print("\n| QWen-VAL, 64 devices, GB | method | makespan ms | count caps | / unlimited | "
          "simulated iteration ms | planner ms (C++) |")
    print("|---|---|---|---|---|---|---|")
    for r in qwen:
        ms = "refused" if r["makespan_ms"] is None else f"{r['makespan_ms']:.1f}"
        ratio = "-" if r["over_unlimited"] is None else f"{r['over_unlimited']:.3f}"
        caps = ", ".join(f"{c} {n}" for c, n in (r["count_cap"] or {}).items()) or "-"
        sim = "-" if r["simulated_ms"] is None else f"{r['simulated_ms']:.1f}"
        print(f"| {r['memory_gb']:g} | {r['method']} | {ms} | {caps} | {ratio} | {sim} | "
              f"{r['planner_ms']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"random": rand, "qwen_val": qwen}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
