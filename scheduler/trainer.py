"""The training loop on top of the executor: optimizer, clipping, mixed precision, logging,
checkpoints. Runs inside each rank (see ``scheduler.launch``).

Gradient clipping uses the global norm: each parameter is counted once (by one holder:
``Executor.owned``), the squares are summed over all ranks, and every rank applies the same factor, so
the update equals a single-process ``clip_grad_norm_``. On GPUs the forward runs under bf16
autocast (parameters and optimizer stay fp32). Under fp16 autocast the losses are scaled
dynamically; an inf or NaN gradient on any rank skips the step on every rank (the check is
all-reduced), so ranks holding different parameters never part ways.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from scheduler import checkpoint as ckpt
from scheduler import count_caps, replan
from scheduler.data import SyntheticStream, batch_tokens
from scheduler.executor import Executor, make_plan
from scheduler.launch import local_device
from scheduler.lr_schedule import check_schedule, lr_at
from scheduler.modelapi import profiled_cost
from scheduler.plan import PlanMemoryError, memory_per_device
from scheduler.plan_switch import migrate_state
from scheduler.tiny_models import DEFAULT_MODEL, get_trainable_model
from scheduler.user_code import load_callable


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp64")


@dataclass
class TrainConfig:
    """What one training run does (picklable: it travels to every rank)."""

    model: str = DEFAULT_MODEL  # a built-in name, or a user's "package.module:factory"
    model_options: dict = field(default_factory=dict)
    # "package.module:factory" called as factory(model, seed=, split=) ("train", "eval"), giving
    # an object whose step(i) is the i-th batch of every task; None: the model's synthetic data
    data: str | None = None
    # the synthetic data's tasks per training step (None: all): k drawn uniformly each step,
    # the others left out of it (evaluation keeps every task); a --data stream decides itself
    tasks_per_step: int | None = None
    steps: int = 40
    method: str = "spindle"
    plan: dict | None = None  # an explicit plan wins over ``method``
    # each device's memory for the planner, GB (None: no limit): the plan keeps every device's
    # estimated weights, gradients, optimizer state and activations within it, as this run
    # keeps them (precision, activation_checkpointing, shard_optimizer; MultiTaskModel.to_problem)
    memory_gb: float | None = None
    cost: str = "model"  # per-layer times for planning: "model" (analytic) or "profile" (timed here)
    lr: float = 3e-3
    # "constant", "cosine" or "linear" decay to min_lr at the last step, after a linear warmup
    # over warmup_steps (scheduler/lr_schedule.py)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.0  # AdamW's, on matrices and embeddings (see decays)
    decay_all: bool = False  # weight decay on biases, norm scales and scalars too
    clip: float | None = 1.0  # the global gradient norm's bound; None: no clipping
    seed: int = 0
    # "fp32", "bf16" (autocast), "fp16" (autocast, with loss scaling), "fp64" (float64
    # parameters and inputs: numerics checks; mtmm's grouped GEMM runs its torch loop there) or
    # "auto": bf16 on GPUs, fp32 on CPUs
    precision: str = "auto"
    # dynamic loss scaling (torch's GradScaler rules, the inf/NaN check shared by all ranks):
    # None: on with fp16 only. The scale starts at init_loss_scale, halves on a step whose
    # gradients hold an inf or NaN (the step is skipped) and doubles after
    # loss_scale_growth_interval steps in a row without one.
    loss_scaling: bool | None = None
    init_loss_scale: float = 2.0 ** 16
    loss_scale_growth_interval: int = 2000
    # micro-batches per optimizer step, their gradients summed and reduced once; each loss
    # divided by its task's units (samples or tokens) over all of them, as one batch would be
    grad_accum: int = 1
    # recompute every component layer's activations in the backward instead of keeping them
    activation_checkpointing: bool = False
    # a torch.compile backend ("inductor") for every component layer; None: eager
    compile: str | None = None
    # every eval_every steps (and after the last), each task's loss on the same eval_batches
    # batches of a held-out stream, forward only; 0: never
    eval_every: int = 0
    eval_batches: int = 1
    # every replan_every steps (0: never), re-plan on the tokens each MetaOp received in
    # those steps and switch plans, moving parameters and optimizer state between ranks, when
    # the simulator predicts the new plan faster by more than replan_min_gain (a fraction) on
    # that workload (scheduler/replan.py); with cost "model" only: a profile is of step 0's data
    replan_every: int = 0
    replan_min_gain: float = 0.05
    # re-plan with each MetaOp's modelled times scaled to the compute its slices took in
    # those steps (replan.calibrate); False: the model's times for the measured tokens
    replan_calibrate: bool = True
    # ZeRO stage 1: each parameter held by several ranks has its optimizer state on one of
    # them, which updates it and broadcasts the new value (Executor(shard_optimizer=))
    shard_optimizer: bool = False
    # each holder group's gradient all-reduce starts in the backward once no slice adds to it
    # (Executor(overlap_grad_reduce=)); False: all of them after the backward; None: on GPUs
    overlap_grad_reduce: bool | None = None
    # a folder for each rank's Chrome trace (rank{r}.json, torch.profiler) of profile_steps
    # steps, after one step skipped and one of warm-up where the run has them; the executor
    # labels every wave's compute and exchange and the reductions ("mtmm ...")
    profile_dir: str | None = None
    profile_steps: int = 3
    checkpoint: str | None = None
    checkpoint_every: int = 0  # 0: only at the end (when ``checkpoint`` is set)
    resume: bool = False
    # rank 0 appends each step's record (the history entry) to this file as one JSON line
    metrics_file: str | None = None
    progress: bool = True
    log_every: int = 10
    return_state: bool = False  # rank 0 returns the whole final state (tests)
    die_at_step: int | None = None  # test hook: rank ``die_rank`` exits hard at this step
    die_rank: int = 1


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """An input on the device; floating ones in ``dtype`` where one is set."""
    if dtype is not None and t.is_floating_point():
        return t.to(device, dtype)
    return t.to(device)


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: to matrices and embeddings, not to biases (a
    ``GroupedLinear`` bias is 2-D), norm scales or scalars such as a contrastive temperature,
    as GPT-2's and most trainers' AdamW setups do."""
    return param.ndim >= 2 and not name.endswith("bias")


def make_optimizer(named_params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over (name, parameter) pairs: one group with ``cfg.weight_decay``, one without
    (``decays``; everything decayed with ``cfg.decay_all``)."""
    # Explicit param groups: a rank that the plan leaves without any layer has no parameters,
    # and torch refuses a bare empty list but accepts empty groups.
    groups = ([], [])
    for name, p in named_params:
        groups[0 if cfg.decay_all or decays(name, p) else 1].append(p)
    return torch.optim.AdamW([{"params": groups[0], "weight_decay": cfg.weight_decay},
                              {"params": groups[1], "weight_decay": 0.0}], lr=cfg.lr,
                             foreach=False)


def clip_global(executor: Executor, max_norm: float) -> float:
    """Scales every local gradient by min(1, max_norm / (global norm + 1e-6)); returns the
    global norm (the same on every rank)."""
    sq = torch.zeros((), dtype=torch.float64, device=executor.device)
    for name, p in executor.named_parameters():
        if p.grad is not None and executor.owned(name):
            sq += p.grad.double().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    norm = math.sqrt(float(sq))
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for p in executor.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


def make_grad_scaler(cfg: TrainConfig, device: torch.device):
    """The run's loss scaler, or None where ``cfg`` scales no loss. Across several ranks it is
    FSDP's ``ShardedGradScaler``, whose inf/NaN flag is all-reduced: each rank holds other
    parameters, and a rank that stepped while another skipped would leave the model torn."""
    if not (cfg.loss_scaling if cfg.loss_scaling is not None else cfg.precision == "fp16"):
        return None
    options = dict(init_scale=cfg.init_loss_scale, growth_interval=cfg.loss_scale_growth_interval)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, **options)
    return torch.amp.GradScaler(device.type, **options)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs ``cfg`` on the current process group (or alone). Returns the history (per step:
    per-task losses, total, tokens/s, grad norm) and, with ``return_state``, rank 0's gathered
    final state."""
    check_config(cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dist.is_initialized():
        device = local_device(rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    else:
        device = local_device(0)
    if device.type == "cuda":  # peak_memory_gb is this run's (train_many runs several)
        torch.cuda.reset_peak_memory_stats(device)

    def fresh_model():
        model = get_trainable_model(cfg.model, **cfg.model_options)
        model.seed = cfg.seed
        return model

    model = fresh_model()
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast_dtype = torch.bfloat16 if use_bf16 else torch.float16 if cfg.precision == "fp16" else None
    dtype = torch.float64 if cfg.precision == "fp64" else None
    param_dtype = dtype or torch.float32
    # the memory this run keeps, for the planner (MultiTaskModel.to_problem)
    memory = dict(device_memory_gb=cfg.memory_gb, activation_checkpointing=cfg.activation_checkpointing,
                  shard_optimizer=cfg.shard_optimizer, param_dtype=param_dtype,
                  activation_dtype=autocast_dtype or param_dtype)
    state = None
    if cfg.resume and cfg.checkpoint and os.path.exists(cfg.checkpoint):
        state = ckpt.load(cfg.checkpoint)
    # a re-planning run resumes planning for the tokens it had measured last
    measured = state["extra"].get("measured_tokens") if state is not None and cfg.replan_every else None
    plan, error, cost = cfg.plan, None, None
    if plan is None and rank == 0:
        cost = profiled_cost(get_trainable_model(cfg.model, **cfg.model_options)) if cfg.cost == "profile" else None
        try:
            plan = make_plan(model, world, cfg.method, cost=cost, seq_lens=measured, **memory)
        except ValueError as e:  # e.g. out of memory: every rank must hear of it, not wait
            error = e
            if isinstance(e, PlanMemoryError) and cfg.method != "mtmm":
                error = PlanMemoryError(f"{e}; --plan mtmm {count_caps.WHAT_IT_DOES}")
    if world > 1:
        # Rank 0's plan for everyone: profiled times differ between processes.
        box = [plan, None if error is None else str(error), isinstance(error, PlanMemoryError)]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
        if box[1] is not None and error is None:
            raise (PlanMemoryError if box[2] else ValueError)(f"planning on rank 0 failed: {box[1]}")
    if error is not None:
        raise error
    groups: dict = {}  # the holder groups' communicators, shared by every plan of the run

    def executor(model, plan):
        return Executor(model, plan, device=device, autocast_dtype=autocast_dtype, dtype=dtype,
                        activation_checkpointing=cfg.activation_checkpointing,
                        compile=cfg.compile, shard_optimizer=cfg.shard_optimizer,
                        overlap_grad_reduce=cfg.overlap_grad_reduce, group_cache=groups)

    def optimizer(ex):
        return make_optimizer([(n, p) for n, p in sorted(ex.named_parameters()) if ex.updates(n)], cfg)

    ex = executor(model, plan)
    # the planner's memory estimate of every rank under this plan (reported with the results)
    estimates = memory_estimates(model, plan, world,
                                 **{k: v for k, v in memory.items() if k != "device_memory_gb"})
    if cfg.plan is not None and cfg.memory_gb is not None:  # the same verdict on every rank
        check_plan_memory(estimates, cfg.memory_gb)
    opt = optimizer(ex)
    scaler = make_grad_scaler(cfg, device)
    start = 0
    if state is not None:
        start = ckpt.restore(ex, opt, state, model_name=cfg.model)
        if scaler is not None and "grad_scaler" in state["extra"]:
            scaler.load_state_dict(state["extra"]["grad_scaler"])
    # The streams get a model of their own: one that an executor built would keep the plan's
    # share of parameters alive after a re-plan has moved them.
    stream = make_stream(cfg, fresh_model(), "train")
    # the same held-out batches at every evaluation
    eval_set = _batches(make_stream(cfg, fresh_model(), "eval"), range(cfg.eval_batches), device,
                        dtype) if cfg.eval_every else []
    bar = _progress(cfg, rank, start)
    prof = _profiler(cfg, rank, start, device)
    ex.trace = prof is not None
    history = []
    accum = cfg.grad_accum
    for step in range(start, cfg.steps):
        if cfg.die_at_step == step and rank == cfg.die_rank:
            os._exit(17)
        t0 = time.perf_counter()
        # micro-batch j of step s is the stream's batch s * accum + j (resumable)
        micro = _batches(stream, range(step * accum, (step + 1) * accum), device, dtype)
        ex.zero_grad()
        t1 = time.perf_counter()
        # the scaler's factor as a tensor: no host sync before the backward
        loss_scale = None if scaler is None else scaler.scale(torch.ones((), device=device))
        losses, stats = _forward_backward(ex, model, micro, loss_scale)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_exec = time.perf_counter() - t1
        if scaler is not None:
            scaler.unscale_(opt)  # true gradients for clipping; the inf/NaN flag shared
        norm = clip_global(ex, cfg.clip) if cfg.clip else float("nan")
        lr = lr_at(step, lr=cfg.lr, steps=cfg.steps, kind=cfg.lr_schedule,
                   warmup_steps=cfg.warmup_steps, min_lr=cfg.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        scale_info = {}
        with ex.span("mtmm optimizer step"):
            if scaler is None:
                opt.step()
            else:
                scale = scaler.get_scale()
                scaler.step(opt)  # skipped on every rank if any rank found an inf or NaN
                scaler.update()
                # the scale only shrinks (backoff) on a step that found one
                scale_info = {"loss_scale": scale, "skipped": scaler.get_scale() < scale}
        with ex.span("mtmm parameter sync"):
            ex.sync_parameters()  # sharded optimizer state: owners' new values to other holders
            ex.sync_buffers()  # running statistics: the lowest holder's to the others
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rec = {"step": step, "losses": losses, "loss": sum(losses.values()), "grad_norm": norm, "lr": lr,
               **scale_info, "seconds": dt, "executor_seconds": t_exec, **stats,
               "tokens_per_s": sum(batch_tokens(m, model) for m in micro) / dt}
        if cfg.replan_every and cfg.replan_calibrate and step == start:
            ex.take_slice_times()  # the run's first step warms up (allocations, compilation)
        if cfg.replan_every and (step + 1) % cfg.replan_every == 0 and step + 1 < cfg.steps:
            with ex.span("mtmm re-plan"):
                verdict, measured = _reconsider(cfg, ex, plan, world, cost if rank == 0 else None,
                                                memory, horizon_steps=min(cfg.replan_every, cfg.steps - step - 1))
            rec["replan"] = {**verdict.record(), "tokens": dict(measured)}
            if verdict.plan is not None:
                new_ex = executor(fresh_model(), verdict.plan)
                new_ex.trace = ex.trace
                new_opt = optimizer(new_ex)
                rec["replan"].update(migrate_state(ex, opt, new_ex, new_opt))
                ex, opt, plan, model = new_ex, new_opt, verdict.plan, new_ex.model
                estimates = memory_estimates(model, plan, world, **{k: v for k, v in memory.items()
                                                                    if k != "device_memory_gb"})
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1):
            rec["eval_losses"] = evaluate(ex, eval_set, model)
            rec["eval_loss"] = sum(rec["eval_losses"].values())
        history.append(rec)
        if prof is not None:
            prof.step()
        if rank == 0:
            _log(cfg, bar, rec)
        if cfg.checkpoint and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            ckpt.save(ex, opt, cfg.checkpoint, step=step + 1, model_name=cfg.model,
                      extra=_extra_state(scaler, measured))
    if bar is not None:
        bar.close()
    if prof is not None:
        prof.stop()  # writes the trace if the run ended inside the recorded steps
    if cfg.checkpoint and (not cfg.checkpoint_every or cfg.steps % cfg.checkpoint_every) and cfg.steps > start:
        ckpt.save(ex, opt, cfg.checkpoint, step=cfg.steps, model_name=cfg.model,
                  extra=_extra_state(scaler, measured))
    out: dict[str, Any] = {"rank": rank, "history": history, "plan_method": plan.get("method"),
                           "count_cap": plan.get("count_cap"),
                           "optimizer_state_bytes": optimizer_state_bytes(opt),
                           # the planner's estimate for this rank, and what CUDA allocated at most
                           "memory_estimate_gb": estimates[rank],
                           "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 1e9
                                              if device.type == "cuda" else None)}
    if cfg.return_state:
        out["state"] = ckpt.gather_state(ex, opt, step=cfg.steps, model_name=cfg.model)
    return out


def _reconsider(cfg: TrainConfig, ex: Executor, plan: dict, world: int, cost, memory: dict,
                horizon_steps: int) -> tuple[replan.Verdict, dict[str, float]]:
    """Rank 0's verdict on re-planning for the tokens measured since the last one, the same on
    every rank (collective), and those tokens. A switch must pay for its state move within
    ``horizon_steps``."""
    tokens = ex.take_token_counts()
    times = ex.take_slice_times() if cfg.replan_calibrate else None
    verdict = None
    if ex.rank == 0:
        verdict = replan.reconsider(ex.model, plan, world, tokens, times=times, method=cfg.method,
                                    min_gain=cfg.replan_min_gain, horizon_steps=horizon_steps,
                                    cost=cost, **memory)
    if world > 1:
        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        verdict = box[0]
    return verdict, tokens


def memory_estimates(model, plan: dict, world: int, **options) -> list[float]:
    """Each rank's GB under ``plan`` as the planner estimates it (``plan.memory_per_device`` on
    ``model.to_problem(world, **options)``: weights, gradients, optimizer state, activations)."""
    return memory_per_device(model.to_problem(world, **options), plan)


def check_plan_memory(used: list[float], device_memory_gb: float) -> None:
    """PlanMemoryError when a given plan's estimated memory per rank (``memory_estimates``)
    passes ``device_memory_gb`` on some device."""
    worst = max(range(len(used)), key=used.__getitem__)
    if used[worst] > device_memory_gb:
        raise PlanMemoryError(
            f"plan: device {worst} would hold about {used[worst]:.6g} GB (estimated weights, "
            f"gradients, optimizer state and activations), more than memory_gb = "
            f"{device_memory_gb}; plan with --memory-gb instead of --plan-file, or raise it")


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's state on this rank (AdamW: its two moments;
    the step counters left out)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values()
               for k, v in st.items() if torch.is_tensor(v) and k != "step")


def _extra_state(scaler, measured: dict | None) -> dict:
    """The checkpoint's extra entries, the same on every rank: the loss scaler's state and the
    tokens per sample a re-planning run measured last (its plan on resuming is for them)."""
    out = _scaler_state(scaler)
    if measured:
        out["measured_tokens"] = dict(measured)
    return out


def _scaler_state(scaler) -> dict:
    """The loss scaler's state for the checkpoint (the same on every rank)."""
    return {} if scaler is None else {"grad_scaler": scaler.state_dict()}


def _profiler(cfg: TrainConfig, rank: int, start: int, device: torch.device):
    """A started torch.profiler writing ``profile_dir``/rank{rank}.json, or None."""
    if cfg.profile_dir is None or cfg.steps <= start:
        return None
    os.makedirs(cfg.profile_dir, exist_ok=True)
    left = cfg.steps - start
    active = min(cfg.profile_steps, left)
    warmup = 1 if left > active else 0
    wait = 1 if left > active + warmup else 0  # the first step allocates and compiles
    path = os.path.join(cfg.profile_dir, f"rank{rank}.json")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=lambda p: p.export_chrome_trace(path))
    prof.start()
    return prof


def _progress(cfg: TrainConfig, rank: int, start: int):
    if rank != 0 or not cfg.progress or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model}", unit="step")


def check_config(cfg: TrainConfig) -> None:
    """ValueError naming the first bad field (before any process group or model is made)."""
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {cfg.precision!r}")
    check_schedule(cfg.lr_schedule, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr)
    for name, low in (("grad_accum", 1), ("eval_every", 0), ("eval_batches", 1),
                      ("loss_scale_growth_interval", 1), ("profile_steps", 1)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    for name in ("shard_optimizer", "decay_all", "replan_calibrate"):  # 0 and 1 pass `in (True, False)`
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name}: expected True or False, got {getattr(cfg, name)!r}")
    for name in ("loss_scaling", "overlap_grad_reduce"):
        if getattr(cfg, name) is not None and not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name}: expected True, False or None, got {getattr(cfg, name)!r}")
    if isinstance(cfg.replan_every, bool) or not isinstance(cfg.replan_every, int) or cfg.replan_every < 0:
        raise ValueError(f"replan_every: expected an int >= 0, got {cfg.replan_every!r}")
    if isinstance(cfg.replan_min_gain, bool) or not isinstance(cfg.replan_min_gain, (int, float)) \
            or not 0 <= cfg.replan_min_gain < 1:
        raise ValueError(f"replan_min_gain: expected a number in [0, 1), got {cfg.replan_min_gain!r}")
    if cfg.tasks_per_step is not None and cfg.data is not None:
        raise ValueError(f"tasks_per_step: for the synthetic data only; the stream {cfg.data!r} "
                         "decides its own tasks (MultiTaskLoader(tasks_per_step=))")
    if cfg.tasks_per_step is not None and (isinstance(cfg.tasks_per_step, bool)
                                           or not isinstance(cfg.tasks_per_step, int) or cfg.tasks_per_step < 1):
        raise ValueError(f"tasks_per_step: expected None or an int >= 1, got {cfg.tasks_per_step!r}")
    if cfg.replan_every and cfg.cost != "model":
        raise ValueError(f"replan_every: re-planning measures tokens, which cost {cfg.cost!r} does not "
                         "take (it times step 0's data); use cost 'model'")
    for name in ("init_loss_scale", "memory_gb", "clip"):
        value = getattr(cfg, name)
        if value is None and name in ("memory_gb", "clip"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{name}: expected a positive finite number, got {value!r}")


def _batches(stream, indices, device: torch.device, dtype: torch.dtype | None) -> list[dict]:
    return [{t: {k: _to(v, device, dtype) for k, v in b.items()}
             for t, b in stream.step(i).items()} for i in indices]


def _tasks_in(model, batches: list[dict]) -> list[str]:
    """The model's tasks that have a batch in any of ``batches``, in the model's order."""
    return [t for t in model.tasks if any(t in b for b in batches)]


def _units_over(model, batches: list[dict]) -> dict[str, int]:
    """Each task's loss units (samples or tokens) over all ``batches`` that hold it: the
    divisor that weighs every unit of them alike."""
    return {t: sum(model.tasks[t].count_units(b[t]) for b in batches if t in b)
            for t in _tasks_in(model, batches)}


def _forward_backward(ex: Executor, model, micro: list[dict],
                      loss_scale: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Every micro-batch forward and backward, the gradients summed and reduced once, with
    the last; each task's loss divided by its units over all of them (one batch's own units
    where there is one) and multiplied by ``loss_scale`` for the backward. Returns the step's
    (unscaled) losses and its phase times on this rank."""
    units = None if len(micro) == 1 else _units_over(model, micro)
    losses = dict.fromkeys(_tasks_in(model, micro), 0.0)
    stats = dict.fromkeys(("compute_s", "transfer_s", "reduce_s"), 0.0)
    for j, data in enumerate(micro):
        for t, loss in ex.step(data, units=units, reduce=j == len(micro) - 1,
                               loss_scale=loss_scale).items():
            losses[t] += loss
        for k, v in ex.last_stats.items():
            stats[k] += v
    return losses, stats


def make_stream(cfg: TrainConfig, model, split: str):
    """The batches of ``split``: the user's ``cfg.data`` factory, else synthetic ones."""
    if cfg.data is None:
        return SyntheticStream(model, seed=cfg.seed, split=split,
                               tasks_per_step=cfg.tasks_per_step if split == "train" else None)
    stream = load_callable(cfg.data, "data")(model, seed=cfg.seed, split=split)
    if not callable(getattr(stream, "step", None)):
        raise TypeError(f"data: {cfg.data!r} returned a {type(stream).__name__} without a "
                        "step(index) method")
    return stream


def evaluate(ex: Executor, batches: list, model) -> dict[str, float]:
    """Each task's loss over ``batches``, forward only: its summed loss over all of them divided
    by its units over all of them (as gradient accumulation weighs them)."""
    units = _units_over(model, batches)
    losses = dict.fromkeys(_tasks_in(model, batches), 0.0)
    for batch in batches:
        for t, loss in ex.evaluate(batch, units=units).items():
            losses[t] += loss
    return losses


def _finite_or_null(value):
    """value for strict JSON: a NaN or infinite float (no clipping's norm, a diverged loss)
    becomes None."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _log(cfg: TrainConfig, bar, rec: dict) -> None:
    if cfg.metrics_file:  # appended and flushed per step: a crash keeps the steps before it
        with open(cfg.metrics_file, "a") as f:
            f.write(json.dumps(_finite_or_null(rec)) + "\n")
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
    step = rec["step"]
    if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps - 1 or "eval_loss" in rec
                          or rec.get("skipped")):
        per_task = " ".join(f"{t}={v:.4f}" for t, v in rec["losses"].items())
        msg = f"step {step:4d}  loss {rec['loss']:.4f}  [{per_task}]  {rec['tokens_per_s']:.0f} tok/s"
        if "eval_loss" in rec:
            msg += f"  eval loss {rec['eval_loss']:.4f}"
        if rec.get("skipped"):
            msg += f"  skipped: inf/NaN gradients at loss scale {rec['loss_scale']:g}"
        (bar.write if bar is not None else print)(msg)
    moved = rec.get("replan")
    if cfg.log_every and moved and moved["switched"]:
        (bar.write if bar is not None else print)(
            f"step {step:4d}  re-planned on the measured tokens: {moved['current_ms']:.4g} -> "
            f"{moved['new_ms']:.4g} ms an iteration (simulated), {moved['moved_mb']:.3g} MB of "
            f"state moved in {moved['seconds']:.3g} s")


def train_many(cfgs: list[TrainConfig]) -> list[dict[str, Any]]:
    """Several runs one after the other in the same process group (saves process start-up in
    tests and benchmarks)."""
    return [train(c) for c in cfgs]
