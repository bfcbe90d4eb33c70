"""Learning-rate schedules (scheduler/lr_schedule.py) against torch.optim.lr_scheduler, and
the training loop that applies them against a single-process float64 reference."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from scheduler.lr_schedule import LR_SCHEDULES, check_schedule, lr_at

LR = 3e-3


def _torch_lrs(kind: str, steps: int, warmup: int, min_lr: float) -> list[float]:
    """The rate of each step under torch's own schedulers: LinearLR warmup, then
    CosineAnnealingLR, LinearLR or a constant factor, chained by SequentialLR."""
    from torch.optim import lr_scheduler as ls

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], lr=LR)
    decay_steps = steps - warmup
    decay = {"constant": lambda: ls.ConstantLR(opt, factor=1.0, total_iters=0),
             "cosine": lambda: ls.CosineAnnealingLR(opt, T_max=decay_steps, eta_min=min_lr),
             "linear": lambda: ls.LinearLR(opt, start_factor=1.0, end_factor=min_lr / LR,
                                           total_iters=decay_steps)}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns of schedulers stepped without updates
        if warmup:
            up = ls.LinearLR(opt, start_factor=1.0 / warmup, end_factor=1.0,
                             total_iters=max(warmup - 1, 1))
            sched = ls.SequentialLR(opt, [up, decay()], milestones=[warmup])
        else:
            sched = decay()
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return lrs


@pytest.mark.parametrize("kind", LR_SCHEDULES)
@pytest.mark.parametrize("steps,warmup,min_lr", [(10, 0, 0.0), (10, 3, 1e-4), (7, 1, 3e-4),
                                                 (2, 1, 0.0)])
def test_rates_match_torch_schedulers(kind, steps, warmup, min_lr):
    ours = [lr_at(s, lr=LR, steps=steps, kind=kind, warmup_steps=warmup, min_lr=min_lr)
            for s in range(steps)]
    assert ours == pytest.approx(_torch_lrs(kind, steps, warmup, min_lr), rel=1e-12, abs=0)


def test_cosine_shape():
    """Half-way through the decay the cosine is at the middle of lr and min_lr."""
    rates = [lr_at(s, lr=1.0, steps=14, kind="cosine", warmup_steps=4, min_lr=0.2)
             for s in range(14)]
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4] == 1.0 and rates[9] == pytest.approx(0.6)
    assert rates[13] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.9)))


@pytest.mark.parametrize("args,name", [
    (("step", LR, 10, 0, 0.0), "lr_schedule"),
    (("cosine", LR, 10, -1, 0.0), "warmup_steps"),
    (("cosine", LR, 10, 1.5, 0.0), "warmup_steps"),
    (("cosine", LR, 10, 10, 0.0), "warmup_steps"),
    (("linear", LR, 10, 0, 2 * LR), "min_lr"),
    (("constant", LR, 10, 0, -1.0), "min_lr"),
])
def test_bad_arguments_are_named(args, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        check_schedule(*args)
    check_schedule("constant", LR, 10, 10, 0.0)  # a warmup as long as the run: no decay


def test_training_follows_the_schedule_like_a_reference_run():
    """tiny-clip in float64, one process: the loop's rates are the schedule's, and the
    parameters those of a plain AdamW run stepped at the same rates."""
    from test_executor import assert_matches_reference, cfg_for

    from scheduler.executor import make_plan
    from scheduler.tiny_models import get_trainable_model
    from scheduler.trainer import train

    cfg = cfg_for("tiny-clip", make_plan(get_trainable_model("tiny-clip"), 1, "sequential"))
    cfg.lr_schedule, cfg.warmup_steps, cfg.min_lr = "cosine", 1, cfg.lr / 10
    result = train(cfg)
    lrs = tuple(lr_at(s, lr=cfg.lr, steps=cfg.steps, kind="cosine", warmup_steps=1,
                      min_lr=cfg.min_lr) for s in range(cfg.steps))
    assert tuple(h["lr"] for h in result["history"]) == lrs
    assert lrs[-1] < lrs[0]  # the last step already decayed
    assert_matches_reference("tiny-clip", result, lrs=lrs)


def test_mtmm_train_refuses_a_schedule_without_decay_steps(capsys):
    from scheduler.cli import main

    rc = main(["train", "--steps", "4", "--lr-schedule", "cosine", "--warmup-steps", "4"])
    assert rc == 2
    assert "warmup_steps: 4 leaves no step of the 4 to decay over" in capsys.readouterr().out
