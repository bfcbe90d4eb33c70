"""The gradient all-reduce started during the backward (``Executor(overlap_grad_reduce=)``):
which buckets start after which wave, and the same training either way."""

from __future__ import annotations

import dataclasses

import torch

from scheduler.executor import Executor
from scheduler.launch import run_local
from scheduler.tiny_models import get_trainable_model
from scheduler.trainer import train_many
from test_executor import CLIP, CLIP_PLAN_3, assert_matches_reference, cfg_for


def _starts(plan: dict) -> list[tuple[tuple[int, ...], int, list[str]]]:
    """On one rank: (holders, wave after which it starts, components) of each bucket; none
    where the overlap is left at its default, which is off on CPUs."""
    assert Executor(get_trainable_model(CLIP), plan)._reduce_after == {}
    ex = Executor(get_trainable_model(CLIP), plan, overlap_grad_reduce=True)
    out = []
    for wave, buckets in ex._reduce_after.items():
        for b in buckets:
            comps = sorted({ex._layer_of(n)[0] for n in ex._bucket_names[b]})
            out.append((ex._buckets[b][0], wave, comps))
    return sorted(out)


def test_buckets_start_after_the_first_wave_that_runs_their_layers():
    """CLIP_PLAN_3: the audio encoder and the contrastive head first run in wave 2, on ranks
    {0, 1, 2} in all: their bucket starts after wave 2's backward, while waves 1 and 0 still
    run; the vision encoder's second layer (first in wave 1) after wave 1; its first layer
    and the text encoder's (wave 0, also held by all three) last, with the text encoder's
    second layer, held by ranks 1 and 2 (wave 0 too)."""
    ranks = run_local(_starts, 3, CLIP_PLAN_3, timeout_s=120)
    everyone = [((0, 1, 2), 0, ["text", "vision"]), ((0, 1, 2), 1, ["vision"]),
                ((0, 1, 2), 2, ["audio", "contrast"])]
    assert ranks[0] == everyone
    assert ranks[1] == ranks[2] == [*everyone, ((1, 2), 0, ["text"])]


def test_overlapped_and_final_reductions_train_alike():
    """3 gloo ranks, float64: bit-identical parameters with the all-reduces started in the
    backward or after it, both the single-process reference's."""
    cfgs = [dataclasses.replace(cfg_for(CLIP, CLIP_PLAN_3), overlap_grad_reduce=flag)
            for flag in (True, False)]
    overlapped, final = run_local(train_many, 3, cfgs, timeout_s=240)[0]
    for r in (overlapped, final):
        assert_matches_reference(CLIP, r)
    for name, p in overlapped["state"]["params"].items():
        assert torch.equal(p, final["state"]["params"][name]), name
