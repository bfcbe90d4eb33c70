"""The paper's three models as planner problems."""

from __future__ import annotations

import pytest

from scheduler import zoo
from scheduler.plan import PlanMemoryError, Problem


def test_models_and_task_variants():
    assert set(zoo.MODELS) == {"multitask-clip", "ofasys", "qwen-val"}
    assert [len(zoo.model_spec("multitask-clip", k).tasks) for k in (4, 7, 10)] == [4, 7, 10]
    assert [t.name for t in zoo.model_spec("qwen-val").tasks] == ["VL", "AL", "VAL"]
    assert len(zoo.model_spec("ofasys").tasks) == 7
    # Variants are prefixes: the 4-task CLIP is the first four pairs of the 10-task one.
    clip10 = zoo.model_spec("multitask-clip", 10)
    assert zoo.model_spec("multitask-clip", 4).tasks == clip10.tasks[:4]
    named = zoo.model_spec("qwen-val", ["VAL", "VL"])
    assert [t.name for t in named.tasks] == ["VAL", "VL"]


@pytest.mark.parametrize("name, published_b, rel", [
    ("multitask-clip", 1.2, 0.10),
    ("ofasys", 0.66, 0.10),
    ("qwen-val", 9.25, 0.05),
])
def test_sizes_match_the_paper(name, published_b, rel):
    assert zoo.model_spec(name).params / 1e9 == pytest.approx(published_b, rel=rel)


def test_published_architecture_facts():
    clip = zoo.model_spec("multitask-clip")
    v = clip.component("vision")
    assert (v.layers, v.hidden, v.heads) == (32, 1280, 16)
    t = next(t for t in clip.tasks if t.name == "vision-text")
    assert t.seq_lens == {"vision": 257, "text": 77, "loss": 1}
    q = zoo.model_spec("qwen-val")
    llm = q.component("llm")
    assert (llm.layers, llm.hidden, llm.mlp, llm.gated) == (32, 4096, 11008, True)
    assert (q.component("vision").layers, q.component("vision").hidden) == (48, 1664)
    assert (q.component("audio").layers, q.component("audio").hidden) == (32, 1280)
    # LLM input = resampled vision 256 + pooled audio 750 + text.
    llm_in = {t.name: t.seq_lens["llm"] for t in q.tasks}
    assert llm_in["VAL"] - llm_in["VL"] == 750 and llm_in["VAL"] - llm_in["AL"] == 256


def test_paper_grid():
    grid = zoo.paper_grid()
    assert ("multitask-clip", 4, 8) in grid and ("multitask-clip", 7, 16) in grid
    assert ("multitask-clip", 10, 32) in grid
    assert {(k, g) for m, k, g in grid if m == "qwen-val"} == {(3, 32), (3, 64)}
    assert all(k in (4, 7) and 8 <= g <= 32 for m, k, g in grid if m == "ofasys")


@pytest.mark.parametrize("model, tasks, gpus", zoo.paper_grid())
def test_grid_problems_parse_and_are_whole(model, tasks, gpus):
    spec = zoo.model_spec(model, tasks)
    p = Problem.from_dict(zoo.build_problem(model, tasks, gpus))
    assert p.num_devices == gpus and p.island_size == 8
    # One MetaOp per (task, component it uses), with the component's full depth.
    assert len(p.metaops) == sum(len(t.seq_lens) for t in spec.tasks)
    for m in p.metaops:
        assert m.layers == spec.component(m.component).layers
        batch = next(t.batch for t in spec.tasks if t.name == m.task)
        assert m.counts == tuple(n for n in range(1, gpus + 1) if batch % n == 0)
        assert gpus in m.counts  # every batch is a multiple of 64
        assert m.param_gb >= 0 and m.activation_gb > 0 and m.output_mb > 0
    assert len(p.flows) == sum(len(t.flows) for t in spec.tasks)


def test_activation_checkpointing_problem():
    """Every MetaOp with weights: activation_gb is its layers' inputs plus one layer's
    recompute, times a third longer; a loss MetaOp unchanged."""
    spec = zoo.model_spec("multitask-clip", 4)
    plain = zoo.build_problem("multitask-clip", 4, 8)
    ck = zoo.build_problem("multitask-clip", 4, 8, activation_checkpointing=True)
    seen = set()
    for a, b in zip(plain["metaops"], ck["metaops"]):
        assert a["name"] == b["name"] and a["param_gb"] == b["param_gb"]
        c = spec.component(a["component"])
        task = next(t for t in spec.tasks if t.name == a["task"])
        inputs_gb = task.batch * task.seq_lens[c.name] * c.hidden * 2 / 1e9  # bf16
        if c.kind == "loss":
            assert (b["activation_gb"], b["time_ms"]) == (a["activation_gb"], a["time_ms"])
        else:
            assert b["activation_gb"] == pytest.approx(inputs_gb + a["activation_gb"] / a["layers"], rel=1e-6)
            assert b["activation_gb"] < a["activation_gb"] / 5
            for n, ms in a["time_ms"].items():
                assert b["time_ms"][n] > ms  # the all-reduce part is not scaled
                assert b["time_ms"][n] <= ms * 4 / 3 * (1 + 1e-6)
        seen.add(c.kind)
    assert seen == {"transformer", "loss"}
    with pytest.raises(ValueError, match="activation_checkpointing must be a bool"):
        zoo.build_problem("multitask-clip", 4, 8, activation_checkpointing="yes")


@pytest.mark.parametrize("model,tasks,gpus,memory_gb", [
    ("multitask-clip", 10, 32, 24), ("ofasys", 7, 16, 24), ("multitask-clip", 4, 8, 80)])
def test_activation_checkpointing_plans_what_memory_refused(model, tasks, gpus, memory_gb):
    """Under a device memory the whole activations cannot fit (refused before planning);
    checkpointed, both backends plan it within that memory (validated), the makespan at most a
    third longer than the unlimited plain one."""
    from scheduler.plan import validate
    from scheduler.planner import plan_problem

    plain = zoo.build_problem(model, tasks, gpus, device_memory_gb=memory_gb)
    with pytest.raises(PlanMemoryError, match="cannot fit in memory"):
        plan_problem(plain, method="mtmm")
    ck = zoo.build_problem(model, tasks, gpus, device_memory_gb=memory_gb,
                           activation_checkpointing=True)
    free = plan_problem(zoo.build_problem(model, tasks, gpus), method="mtmm")
    for backend in ("cpp", "python"):
        plan = plan_problem(ck, method="mtmm", backend=backend)
        validate(ck, plan)  # every device within memory_gb at every point
        assert free["makespan_ms"] < plan["makespan_ms"] <= free["makespan_ms"] * 4 / 3 * 1.05


def test_qwen_val_on_64_80gb_devices_needs_checkpointing_and_sharded_optimizer_state():
    """QWen-VAL's activations alone exceed 64 x 80 GB; checkpointed they fit, but the LLM's
    replicated Adam state (32 layers x 3.24 GB) fits no device that runs all its layers, which
    the allocation asks for: spindle refuses it, and mtmm plans it only by capping a slice's
    devices (so that each device holds fewer LLM layers). With ZeRO-1 among each layer's
    holders both back ends plan it uncapped, the same plan, within memory (validated with each
    layer's final holders), about 4/3 of the unlimited plan."""
    from scheduler.plan import memory_per_device, validate
    from scheduler.planner import plan_problem

    base = dict(device_memory_gb=80.0)
    with pytest.raises(PlanMemoryError, match="cannot fit in memory"):
        plan_problem(zoo.build_problem("qwen-val", 3, 64, **base), method="mtmm")
    checkpointed = zoo.build_problem("qwen-val", 3, 64, activation_checkpointing=True, **base)
    with pytest.raises(PlanMemoryError, match="cannot fit in memory"):
        plan_problem(checkpointed, method="spindle")
    with pytest.raises(PlanMemoryError, match="cannot fit in memory"):
        plan_problem(checkpointed, method="mtmm", memory_fallback=False)
    capped = plan_problem(checkpointed, method="mtmm")
    assert capped["count_cap"]["llm"] < 64
    validate(checkpointed, capped)
    p = zoo.build_problem("qwen-val", 3, 64, activation_checkpointing=True,
                          optimizer_sharding=True, **base)
    assert p["optimizer_shard_fraction"] == 0.75
    plans = [plan_problem(p, method="mtmm", backend=b) for b in ("cpp", "python")]
    assert plans[0]["waves"] == plans[1]["waves"]
    assert plans[0]["count_cap"] is None
    validate(p, plans[0])
    assert max(memory_per_device(p, plans[0])) <= 80.0
    free = plan_problem(zoo.build_problem("qwen-val", 3, 64), method="mtmm")
    assert free["makespan_ms"] < plans[0]["makespan_ms"] <= free["makespan_ms"] * 4 / 3 * 1.05
    assert plans[0]["makespan_ms"] < capped["makespan_ms"]


# 24 GB: about 350 plans in the Python twin, 20 s on a 2-core CPU
@pytest.mark.parametrize("memory_gb", [40.0, pytest.param(24.0, marks=pytest.mark.slow)])
def test_qwen_val_on_small_devices_plans_under_count_caps(memory_gb):
    """At 40 and 24 GB even sharded state does not fit devices that run every LLM layer; the
    memory fallback plans under caps on each component's device counts: the same plan on both
    back ends, within memory, each component's slices no wider than its cap, the lower bound
    the problem's own, no slower than the best single cap on every component, slower than the
    80 GB plan."""
    from scheduler.count_caps import count_capped
    from scheduler.plan import Problem, lower_bound, memory_per_device, validate
    from scheduler.planner import plan_problem

    d = zoo.build_problem("qwen-val", 3, 64, device_memory_gb=memory_gb,
                          activation_checkpointing=True, optimizer_sharding=True)
    with pytest.raises(PlanMemoryError, match="cannot fit in memory"):
        plan_problem(d, method="mtmm", memory_fallback=False)
    plans = [plan_problem(d, method="mtmm", backend=b) for b in ("cpp", "python")]
    assert plans[0]["waves"] == plans[1]["waves"]
    plan = plans[0]
    assert plan["count_cap"] == plans[1]["count_cap"] and plan["count_cap"]["llm"] < 64
    validate(d, plan)
    assert max(memory_per_device(d, plan)) <= memory_gb
    p = Problem.from_dict(d)
    for s in (s for w in plan["waves"] for s in w["slices"]):
        cap = plan["count_cap"].get(p.metaops[p.index(s["metaop"])].component, 64)
        assert len(s["devices"]) <= cap
    assert plan["lower_bound_ms"] == lower_bound(p)
    uniform, components = [], {m.component for m in p.metaops}
    for cap in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48):
        try:
            alt = plan_problem(count_capped(p, dict.fromkeys(components, cap)),
                               method="mtmm", memory_fallback=False)
        except PlanMemoryError:
            continue
        uniform.append(alt["makespan_ms"])
    assert uniform and plan["makespan_ms"] <= min(uniform)
    roomy = dict(d, device_memory_gb=80.0)
    assert plan_problem(roomy, method="mtmm")["makespan_ms"] < plan["makespan_ms"]


def test_mtmm_plan_takes_memory_and_checkpointing(tmp_path, capsys):
    import json

    from scheduler.cli import main
    from scheduler.plan import memory_per_device, validate

    args = ["plan", "--model", "ofasys", "--tasks", "7", "--gpus", "16", "--memory-gb", "24"]
    assert main(args) == 1  # spindle, the default
    err = capsys.readouterr().err
    assert "cannot fit in memory" in err and "; --method mtmm caps components' device" in err
    out = tmp_path / "plan.json"
    assert main([*args, "--activation-checkpointing", "-o", str(out)]) == 0
    problem = zoo.build_problem("ofasys", 7, 16, device_memory_gb=24, activation_checkpointing=True)
    plan = json.loads(out.read_text())
    validate(problem, plan)
    peak = max(memory_per_device(problem, plan))
    assert f"memory       peak {peak:.1f} GB per device" in capsys.readouterr().out and peak <= 24
    assert main([*args[:-1], "-5"]) == 1
    assert "--memory-gb: expected a positive number" in capsys.readouterr().err
    problem = tmp_path / "p.json"
    problem.write_text(json.dumps(zoo.build_problem("ofasys", 4, 8)))
    assert main(["plan", str(problem), "--activation-checkpointing"]) == 1
    assert "apply to --model" in capsys.readouterr().err
    qwen = ["plan", "--model", "qwen-val", "--gpus", "64", "--memory-gb", "80",
            "--activation-checkpointing"]
    assert main(qwen) == 1
    assert "cannot fit in memory" in capsys.readouterr().err
    assert main([*qwen, "--shard-optimizer"]) == 0
    assert "count cap" not in capsys.readouterr().out
    small = [*qwen[:-2], "40", "--activation-checkpointing", "--shard-optimizer"]
    assert main([*small, "--method", "mtmm", "--no-memory-fallback"]) == 1
    err = capsys.readouterr().err
    assert "cannot fit in memory" in err and "; mtmm without --no-memory-fallback caps" in err
    assert main([*qwen[:-2], "16", "--activation-checkpointing", "--shard-optimizer",
                 "--method", "mtmm"]) == 1  # refused with every cap: nothing to suggest
    err = capsys.readouterr().err
    assert "capped at each smaller count" in err and "caps components'" not in err
    saved = tmp_path / "problem.json"
    assert main([*small, "--method", "mtmm", "-o", str(out), "--save-problem", str(saved)]) == 0
    assert json.loads(saved.read_text()) == zoo.build_problem(
        "qwen-val", None, 64, device_memory_gb=40.0, activation_checkpointing=True,
        optimizer_sharding=True)
    printed = capsys.readouterr().out
    caps = json.loads(out.read_text())["count_cap"]
    assert caps["llm"] < 64 and "of the capped problem" in printed
    assert "count caps   " + ", ".join(f"{c} {n}" for c, n in caps.items()) in printed
    assert main(["simulate", str(saved), str(out)]) == 0
    simulated = capsys.readouterr().out
    assert simulated.startswith("iteration ") and "memory peak " in simulated
    assert simulated.split("memory peak ")[1] == printed.split("memory       peak ")[1]


def test_shared_components_give_separate_metaops():
    p = Problem.from_dict(zoo.build_problem("qwen-val", gpus=32))
    llm = [m for m in p.metaops if m.component == "llm"]
    assert [m.name for m in llm] == ["VL/llm", "AL/llm", "VAL/llm"]
    # Same weights, different shapes: VAL's LLM input is the longest, so it is the slowest.
    assert llm[2].time_ms[1] > llm[1].time_ms[1]
    assert len({m.param_gb for m in llm}) == 1


def test_the_llm_dominates_qwen_val():
    p = Problem.from_dict(zoo.build_problem("qwen-val", gpus=64))
    work = {}
    for m in p.metaops:
        work[m.component] = work.get(m.component, 0.0) + m.layers * m.time_ms[1]
    assert max(work, key=work.get) == "llm"
    assert work["llm"] > 0.5 * sum(work.values())


def test_bad_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        zoo.model_spec("gpt")
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        zoo.model_spec("qwen-val", 4)
    with pytest.raises(ValueError, match="distinct names"):
        zoo.model_spec("qwen-val", ["VL", "XL"])
    with pytest.raises(TypeError, match="tasks"):
        zoo.model_spec("qwen-val", "VL")
    with pytest.raises(ValueError, match="num_devices"):
        zoo.build_problem("ofasys", 4, gpus=0)
