"""The paper's evaluation reproduced on the simulator, plus the studies that go beyond it.

* ``run_grid``: every (model, tasks, gpus) of ``zoo.paper_grid()`` x every method, planned by
  ``planner.plan_problem`` and priced by ``simulate.simulate``; speed-up over ``sequential``
  with the published figure alongside where the paper gives one.
* ``placement_study``: inter-wave transfer time of the spindle and mtmm plans as placed, and
  with a placement that ignores flows (each wave's groups laid on consecutive devices in MetaOp
  name order).
* ``wave_rule_study``: why spindle falls short of its published speed-ups: its plans against its
  levels' relaxed optimum C* (the paper reports within 7%), with the paper's wave-length rule
  and with mtmm's least-idle rule, all else equal.
* ``dynamic_study``: a plan made once for the nominal task mix, replayed on 1,000 iterations of
  a changing workload, against re-planning every iteration with the planning time counted.
* ``check_targets``: the issue's targets, measured.
"""

from __future__ import annotations

import math
import random
import time
from typing import Iterable

from .checks import check_positive_int

__all__ = ["METHODS", "PUBLISHED", "published_speedup", "run_grid", "placement_study",
           "unplaced", "wave_rule_study", "dynamic_study", "check_targets", "format_markdown"]

METHODS = ("sequential", "distmm", "optimus", "uniform", "spindle", "mtmm")

# Published speed-ups over DeepSpeed (task-sequential), keyed by (model, gpus); tasks where the
# paper's figure is for one task count only (DESIGN.md, "Published results").
PUBLISHED: dict[tuple[str, int], dict] = {
    ("multitask-clip", 32): {"tasks": 10, "spindle": 1.71, "optimus": 1.38, "distmm": 1.14,
                             "sequential": 1.0},
    ("qwen-val", 32): {"tasks": None, "spindle": 1.16},
    ("qwen-val", 64): {"tasks": None, "spindle": 1.63, "optimus": 1.44},
}


def published_speedup(model: str, tasks: int, gpus: int, method: str) -> float | None:
    entry = PUBLISHED.get((model, gpus))
    if entry is None or (entry["tasks"] is not None and entry["tasks"] != tasks):
        return None
    return entry.get(method)


def _progress(items, total: int, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # the GPU machine may lack tqdm; run without a bar
        return items
    return tqdm(items, total=total, desc=desc, leave=False)


def _plan(problem, method: str, **options) -> dict:
    from scheduler.planner import plan_problem

    return plan_problem(problem, method=method, **options)


# --- the grid -----------------------------------------------------------------------------------

def run_grid(grid: Iterable[tuple[str, int, int]] | None = None, methods=METHODS, cluster=None,
             progress: bool = False) -> list[dict]:
    """Plan and simulate every grid point with every method; one row per (point, method)."""
    from scheduler import zoo
    from scheduler.simulate import simulate

    grid = list(zoo.paper_grid() if grid is None else grid)
    rows = []
    jobs = [(g, m) for g in grid for m in methods]
    base: dict[tuple, float] = {}
    problems: dict[tuple, object] = {}
    for (model, tasks, gpus), method in _progress(jobs, len(jobs), "paper grid", progress):
        key = (model, tasks, gpus)
        if key not in problems:
            problems[key] = zoo.build_problem(model, tasks, gpus)
        problem = problems[key]
        plan = _plan(problem, method)
        sim = simulate(problem, plan, cluster)
        rows.append({"model": model, "tasks": tasks, "gpus": gpus, "method": method,
                     "iteration_ms": sim.iteration_ms, "speedup": None,
                     "published": published_speedup(model, tasks, gpus, method),
                     "compute_ms": sim.compute_ms, "transfer_ms": sim.transfer_ms,
                     "sync_ms": sim.sync_ms, "transfer_fraction": sim.transfer_fraction,
                     "makespan_ms": plan.get("makespan_ms"), "relaxed_ms": plan.get("relaxed_ms"),
                     "planner_ms": plan.get("planner_ms")})
        if method == "sequential":
            base[key] = (sim.iteration_ms, sim.compute_ms)
    for r in rows:
        b = base.get((r["model"], r["tasks"], r["gpus"]))
        r["speedup"] = b[0] / r["iteration_ms"] if b and r["iteration_ms"] > 0 else None
        # The same ratio of compute alone: what communication takes away from the speed-up.
        r["compute_speedup"] = b[1] / r["compute_ms"] if b and r["compute_ms"] > 0 else None
        # How far the plan is above the relaxed optimum of its levels (spindle and mtmm).
        relaxed = r.get("relaxed_ms")
        r["over_cstar"] = r["makespan_ms"] / relaxed if relaxed else None
    return rows


# --- placement on / off -------------------------------------------------------------------------

def unplaced(plan: dict, how: str = "ordered", seed: int = 0,
             num_devices: int | None = None) -> dict:
    """The same waves and group sizes with a placement that ignores flows and shared parameters.

    ``how="ordered"``: each wave's slices, in MetaOp name order, get consecutive device ids from
    0 (what a wave scheduler without a placement step would do; groups stay inside nodes as far
    as their sizes allow). ``how="random"``: each wave's slices take consecutive chunks of a
    random permutation of the devices (any free devices, seeded).
    """
    if how not in ("ordered", "random"):
        raise ValueError(f"how must be 'ordered' or 'random', got {how!r}")
    rng = random.Random(seed)
    num = num_devices or 1 + max((d for w in plan["waves"] for s in w["slices"]
                                  for d in s["devices"]), default=0)
    waves = []
    for wave in plan["waves"]:
        ids = list(range(num))
        if how == "random":
            rng.shuffle(ids)
        nxt, slices = 0, []
        for s in sorted(wave["slices"], key=lambda s: s["metaop"]):
            n = len(s["devices"])
            slices.append({**s, "devices": sorted(ids[nxt:nxt + n])})
            nxt += n
        waves.append({**wave, "slices": slices})
    return {**plan, "waves": waves, "placement": how}


def placement_study(grid=None, methods=("spindle", "mtmm"), cluster=None,
                    progress: bool = False) -> list[dict]:
    """Transfer time and share of the iteration with the planner's placement and without it."""
    from scheduler import zoo
    from scheduler.simulate import simulate

    grid = list(zoo.paper_grid() if grid is None else grid)
    jobs = [(g, m) for g in grid for m in methods]
    rows, problems = [], {}
    for (model, tasks, gpus), method in _progress(jobs, len(jobs), "placement", progress):
        key = (model, tasks, gpus)
        if key not in problems:
            problems[key] = zoo.build_problem(model, tasks, gpus)
        plan = _plan(problems[key], method)
        placed = simulate(problems[key], plan, cluster)
        naive = simulate(problems[key], unplaced(plan), cluster)
        scattered = simulate(problems[key], unplaced(plan, "random", num_devices=gpus), cluster)
        rows.append({"model": model, "tasks": tasks, "gpus": gpus, "method": method,
                     "placed_transfer_ms": placed.transfer_ms,
                     "placed_fraction": placed.transfer_fraction,
                     "unplaced_transfer_ms": naive.transfer_ms,
                     "unplaced_fraction": naive.transfer_fraction,
                     "ratio": (naive.transfer_ms / placed.transfer_ms
                               if placed.transfer_ms > 0 else None),
                     "random_transfer_ms": scattered.transfer_ms,
                     "random_fraction": scattered.transfer_fraction,
                     "placed_iteration_ms": placed.iteration_ms,
                     "unplaced_iteration_ms": naive.iteration_ms})
    return rows


# --- the wave-length rule ---------------------------------------------------------------------

def wave_rule_study(grid=None, cluster=None, progress: bool = False) -> list[dict]:
    """Spindle's plans against the relaxed optimum C* of their MetaLevels, with two wave rules.

    ``paper``: the rule DESIGN.md gives (a wave ends when its shortest tuple ends; a group
    whose next layer does not fit in that time sits the wave out). ``least_idle``: the same
    algorithm with mtmm's wave length (docs/planner.md, section 4), nothing else changed.
    The paper reports Spindle's plans within 7% of C*; ``cstar_speedup`` is sequential's
    makespan over C*, the compute-only speed-up of a plan exactly at the relaxed optimum.
    """
    from scheduler import zoo
    from scheduler.planner import plan_problem
    from scheduler.simulate import simulate

    grid = list(zoo.paper_grid() if grid is None else grid)
    rows = []
    for model, tasks, gpus in _progress(grid, len(grid), "wave rule", progress):
        problem = zoo.build_problem(model, tasks, gpus)
        seq_plan = plan_problem(problem, "sequential")
        seq = simulate(problem, seq_plan, cluster).iteration_ms
        row = {"model": model, "tasks": tasks, "gpus": gpus, "sequential_ms": seq}
        for rule, least_idle in (("paper", False), ("least_idle", True)):
            plan = plan_problem(problem, "spindle", least_idle=least_idle)
            sim = simulate(problem, plan, cluster)
            row[rule] = {"makespan_ms": plan["makespan_ms"],
                         "over_cstar": plan["makespan_ms"] / plan["relaxed_ms"],
                         "iteration_ms": sim.iteration_ms, "speedup": seq / sim.iteration_ms,
                         "compute_speedup": seq_plan["makespan_ms"] / plan["makespan_ms"]}
            row["relaxed_ms"] = plan["relaxed_ms"]
        row["cstar_speedup"] = seq_plan["makespan_ms"] / row["relaxed_ms"]
        row["published"] = published_speedup(model, tasks, gpus, "spindle")
        rows.append(row)
    return rows


# --- dynamic data -------------------------------------------------------------------------------

def dynamic_study(iterations: int = 1000, config=None, method: str = "mtmm", cluster=None,
                  progress: bool = False, held_aware: bool = True) -> dict:
    """A plan made once (the paper) vs re-planning every iteration, over a changing workload.

    The fixed plan is made for the nominal problem (every task, nominal lengths) and replayed
    on each iteration's data (slices of absent tasks leave their devices idle). Both
    re-planning runs plan every iteration and pay its measured planning wall time on top of
    the simulated time, and pay the state move of every switch (``state_moves.move_between``: new
    holders receive a layer's weights and optimizer state; an absent task's layers stay where
    they were until a plan needs them elsewhere). With ``held_aware`` each run plans with
    its own held state (the problem's ``held_state``: placement prefers the devices that hold
    a layer), and each new plan's devices are renamed to move the least
    (``state_moves.relabel_for_state``):

    - ``replan``: runs each iteration's own plan (switches every time the holders change);
    - ``paying``: keeps its plan unless the new one saves more than its move on this
      iteration's data (or the kept plan lacks a task that joined), as the runtime's
      ``replan.reconsider`` decides with a horizon of one step.

    Throughput is iterations per second of the total; all runs see identical data.
    """
    from scheduler.plan import Problem
    from scheduler.state_moves import held_state, layer_holders, move_between, relabel_for_state
    from scheduler.simulate import simulate
    from scheduler.workload import Workload, WorkloadConfig

    check_positive_int("iterations", iterations)
    workload = Workload(config or WorkloadConfig())
    nominal_dict = workload.nominal_problem()
    nominal = Problem.from_dict(nominal_dict)  # every MetaOp: the index of the holders
    fixed_plan = _plan(nominal_dict, method)
    fixed_ms = replan_ms = planning_ms = move_ms = paying_ms = paying_move_ms = 0.0
    switches = 0
    held = layer_holders(nominal, fixed_plan)  # where each layer's state is, re-planning every time
    kept, kept_held = fixed_plan, dict(held)  # the paying run's plan and state
    active = []

    def plan_for(problem: dict, holders) -> tuple[dict, float]:
        """A plan for this iteration, placed near ``holders`` when held-aware; its wall ms."""
        t0 = time.perf_counter()
        if held_aware:
            problem = dict(problem, held_state=held_state(holders, problem))
        plan = _plan(problem, method)
        return plan, (time.perf_counter() - t0) * 1e3

    for _ in _progress(range(iterations), iterations, "dynamic", progress):
        spec = workload.next_spec()
        active.append(len(spec.tasks))
        problem = workload._problem(spec)
        fixed_ms += simulate(problem, fixed_plan, cluster, strict=False).iteration_ms
        plan, planned = plan_for(problem, held)
        new_ms = simulate(problem, plan, cluster).iteration_ms
        # renamed to keep the most state in place (the same plan and times); the renaming's
        # wall time counts as planning
        t0 = time.perf_counter()
        now = layer_holders(nominal, relabel_for_state(nominal, plan, held, cluster))
        renaming = (time.perf_counter() - t0) * 1e3
        planning_ms += planned + renaming
        moved = move_between(nominal, held, now, cluster)
        held.update(now)
        move_ms += moved
        replan_ms += new_ms + planned + renaming + moved
        # the paying run
        present = {m["name"] for m in problem["metaops"]}
        covers = present <= {s["metaop"] for w in kept["waves"] for s in w["slices"]}
        kept_ms = simulate(problem, kept, cluster, strict=False).iteration_ms if covers else math.inf
        if held_aware:  # its own plan, placed near its own state
            plan, planned = plan_for(problem, kept_held)
            new_ms = simulate(problem, plan, cluster).iteration_ms
        t0 = time.perf_counter()
        renamed = relabel_for_state(nominal, plan, kept_held, cluster)
        planned += (time.perf_counter() - t0) * 1e3
        now = layer_holders(nominal, renamed)
        moving = move_between(nominal, kept_held, now, cluster)
        if kept_ms - new_ms > moving:
            kept, switches = renamed, switches + 1
            kept_held.update(now)
            paying_move_ms += moving
            paying_ms += new_ms + planned + moving
        else:
            paying_ms += kept_ms + planned
    c = workload.config
    return {"model": c.model, "tasks": len(workload.spec.tasks), "gpus": c.gpus, "method": method,
            "iterations": iterations, "held_aware": held_aware, "fixed_total_ms": fixed_ms,
            "replan_total_ms": replan_ms,
            "planning_total_ms": planning_ms, "planning_mean_ms": planning_ms / iterations,
            "move_total_ms": move_ms, "move_mean_ms": move_ms / iterations,
            "fixed_mean_ms": fixed_ms / iterations, "replan_mean_ms": replan_ms / iterations,
            "throughput_gain": fixed_ms / replan_ms - 1.0,
            "gain_without_moves": fixed_ms / (replan_ms - move_ms) - 1.0,
            "paying_total_ms": paying_ms, "paying_mean_ms": paying_ms / iterations,
            "paying_gain": fixed_ms / paying_ms - 1.0, "paying_switches": switches,
            "paying_move_total_ms": paying_move_ms,
            "mean_active_tasks": sum(active) / len(active), "config": vars(c).copy()}


# --- targets and report -------------------------------------------------------------------------

def check_targets(rows: list[dict], placement: list[dict] | None = None,
                  dynamic: dict | None = None) -> list[dict]:
    """The issue's targets, each {"target", "holds", "detail"}."""
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_point.setdefault((r["model"], r["tasks"], r["gpus"]), {})[r["method"]] = r
    out = []
    bad = []
    for key, m in by_point.items():
        chain = [m[k]["iteration_ms"] for k in ("spindle", "optimus", "distmm", "sequential")
                 if k in m]
        if len(chain) == 4 and not all(a < b for a, b in zip(chain, chain[1:])):
            bad.append("/".join(map(str, key)))
    if by_point:
        out.append({"target": "spindle > optimus > distmm > sequential on every configuration",
                    "holds": not bad, "detail": f"violated on {', '.join(bad)}" if bad else
                    f"holds on all {len(by_point)} configurations"})
    for model, gpus, pub in (("multitask-clip", 32, 1.71), ("qwen-val", 64, 1.63)):
        hits = [r for r in rows if r["model"] == model and r["gpus"] == gpus
                and r["method"] == "spindle" and r.get("published") is not None]
        if hits:
            s = hits[0]["speedup"]
            out.append({"target": f"spindle speed-up {model} {gpus} GPUs within 15% of {pub}x",
                        "holds": abs(s / pub - 1) <= 0.15,
                        "detail": f"{s:.2f}x ({100 * (s / pub - 1):+.0f}%)"})
    pairs = [(m["mtmm"]["iteration_ms"], m["spindle"]["iteration_ms"], k)
             for k, m in by_point.items() if "mtmm" in m and "spindle" in m]
    if pairs:
        wins = sum(a < b * (1 - 1e-9) for a, b, _ in pairs)
        worst = max(a / b - 1 for a, b, _ in pairs)
        out.append({"target": "mtmm beats spindle on >= half the grid, never > 1% worse",
                    "holds": wins * 2 >= len(pairs) and worst <= 0.01,
                    "detail": f"faster on {wins}/{len(pairs)}; worst {100 * worst:+.2f}%"})
    if placement:
        worst_frac = max(p["placed_fraction"] for p in placement)
        ratios = [p["ratio"] for p in placement if p["ratio"] is not None]
        detail = f"max {100 * worst_frac:.1f}% of the iteration with placement"
        if ratios:
            detail += f"; without placement (ordered) {min(ratios):.1f}x-{max(ratios):.1f}x more"
        rnd = [p["random_transfer_ms"] / p["placed_transfer_ms"] for p in placement
               if p["placed_transfer_ms"] > 0 and "random_transfer_ms" in p]
        if rnd:
            detail += f", (random) {min(rnd):.1f}x-{max(rnd):.1f}x"
        out.append({"target": "transfers <= 6% of the iteration with placement, 3-6x more without",
                    "holds": worst_frac <= 0.06 and bool(ratios) and min(ratios) >= 3,
                    "detail": detail})
    if dynamic:
        g = dynamic["throughput_gain"]
        out.append({"target": "re-planning every iteration >= 10% higher throughput",
                    "holds": g >= 0.10,
                    "detail": f"{100 * g:+.1f}% over {dynamic['iterations']} iterations, "
                              f"planning {dynamic['planning_mean_ms']:.2f} ms/iteration, state "
                              f"moves {dynamic['move_mean_ms']:.1f} ms/iteration "
                              f"({100 * dynamic['gain_without_moves']:+.1f}% without them; "
                              f"switching only when it pays: {100 * dynamic['paying_gain']:+.1f}%)"})
    return out


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def format_markdown(rows: list[dict], placement=None, dynamic=None, targets=None,
                    wave_rule=None) -> str:
    lines = ["| model | tasks | GPUs | method | iteration ms | speed-up | published | transfers % "
             "| sync % | compute-only speed-up | plan / C* |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        it = r["iteration_ms"]
        lines.append(f"| {r['model']} | {r['tasks']} | {r['gpus']} | {r['method']} | {it:.1f} "
                     f"| {_f(r['speedup'], '.2f')}x | {_f(r.get('published'), '.2f')} "
                     f"| {100 * r['transfer_ms'] / it:.1f} | {100 * r['sync_ms'] / it:.1f} "
                     f"| {_f(r.get('compute_speedup'), '.2f')}x | {_f(r.get('over_cstar'), '.3f')} |")
    if wave_rule:
        lines += ["", "Spindle's plans against the relaxed optimum C* of their levels (the paper "
                      "reports within 7%), with the paper's wave-length rule and with mtmm's "
                      "least-idle rule, nothing else changed. C* speed-up: sequential's makespan "
                      "over C*, the compute-only speed-up of a plan exactly at C*. Cells: plan / "
                      "C*, compute-only speed-up, simulated speed-up.", "",
                  "| model | tasks | GPUs | C* speed-up | paper rule | least-idle rule "
                  "| published |", "|---|---|---|---|---|---|---|"]
        for w in wave_rule:
            cells = [f"{w[k]['over_cstar']:.3f}, {w[k]['compute_speedup']:.2f}x, "
                     f"{w[k]['speedup']:.2f}x" for k in ("paper", "least_idle")]
            lines.append(f"| {w['model']} | {w['tasks']} | {w['gpus']} "
                         f"| {w['cstar_speedup']:.2f}x | {cells[0]} | {cells[1]} "
                         f"| {_f(w.get('published'), '.2f')} |")
    if placement:
        lines += ["", "Inter-wave transfers with the planner's placement and without it (ordered: "
                      "each wave's groups on consecutive devices in MetaOp name order; random: on "
                      "a random permutation; ratio = ordered / placed):", "",
                  "| model | tasks | GPUs | method | placed ms | placed % | ordered ms | ordered % "
                  "| ratio | random ms | random % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in placement:
            lines.append(f"| {p['model']} | {p['tasks']} | {p['gpus']} | {p['method']} "
                         f"| {p['placed_transfer_ms']:.2f} | {100 * p['placed_fraction']:.2f} "
                         f"| {p['unplaced_transfer_ms']:.2f} | {100 * p['unplaced_fraction']:.2f} "
                         f"| {_f(p['ratio'], '.1f')} | {p['random_transfer_ms']:.2f} "
                         f"| {100 * p['random_fraction']:.2f} |")
    if dynamic:
        d = dynamic
        lines += ["", f"Dynamic workload ({d['model']}, {d['tasks']} tasks, {d['gpus']} GPUs, "
                      f"{d['iterations']} iterations, method {d['method']}, placed "
                      f"{'near' if d.get('held_aware', True) else 'without'} the held state, mean "
                      f"{d['mean_active_tasks']:.1f} active tasks): fixed plan "
                      f"{d['fixed_mean_ms']:.1f} "
                      f"ms/iteration, re-planned {d['replan_mean_ms']:.1f} ms/iteration including "
                      f"{d['planning_mean_ms']:.2f} ms of planning and {d['move_mean_ms']:.1f} ms "
                      f"of state moves; throughput {100 * d['throughput_gain']:+.1f}% "
                      f"({100 * d['gain_without_moves']:+.1f}% without the moves). Switching "
                      f"only when the new plan saves more than its move: "
                      f"{d['paying_mean_ms']:.1f} ms/iteration, {d['paying_switches']} switches, "
                      f"throughput {100 * d['paying_gain']:+.1f}%."]
    if targets:
        lines += ["", "| target | holds | measured |", "|---|---|---|"]
        lines += [f"| {t['target']} | {'yes' if t['holds'] else 'NO'} | {t['detail']} |"
                  for t in targets]
    return "\n".join(lines) + "\n"
