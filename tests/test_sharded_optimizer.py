"""Optimizer state sharded among the ranks that hold a parameter (``shard_optimizer``, ZeRO
stage 1 inside each holder group) against the single-process reference of test_executor.py:
the same losses and parameters (float64, < 1e-10), each parameter's AdamW moments on exactly
one rank, and checkpoints that resume with or without sharding.
"""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.data import SyntheticStream
from scheduler.executor import Executor, make_plan
from scheduler.launch import run_local
from scheduler.tiny_models import get_trainable_model
from scheduler.trainer import TrainConfig, check_config, train, train_many
from test_executor import (CLIP, CLIP_PLAN_3, STEPS, VAL_PLAN_3, assert_matches_reference, cfg_for,
                           needs_val, reference_run, run_plans)


def test_three_ranks_match_the_reference_and_keep_each_moment_once():
    """CLIP_PLAN_3 (the vision encoder's first layer on all three ranks, others on two) and
    the spindle plan: the reference's losses and parameters, with AdamW's two moments of every
    parameter on one rank only, where unsharded every holder keeps them."""
    model = get_trainable_model(CLIP)
    plans = [CLIP_PLAN_3, make_plan(model, 3, "spindle")]
    # with the all-reduces started in the backward (off by default on CPUs)
    sharded = run_local(train_many, 3, [dataclasses.replace(cfg_for(CLIP, p), shard_optimizer=True,
                                                            overlap_grad_reduce=True)
                                        for p in plans], timeout_s=240)
    plain = run_local(train_many, 3, [cfg_for(CLIP, p) for p in plans], timeout_s=240)
    whole = get_trainable_model(CLIP).build().double()
    moments = 2 * sum(p.numel() * p.element_size() for p in whole.parameters())
    for i, plan in enumerate(plans):
        assert_matches_reference(CLIP, sharded[0][i])
        got = [r[i]["optimizer_state_bytes"] for r in sharded]
        replicated = [r[i]["optimizer_state_bytes"] for r in plain]
        assert sum(got) == moments  # each parameter's moments once
        assert sum(replicated) > moments  # plans that replicate some parameter
        assert all(g <= r for g, r in zip(got, replicated))


@pytest.mark.slow
@needs_val
def test_packed_val_plan_matches_the_reference():
    """tiny-val's packed, re-split plan (fp32: its ranks run mtmm's Triton kernels)."""
    (r,) = run_plans("tiny-val", 3, [VAL_PLAN_3], shard_optimizer=True)
    assert_matches_reference("tiny-val", r)


def _ownership(plan: dict) -> dict:
    """On one rank: per parameter, (holders, owned, updated, elements, has a gradient after
    a step)."""
    model = get_trainable_model(CLIP)
    ex = Executor(model, plan, shard_optimizer=True)
    ex.step(SyntheticStream(model).step(0))
    return {n: (ex.holders_of(n), ex.owned(n), ex.updates(n), p.numel(), p.grad is not None)
            for n, p in ex.named_parameters()}


def test_owners_are_holders_spread_by_size():
    """Every parameter is owned and updated by exactly one of its holders, the only one left
    with its (reduced) gradient; in each holder group the owners' elements differ by at most
    the largest parameter."""
    ranks = run_local(_ownership, 3, CLIP_PLAN_3, timeout_s=120)
    seen = {}
    for r, table in enumerate(ranks):
        for name, (holders, owned, updated, numel, grad) in table.items():
            assert r in holders and owned == updated == grad
            if owned:
                assert name not in seen
                seen[name] = (r, holders, numel)
    assert seen.keys() == set().union(*ranks)
    groups = {}
    for name, (r, holders, numel) in seen.items():
        if len(holders) > 1:
            load = groups.setdefault(holders, dict.fromkeys(holders, 0))
            load[r] += numel
    assert groups  # CLIP_PLAN_3 replicates some layers
    for holders, load in groups.items():
        biggest = max(n for _, h, n in seen.values() if h == holders)
        assert max(load.values()) - min(load.values()) <= biggest, (holders, load)
        assert sum(v > 0 for v in load.values()) > 1, (holders, load)  # really spread


def test_sharded_checkpoint_resumes_unsharded_in_one_process(tmp_path):
    """Two steps on 3 sharded ranks, the checkpoint (every moment from its owner), the last
    step in one plain process: the reference's three steps."""
    path = str(tmp_path / "ck.pt")
    first = dataclasses.replace(cfg_for(CLIP, CLIP_PLAN_3), steps=STEPS - 1, checkpoint=path,
                                shard_optimizer=True)
    run_local(train, 3, first, timeout_s=240)
    rest = dataclasses.replace(cfg_for(CLIP, make_plan(get_trainable_model(CLIP), 1, "sequential")),
                               checkpoint=path, resume=True)
    out = train(rest)
    assert [h["step"] for h in out["history"]] == [STEPS - 1]
    ref_hist, ref_params = reference_run(CLIP, "fp64")
    for task, want in ref_hist[-1].items():
        assert abs(out["history"][-1]["losses"][task] - want) < 1e-10 * abs(want)
    for name, want in ref_params.items():
        got = out["state"]["params"][name]
        assert float((got - want).norm() / want.norm()) < 1e-10, name


def test_plain_checkpoint_resumes_sharded(tmp_path):
    """The other way: two plain steps in one process, the last on 3 sharded ranks."""
    path = str(tmp_path / "ck.pt")
    single = make_plan(get_trainable_model(CLIP), 1, "sequential")
    train(dataclasses.replace(cfg_for(CLIP, single), steps=STEPS - 1, checkpoint=path))
    cfg = dataclasses.replace(cfg_for(CLIP, CLIP_PLAN_3), checkpoint=path, resume=True,
                              shard_optimizer=True)
    (out, *_) = run_local(train, 3, cfg, timeout_s=240)
    _, ref_params = reference_run(CLIP, "fp64")
    for name, want in ref_params.items():
        got = out["state"]["params"][name]
        assert float((got - want).norm() / want.norm()) < 1e-10, name


def test_bad_flag_is_named():
    with pytest.raises(ValueError, match="shard_optimizer: expected True or False"):
        check_config(TrainConfig(shard_optimizer="yes"))


def test_zero_grad_drops_gradients_the_optimizer_does_not_hold():
    model = get_trainable_model(CLIP)
    ex = Executor(model, make_plan(model, 1, "sequential"))
    ex.step(SyntheticStream(model).step(0))
    assert any(p.grad is not None for p in ex.parameters())
    ex.zero_grad()
    assert all(p.grad is None for p in ex.parameters())
