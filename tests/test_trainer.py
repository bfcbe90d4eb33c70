"""The training loop: global-norm clipping equals torch's, the built-in models learn, logging,
the `mtmm train` command, bf16 on GPUs, lazy tqdm."""

from __future__ import annotations

import math
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch

from scheduler.data import SyntheticStream
from scheduler.executor import Executor, make_plan
from scheduler.tiny_models import get_trainable_model
from scheduler.trainer import TrainConfig, check_config, clip_global, train
from test_executor import _has_val_kernels


def test_clip_global_equals_clip_grad_norm():
    model = get_trainable_model("tiny-clip")
    ex = Executor(model, make_plan(model, 1, "sequential"))
    ref = get_trainable_model("tiny-clip").build()
    data = SyntheticStream(ref).step(0)
    ex.step(data)
    sum(ref.reference_losses(data).values()).backward()
    want = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5))
    got = clip_global(ex, 0.5)
    assert abs(got - want) / want < 1e-6 and got > 0.5  # the clip was active
    refp = dict(ref.named_parameters())
    for name, p in ex.named_parameters():
        assert torch.allclose(p.grad, refp[name].grad, rtol=1e-5, atol=1e-9), name


def _first_last(hist, task):
    return statistics.mean(h["losses"][task] for h in hist[:5]), statistics.mean(h["losses"][task] for h in hist[-5:])


def test_tiny_clip_learns_and_logs(capsys):
    steps = 40
    cfg = TrainConfig(model="tiny-clip", steps=steps, method="sequential", progress=False, log_every=10)
    hist = train(cfg)["history"]
    out = capsys.readouterr().out
    for task in hist[0]["losses"]:
        first, last = _first_last(hist, task)
        assert last < 0.75 * first, f"{task}: loss {first:.3f} -> {last:.3f}"
    assert all(h["tokens_per_s"] > 0 and h["grad_norm"] > 0 for h in hist)
    # one line per 10 steps and the last, each with every task's loss and tokens/s
    lines = [ln for ln in out.splitlines() if ln.startswith("step")]
    assert len(lines) == steps // 10 + 1
    assert all(f"{t}=" in lines[0] for t in hist[0]["losses"]) and "tok/s" in lines[0]


def test_tiny_val_learns():
    """In a fresh process without TRITON_INTERPRET (the kernels' CPU path): the interpreter
    would make 40 steps take a minute."""
    if not _has_val_kernels():
        pytest.skip("mtmm_kernels.pack_multimodal/GroupedLinear missing")
    import json

    code = ("import json; from scheduler.trainer import TrainConfig, train; "
            "print(json.dumps(train(TrainConfig(model='tiny-val', steps=40, method='sequential', progress=False, "
            "log_every=0))['history']))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    hist = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     env=env, timeout=300).stdout)
    for task in ("vl", "al", "val"):
        first, last = _first_last(hist, task)
        assert last < 0.85 * first, f"{task}: loss {first:.3f} -> {last:.3f}"


def test_mtmm_train_command_runs_two_gloo_processes(capfd, tmp_path):
    import json

    from scheduler.cli import main

    metrics = tmp_path / "metrics.jsonl"
    argv = ["train", "--steps", "3", "--nproc", "2", "--no-progress", "--log-every", "1", "--cost", "profile",
            "--grad-accum", "2", "--metrics-file", str(metrics)]
    assert main(argv) == 0
    out = capfd.readouterr().out  # the step lines come from rank 0's process
    assert "trained tiny-clip with plan spindle" in out and "tokens/s" in out
    assert sum(line.startswith("step") for line in out.splitlines()) == 3
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # rank 0's only
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert f"step {r['step']:4d}  loss {r['loss']:.4f}" in out


def test_metrics_file_holds_the_history_as_strict_json(tmp_path):
    import json
    import math

    metrics = tmp_path / "m.jsonl"
    cfg = TrainConfig(model="tiny-clip", steps=2, method="sequential", progress=False, log_every=0,
                      clip=None, metrics_file=str(metrics))
    history = train(cfg)["history"]
    text = metrics.read_text()
    assert "NaN" not in text  # no clipping: no norm, written as null
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == 2 and math.isnan(history[0]["grad_norm"])
    for rec, h in zip(records, history):
        assert rec == {k: (None if k == "grad_norm" else v) for k, v in h.items()}


def test_mtmm_train_refuses_a_bad_grad_accum(capsys):
    from scheduler.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--grad-accum", "0"])
    assert "--grad-accum: expected a positive int, got 0" in capsys.readouterr().err


def test_mtmm_train_takes_clip_and_decay_all(capsys):
    """--clip MAX_NORM bounds the global gradient norm (0: no clipping) and --decay-all decays
    every parameter; a negative bound is refused before any process starts."""
    from scheduler.cli import build_parser, main
    from scheduler.cmd_train import config_from_args

    parser = build_parser()
    cfg = config_from_args(parser.parse_args(["train"]))
    assert cfg.clip == 1.0 and cfg.decay_all is False  # TrainConfig's defaults
    cfg = config_from_args(parser.parse_args(["train", "--clip", "0.25", "--decay-all"]))
    assert cfg.clip == 0.25 and cfg.decay_all is True
    assert config_from_args(parser.parse_args(["train", "--clip", "0"])).clip is None
    assert main(["train", "--clip", "-1", "--steps", "1"]) == 2
    assert "clip: expected a positive finite number, got -1.0" in capsys.readouterr().out
    for name in ("decay_all", "shard_optimizer", "loss_scaling", "overlap_grad_reduce"):
        with pytest.raises(ValueError, match=f"{name}: expected True.* got 1"):
            check_config(TrainConfig(**{name: 1}))


@pytest.mark.slow  # 3 gloo ranks, about 6-9 s
def test_mtmm_train_re_plans_on_measured_tokens(capfd):
    """--replan-every N: the command re-plans, logs the switch and counts it in its summary;
    bad settings are refused before any process starts."""
    from scheduler.cli import build_parser, main
    from scheduler.cmd_train import config_from_args

    cfg = config_from_args(build_parser().parse_args(["train"]))
    assert cfg.replan_every == 0 and cfg.replan_min_gain == 0.05  # off by default
    assert cfg.replan_calibrate is True  # measured times, unless --replan-model-times
    assert config_from_args(build_parser().parse_args(
        ["train", "--replan-model-times"])).replan_calibrate is False
    argv = ["train", "--steps", "3", "--nproc", "3", "--no-progress", "--log-every", "1",
            "--replan-every", "1", "--replan-min-gain", "0"]
    assert main(argv) == 0
    out = capfd.readouterr().out
    assert "re-planned on the measured tokens" in out and "MB of state moved" in out
    assert re.search(r"in 3 steps, \d+ tokens/s, switched plans [12] times?", out), out
    assert main(["train", "--replan-every", "-1"]) == 2
    assert "replan_every: expected an int >= 0, got -1" in capfd.readouterr().out
    assert main(["train", "--replan-every", "2", "--cost", "profile"]) == 2
    assert "re-planning measures tokens" in capfd.readouterr().out


def test_mtmm_train_reports_a_bad_plan_file(tmp_path, capsys):
    import json

    from scheduler.cli import main

    plan = make_plan(get_trainable_model("tiny-clip"), 3, "sequential")
    (tmp_path / "p.json").write_text(json.dumps(plan))
    rc = main(["train", "--steps", "1", "--nproc", "2", "--no-progress", "--plan-file", str(tmp_path / "p.json")])
    assert rc == 1
    assert "made for 3 devices, but the world has 2 processes" in capsys.readouterr().out


def test_progress_bar_is_optional(monkeypatch):
    """tqdm is imported only when a bar is shown, and its absence (the GPU machine may lack it)
    only removes the bar."""
    from scheduler import trainer

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    cfg = TrainConfig(steps=3)
    bar = trainer._progress(cfg, 0, 0)
    assert bar is not None and bar.total == 3
    bar.close()
    assert trainer._progress(cfg, 1, 0) is None  # only rank 0 draws
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    assert trainer._progress(cfg, 0, 0) is None


def test_fp64_trains_in_float64_and_a_bad_precision_is_named():
    """precision="fp64" (the executor tests' tiny-clip runs) keeps parameters, losses and
    gradients in float64; an unknown precision is refused by name."""
    out = train(TrainConfig(model="tiny-clip", steps=2, precision="fp64", progress=False,
                            log_every=0, return_state=True))
    assert {p.dtype for p in out["state"]["params"].values()} == {torch.float64}
    fp32 = train(TrainConfig(model="tiny-clip", steps=2, precision="fp32", progress=False,
                             log_every=0))
    for a, b in zip(out["history"], fp32["history"]):  # the same run, other rounding
        assert a["loss"] != b["loss"] and abs(a["loss"] - b["loss"]) < 1e-5 * abs(b["loss"])
    with pytest.raises(ValueError, match="^precision: .* got 'fp8'"):
        train(TrainConfig(model="tiny-clip", steps=1, precision="fp8", progress=False))


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["tiny-clip", "tiny-val"])
def test_bf16_autocast_on_gpu_tracks_fp32(model):
    """bf16 autocast (mtmm train's default on GPUs) against fp32; tiny-val packs autocast's
    bf16 streams with fp32 embeddings and runs its heads as one grouped GEMM."""
    base = dict(model=model, steps=3, method="sequential", progress=False, log_every=0)
    fp32 = train(TrainConfig(precision="fp32", **base))["history"]
    bf16 = train(TrainConfig(precision="bf16", **base))["history"]
    for a, b in zip(fp32, bf16):
        for task in a["losses"]:
            assert abs(a["losses"][task] - b["losses"][task]) < 5e-2 * abs(a["losses"][task])


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["tiny-clip", "tiny-val"])
def test_fp16_with_loss_scaling_on_gpu_tracks_fp32(model):
    """fp16 autocast with its loss scaler: the first step's losses are fp32's within fp16
    rounding, and a scale that fits lets the steps through."""
    base = dict(model=model, steps=3, method="sequential", progress=False, log_every=0)
    fp32 = train(TrainConfig(precision="fp32", **base))["history"]
    fp16 = train(TrainConfig(precision="fp16", init_loss_scale=2.0 ** 8, **base))["history"]
    for task, loss in fp32[0]["losses"].items():
        assert abs(fp16[0]["losses"][task] - loss) < 5e-2 * abs(loss)
    assert [h["skipped"] for h in fp16] == [False] * 3
    assert all(math.isfinite(h["grad_norm"]) for h in fp16)


@pytest.mark.slow
def test_runs_under_torchrun(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run([*torchrun, "-m", "scheduler.cli", "train", "--steps", "2", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    # the ranks' own errors come first in stderr, the launcher's summary of them last
    assert r.returncode == 0, r.stderr[:3000] + "\n...\n" + r.stderr[-1000:]
    assert "trained tiny-clip" in r.stdout


def test_profile_writes_each_ranks_trace_of_the_steps_asked(tmp_path):
    """2 gloo ranks, 4 steps, a trace of 2 (after one skipped and one of warm-up): every rank's
    Chrome trace has each of its slices' forward and backward once per recorded step, and two
    optimizer steps."""
    import json
    from collections import Counter

    from scheduler.executor import Schedule
    from scheduler.launch import run_local

    model = get_trainable_model("tiny-clip")
    plan = make_plan(model, 2, "spindle")
    cfg = TrainConfig(model="tiny-clip", steps=4, plan=plan, progress=False, log_every=0,
                      profile_dir=str(tmp_path), profile_steps=2)
    run_local(train, 2, cfg, timeout_s=240)
    schedule = Schedule(get_trainable_model("tiny-clip"), plan, 2)
    for rank in range(2):
        trace = json.loads((tmp_path / f"rank{rank}.json").read_text())
        names = Counter(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("mtmm"))
        mine = [s for s in schedule.slices if rank in s.devices]
        assert mine
        for phase in ("forward", "backward"):
            want = {f"mtmm {phase} wave {s.wave} {s.metaop}[{s.begin}:{s.end}]": 2 for s in mine}
            got = {n: c for n, c in names.items() if n.startswith(f"mtmm {phase} wave")}
            assert got == want, (rank, phase)
        assert names["mtmm optimizer step"] == 2
