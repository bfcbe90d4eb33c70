"""Training a user's own model and data (``package.module:attribute``, scheduler/user_code.py)
with the ``mtmm train`` command, and the errors for bad names."""

from __future__ import annotations

import json

import pytest
import torch

from scheduler.data import SyntheticStream
from scheduler.tiny_models import get_trainable_model
from scheduler.user_code import is_spec, load_callable


def test_mtmm_train_runs_a_users_model_on_a_users_data(tmp_path):
    """Two gloo ranks train tests/user_model.py's model on its stream: the first step's losses
    are the whole model's on that stream's first batch (float64)."""
    from scheduler.cli import main

    metrics = tmp_path / "m.jsonl"
    rc = main(["train", "--model", "user_model:small_clip", "--data", "user_model:ShiftedStream",
               "--nproc", "2", "--steps", "2", "--no-progress", "--log-every", "0",
               "--precision", "fp64", "--metrics-file", str(metrics)])
    assert rc == 0
    first = json.loads(metrics.read_text().splitlines()[0])
    model = get_trainable_model("user_model:small_clip")
    assert model.name == "user-clip" and model.components["vision"].num_layers == 1
    model = model.build().double()
    batch = SyntheticStream(model, seed=1000).step(0)  # what ShiftedStream gives at seed 0
    batch = {t: {k: v.double() if v.is_floating_point() else v for k, v in b.items()}
             for t, b in batch.items()}
    with torch.no_grad():
        want = {t: float(loss) for t, loss in model.reference_losses(batch).items()}
    assert first["losses"] == pytest.approx(want, rel=1e-10)


def test_spec_form():
    assert is_spec("pkg.mod:factory") and is_spec("m:a.b")
    assert not any(is_spec(t) for t in ("tiny-clip", ":f", "m:", "m"))


@pytest.mark.parametrize("spec,message", [
    ("tiny-clip", "expected 'package.module:callable'"),
    ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
    ("user_model:missing", "has no attribute 'missing'"),
    ("user_model:NOT_CALLABLE", r"is not callable \(a int\)"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=f"^data: .*{message}"):
        load_callable(spec, "data")


def test_a_factory_that_returns_no_model_is_named():
    with pytest.raises(TypeError, match="^model: 'user_model:not_a_model' returned a str"):
        get_trainable_model("user_model:not_a_model")


def test_mtmm_train_names_a_bad_factory_before_starting_ranks(capsys):
    from scheduler.cli import main

    assert main(["train", "--model", "user_model:not_a_model"]) == 2
    assert "model: 'user_model:not_a_model' returned a str" in capsys.readouterr().out
    assert main(["train", "--data", "user_model:missing"]) == 2
    assert "data: 'user_model' has no attribute 'missing'" in capsys.readouterr().out


def test_mtmm_train_refuses_an_unknown_model_name(capsys):
    from scheduler.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--model", "tiny-nothing"])
    assert "or 'package.module:factory', got 'tiny-nothing'" in capsys.readouterr().err


def test_mtmm_plan_plans_a_trainable_model_and_mtmm_train_runs_that_plan(tmp_path, capsys):
    """`mtmm plan --model user_model:small_clip --gpus 2 --device H100` writes the problem the
    runtime would plan on H100s (the model's own valid counts, H100 layer times), stamped with
    the model and device count; `mtmm train --plan-file` runs it on 2 ranks. Under a memory
    limit the plan keeps each device's estimate within it (bf16 activations, as on GPUs)."""
    from scheduler import costmodel
    from scheduler.cli import main
    from scheduler.modelapi import analytic_cost
    from scheduler.plan import memory_per_device, validate
    from scheduler.planner import plan_problem

    out = tmp_path / "plan.json"
    argv = ["plan", "--model", "user_model:small_clip", "--gpus", "2", "--device", "H100",
            "--method", "mtmm", "-o", str(out)]
    assert main(argv) == 0
    plan = json.loads(out.read_text())
    assert plan["model"] == "user-clip" and plan["num_devices"] == 2
    model = get_trainable_model("user_model:small_clip")
    problem = model.to_problem(2, island_size=2, cost=analytic_cost(costmodel.H100),
                               activation_dtype=torch.bfloat16)
    want = plan_problem(problem, "mtmm")
    assert plan["waves"] == want["waves"] and plan["makespan_ms"] == want["makespan_ms"]
    a800 = plan_problem(model.to_problem(2, island_size=2, cost=analytic_cost(costmodel.A800)),
                        "mtmm")
    assert a800["makespan_ms"] > plan["makespan_ms"]  # the H100's times, not the A800's
    capsys.readouterr()
    assert main(["train", "--model", "user_model:small_clip", "--plan-file", str(out),
                 "--nproc", "2", "--steps", "2", "--no-progress", "--log-every", "0"]) == 0
    assert "trained user_model:small_clip with plan mtmm" in capsys.readouterr().out
    assert main(["train", "--model", "tiny-clip", "--plan-file", str(out), "--nproc", "2",
                 "--steps", "1", "--no-progress", "--log-every", "0"]) == 1
    assert "made for model 'user-clip'" in capsys.readouterr().out

    peak = max(memory_per_device(dict(problem, device_memory_gb=1e9), want))
    assert main([*argv, "--memory-gb", repr(peak * 0.99), "--activation-checkpointing"]) == 0
    limited = dict(model.to_problem(2, island_size=2, cost=analytic_cost(costmodel.H100),
                                    activation_dtype=torch.bfloat16, activation_checkpointing=True,
                                    device_memory_gb=peak * 0.99))
    plan = json.loads(out.read_text())
    validate(limited, plan)
    assert max(memory_per_device(limited, plan)) <= peak * 0.99
    for bad, message in ((["--tasks", "2"], "--tasks applies to the zoo models"),
                         (["--model", "nope"], "--model: expected a zoo model"),
                         (["--gpus", "0"], "--gpus: expected a positive int, got 0")):
        assert main([*argv, *bad]) == 1
        assert message in capsys.readouterr().err
