"""A model and a data stream declared outside mtmm, as a user's package would declare them, for
``mtmm train --model user_model:small_clip --data user_model:ShiftedStream``
(tests/test_user_code.py)."""

from __future__ import annotations

import torch

from scheduler.data import SyntheticStream
from scheduler.tiny_models import tiny_clip


def small_clip(**options):
    """tiny-clip with one layer per encoder, under a name of its own."""
    model = tiny_clip(layers=1, **options)
    model.name = "user-clip"
    return model


class ShiftedStream(SyntheticStream):
    """The model's synthetic batches of another seed: a stream that is not mtmm's default."""

    SHIFT = 1000

    def __init__(self, model, seed: int = 0, split: str = "train"):
        super().__init__(model, seed=seed + self.SHIFT, split=split)


NOT_CALLABLE = 3


def not_a_model():
    return "a string"


class PoisonedStream(SyntheticStream):
    """The synthetic batches, with task audio-text's audio all inf at step POISON_STEP: every
    gradient on that task's path (audio and text encoders, contrastive head) turns NaN there,
    the vision encoder's stays finite (tests/test_loss_scaling.py)."""

    POISON_STEP = 1

    def step(self, index: int):
        batch = super().step(index)
        if index == self.POISON_STEP:
            batch["audio-text"] = dict(batch["audio-text"], audio=torch.full_like(
                batch["audio-text"]["audio"], float("inf")))
        return batch


class PartialStream(SyntheticStream):
    """The synthetic batches with tasks left out, in a cycle of three steps: every task; all
    but audio-text; vision-audio alone (its text encoder then runs for no task)
    (tests/test_absent_tasks.py)."""

    LEFT_OUT = ((), ("audio-text",), ("vision-text", "audio-text"))

    def step(self, index: int):
        batch = super().step(index)
        return {t: b for t, b in batch.items() if t not in self.LEFT_OUT[index % 3]}


class _NormedBlock(torch.nn.Module):
    """tiny-clip's vision layer followed by a BatchNorm over the hidden size: running
    statistics, persistent buffers that change in every training forward."""

    def __init__(self, block: torch.nn.Module, hidden: int):
        super().__init__()
        self.block, self.bn = block, torch.nn.BatchNorm1d(hidden)

    def forward(self, x_BTH, ctx):
        y = self.block(x_BTH, ctx)
        return self.bn(y.transpose(1, 2)).transpose(1, 2)


def clip_with_batchnorm(**options):
    """tiny-clip whose vision layers carry a BatchNorm (tests/test_buffers.py)."""
    model = tiny_clip(**options)
    vision = model.components["vision"]
    make = vision._factories["layer"]
    vision._factories["layer"] = lambda i: _NormedBlock(make(i), vision.hidden)
    model.name = "clip-bn"
    return model
