"""Learning-rate schedules of the training loop: a linear warmup, then constant, cosine or
linear decay to ``min_lr`` at the last step.

The rate is a pure function of the step index, so a resumed run (any process count) continues
the schedule without state of its own in the checkpoint. The shapes are those of
``torch.optim.lr_scheduler``'s ``LinearLR`` warmup followed by ``CosineAnnealingLR`` or
``LinearLR`` decay (``SequentialLR``), which the tests compare against.
"""

from __future__ import annotations

import math

__all__ = ["LR_SCHEDULES", "check_schedule", "lr_at"]

LR_SCHEDULES = ("constant", "cosine", "linear")


def check_schedule(kind: str, lr: float, steps: int, warmup_steps: int, min_lr: float) -> None:
    """ValueError naming the first bad argument."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {kind!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected an int >= 0, got {warmup_steps!r}")
    if not 0.0 <= min_lr <= lr:
        raise ValueError(f"min_lr: expected a value in [0, lr={lr}], got {min_lr!r}")
    if kind != "constant" and warmup_steps >= steps:
        raise ValueError(f"warmup_steps: {warmup_steps} leaves no step of the {steps} to decay "
                         f"over (lr_schedule={kind!r})")


def lr_at(step: int, *, lr: float, steps: int, kind: str = "constant", warmup_steps: int = 0,
          min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``steps``: lr * (step + 1) /
    warmup_steps during the warmup, then ``kind`` from lr at the first step after it towards
    min_lr, which a decaying schedule reaches one step after the last."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if kind == "constant":
        return lr
    progress = (step - warmup_steps) / (steps - warmup_steps)
    if kind == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    assert kind == "linear", kind
    return lr - (lr - min_lr) * progress
