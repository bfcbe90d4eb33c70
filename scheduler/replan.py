"""Re-planning a running job on the workload it measured.

The first plan is made before any data is seen, from each task's declared ``seq_lens`` and the
cost model's times. The executor counts the tokens each MetaOp's first layer actually receives
(``Executor.take_token_counts``: padded lengths where the model pads, packed rows where it
packs) and times its slices (``Executor.take_slice_times``). Every ``replan_every`` steps the
trainer asks :func:`reconsider` whether a plan made for the measured tokens, each MetaOp's
times scaled to its measured compute (:func:`calibrate`), beats the running one, and switches
to it (``scheduler.plan_switch``) when the planner's simulator predicts it faster, on that same
measured workload, by more than ``min_gain`` of the running plan's time, and when the time
saved over the next ``horizon_steps`` steps pays for moving the state
(``state_moves.move_ms``). The new plan is made twice, placed near the running plan's state
(the problem's ``held_state``) and without it, each renamed to move little
(``state_moves.relabel_for_state``); the one that runs and moves least over the horizon is
the candidate (``state_moves.plan_near``). The threshold keeps a job from paying a state move
for a gain inside the model's error, and from swinging between two plans of about equal time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from scheduler.plan import PlanMemoryError, Problem
from scheduler.state_moves import layer_holders, plan_near


@dataclass(frozen=True)
class Verdict:
    """What :func:`reconsider` found: ``plan`` to switch to, or None to keep the running one."""

    plan: dict | None
    current_ms: float  # the running plan's simulated iteration on the measured workload
    new_ms: float | None  # the new plan's (None: no plan could be made)
    reason: str
    move_ms: float | None = None  # the switch's state move, estimated (state_moves.move_ms)
    factors: Mapping[str, float] | None = None  # measured / modelled time per MetaOp (calibrate)

    def record(self) -> dict:
        """For a step's history (JSON-ready)."""
        return {"switched": self.plan is not None, "current_ms": self.current_ms,
                "new_ms": self.new_ms, "move_ms": self.move_ms, "reason": self.reason,
                "time_factors": dict(self.factors or {})}


def check_min_gain(min_gain: float) -> None:
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain < 1:
        raise ValueError(f"min_gain: expected a number in [0, 1), got {min_gain!r}")


def calibrate(problem: dict, times: Mapping[str, list[tuple[int, int, float]]]) -> dict[str, float]:
    """Scales, in place, each MetaOp's ``time_ms`` of ``problem`` (a problem dict) by its
    measured compute over the modelled: ``times`` ({metaop: [(devices, layers, ms)]}, one
    entry per slice, e.g. ``Executor.take_slice_times``) against ``time_ms[devices] *
    layers`` summed over the same slices (those on counts the table has). One factor per
    MetaOp keeps the model's shape across device counts and its monotonicity. Returns the
    factors."""
    factors = {}
    for m in problem["metaops"]:
        slices = [(str(n), layers, ms) for n, layers, ms in times.get(m["name"], ())
                  if str(n) in m["time_ms"]]
        modelled = sum(m["time_ms"][n] * layers for n, layers, _ in slices)
        measured = sum(ms for _, _, ms in slices)
        if modelled > 0 and measured > 0:
            factors[m["name"]] = f = measured / modelled
            m["time_ms"] = {n: t * f for n, t in m["time_ms"].items()}
    return factors


def reconsider(model, plan: dict, world: int, tokens: dict[str, float], *, method: str,
               times: Mapping[str, list[tuple[int, int, float]]] | None = None,
               min_gain: float = 0.05, horizon_steps: int = 1, cost=None,
               **problem_options) -> Verdict:
    """Plans ``model`` on ``world`` devices for the measured ``tokens`` ({metaop: tokens per
    sample}) with ``method`` and compares it with the running ``plan`` on that workload
    (``scheduler.simulate``), each MetaOp's times scaled to its measured ``times`` where given
    (:func:`calibrate`): a switch must save more than ``min_gain`` of an iteration and,
    over ``horizon_steps`` iterations, more than its state move (``state_moves.move_ms``). ``cost``
    and ``problem_options`` (memory, checkpointing, sharding) go to ``model.to_problem`` as
    for the first plan."""
    from scheduler.executor import make_plan
    from scheduler.simulate import simulate

    check_min_gain(min_gain)
    if isinstance(horizon_steps, bool) or not isinstance(horizon_steps, int) or horizon_steps < 1:
        raise ValueError(f"horizon_steps: expected an int >= 1, got {horizon_steps!r}")
    problem = model.to_problem(world, cost=cost, seq_lens=tokens, **problem_options)
    factors = calibrate(problem, times) if times else {}
    current = simulate(problem, plan).iteration_ms
    holders = layer_holders(Problem.from_dict(problem), plan)
    try:  # placed near the running plan's state or not, renamed: what moves and runs least
        new, new_ms, moving = plan_near(
            problem, holders, lambda pr: make_plan(model, world, method, problem=pr),
            horizon_steps=horizon_steps)
    except PlanMemoryError as e:
        return Verdict(None, current, None, f"no {method} plan fits memory: {e}", factors=factors)
    if not math.isfinite(new_ms) or new_ms >= (1.0 - min_gain) * current:
        return Verdict(None, current, new_ms,
                       f"the new {method} plan is not more than {min_gain:.0%} faster", moving, factors)
    saved = (current - new_ms) * horizon_steps
    if saved < moving:
        return Verdict(None, current, new_ms, f"the new {method} plan saves {saved:.4g} ms over "
                       f"{horizon_steps} steps, less than its state move ({moving:.4g} ms)", moving,
                       factors)
    return Verdict(new, current, new_ms, f"the new {method} plan is {1 - new_ms / current:.1%} faster",
                   moving, factors)
