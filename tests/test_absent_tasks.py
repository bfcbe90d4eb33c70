"""Steps whose data leave some tasks out (a loader that samples tasks, a dataset that ran dry):
their slices and messages are skipped, and a parameter that no task of the step ran keeps no
gradient on any holder, so AdamW leaves it alone, as in one process. Against a single-process
float64 reference of the same batches (< 1e-10), on 3 gloo ranks, with and without sharded
optimizer state and gradient accumulation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scheduler.data import SyntheticStream
from scheduler.executor import Executor, make_plan
from scheduler.launch import run_local
from scheduler.tiny_models import get_trainable_model
from scheduler.trainer import TrainConfig, _to, check_config, train_many
from test_executor import CLIP, CLIP_NORM, CLIP_PLAN_3, LR, STEPS, TOL, cfg_for
from user_model import PartialStream

DATA = "user_model:PartialStream"


def _reference(steps: int, accum: int = 1, stream=PartialStream):
    """(per-step task losses, final parameters) of one process on ``stream``'s batches
    (PartialStream's, or a stream class taking the model and a seed):
    each task's loss over the micro-batches that hold it, divided by its units there; a
    parameter no task of the step ran has no gradient (AdamW skips it)."""
    model = get_trainable_model(CLIP).build().double()
    named = sorted(model.named_parameters())
    no_decay = [p for n, p in named if n.rsplit(".", 1)[-1] == "bias" or p.dim() < 2]
    decay = [p for _, p in named if not any(p is q for q in no_decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, foreach=False)
    stream = stream(model, seed=0)
    hist = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        micro = [{t: {k: _to(v, "cpu", torch.float64) for k, v in b.items()}
                  for t, b in stream.step(s * accum + j).items()} for j in range(accum)]
        total = {t: sum(model.tasks[t].count_units(m[t]) for m in micro if t in m)
                 for t in model.tasks if any(t in m for m in micro)}
        losses = dict.fromkeys(total, 0.0)
        for batch in micro:
            for t, loss in model.reference_losses(batch).items():
                losses[t] = losses[t] + loss * (model.tasks[t].count_units(batch[t]) / total[t])
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named if p.grad is not None], CLIP_NORM)
        opt.step()
        hist.append({k: float(v.detach()) for k, v in losses.items()})
    return hist, {n: p.detach().clone() for n, p in named}


def _assert_matches(result: dict, steps: int = STEPS, accum: int = 1, stream=PartialStream) -> None:
    ref_hist, ref_params = _reference(steps, accum, stream)
    assert len(result["history"]) == steps
    for step, (got, want) in enumerate(zip(result["history"], ref_hist)):
        assert list(got["losses"]) == list(want), f"step {step}: tasks {list(got['losses'])}"
        for task in want:
            err = abs(got["losses"][task] - want[task]) / abs(want[task])
            assert err < TOL["fp64"], f"step {step} task {task}: {got['losses'][task]} vs {want[task]}"
    params = result["state"]["params"]
    for name, want in ref_params.items():
        err = float((params[name] - want).norm() / want.norm().clamp_min(1e-12))
        assert err < TOL["fp64"], f"{name}: relative error {err:.2e}"


def test_reference_leaves_the_unused_encoder_alone():
    """The reference's premise: at step 2 (vision-audio alone) the text encoder has no
    gradient, and AdamW does not move it (zero gradients would, through its momentum)."""
    one, _ = _reference(2)
    two_hist, two = _reference(3)
    _, after_two = _reference(2)
    assert list(two_hist[2]) == ["vision-audio"] and len(one) == 2
    text = [n for n in two if n.startswith("components.text.")]
    assert text and all(torch.equal(two[n], after_two[n]) for n in text)
    assert not all(torch.equal(two[n], after_two[n]) for n in two if n.startswith("components.vision."))


def test_three_ranks_skip_absent_tasks_as_one_process_would():
    """CLIP_PLAN_3 (the text encoder held by all three ranks) and spindle's plan, the optimizer
    plain and sharded; then two micro-batches a step (a task present in one of them only)."""
    model = get_trainable_model(CLIP)
    plans = [CLIP_PLAN_3, make_plan(model, 3, "spindle")]
    cfgs = [dataclasses.replace(cfg_for(CLIP, p), data=DATA, shard_optimizer=sharded)
            for p in plans for sharded in (False, True)]
    cfgs.append(dataclasses.replace(cfg_for(CLIP, CLIP_PLAN_3, accum=2), data=DATA))
    results = run_local(train_many, 3, cfgs, timeout_s=240)[0]
    for r in results[:4]:
        _assert_matches(r)
    _assert_matches(results[4], accum=2)


def test_one_process_executor_takes_a_step_without_some_tasks():
    model = get_trainable_model(CLIP)
    ex = Executor(model, make_plan(model, 1, "spindle"))
    stream = PartialStream(model)
    losses = ex.step(stream.step(2))
    assert list(losses) == ["vision-audio"]
    grads = {n: p.grad for n, p in ex.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("components.text."))
    assert all(g is not None for n, g in grads.items() if n.startswith("components.vision."))
    assert list(ex.evaluate(stream.step(1))) == ["vision-text", "vision-audio"]


def test_data_naming_no_task_or_an_unknown_one_is_refused():
    model = get_trainable_model(CLIP)
    ex = Executor(model, make_plan(model, 1, "sequential"))
    step = PartialStream(model).step(0)
    with pytest.raises(ValueError, match=r"data: \['speech-text'\] are not tasks of 'tiny-clip'"):
        ex.step({**step, "speech-text": step["vision-text"]})
    with pytest.raises(ValueError, match="data: no batch for any task of 'tiny-clip'"):
        ex.step({})
    with pytest.raises(ValueError, match=r"batches: \['speech-text'\] are not tasks"):
        get_trainable_model(CLIP).build().reference_losses({"speech-text": step["vision-text"]})


class _TwoTasksAStep(SyntheticStream):
    def __init__(self, model, seed: int = 0):
        super().__init__(model, seed=seed, tasks_per_step=2)


def test_synthetic_stream_draws_its_tasks_and_keeps_their_batches():
    model = get_trainable_model(CLIP)
    full, two = SyntheticStream(model), _TwoTasksAStep(model)
    kinds = set()
    for i in range(30):
        step = two.step(i)
        assert tuple(step) == two.tasks_of(i) and len(step) == 2
        kinds.add(tuple(step))
        for t, batch in step.items():
            assert all(torch.equal(v, full.step(i)[t][k]) for k, v in batch.items())
    assert len(kinds) == 3  # every pair of tiny-clip's three tasks comes up
    assert [two.tasks_of(i) for i in range(12)] == [_TwoTasksAStep(model).tasks_of(i) for i in range(12)]
    with pytest.raises(ValueError, match=r"tasks_per_step: expected None or an int in \[1, 3\], got 4"):
        SyntheticStream(model, tasks_per_step=4)


def test_training_on_two_of_three_tasks_a_step_matches_one_process():
    """TrainConfig(tasks_per_step=2) on 3 ranks, CLIP_PLAN_3: the same batches, losses and
    parameters as one process; evaluation keeps every task."""
    cfg = dataclasses.replace(cfg_for(CLIP, CLIP_PLAN_3), tasks_per_step=2, eval_every=STEPS)
    (r,) = run_local(train_many, 3, [cfg], timeout_s=240)[0]
    _assert_matches(r, stream=_TwoTasksAStep)
    assert list(r["history"][-1]["eval_losses"]) == list(get_trainable_model(CLIP).tasks)


def test_tasks_per_step_is_checked():
    from scheduler.cli import build_parser
    from scheduler.cmd_train import config_from_args

    assert config_from_args(build_parser().parse_args(["train", "--tasks-per-step", "2"])).tasks_per_step == 2
    with pytest.raises(ValueError, match="tasks_per_step: for the synthetic data only"):
        check_config(TrainConfig(tasks_per_step=2, data="user_model:PartialStream"))
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="tasks_per_step: expected None or an int >= 1"):
            check_config(TrainConfig(tasks_per_step=bad))
