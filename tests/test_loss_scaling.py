"""Dynamic loss scaling (``precision="fp16"``, or ``loss_scaling=True``) against torch's own
``GradScaler`` driving a single-process run of the whole model.

The exact comparisons run in float64, where a power-of-two scale is exact, so that a scaled
step equals an unscaled one and only the scaler's decisions (skip, back off, grow) can differ.
A batch poisoned with inf on one task (tests/user_model.py's ``PoisonedStream``) makes the
gradients of that task's components NaN while the vision encoder's stay finite: on the
2-rank plan below, rank 0 holds the vision encoder only, so it would step alone where the
whole model skips unless the ranks share the inf/NaN check.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from scheduler.data import SyntheticStream
from scheduler.executor import Executor, make_plan
from scheduler.launch import run_local
from scheduler.tiny_models import get_trainable_model
from scheduler.trainer import TrainConfig, _to, check_config, train, train_many
from user_model import PoisonedStream

LR, CLIP_NORM, STEPS = 3e-3, 1.0, 5
INIT_SCALE, GROWTH = 2.0 ** 10, 2


def _s(metaop, b, e, devices):
    return {"metaop": metaop, "layer_begin": b, "layer_end": e, "devices": devices}


# tiny-clip on 2 ranks: rank 0 runs the vision encoder alone (for two tasks), rank 1 everything
# else, so rank 0 holds no parameter on audio-text's path.
VISION_APART = {"waves": [
    {"slices": [_s("vision-text/vision", 0, 2, [0]), _s("vision-text/text", 0, 2, [1])]},
    {"slices": [_s("vision-audio/vision", 0, 2, [0]), _s("audio-text/text", 0, 2, [1])]},
    {"slices": [_s("audio-text/audio", 0, 2, [1])]},
    {"slices": [_s("vision-audio/audio", 0, 2, [1])]},
    {"slices": [_s("vision-text/contrast", 0, 1, [1])]},
    {"slices": [_s("audio-text/contrast", 0, 1, [1])]},
    {"slices": [_s("vision-audio/contrast", 0, 1, [1])]},
]}


def _cfg(**options) -> TrainConfig:
    base = dict(model="tiny-clip", steps=STEPS, plan=VISION_APART, lr=LR, clip=CLIP_NORM,
                precision="fp64", loss_scaling=True, init_loss_scale=INIT_SCALE,
                loss_scale_growth_interval=GROWTH, data="user_model:PoisonedStream",
                return_state=True, progress=False, log_every=0)
    return TrainConfig(**{**base, **options})


def reference(steps: int = STEPS):
    """Per step: (task losses, the scale used, skipped), and the final parameters, of the whole
    model in one process under ``torch.amp.GradScaler``."""
    model = get_trainable_model("tiny-clip").build().double()
    named = sorted(model.named_parameters())
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=GROWTH)
    stream = PoisonedStream(model, seed=0)
    hist = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        batch = {t: {k: _to(v, "cpu", torch.float64) for k, v in b.items()}
                 for t, b in stream.step(s).items()}
        losses = model.reference_losses(batch)
        scaler.scale(sum(losses.values())).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        hist.append(({t: float(v.detach()) for t, v in losses.items()}, scale,
                     scaler.get_scale() < scale))
    return hist, {n: p.detach().clone() for n, p in named}


def _same_loss(got: float, want: float) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    return abs(got - want) <= 1e-10 * abs(want)


def assert_matches(result: dict, ref) -> None:
    ref_hist, ref_params = ref
    assert len(result["history"]) == len(ref_hist)
    for step, (rec, (losses, scale, skipped)) in enumerate(zip(result["history"], ref_hist)):
        assert (rec["loss_scale"], rec["skipped"]) == (scale, skipped), f"step {step}"
        assert all(_same_loss(rec["losses"][t], losses[t]) for t in losses), (step, rec["losses"], losses)
    params = result["state"]["params"]
    assert params.keys() == ref_params.keys()
    for name, want in ref_params.items():
        err = float((params[name] - want).norm() / want.norm().clamp_min(1e-12))
        assert err < 1e-10, f"{name}: relative error {err:.2e}"


def test_the_reference_skips_the_poisoned_step_and_grows_after_two_clean_ones():
    hist, _ = reference()
    assert [(scale, skipped) for _, scale, skipped in hist] == [
        (1024.0, False), (1024.0, True), (512.0, False), (512.0, False), (1024.0, False)]
    assert math.isnan(hist[1][0]["audio-text"]) and math.isfinite(hist[1][0]["vision-text"])


def test_two_ranks_skip_together_where_one_alone_saw_nan():
    """Rank 0's gradients are finite at the poisoned step; it skips with rank 1 all the same,
    and both follow the reference's scale, so every parameter ends where the reference's do."""
    results = run_local(train, 2, _cfg(), timeout_s=240)
    assert_matches(results[0], reference())
    assert [(h["loss_scale"], h["skipped"]) for h in results[1]["history"]] == [
        (h["loss_scale"], h["skipped"]) for h in results[0]["history"]]


def test_with_sharded_optimizer_state_on_three_ranks():
    """Loss scaling with ZeRO-1 (test_executor's CLIP_PLAN_3, every layer but the text
    encoder's second on all three ranks): each rank unscales and checks only the gradients its
    optimizer updates, and clips by the norm of those; the shared flag and norm still give the
    reference's scales, skips and parameters."""
    from test_executor import CLIP_PLAN_3

    results = run_local(train, 3, _cfg(plan=CLIP_PLAN_3, shard_optimizer=True), timeout_s=240)
    assert_matches(results[0], reference())


def test_one_process_matches_the_reference():
    """World of one: torch's plain GradScaler; the executor scales each task's loss."""
    plan = make_plan(get_trainable_model("tiny-clip"), 1, "sequential")
    assert_matches(train(_cfg(plan=plan)), reference())


def test_resume_restores_the_scale_and_its_growth_count(tmp_path):
    """Three steps, a checkpoint, two more: the same scales and parameters as five in a row.
    The scale at step 3 is the backed-off one (512), and the doubling at step 4 needs the
    count of clean steps from before the checkpoint."""
    plan = make_plan(get_trainable_model("tiny-clip"), 1, "sequential")
    path = str(tmp_path / "ck.pt")
    whole = train(_cfg(plan=plan))
    train(_cfg(plan=plan, steps=3, checkpoint=path))
    resumed = train(_cfg(plan=plan, checkpoint=path, resume=True))
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    assert [h["loss_scale"] for h in resumed["history"]] == [
        h["loss_scale"] for h in whole["history"][3:]] == [512.0, 1024.0]
    for name, p in whole["state"]["params"].items():
        assert torch.equal(resumed["state"]["params"][name], p), name


def test_fp16_trains_on_two_ranks_with_one_scale():
    """fp16 autocast from a scale that overflows: the first steps are skipped on both ranks
    alike until the scale fits, then the loss goes down; the first losses are the float64
    model's within fp16 rounding."""
    cfg = _cfg(precision="fp16", loss_scaling=None, init_loss_scale=2.0 ** 20, steps=12,
               data=None, loss_scale_growth_interval=2000)
    results = run_local(train_many, 2, [cfg], timeout_s=240)
    hists = [r[0]["history"] for r in results]
    scales = [[(h["loss_scale"], h["skipped"]) for h in hist] for hist in hists]
    assert scales[0] == scales[1]
    skipped = [s for _, s in scales[0]]
    assert skipped[0] and not all(skipped)
    assert skipped == sorted(skipped, reverse=True)  # back off until it fits, then no overflow
    first = [i for i, s in enumerate(skipped) if not s][0]
    assert scales[0][first][0] == 2.0 ** (20 - first)
    ref = get_trainable_model("tiny-clip").build().double()
    batch = {t: {k: _to(v, "cpu", torch.float64) for k, v in b.items()}
             for t, b in SyntheticStream(ref, seed=0).step(0).items()}
    with torch.no_grad():
        want = {t: float(v) for t, v in ref.reference_losses(batch).items()}
    assert hists[0][0]["losses"] == pytest.approx(want, rel=1e-2)
    params = results[0][0]["state"]["params"]
    assert all(torch.isfinite(p).all() for p in params.values())
    # the skipped steps all ran the initial model; the last three trained ones learnt
    before = sum(h["loss"] for h in hists[0][:first]) / first
    after = sum(h["loss"] for h in hists[0][-3:]) / 3
    assert after < 0.85 * before, (before, after)


@pytest.mark.parametrize("field,value,message", [
    ("init_loss_scale", 0.0, "init_loss_scale: expected a positive finite number"),
    ("init_loss_scale", math.inf, "init_loss_scale: expected a positive finite number"),
    ("init_loss_scale", True, "init_loss_scale: expected a positive finite number"),
    ("loss_scale_growth_interval", 0, r"loss_scale_growth_interval: expected an int >= 1"),
    ("loss_scaling", "yes", "loss_scaling: expected True, False or None"),
    ("precision", "fp8", "precision: expected one of"),
])
def test_bad_scaling_options_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        check_config(dataclasses.replace(_cfg(), **{field: value}))


@pytest.mark.parametrize("value,message", [
    (0.0, "positive finite number"), (-2.0, "positive finite number"), (math.nan, "positive finite"),
    (torch.ones(2), "expected a 0-d tensor"),
])
def test_executor_names_a_bad_loss_scale(value, message):
    model = get_trainable_model("tiny-clip")
    ex = Executor(model, make_plan(model, 1, "sequential"))
    with pytest.raises(ValueError, match=f"loss_scale: .*{message}"):
        ex.step(SyntheticStream(model).step(0), loss_scale=value)
