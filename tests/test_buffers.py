"""Persistent buffers (a BatchNorm's running statistics) in the runtime: the holders of a
layer keep one value (the lowest holder's, as DDP keeps rank 0's), checkpoints keep and
restore them, and a plan switch moves them (tests/user_model.py's ``clip_with_batchnorm``)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from scheduler import checkpoint as ckpt
from scheduler import plan_switch
from scheduler.data import SyntheticStream
from scheduler.executor import Executor, make_plan
from scheduler.launch import run_local
from scheduler.tiny_models import get_trainable_model
from scheduler.trainer import TrainConfig, make_optimizer, train
from test_executor import CLIP_PLAN_3

BN = "user_model:clip_with_batchnorm"


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(model=BN, steps=2, plan=dict(CLIP_PLAN_3, model="clip-bn"), precision="fp64",
                               progress=False, log_every=0), **kw})


def _buffers_after_training(cfg: TrainConfig) -> dict:
    """Runs in each rank: trains, then returns this rank's buffers."""
    captured = {}
    real = Executor.sync_buffers

    def keep(self):
        real(self)
        captured.update({n: t.detach().clone() for n, t in self.named_buffers().items()})

    Executor.sync_buffers = keep
    try:
        train(cfg)
    finally:
        Executor.sync_buffers = real
    return captured


def test_holders_of_a_layer_keep_one_running_statistic():
    """CLIP_PLAN_3 runs vision layer 0 on all three ranks for two tasks, each on other samples:
    without the sync their running means part ways; with it every holder has rank 0's."""
    per_rank = run_local(_buffers_after_training, 3, _cfg(), timeout_s=240)
    name = "components.vision.layers.0.bn.running_mean"
    assert all(name in b for b in per_rank)
    assert all(torch.equal(b[name], per_rank[0][name]) for b in per_rank)
    assert float(per_rank[0][name].abs().sum()) > 0  # it moved from its zero start
    counts = {int(b["components.vision.layers.0.bn.num_batches_tracked"]) for b in per_rank}
    # rank 0's: vision-text's two steps (rank 2 also ran vision-audio's and counted 4 before
    # the sync took rank 0's)
    assert counts == {2}


def test_checkpoint_keeps_and_restores_buffers(tmp_path):
    path = tmp_path / "bn.pt"
    train(_cfg(plan=None, checkpoint=str(path)))
    state = ckpt.load(path)
    keys = [n for n in state["buffers"] if n.startswith("components.vision.")]
    assert len(keys) == 2 * 3  # two layers: running mean, variance, batches tracked
    model = get_trainable_model(BN)
    ex = Executor(model, make_plan(model, 1, "sequential"), dtype=torch.float64)
    ckpt.restore(ex, make_optimizer(sorted(ex.named_parameters()), TrainConfig()), state, model_name=BN)
    for name, t in ex.named_buffers().items():
        assert torch.equal(t, state["buffers"][name].to(t.dtype)), name
    del state["buffers"][keys[0]]
    with pytest.raises(ValueError, match="checkpoint: no values for buffers"):
        ckpt.restore(ex, make_optimizer(sorted(ex.named_parameters()), TrainConfig()), state, model_name=BN)


def _switch_moves_buffers() -> dict:
    model = get_trainable_model(BN)
    old = Executor(model, dict(CLIP_PLAN_3, model="clip-bn"))
    opt = make_optimizer(sorted(old.named_parameters()), TrainConfig())
    old.step(SyntheticStream(model).step(0))
    opt.step()
    old.sync_buffers()
    new = Executor(get_trainable_model(BN), make_plan(model, 3, "spindle"))
    plan_switch.migrate_state(old, opt, new, make_optimizer(sorted(new.named_parameters()), TrainConfig()))
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, {n: t.clone() for n, t in old.named_buffers().items()})
    olds = {n: t for part in box for n, t in part.items()}
    return {n: (t.clone(), olds[n]) for n, t in new.named_buffers().items()}


@pytest.mark.slow  # 3 gloo ranks, about 6-9 s
def test_a_plan_switch_moves_buffers():
    """From CLIP_PLAN_3 to spindle's plan: every new holder of a vision layer has the running
    statistics the old holders agreed on (not a fresh BatchNorm's)."""
    got = run_local(_switch_moves_buffers, 3, timeout_s=120)
    names = {n for part in got for n in part}
    assert len(names) == 2 * 3  # every buffer of both vision layers is held somewhere
    for part in got:
        for name, (now, before) in part.items():
            assert torch.equal(now, before), name
            if name.endswith("running_mean"):
                assert float(now.abs().sum()) > 0
