"""`mtmm train --memory-gb`: the runtime plans within each device's memory as the run keeps it
(MultiTaskModel.to_problem's memory terms), mtmm falls back to capped counts, and a plan that
cannot fit stops every rank with the planner's error."""

from __future__ import annotations

import pytest
import torch

from scheduler import costmodel
from scheduler.executor import make_plan
from scheduler.modelapi import _graph_component
from scheduler.plan import memory_per_device, validate
from scheduler.planner import plan_problem
from scheduler.tiny_models import get_trainable_model


def test_to_problem_charges_memory_as_the_run_keeps_it():
    """By hand: 16 bytes per parameter in fp32 (weight, gradient, two AdamW moments), 32 in
    fp64, the moments (1/2) sharded with shard_optimizer; activations from the per-token
    transformer estimate, scaled from bf16 to the activation dtype; checkpointing keeps a
    layer's input plus its share of one layer's recompute and charges 4/3 of the time."""
    model = get_trainable_model("tiny-val")
    params = model.param_counts()
    base = model.to_problem(3)
    f64 = model.to_problem(3, param_dtype=torch.float64, shard_optimizer=True)
    bf16 = model.to_problem(3, activation_dtype=torch.bfloat16)
    ck = model.to_problem(3, activation_checkpointing=True, activation_dtype=torch.bfloat16)
    assert "optimizer_shard_fraction" not in base and f64["optimizer_shard_fraction"] == 0.5
    checked = set()
    for m, m64, mb, mc in zip(base["metaops"], f64["metaops"], bf16["metaops"], ck["metaops"]):
        c = model.components[m["component"]]
        t = model.tasks[m["task"]]
        tokens = int(t.seq_lens.get(c.name, 1))
        assert m["param_gb"] == pytest.approx(params[c.name] * 16 / 1e9, rel=1e-12)
        assert m64["param_gb"] == pytest.approx(params[c.name] * 32 / 1e9, rel=1e-12)
        full_bf16 = t.batch * tokens * costmodel._activation_bytes_per_token(_graph_component(c)) / 1e9
        assert mb["activation_gb"] == pytest.approx(full_bf16, rel=1e-12)
        assert m["activation_gb"] == pytest.approx(2 * full_bf16, rel=1e-12)  # fp32
        assert m64["activation_gb"] == pytest.approx(4 * full_bf16, rel=1e-12)
        if c.kind != "loss":
            kept = t.batch * tokens * c.hidden * 2 / 1e9 + full_bf16 / c.num_layers
            assert mc["activation_gb"] == pytest.approx(kept, rel=1e-12)
            assert mc["activation_gb"] < mb["activation_gb"] or c.num_layers == 1
            for n, ms in mc["time_ms"].items():
                assert ms == pytest.approx(mb["time_ms"][n] * 4 / 3, rel=1e-12)
        checked.add(c.kind)
    assert "transformer" in checked
    for kwargs, name in (({"shard_optimizer": 1}, "shard_optimizer"),
                         ({"activation_checkpointing": "yes"}, "activation_checkpointing"),
                         ({"param_dtype": torch.int32}, "param_dtype"),
                         ({"activation_dtype": "bf16"}, "activation_dtype")):
        with pytest.raises(ValueError, match=name):
            model.to_problem(3, **kwargs)


def _tight_memory(model, world: int) -> float:
    """A device memory (GB) at which spindle's plan of ``model`` (fp32 run) does not fit and
    mtmm's fits only with capped counts, found on a grid below the unlimited plan's peak."""
    free = model.to_problem(world)
    peak = max(memory_per_device(dict(free, device_memory_gb=1e9), plan_problem(free, "mtmm")))
    for i in range(1, 60):
        gb = peak * (1 - i / 100)
        d = dict(free, device_memory_gb=gb)
        try:
            plan_problem(d, "spindle")
            continue
        except ValueError:
            pass
        try:
            if plan_problem(d, "mtmm")["count_cap"]:
                return gb
        except ValueError:
            continue
    raise AssertionError("no memory between spindle's refusal and mtmm's capped plan")


@pytest.mark.slow  # about 15 s: two 3-rank runs
def test_train_plans_within_memory_gb_on_three_ranks():
    """3 gloo ranks, tiny-clip, fp32: under a memory where spindle refuses, `mtmm train --plan
    mtmm` runs a capped plan (the one the planner gives for the run's own problem, within the
    memory); its losses are those of the unlimited plan (the same model and data, another
    placement)."""
    from scheduler.launch import run_local
    from scheduler.trainer import TrainConfig, train

    model = get_trainable_model("tiny-clip")
    gb = _tight_memory(model, 3)
    problem = model.to_problem(3, device_memory_gb=gb)
    want = make_plan(model, 3, "mtmm", problem=problem)
    validate(problem, want)
    assert want["count_cap"] and max(memory_per_device(problem, want)) <= gb
    cfg = dict(model="tiny-clip", steps=3, progress=False, log_every=0, method="mtmm")
    capped = run_local(train, 3, TrainConfig(memory_gb=gb, **cfg), timeout_s=240)
    free = run_local(train, 3, TrainConfig(**cfg), timeout_s=240)
    assert capped[0]["count_cap"] == want["count_cap"] and free[0]["count_cap"] is None
    # each rank reports the planner's estimate for itself (no CUDA peak on a CPU)
    estimates = memory_per_device(problem, want)
    assert [r["memory_estimate_gb"] for r in capped] == pytest.approx(estimates, rel=1e-12)
    assert all(r["memory_estimate_gb"] <= gb and r["peak_memory_gb"] is None for r in capped)
    for a, b in zip(capped[0]["history"], free[0]["history"]):
        for task, loss in a["losses"].items():
            assert loss == pytest.approx(b["losses"][task], rel=1e-5, abs=1e-7)


def _train_or_error(cfg) -> str | None:
    from scheduler.trainer import train

    try:
        train(cfg)
    except ValueError as e:
        return f"{type(e).__name__}: {e}"
    return None


def test_a_plan_that_cannot_fit_stops_every_rank_with_the_planners_error():
    """Planning happens on rank 0; its error reaches the other ranks, which raise it instead of
    waiting for a plan (under torchrun nothing would stop them before the collective's
    timeout)."""
    from scheduler.launch import run_local
    from scheduler.trainer import TrainConfig

    gb = _tight_memory(get_trainable_model("tiny-clip"), 3)
    cfg = TrainConfig(model="tiny-clip", steps=1, progress=False, log_every=0, memory_gb=gb)
    errors = run_local(_train_or_error, 3, cfg, timeout_s=90)  # spindle refuses
    assert all(e.startswith("PlanMemoryError: ") and "cannot fit in memory" in e for e in errors)
    assert not errors[0].startswith("PlanMemoryError: planning on rank 0 failed")
    assert all(e.endswith("; --plan mtmm caps components' device counts until a plan fits, "
                          "where one does") for e in errors)
    assert all(e.startswith("PlanMemoryError: planning on rank 0 failed: cannot fit")
               for e in errors[1:])


def test_mtmm_train_takes_memory_gb(capsys):
    from scheduler.cli import main

    gb = _tight_memory(get_trainable_model("tiny-clip"), 3)
    argv = ["train", "--nproc", "3", "--steps", "1", "--no-progress", "--log-every", "0",
            "--memory-gb", f"{gb!r}"]
    assert main(argv) == 1  # spindle, the default, refuses
    assert "cannot fit in memory" in capsys.readouterr().out
    assert main([*argv, "--plan", "mtmm"]) == 0
    out = capsys.readouterr().out
    assert "with plan mtmm (count caps " in out and "GB estimated by the planner" in out
    assert main([*argv[:-1], "-1"]) == 2
    assert "memory_gb: expected a positive finite number, got -1.0" in capsys.readouterr().out


@pytest.mark.slow  # about 11 s: two 3-rank runs
def test_a_given_plan_is_checked_against_memory_gb():
    """With an explicit plan, memory_gb checks it (the planner is not asked): the unlimited
    plan under a memory it passes stops every rank, naming the device and the estimate; under
    its own peak it trains."""
    from scheduler.launch import run_local
    from scheduler.trainer import TrainConfig

    model = get_trainable_model("tiny-clip")
    plan = make_plan(model, 3, "mtmm")
    peak = max(memory_per_device(model.to_problem(3), plan))
    cfg = dict(model="tiny-clip", steps=1, progress=False, log_every=0, plan=plan)
    errors = run_local(_train_or_error, 3, TrainConfig(memory_gb=peak * 0.999, **cfg), timeout_s=90)
    assert all(e is not None and e.startswith("PlanMemoryError: plan: device ")
               and "would hold about" in e for e in errors), errors
    assert f"{peak:.6g} GB" in errors[0]
    assert run_local(_train_or_error, 3, TrainConfig(memory_gb=peak, **cfg), timeout_s=90) == [None] * 3
