"""`mtmm plan`: plan one training iteration.

    mtmm plan PROBLEM.json [--method M] [--backend cpp|python] [-o PLAN.json]
    mtmm plan --model NAME [--tasks K] [--gpus N] [--device A800|H100|H200] [--memory-gb GB]
              [--activation-checkpointing] [--shard-optimizer] [--method M] [-o PLAN.json]
              [--save-problem PROBLEM.json] [--tokens TOKENS.json]
    either form: [--near RUNNING_PLAN.json]

NAME: a zoo model (multitask-clip, ofasys, qwen-val), or a model `mtmm train` runs (a built-in
one such as tiny-clip, or your 'package.module:factory'): its plan, stamped with the model and
device count, runs with `mtmm train --model NAME --plan-file PLAN.json`. --tokens plans such a
model for measured tokens per sample ({"task/component": tokens}, e.g. the `tokens` of a
re-plan's record in `mtmm train --metrics-file` output) instead of its declared lengths.
--near makes the plan a job running RUNNING_PLAN.json would switch to, as a re-plan picks it
(state_moves.plan_near): placed near the devices that hold each layer's state (the problem's
held_state) or not, renamed to move the least, whichever runs and moves less; the move's
estimate is printed.
"""

from __future__ import annotations

import argparse
import json
import sys


def _summary(plan: dict, problem: dict | None = None) -> str:
    lines = [
        f"method       {plan['method']} ({plan.get('backend', 'python')})",
        f"makespan     {plan['makespan_ms']:.3f} ms",
    ]
    if "relaxed_ms" in plan:
        of = "" if plan.get("count_cap") is None else ", of the capped problem"
        lines.append(f"relaxed C*   {plan['relaxed_ms']:.3f} ms "
                     f"(makespan / relaxed = {plan['makespan_ms'] / plan['relaxed_ms']:.4f}{of})")
    lines.append(f"lower bound  {plan['lower_bound_ms']:.3f} ms")
    lines.append(f"planner      {plan['planner_ms']:.3f} ms")
    lines.append(f"waves        {len(plan['waves'])} "
                 f"({sum(len(w['slices']) for w in plan['waves'])} slices)")
    if plan.get("count_cap") is not None:
        caps = ", ".join(f"{c} {n}" for c, n in plan["count_cap"].items())
        lines.append(f"count caps   {caps} devices per slice (uncapped, the plan did not fit "
                     "memory)")
    if problem is not None and problem.get("device_memory_gb") is not None:
        from scheduler.plan import memory_summary

        lines.append(f"memory       {memory_summary(problem, plan)}")
    return "\n".join(lines)


def _model_problem(args: argparse.Namespace):
    """(problem, None) for a zoo model; (problem, the model) for one `mtmm train` runs, its
    memory as that run keeps it on GPUs (fp32 parameters and AdamW state, bf16 autocast)."""
    import torch

    from scheduler import costmodel, zoo

    preset = costmodel.PRESETS[args.device or "A800"].with_(island_size=min(8, args.gpus))
    if args.model in zoo.MODELS:
        if args.tokens is not None:
            raise ValueError("--tokens applies to a model `mtmm train` runs; a zoo model's lengths "
                             "are its tasks'")
        return zoo.build_problem(args.model, args.tasks, args.gpus, cost=preset,
                                 device_memory_gb=args.memory_gb,
                                 activation_checkpointing=args.activation_checkpointing,
                                 optimizer_sharding=args.shard_optimizer), None
    from scheduler.modelapi import analytic_cost
    from scheduler.tiny_models import MODELS, get_trainable_model
    from scheduler.user_code import is_spec

    if args.model not in MODELS and not is_spec(args.model):
        raise ValueError(f"--model: expected a zoo model {sorted(zoo.MODELS)}, a trainable one "
                         f"{sorted(MODELS)} or 'package.module:factory', got {args.model!r}")
    if args.tasks is not None:
        raise ValueError("--tasks applies to the zoo models; a trainable model plans every task")
    tokens = None
    if args.tokens is not None:
        with open(args.tokens) as f:
            tokens = json.load(f)
    model = get_trainable_model(args.model)
    problem = model.to_problem(args.gpus, island_size=min(8, args.gpus),
                               cost=analytic_cost(preset), device_memory_gb=args.memory_gb,
                               activation_checkpointing=args.activation_checkpointing,
                               shard_optimizer=args.shard_optimizer,
                               activation_dtype=torch.bfloat16, seq_lens=tokens)
    return problem, model


def _memory_hint(error: Exception, args: argparse.Namespace) -> str:
    """Where a method without mtmm's memory fallback refused for memory, how to try it."""
    from scheduler.count_caps import WHAT_IT_DOES
    from scheduler.plan import PlanMemoryError

    if not isinstance(error, PlanMemoryError):
        return ""
    if args.method != "mtmm":
        how = "--method mtmm"
    elif args.memory_fallback is False:
        how = "mtmm without --no-memory-fallback"
    else:  # the fallback itself refused
        return ""
    return f"; {how} {WHAT_IT_DOES}"


def _near(problem: dict, running_path: str) -> dict:
    """Where a job running the plan at ``running_path`` keeps each layer of ``problem``."""
    from scheduler.plan import Problem
    from scheduler.state_moves import layer_holders

    with open(running_path) as f:
        running = json.load(f)
    if not isinstance(running, dict) or not isinstance(running.get("waves"), list):
        raise ValueError(f"--near: {running_path} is not a plan (no waves)")
    try:
        holders = layer_holders(Problem.from_dict(problem), running)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--near: {running_path} is not a plan of this problem: {e}") from e
    return holders


def run(args: argparse.Namespace) -> int:
    from scheduler.planner import plan_problem

    if (args.problem is None) == (args.model is None):
        print("mtmm plan: give PROBLEM.json or --model NAME (not both)", file=sys.stderr)
        return 2
    try:
        trainable = None
        if args.model is not None:
            if args.memory_gb is not None and not args.memory_gb > 0:
                raise ValueError(f"--memory-gb: expected a positive number, got {args.memory_gb}")
            if args.gpus < 1:
                raise ValueError(f"--gpus: expected a positive int, got {args.gpus}")
            problem, trainable = _model_problem(args)
        elif (args.memory_gb is not None or args.activation_checkpointing or args.shard_optimizer
              or args.device is not None or args.tokens is not None):
            raise ValueError("--device, --memory-gb, --activation-checkpointing, --shard-optimizer "
                             "and --tokens apply to --model; a problem file sets its "
                             "times, device_memory_gb, activation_gb and "
                             "optimizer_shard_fraction itself")
        else:
            with open(args.problem) as f:
                problem = json.load(f)
        holders = None if args.near is None else _near(problem, args.near)
        options = {k: getattr(args, k) for k in ("overlap_levels", "portfolio", "memory_fallback")
                   if getattr(args, k) is not None}
        if trainable is None:
            def plan_for(pr):
                return plan_problem(pr, method=args.method, backend=args.backend, **options)
        else:  # stamped with the model and device count, which the executor checks
            from scheduler.executor import make_plan

            def plan_for(pr):
                return make_plan(trainable, args.gpus, args.method, problem=pr,
                                 backend=args.backend, options=options)
        if holders is None:
            plan = plan_for(problem)
        else:
            from scheduler.state_moves import held_state, plan_near

            plan, _, moving = plan_near(problem, holders, plan_for)
            problem = dict(problem, held_state=held_state(holders, problem))  # as saved
    except (OSError, json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
        print(f"mtmm plan: {e}{_memory_hint(e, args)}", file=sys.stderr)
        return 1
    print(_summary(plan, problem))
    if holders is not None:
        print(f"state move   {moving:.3f} ms from {args.near} (simulated cluster)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(plan, f, indent=1)
    if args.save_problem:
        with open(args.save_problem, "w") as f:
            json.dump(problem, f, indent=1)
    if args.gantt or args.trace:  # pictures of the simulated iteration (scheduler/viz.py)
        from scheduler import viz
        from scheduler.simulate import simulate

        sim = simulate(problem, plan)
        if args.gantt:
            viz.save_gantt(problem, plan, args.gantt, sim=sim)
        if args.trace:
            viz.save_trace(problem, plan, args.trace, sim=sim)
    return 0


def costmodel_presets() -> tuple[str, ...]:
    from scheduler.costmodel import PRESETS

    return tuple(PRESETS)


def add_parser(sub) -> None:
    from scheduler.planner import BACKENDS, METHODS

    p = sub.add_parser("plan", help="plan one training iteration (Spindle / mtmm / baselines)")
    p.add_argument("problem", nargs="?", help="problem JSON (docs/formats.md)")
    p.add_argument("--model",
                   help="a model instead of a file: a zoo model (multitask-clip, ofasys, "
                        "qwen-val), or one `mtmm train` runs (tiny-clip, tiny-val, or "
                        "'package.module:factory')")
    p.add_argument("--device", choices=sorted(costmodel_presets()), default=None,
                   help="--model: the GPU whose analytic cost model times the layers "
                        "(default A800, the paper's)")
    p.add_argument("--tasks", type=int, default=None, help="tasks of the zoo model")
    p.add_argument("--gpus", type=int, default=8, help="--model: devices (default 8)")
    p.add_argument("--memory-gb", type=float, default=None, metavar="GB",
                   help="--model: each device's memory (default: unlimited)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="--model: layers keep only their inputs and are recomputed in the "
                        "backward (less activation memory, a third more layer compute)")
    p.add_argument("--shard-optimizer", action="store_true",
                   help="--model: Adam's state of a layer split among the devices that "
                        "hold it (ZeRO-1)")
    p.add_argument("--method", choices=METHODS, default="spindle")
    p.add_argument("--backend", choices=BACKENDS, default="cpp")
    p.add_argument("--overlap-levels", dest="overlap_levels", action=argparse.BooleanOptionalAction,
                   default=None, help="override the method's default (spindle/mtmm only)")
    p.add_argument("--portfolio", action=argparse.BooleanOptionalAction, default=None,
                   help="mtmm: plan every variant and keep the best (default on)")
    p.add_argument("--memory-fallback", dest="memory_fallback",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="mtmm: when the plan does not fit memory, plan again with components' "
                        "device counts capped and keep the fastest plan that fits (default on; "
                        "docs/planner.md, section 7)")
    p.add_argument("--tokens", metavar="TOKENS.json",
                   help="--model (one `mtmm train` runs): plan for these tokens per sample "
                        "({\"task/component\": tokens}, as a re-plan records them) instead of "
                        "the declared lengths")
    p.add_argument("--near", metavar="RUNNING_PLAN.json",
                   help="plan for a job running this plan, as a re-plan picks it (placed near "
                        "the devices holding each layer or not, renamed to move the least); "
                        "prints the state move's estimate")
    p.add_argument("-o", "--output", help="write the plan JSON here")
    p.add_argument("--save-problem", metavar="PATH",
                   help="write the problem JSON here (with --model: what was planned; "
                        "`mtmm simulate PATH PLAN.json` prices the plan on a cluster)")
    p.add_argument("--gantt", help="write a Gantt chart of the simulated plan (PNG)")
    p.add_argument("--trace", help="write a Chrome/Perfetto trace of the simulated plan (JSON)")
    p.set_defaults(func=run)
