"""Switching plans mid-run (scheduler/plan_switch.py) and re-planning on measured tokens
(scheduler/replan.py, ``TrainConfig.replan_every``).

A run that changes plans between steps must train exactly like the single-process reference
of test_executor.py (float64, < 1e-10): every parameter and every AdamW moment reaches its
new holders intact, sharded or not, through plans where a rank holds nothing.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from scheduler import plan_switch, replan
from scheduler.data import SyntheticStream
from scheduler.executor import Executor, make_plan
from scheduler.launch import run_local
from scheduler.plan import PlanMemoryError, Problem
from scheduler.simulate import simulate
from scheduler.state_moves import held_state, layer_holders, move_ms, relabel_for_state
from scheduler.tiny_models import get_trainable_model
from scheduler.trainer import TrainConfig, check_config, make_optimizer, train, train_many
from test_executor import CLIP, CLIP_PLAN_3, VAL_PLAN_3, _s, assert_matches_reference, cfg_for, needs_val

# tiny-clip on ranks 0 and 1 only: rank 2 holds nothing
CLIP_PLAN_01 = {"waves": [
    {"slices": [_s("vision-text/vision", 0, 2, [0]), _s("vision-text/text", 0, 2, [1])]},
    {"slices": [_s("vision-text/contrast", 0, 1, [0]), _s("audio-text/audio", 0, 2, [1])]},
    {"slices": [_s("audio-text/text", 0, 2, [0, 1])]},
    {"slices": [_s("audio-text/contrast", 0, 1, [1]), _s("vision-audio/vision", 0, 2, [0])]},
    {"slices": [_s("vision-audio/audio", 0, 2, [0, 1])]},
    {"slices": [_s("vision-audio/contrast", 0, 1, [0])]},
]}


def _train_switching(cfgs: list[TrainConfig], plans: list[list[dict]],
                     bucket_mbs: list[float] | None = None) -> list[dict]:
    """In each rank: ``train(cfg)`` with every re-plan answered by the next of its ``plans``
    (a forced switch at each ``replan_every`` step), switches sending in buckets of
    ``bucket_mbs`` MB (default ``plan_switch.BUCKET_MB``)."""
    results = []
    default_bucket = plan_switch.BUCKET_MB
    for cfg, queue, bucket in zip(cfgs, plans, bucket_mbs or [default_bucket] * len(cfgs)):
        queue = list(queue)
        plan_switch.BUCKET_MB = bucket

        def forced(model, plan, world, tokens, **kw):
            return replan.Verdict(queue.pop(0), 1.0, 0.5, "forced by the test")

        real, replan.reconsider = replan.reconsider, forced
        try:
            results.append(train(cfg))
        finally:
            replan.reconsider, plan_switch.BUCKET_MB = real, default_bucket
        assert dist.get_rank() != 0 or not queue, "a forced plan was not used"  # rank 0 decides
    return results


def test_switching_plans_every_step_on_3_ranks_matches_the_reference():
    """CLIP_PLAN_3 -> rank 2 holding nothing -> spindle, with the optimizer unsharded and
    sharded (owners move, a parameter's moments go to its new owner only); the sharded run's
    switches send one entry per round (100-byte buckets)."""
    model = get_trainable_model(CLIP)
    spindle = make_plan(model, 3, "spindle")
    cfgs = [dataclasses.replace(cfg_for(CLIP, CLIP_PLAN_3), replan_every=1, shard_optimizer=s)
            for s in (False, True)]
    results = run_local(_train_switching, 3, cfgs, [[CLIP_PLAN_01, spindle]] * 2,
                        [plan_switch.BUCKET_MB, 1e-4], timeout_s=240)
    for i in range(2):
        r = results[0][i]
        assert_matches_reference(CLIP, r)
        assert [h["replan"]["switched"] for h in r["history"][:2]] == [True, True]
        assert r["history"][0]["replan"]["moved_mb"] > 0
        rounds = [x[i]["history"][0]["replan"]["rounds"] for x in results]
        # a tiny-clip moves well under a bucket: one round on ranks that send or receive;
        # one entry at a time, many
        assert max(rounds) == 1 if i == 0 else max(rounds) > 10, rounds
        # every rank's moments add up to each parameter's once (sharded) or per holder
        assert sum(x[i]["optimizer_state_bytes"] for x in results) > 0
    whole = get_trainable_model(CLIP).build().double()
    moments = 2 * sum(p.numel() * p.element_size() for p in whole.parameters())
    assert sum(x[1]["optimizer_state_bytes"] for x in results) == moments


@pytest.mark.slow
@needs_val
def test_switching_tiny_val_plans_keeps_its_packed_run_on_the_reference():
    """tiny-val (packed activations, grouped heads: fp32, its ranks run mtmm's Triton kernels)
    from VAL_PLAN_3 to the mtmm plan after the first step, the optimizer sharded."""
    model = get_trainable_model("tiny-val")
    cfg = dataclasses.replace(cfg_for("tiny-val", VAL_PLAN_3), replan_every=2, shard_optimizer=True)
    (r,) = run_local(_train_switching, 3, [cfg], [[make_plan(model, 3, "mtmm")]], timeout_s=300)[0]
    assert r["history"][1]["replan"]["switched"]
    assert_matches_reference("tiny-val", r)


def test_one_process_switch_copies_every_value_and_moment_bit_for_bit():
    model = get_trainable_model(CLIP)
    plan_a, plan_b = make_plan(model, 1, "sequential"), make_plan(model, 1, "spindle")
    cfg = TrainConfig(model=CLIP, lr=1e-2)
    old = Executor(model, plan_a)
    old_opt = make_optimizer(sorted(old.named_parameters()), cfg)
    old.step(SyntheticStream(model).step(0))
    old_opt.step()
    new = Executor(get_trainable_model(CLIP), plan_b)
    new_opt = make_optimizer(sorted(new.named_parameters()), cfg)
    info = plan_switch.migrate_state(old, old_opt, new, new_opt)
    assert info["moved_mb"] == 0  # nothing leaves the process
    olds, news = dict(old.named_parameters()), dict(new.named_parameters())
    assert olds.keys() == news.keys()
    for name, p in olds.items():
        q = news[name]
        assert q is not p and torch.equal(q, p), name
        want, got = old_opt.state[p], new_opt.state[q]
        assert want.keys() == got.keys(), name
        for key in want:
            assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(want[key])), (name, key)
            if torch.is_tensor(want[key]) and want[key].dim():
                assert got[key].data_ptr() != want[key].data_ptr()  # a copy, not the old memory


def test_a_switch_before_any_step_moves_values_and_no_state():
    model = get_trainable_model(CLIP)
    cfg = TrainConfig(model=CLIP)
    old = Executor(model, make_plan(model, 1, "sequential"))
    new = Executor(get_trainable_model(CLIP, seed=5), make_plan(model, 1, "spindle"))
    new_opt = make_optimizer(sorted(new.named_parameters()), cfg)
    plan_switch.migrate_state(old, make_optimizer(sorted(old.named_parameters()), cfg), new, new_opt)
    assert all(torch.equal(p, dict(new.named_parameters())[n]) for n, p in old.named_parameters())
    assert not new_opt.state


def test_plans_of_different_models_are_refused():
    offers = [{"a": ((2,), torch.float32, {}), "b": ((2,), torch.float32, {})}]
    with pytest.raises(ValueError, match=r"none of the new plan's ranks holds \['b'\]"):
        plan_switch._transfers(offers, [{"a": True}])
    with pytest.raises(ValueError, match=r"no old rank has \['c'\]"):
        plan_switch._transfers(offers, [{"a": True, "b": True, "c": True}])
    with pytest.raises(ValueError, match="owned by ranks 0 and 1"):
        plan_switch._transfers([{"a": offers[0]["a"]}, {"a": offers[0]["a"]}], [{"a": True}])


# --- measured tokens --------------------------------------------------------------------------
def _counts_on_ranks(plan: dict, steps: int) -> dict:
    model = get_trainable_model(CLIP)
    ex = Executor(model, plan)
    stream = SyntheticStream(model)
    for s in range(steps):
        ex.step(stream.step(s))
    ex.evaluate(stream.step(99))  # an evaluation is not counted
    return ex.take_token_counts()


def _expected_counts(steps: int) -> dict:
    """From the batches alone: text padded to the step's longest sample, the other encoders'
    fixed token counts, two rows per sample at the contrastive head (its [B, 2, D] pair)."""
    model = get_trainable_model(CLIP)
    stream = SyntheticStream(model)
    out = {}
    for task, t in model.tasks.items():
        for comp in model.task_order(task):
            if comp == "text":
                out[f"{task}/text"] = sum(stream.step(s)[task]["text"].shape[1] for s in range(steps)) / steps
            elif comp == "contrast":
                out[f"{task}/contrast"] = 2.0
            else:
                out[f"{task}/{comp}"] = float(stream.step(0)[task][comp].shape[1])
    return out


def test_token_counts_are_the_rows_each_metaop_received_on_any_plan():
    want = _expected_counts(3)
    assert len({v for k, v in want.items() if k.endswith("/text")}) > 1  # lengths differ by task
    alone = _counts_on_ranks(make_plan(get_trainable_model(CLIP), 1, "sequential"), 3)
    assert alone == pytest.approx(want, rel=1e-12)
    spread = run_local(_counts_on_ranks, 3, CLIP_PLAN_3, 3, timeout_s=120)
    assert all(c == spread[0] for c in spread)  # the same on every rank
    assert spread[0] == pytest.approx(want, rel=1e-12)


def test_token_counts_reset_after_each_take():
    model = get_trainable_model(CLIP)
    ex = Executor(model, make_plan(model, 1, "sequential"))
    ex.step(SyntheticStream(model).step(0))
    assert ex.take_token_counts()
    assert ex.take_token_counts() == {}


def test_to_problem_takes_measured_tokens_for_the_metaops_named():
    model = get_trainable_model(CLIP)
    declared = model.to_problem(3)
    same = model.to_problem(3, seq_lens={"vision-text/text": 7})  # the declared length
    assert same == declared
    longer = model.to_problem(3, seq_lens={"vision-text/text": 40.5})
    for a, b in zip(declared["metaops"], longer["metaops"]):
        if a["name"] == "vision-text/text":
            assert all(b["time_ms"][n] > a["time_ms"][n] for n in a["time_ms"])
            assert b["activation_gb"] == pytest.approx(a["activation_gb"] * 40.5 / 7)
        else:
            assert a == b
    with pytest.raises(ValueError, match="seq_lens: 'vision-text/lm' is not a MetaOp"):
        model.to_problem(3, seq_lens={"vision-text/lm": 3})
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="seq_lens: expected a positive finite number"):
            model.to_problem(3, seq_lens={"vision-text/text": bad})


# --- the decision -------------------------------------------------------------------------------
def test_reconsider_keeps_a_plan_made_for_the_same_tokens():
    model = get_trainable_model(CLIP)
    plan = make_plan(model, 3, "spindle")
    v = replan.reconsider(model, plan, 3, {}, method="spindle")
    assert v.plan is None and v.new_ms == pytest.approx(v.current_ms, rel=1e-12)
    assert "not more than 5% faster" in v.reason


def _candidates(model, problem: dict, plan: dict) -> tuple[dict, dict]:
    """The spindle plans for ``problem`` placed near ``plan``'s state and not, both renamed."""
    p = Problem.from_dict(problem)
    holders = layer_holders(p, plan)
    return tuple(relabel_for_state(p, make_plan(model, 4, "spindle", problem=pr), holders)
                 for pr in (dict(problem, held_state=held_state(holders)), problem))


def test_reconsider_switches_to_the_plan_for_the_measured_tokens():
    """The text encoder of one task turns out 30x longer than declared: the plan for the
    measured tokens is the planner's plan for that problem, and simulated faster on it."""
    model = get_trainable_model(CLIP)
    plan = make_plan(model, 4, "spindle")
    tokens = {"audio-text/text": 210.0}
    v = replan.reconsider(model, plan, 4, tokens, method="spindle", min_gain=0.0)
    problem = model.to_problem(4, seq_lens=tokens)
    p = Problem.from_dict(problem)
    # of the planner's plans for that problem placed near the running plan's state and not,
    # each renamed to move the least, the one whose time and move add up to less
    near, fresh = _candidates(model, problem, plan)
    assert move_ms(p, plan, near) < move_ms(p, plan, fresh)  # near the state, it moves less
    costs = [simulate(problem, c).iteration_ms + move_ms(p, plan, c) for c in (near, fresh)]
    assert v.plan["waves"] == (near, fresh)[costs.index(min(costs))]["waves"]
    assert v.new_ms + v.move_ms == pytest.approx(min(costs), rel=1e-12)
    assert v.plan["waves"] != plan["waves"]
    assert v.new_ms == pytest.approx(simulate(problem, v.plan).iteration_ms, rel=1e-12)
    assert v.current_ms == pytest.approx(simulate(problem, plan).iteration_ms, rel=1e-12)
    assert v.new_ms < v.current_ms
    assert v.record()["switched"] is True
    gain = 1 - v.new_ms / v.current_ms
    held = replan.reconsider(model, plan, 4, tokens, method="spindle", min_gain=gain + 0.01)
    assert held.plan is None and held.new_ms == pytest.approx(v.new_ms)


def test_reconsider_keeps_the_plan_when_none_fits_memory():
    model = get_trainable_model(CLIP)
    plan = make_plan(model, 3, "spindle")
    v = replan.reconsider(model, plan, 3, {}, method="spindle", device_memory_gb=1e-9)
    assert v.plan is None and v.new_ms is None and "fits memory" in v.reason
    with pytest.raises(PlanMemoryError):
        make_plan(model, 3, "spindle", device_memory_gb=1e-9)


def test_replan_settings_are_checked():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="replan_every: expected an int >= 0"):
            check_config(TrainConfig(replan_every=bad))
    for bad in (-0.1, 1.0, True, float("nan")):
        with pytest.raises(ValueError, match="replan_min_gain: expected a number in"):
            check_config(TrainConfig(replan_min_gain=bad))
    with pytest.raises(ValueError, match="replan_every: re-planning measures tokens"):
        check_config(TrainConfig(replan_every=2, cost="profile"))
    with pytest.raises(ValueError, match="replan_calibrate: expected True or False"):
        check_config(TrainConfig(replan_calibrate=1))
    with pytest.raises(ValueError, match="min_gain"):
        replan.check_min_gain(1.0)


def test_the_trainer_re_plans_on_its_own_and_still_matches_the_reference():
    """No forcing: tiny-clip's text runs longer than its declared 7 tokens, and with no
    threshold the re-plan after some step switches; the run equals the reference. (The
    model's times for the measured tokens: measured times would make the verdict timing's.)"""
    cfg = dataclasses.replace(cfg_for(CLIP, None), method="spindle", replan_every=1,
                              replan_min_gain=0.0, replan_calibrate=False)
    (r,) = run_local(train_many, 3, [cfg], timeout_s=240)[0]
    assert_matches_reference(CLIP, r)
    records = [h["replan"] for h in r["history"] if "replan" in h]
    assert len(records) == 2 and any(x["switched"] for x in records)
    for x in records:
        assert x["new_ms"] <= x["current_ms"] or not x["switched"]


def test_reconsider_keeps_a_plan_whose_move_outweighs_the_steps_it_saves(monkeypatch):
    model = get_trainable_model(CLIP)
    plan = make_plan(model, 4, "spindle")
    tokens = {"audio-text/text": 210.0}
    v = replan.reconsider(model, plan, 4, tokens, method="spindle", min_gain=0.0)
    saved = v.current_ms - v.new_ms
    assert v.plan is not None and 0 < v.move_ms < saved
    # every move priced alike: the candidate is the faster plan; its move, 10.5 steps' saving
    from scheduler import state_moves

    monkeypatch.setattr(state_moves, "move_between", lambda *a, **k: 0.0)
    v = replan.reconsider(model, plan, 4, tokens, method="spindle", min_gain=0.0)
    saved = v.current_ms - v.new_ms
    monkeypatch.setattr(state_moves, "move_between", lambda *a, **k: 10.5 * saved)
    kept = replan.reconsider(model, plan, 4, tokens, method="spindle", min_gain=0.0, horizon_steps=10)
    assert kept.plan is None and "less than its state move" in kept.reason
    took = replan.reconsider(model, plan, 4, tokens, method="spindle", min_gain=0.0, horizon_steps=11)
    assert took.plan is not None and took.move_ms == pytest.approx(10.5 * saved)
    with pytest.raises(ValueError, match="horizon_steps"):
        replan.reconsider(model, plan, 4, tokens, method="spindle", horizon_steps=0)


@pytest.mark.slow  # 3 gloo ranks, about 6-9 s
def test_calibrated_re_planning_records_every_metaops_factor_and_matches_the_reference():
    """With measured times (the default) the verdict depends on this machine's timing; the
    run still equals the reference, and the re-plan after step 1 (step 0 warms up, untimed)
    scaled every MetaOp by a positive factor."""
    cfg = dataclasses.replace(cfg_for(CLIP, None), method="spindle", replan_every=1)
    (r,) = run_local(train_many, 3, [cfg], timeout_s=240)[0]
    assert_matches_reference(CLIP, r)
    names = set(get_trainable_model(CLIP).metaops())
    assert r["history"][0]["replan"]["time_factors"] == {}  # the first step is not timed
    factors = r["history"][1]["replan"]["time_factors"]
    assert set(factors) == names and all(f > 0 for f in factors.values())


# --- measured times -------------------------------------------------------------------------------
def _times_on_ranks(plan: dict, data_indices: list[int]) -> dict:
    from user_model import PartialStream

    model = get_trainable_model(CLIP)
    ex = Executor(model, plan)
    stream = PartialStream(model)
    for i in data_indices:
        ex.step(stream.step(i))
    ex.evaluate(stream.step(0))  # not counted
    return ex.take_slice_times()


@pytest.mark.slow  # 3 gloo ranks, about 6-9 s
def test_slice_times_cover_each_slice_that_ran_per_call_on_any_plan():
    """Every slice of the plan that ran appears once with its device count and layers, the
    same on every rank; PartialStream's step 2 runs vision-audio alone, so over steps 0 and 2
    vision-text ran once and vision-audio twice, and each is timed per call that ran it."""
    want = sorted((sl["metaop"], len(sl["devices"]), sl["layer_end"] - sl["layer_begin"])
                  for w in CLIP_PLAN_3["waves"] for sl in w["slices"])
    got = run_local(_times_on_ranks, 3, CLIP_PLAN_3, [0, 2], timeout_s=120)
    assert all(g == got[0] for g in got)
    flat = sorted((m, n, layers) for m, entries in got[0].items() for n, layers, _ in entries)
    assert flat == want
    assert all(ms > 0 for entries in got[0].values() for _, _, ms in entries)
    only_vt = _times_on_ranks(make_plan(get_trainable_model(CLIP), 1, "sequential"), [1])
    assert "audio-text/audio" not in only_vt and "vision-text/vision" in only_vt


def test_calibrate_scales_each_metaop_by_measured_over_modelled():
    problem = {"metaops": [
        {"name": "t/a", "time_ms": {"1": 4.0, "2": 2.5, "4": 2.0}},
        {"name": "t/b", "time_ms": {"1": 1.0}},
        {"name": "t/c", "time_ms": {"1": 3.0}},
    ]}
    # t/a: 3 layers on 2 devices (modelled 7.5 ms) and 1 on 4 (2.0 ms) took 19 ms in all;
    # t/b ran on 3 devices, a count its table lacks; t/c was not measured
    factors = replan.calibrate(problem, {"t/a": [(2, 3, 15.0), (4, 1, 4.0)], "t/b": [(3, 1, 9.0)]})
    assert factors == {"t/a": pytest.approx(2.0)}
    assert problem["metaops"][0]["time_ms"] == pytest.approx({"1": 8.0, "2": 5.0, "4": 4.0})
    assert problem["metaops"][1]["time_ms"] == {"1": 1.0}
    assert problem["metaops"][2]["time_ms"] == {"1": 3.0}


def test_reconsider_on_measured_times_plans_for_them():
    """Measured times ten times the model's for one MetaOp: the verdict simulates both plans
    on the scaled problem, and its new plan is the planner's for that problem."""
    model = get_trainable_model(CLIP)
    plan = make_plan(model, 4, "spindle")
    times = {"vision-text/vision": [(n, layers, 10 * model.to_problem(4)["metaops"][0]["time_ms"][str(n)] * layers)
                                    for n, layers in ((len(sl["devices"]), sl["layer_end"] - sl["layer_begin"])
                                                      for w in plan["waves"] for sl in w["slices"]
                                                      if sl["metaop"] == "vision-text/vision")]}
    v = replan.reconsider(model, plan, 4, {}, times=times, method="spindle", min_gain=0.0)
    assert v.factors == {"vision-text/vision": pytest.approx(10.0)}
    problem = model.to_problem(4)
    replan.calibrate(problem, times)
    assert v.current_ms == pytest.approx(simulate(problem, plan).iteration_ms, rel=1e-12)
    p = Problem.from_dict(problem)
    costs = [(simulate(problem, c).iteration_ms, move_ms(p, plan, c))
             for c in _candidates(model, problem, plan)]
    assert (v.new_ms, v.move_ms) == min(costs, key=sum)
    assert v.record()["time_factors"] == {"vision-text/vision": pytest.approx(10.0)}


def test_a_resumed_re_planning_run_plans_for_the_tokens_it_measured(tmp_path, monkeypatch):
    """The checkpoint keeps the tokens of the last re-plan; resuming with re-planning on makes
    the first plan for them (without it, for the declared lengths)."""
    import scheduler.trainer as trainer

    path = str(tmp_path / "run.pt")
    base = dict(model=CLIP, precision="fp64", progress=False, log_every=0, checkpoint=path,
                replan_every=1, replan_calibrate=False)
    first = train(TrainConfig(steps=2, **base))
    tokens = first["history"][0]["replan"]["tokens"]
    assert tokens == pytest.approx(_expected_counts(1), rel=1e-12)  # step 0's rows
    from scheduler import checkpoint as ckpt

    assert ckpt.load(path)["extra"]["measured_tokens"] == tokens
    seen = []
    real = trainer.make_plan

    def spy(model, world, method, **kw):
        seen.append(kw.get("seq_lens"))
        return real(model, world, method, **kw)

    monkeypatch.setattr(trainer, "make_plan", spy)
    train(TrainConfig(steps=3, resume=True, **base))
    train(TrainConfig(steps=4, resume=True, **{**base, "replan_every": 0}))
    assert seen == [tokens, None]


@pytest.mark.gpu
def test_on_a_gpu_slices_are_timed_by_cuda_events_and_a_switch_copies_exactly():
    model = get_trainable_model(CLIP)
    cfg = TrainConfig(model=CLIP)
    old = Executor(model, make_plan(model, 1, "sequential"), device="cuda")
    opt = make_optimizer(sorted(old.named_parameters()), cfg)
    stream = SyntheticStream(model)
    for i in range(2):
        old.zero_grad()
        old.step({t: {k: v.cuda() for k, v in b.items()} for t, b in stream.step(i).items()})
        opt.step()
    times = old.take_slice_times()
    assert set(times) == set(model.metaops())
    assert all(ms > 0 for entries in times.values() for _, _, ms in entries)
    new = Executor(get_trainable_model(CLIP), make_plan(model, 1, "spindle"), device="cuda")
    new_opt = make_optimizer(sorted(new.named_parameters()), cfg)
    plan_switch.migrate_state(old, opt, new, new_opt)
    news = dict(new.named_parameters())
    for name, p in old.named_parameters():
        assert news[name].is_cuda and torch.equal(news[name], p), name
        for key, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(new_opt.state[news[name]][key]), torch.as_tensor(v))


def test_mtmm_plan_takes_measured_tokens_for_a_trainable_model(tmp_path, capsys):
    """mtmm plan --model tiny-clip --tokens T.json plans for those tokens (the problem it saves
    is to_problem's with seq_lens=T); a zoo model or a problem file refuses --tokens."""
    import json

    from scheduler.cli import main

    tokens = {"audio-text/text": 210.0}
    (tmp_path / "t.json").write_text(json.dumps(tokens))
    argv = ["plan", "--model", CLIP, "--gpus", "4", "--tokens", str(tmp_path / "t.json"),
            "--save-problem", str(tmp_path / "p.json"), "-o", str(tmp_path / "plan.json")]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "p.json").read_text())
    declared = {m["name"]: m for m in json.loads(json.dumps(
        _problem_as_planned(CLIP, 4)))["metaops"]}
    for m in saved["metaops"]:
        if m["name"] == "audio-text/text":
            assert m["activation_gb"] == pytest.approx(declared[m["name"]]["activation_gb"] * 210 / 7)
        else:
            assert m == declared[m["name"]]
    assert main(["plan", "--model", "multitask-clip", "--tasks", "4", "--tokens", str(tmp_path / "t.json")]) == 1
    assert "--tokens applies to a model `mtmm train` runs" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "p.json"), "--tokens", str(tmp_path / "t.json")]) == 1
    assert "--tokens apply to --model" in capsys.readouterr().err


def _problem_as_planned(name: str, gpus: int) -> dict:
    """The problem mtmm plan --model makes for a trainable model (A800 times, bf16 autocast)."""
    from scheduler import costmodel
    from scheduler.modelapi import analytic_cost

    return get_trainable_model(name).to_problem(
        gpus, island_size=min(8, gpus), cost=analytic_cost(costmodel.PRESETS["A800"].with_(island_size=min(8, gpus))),
        activation_dtype=torch.bfloat16)


def test_buckets_cut_each_pairs_entries_in_order_within_the_limit():
    parts = [("a", "", 10), ("a", "exp_avg", 10), ("b", "", 30), ("c", "", 5), ("d", "", 1)]
    # 4-byte entries, 80-byte buckets: 40 + 40 fit one, b (120) alone, then c and d together
    assert plan_switch._buckets(parts, 4, 80.0) == [parts[:2], parts[2:3], parts[3:]]
    assert plan_switch._buckets(parts, 4, 1e9) == [parts]
    assert plan_switch._buckets(parts, 4, 1.0) == [[p] for p in parts]
    assert plan_switch._buckets([], 4, 80.0) == []
    model = get_trainable_model(CLIP)
    ex = Executor(model, make_plan(model, 1, "sequential"))
    opt = make_optimizer(sorted(ex.named_parameters()), TrainConfig(model=CLIP))
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="bucket_mb: expected a positive number"):
            plan_switch.migrate_state(ex, opt, ex, opt, bucket_mb=bad)
