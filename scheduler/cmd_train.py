"""`mtmm train`: train a built-in multi-task multi-modal model with a plan, on every local
device (one gloo process per requested CPU rank, one NCCL process per GPU) or under torchrun."""

from __future__ import annotations

import argparse
import json
import os


def config_from_args(args: argparse.Namespace):
    """The TrainConfig that ``args`` ask for (the plan file read, not yet checked)."""
    from scheduler.trainer import TrainConfig

    plan = None
    if args.plan_file:
        with open(args.plan_file) as f:
            plan = json.load(f)
    return TrainConfig(
        model=args.model, data=args.data, tasks_per_step=args.tasks_per_step, steps=args.steps, method=args.plan, plan=plan,
        memory_gb=args.memory_gb,
        cost=args.cost, seed=args.seed, precision=args.precision, init_loss_scale=args.init_loss_scale,
        lr=args.lr, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        min_lr=args.min_lr, weight_decay=args.weight_decay, decay_all=args.decay_all,
        clip=None if args.clip == 0 else args.clip, grad_accum=args.grad_accum,
        activation_checkpointing=args.activation_checkpointing, compile=args.compile,
        eval_every=args.eval_every, eval_batches=args.eval_batches,
        shard_optimizer=args.shard_optimizer, replan_every=args.replan_every,
        replan_min_gain=args.replan_min_gain, replan_calibrate=not args.replan_model_times,
        profile_dir=args.profile, profile_steps=args.profile_steps,
        checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume,
        progress=not args.no_progress, log_every=args.log_every, metrics_file=args.metrics_file,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from scheduler import launch
    from scheduler.tiny_models import get_trainable_model
    from scheduler.trainer import check_config, train
    from scheduler.user_code import load_callable

    cfg = config_from_args(args)
    try:  # before any process starts
        check_config(cfg)
        get_trainable_model(cfg.model, **cfg.model_options)  # a user's factory imports here
        if cfg.data is not None:
            load_callable(cfg.data, "data")
    except (ValueError, TypeError) as e:
        print(f"mtmm train: {e}")
        return 2
    if launch.init_from_env():  # under torchrun: this process is one rank
        # The group is torn down here, not by the interpreter's exit, where gloo's threads
        # could outlive it (a rank once aborted with "terminate called without an active
        # exception").
        finished = False
        try:
            results = [train(cfg)]
            finished = True
        finally:
            launch.finish_from_env(wait=finished)
    else:
        nproc = args.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else min(4, os.cpu_count() or 1))
        try:
            results = launch.run_local(train, nproc, cfg, timeout_s=args.timeout)
        except launch.RankFailedError as e:
            print(f"mtmm train: {e}")
            return 1
    hist = results[0]["history"]
    if hist and results[0]["rank"] == 0:
        first, last = hist[0], hist[-1]
        tok_s = sum(h["tokens_per_s"] for h in hist[1:] or hist) / len(hist[1:] or hist)
        skipped = sum(bool(h.get("skipped")) for h in hist)
        caps = results[0].get("count_cap")
        caps = f" (count caps {', '.join(f'{c} {n}' for c, n in caps.items())})" if caps else ""
        switched = sum(bool(h.get("replan", {}).get("switched")) for h in hist)
        print(f"trained {cfg.model} with plan {results[0]['plan_method']}{caps}: loss {first['loss']:.4f} -> "
              f"{last['loss']:.4f} in {len(hist)} steps, {tok_s:.0f} tokens/s"
              + (f", switched plans {switched} time{'s' if switched > 1 else ''}" if switched else "")
              + (f", {skipped} skipped (inf/NaN gradients)" if skipped else ""))
        peak = results[0].get("peak_memory_gb")
        print(f"memory on rank 0: {results[0]['memory_estimate_gb']:.4g} GB estimated by the planner"
              + (f", {peak:.4g} GB allocated at most" if peak is not None else ""))
    return 0


def _model_name(text: str) -> str:
    from scheduler.tiny_models import MODELS
    from scheduler.user_code import is_spec

    if text not in MODELS and not is_spec(text):
        raise argparse.ArgumentTypeError(
            f"expected one of {sorted(MODELS)} or 'package.module:factory', got {text!r}")
    return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def add_parser(sub) -> None:
    from scheduler.lr_schedule import LR_SCHEDULES
    from scheduler.tiny_models import DEFAULT_MODEL, MODELS

    p = sub.add_parser("train", help="train a built-in model with a plan on local devices or under torchrun")
    p.add_argument("--model", default=DEFAULT_MODEL, type=_model_name,
                   help=f"a built-in model ({', '.join(sorted(MODELS))}) or your "
                        "'package.module:factory' returning an unbuilt MultiTaskModel")
    p.add_argument("--data", metavar="MODULE:FACTORY",
                   help="batches: factory(model, seed=, split=) with a step(index) method "
                        "(default: the model's synthetic data)")
    p.add_argument("--tasks-per-step", type=_positive_int, default=None, metavar="K",
                   help="K tasks a training step, drawn anew each step, the others left out "
                        "(synthetic data; default: every task)")
    p.add_argument("--nproc", type=int, default=0,
                   help="processes (default: one per GPU, else one gloo rank per CPU core, at most 4)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--plan", default="spindle", help="plan method: spindle, mtmm, sequential, distmm, optimus, uniform")
    p.add_argument("--plan-file", help="a plan JSON (issue-5 format) to run instead of planning")
    p.add_argument("--memory-gb", type=float, default=None, metavar="GB",
                   help="each device's memory for the planner (default: no limit): the plan keeps "
                        "each device's estimated weights, gradients, optimizer state and "
                        "activations within it (spindle refuses a plan that does not fit; mtmm "
                        "caps components' device counts until one fits)")
    p.add_argument("--cost", choices=["model", "profile"], default="model",
                   help="per-layer times for the planner: the analytic model, or each MetaOp timed here first")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW's, on matrices and embeddings (not biases or norm scales)")
    p.add_argument("--decay-all", action="store_true",
                   help="weight decay on biases, norm scales and scalars too (default: matrices "
                        "and embeddings only)")
    p.add_argument("--clip", type=float, default=1.0, metavar="MAX_NORM",
                   help="clip the global gradient norm (every parameter counted once) to "
                        "MAX_NORM (default 1.0); 0 turns clipping off")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="decay from --lr to --min-lr at the last step, after the warmup")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16", "fp64"], default="auto",
                   help="auto: bf16 autocast on GPUs, fp32 on CPUs; fp16: autocast with dynamic "
                        "loss scaling (a step with inf/NaN gradients is skipped on every rank)")
    p.add_argument("--init-loss-scale", type=float, default=2.0 ** 16, metavar="S",
                   help="fp16's first loss scale")
    p.add_argument("--grad-accum", type=_positive_int, default=1, metavar="K",
                   help="micro-batches per optimizer step (gradients summed, reduced once)")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="every N steps and after the last, the loss on held-out batches (0: never)")
    p.add_argument("--eval-batches", type=_positive_int, default=1, metavar="K",
                   help="held-out batches per evaluation (the same each time)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile every component layer (default backend: inductor)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward (less memory)")
    p.add_argument("--shard-optimizer", action="store_true",
                   help="ZeRO-1: the optimizer state of a parameter held by several ranks on one "
                        "of them, which broadcasts its update")
    p.add_argument("--replan-every", type=int, default=0, metavar="N",
                   help="every N steps, re-plan on the tokens each MetaOp received and switch "
                        "plans (parameters and optimizer state move between ranks) when the "
                        "simulator predicts the new plan faster by more than --replan-min-gain "
                        "(default 0: never; needs --cost model)")
    p.add_argument("--replan-min-gain", type=float, default=0.05, metavar="F",
                   help="the predicted gain, a fraction of the running plan's iteration, that a "
                        "re-plan must beat to switch (default 0.05)")
    p.add_argument("--replan-model-times", action="store_true",
                   help="re-plan with the cost model's times for the measured tokens (default: "
                        "each MetaOp's times scaled to the compute its slices measured)")
    p.add_argument("--profile", metavar="DIR",
                   help="write each rank's Chrome trace (torch.profiler) to DIR/rank<r>.json")
    p.add_argument("--profile-steps", type=_positive_int, default=3, metavar="K",
                   help="steps the trace records, after one skipped and one of warm-up")
    p.add_argument("--checkpoint", help="checkpoint file (written atomically)")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--metrics-file", metavar="PATH",
                   help="append every step's losses, lr, grad norm and timings as JSON lines")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a hung rank is declared dead")
    p.set_defaults(func=run)
