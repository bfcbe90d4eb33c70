"""Model API: declaring a model, its MetaOps and planner problem, selective building, batch
checks; the synthetic stream and the dataset loader."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from scheduler.data import MultiTaskLoader, SyntheticStream, collate, shard_batch
from scheduler.modelapi import Component, MultiTaskModel, Task
from scheduler.tiny_models import DEFAULT_MODEL, get_trainable_model


# --- a model declared in a few lines, checked against a hand-written float64 forward --------
class Affine(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, ctx):
        return torch.tanh(self.lin(x))


class Read(nn.Module):
    def __init__(self, key, d_in, d):
        super().__init__()
        self.key, self.lin = key, nn.Linear(d_in, d)

    def forward(self, inputs, batch, ctx):
        return self.lin(batch[self.key])


class Half(nn.Module):
    def forward(self, x, ctx):
        return 0.5 * x


class Sum(nn.Module):
    def forward(self, inputs, batch, ctx):
        return sum(inputs[k] for k in sorted(inputs))


def mse_sum(outputs, batch):
    (y,) = outputs.values()
    return ((y - batch["y"]) ** 2).sum()


def small_model() -> MultiTaskModel:
    comps = [
        Component("a", layer=lambda i: Affine(4), num_layers=2, pre=lambda: Read("xa", 3, 4), hidden=4),
        Component("b", layer=lambda i: Affine(4), num_layers=1, pre=lambda: Read("xb", 5, 4), hidden=4),
        Component("top", layer=lambda i: Affine(4), num_layers=3, pre=lambda: Sum(), post=lambda: Half(),
                  hidden=4),
    ]
    mods = {"xa": ((3,), "float"), "xb": ((5,), "float"), "y": ((4,), "float")}
    tasks = [
        Task("ab", batch=6, flows=(("a", "top"), ("b", "top")), modalities=mods, loss=mse_sum),
        Task("a_only", batch=4, flows=(("a", "top"),), modalities={k: mods[k] for k in ("xa", "y")},
             loss=mse_sum, units=lambda b: 4 * b["y"].shape[0]),
    ]
    return MultiTaskModel("small", comps, tasks, seed=3)


def test_metaops_flows_and_order():
    m = small_model()
    assert m.metaops() == ["ab/a", "ab/b", "ab/top", "a_only/a", "a_only/top"]
    assert m.metaop_flows() == [("ab/a", "ab/top"), ("ab/b", "ab/top"), ("a_only/a", "a_only/top")]
    assert m.sink("ab") == "top" and m.task_order("a_only") == ["a", "top"]
    assert m.valid_counts("ab", "a", 8) == [1, 2, 3, 6] and m.valid_counts("a_only", "top", 3) == [1, 2]


def test_reference_losses_equal_hand_written_forward():
    m = small_model().build()
    gen = torch.Generator().manual_seed(1)
    data = {"ab": {"xa": torch.randn(6, 3, generator=gen), "xb": torch.randn(6, 5, generator=gen),
                   "y": torch.randn(6, 4, generator=gen)},
            "a_only": {"xa": torch.randn(4, 3, generator=gen), "y": torch.randn(4, 4, generator=gen)}}
    got = m.reference_losses(data)
    P = {n: p.detach().double() for n, p in m.named_parameters()}

    def lin(prefix, x):
        return x @ P[prefix + ".weight"].T + P[prefix + ".bias"]

    def stack(c, x, n):
        for i in range(n):
            x = torch.tanh(lin(f"components.{c}.layers.{i}.lin", x))
        return x

    def a(b):
        return stack("a", lin("components.a.pre.lin", b["xa"].double()), 2)

    ab = data["ab"]
    top = 0.5 * stack("top", a(ab) + stack("b", lin("components.b.pre.lin", ab["xb"].double()), 1), 3)
    want_ab = ((top - ab["y"].double()) ** 2).sum() / 6
    ao = data["a_only"]
    want_ao = ((0.5 * stack("top", a(ao), 3) - ao["y"].double()) ** 2).sum() / 16
    assert torch.allclose(got["ab"].double(), want_ab, rtol=1e-5)
    assert torch.allclose(got["a_only"].double(), want_ao, rtol=1e-5)


def test_selective_build_gives_the_same_weights():
    full = dict(get_trainable_model("tiny-clip").build().named_parameters())
    part = get_trainable_model("tiny-clip").build({"vision": [1], "text": [0]})
    names = {n for n, _ in part.named_parameters()}
    assert any(n.startswith("components.vision.layers.1.") for n in names)
    assert not any(n.startswith("components.vision.layers.0.") or n.startswith("components.vision.pre") for n in names)
    assert any(n.startswith("components.vision.post.") for n in names)  # post comes with the last layer
    assert any(n.startswith("components.text.pre.") for n in names)  # pre comes with layer 0
    assert not any(n.startswith("components.audio") for n in names)
    for n, p in part.named_parameters():
        assert torch.equal(p, full[n]), n
    other_seed = get_trainable_model("tiny-clip", seed=1).build()
    assert not torch.equal(dict(other_seed.named_parameters())["components.vision.layers.0.fc1.weight"],
                           full["components.vision.layers.0.fc1.weight"])


def test_problem_is_valid_and_matches_graph_model_spec():
    plan_mod = pytest.importorskip("scheduler.plan")
    m = get_trainable_model("tiny-clip")
    problem = m.to_problem(4)
    p = plan_mod.Problem.from_dict(problem)
    assert [op.name for op in p.metaops] == m.metaops()
    by = {op["name"]: op for op in problem["metaops"]}
    assert list(by["vision-text/vision"]["time_ms"]) == ["1", "2", "4"]  # divisors of batch 8
    assert list(by["audio-text/text"]["time_ms"]) == ["1", "2", "3"]  # of batch 6, <= 4 devices
    assert list(by["vision-text/contrast"]["time_ms"]) == ["1"]  # needs its whole batch
    t = by["vision-text/vision"]["time_ms"]
    assert t["1"] > t["2"] > t["4"] > 0
    graph = pytest.importorskip("scheduler.graph")
    g = graph.to_problem(m.to_model_spec(), 4)
    assert sorted(op["name"] for op in g["metaops"]) == sorted(m.metaops())
    assert sorted(map(tuple, g["flows"])) == sorted(map(tuple, problem["flows"]))


@pytest.mark.parametrize(
    "tasks, message",
    [
        ([Task("t", 2, (("a", "zz"),), {}, mse_sum)], "unknown component 'zz'"),
        ([Task("t", 2, (("a", "top"), ("b", "c2")), {}, mse_sum)], "exactly one sink"),
        ([Task("t", 2, (("a", "top"), ("top", "a")), {}, mse_sum)], "exactly one sink"),
        ([Task("t", 2, (("top", "a"),), {}, mse_sum)], "source component 'top' has no pre"),
        ([Task("t", 0, (("a", "top"),), {}, mse_sum)], "batch of task 't'"),
        ([Task("t/x", 2, (("a", "top"),), {}, mse_sum)], "bad or duplicate task name"),
    ],
)
def test_bad_declarations(tasks, message):
    comps = [Component("a", layer=lambda i: Affine(4), num_layers=1, pre=lambda: Read("x", 3, 4), hidden=4),
             Component("b", layer=lambda i: Affine(4), num_layers=1, pre=lambda: Read("x", 3, 4), hidden=4),
             Component("c2", layer=lambda i: Affine(4), num_layers=1, hidden=4),
             Component("top", layer=lambda i: Affine(4), num_layers=1, hidden=4)]
    with pytest.raises(ValueError, match=message):
        MultiTaskModel("bad", comps, tasks)


def test_cycle_is_refused():
    comps = [Component("a", layer=lambda i: Affine(4), num_layers=1, pre=lambda: Sum(), hidden=4),
             Component("b", layer=lambda i: Affine(4), num_layers=1, pre=lambda: Sum(), hidden=4),
             Component("c", layer=lambda i: Affine(4), num_layers=1, pre=lambda: Sum(), hidden=4)]
    with pytest.raises(ValueError, match="cycle"):
        MultiTaskModel("bad", comps, [Task("t", 2, (("a", "b"), ("b", "a"), ("b", "c")), {}, mse_sum)])


def test_bad_components():
    with pytest.raises(ValueError, match="num_layers of component 'x'"):
        Component("x", layer=lambda i: Affine(4), num_layers=0, hidden=4)
    with pytest.raises(ValueError, match="without '/'"):
        Component("x/y", layer=lambda i: Affine(4), num_layers=1, hidden=4)
    with pytest.raises(ValueError, match="duplicate name 'a'"):
        c = Component("a", layer=lambda i: Affine(4), num_layers=1, pre=lambda: Read("x", 3, 4), hidden=4)
        MultiTaskModel("m", [c, c], [])


def test_check_batch_names_task_and_modality():
    m = small_model()
    good = {"xa": torch.zeros(4, 3), "y": torch.zeros(4, 4)}
    m.check_batch("a_only", good)
    with pytest.raises(ValueError, match=r"'a_only', modality 'xa': expected shape \(4, 3\), got \(5, 3\)"):
        m.check_batch("a_only", {**good, "xa": torch.zeros(5, 3)})
    with pytest.raises(TypeError, match="expected a tensor"):
        m.check_batch("a_only", {**good, "y": [0.0]})


# --- data ----------------------------------------------------------------------------------
def test_synthetic_stream_is_deterministic_and_heterogeneous():
    model = get_trainable_model(DEFAULT_MODEL)
    a, b = SyntheticStream(model, seed=0), SyntheticStream(model, seed=0)
    s0, s0b, s1 = a.step(0), b.step(0), a.step(1)
    for task, batch in s0.items():
        model.check_batch(task, batch)
        assert all(torch.equal(batch[k], s0b[task][k]) for k in batch)
    assert not torch.equal(s0["vision-text"]["vision"], s1["vision-text"]["vision"])
    lens = s0["vision-text"]["text_len"]
    assert lens.min() < lens.max()  # lengths vary inside a batch
    assert {model.tasks[t].batch for t in s0} == {8, 6, 4}  # and batches across tasks


def test_loader_over_map_style_and_iterable_datasets():
    class MapDS(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"x": torch.full((i + 1, 2), float(i)), "label": torch.tensor(i)}

    class IterDS(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([{"v": torch.tensor([float(i)])} for i in range(3)])

    loader = MultiTaskLoader({"m": MapDS(), "it": IterDS()}, {"m": 3, "it": 2}, seed=0)
    steps = [loader.step() for _ in range(4)]
    assert sorted(steps[0]["m"]["label"].tolist() + steps[1]["m"]["label"].tolist()[:2]) == list(range(5))
    b = steps[0]["m"]
    assert b["x"].shape == (3, int(b["x_len"].max()), 2)
    for i, lbl in enumerate(b["label"].tolist()):
        assert b["x_len"][i] == lbl + 1 and torch.all(b["x"][i, lbl + 1:] == 0)
    assert [s["it"]["v"].flatten().tolist() for s in steps] == [[0, 1], [2, 0], [1, 2], [0, 1]]
    with pytest.raises(ValueError, match=r"no dataset for tasks \['zz'\]"):
        MultiTaskLoader({}, {"zz": 1})


def test_loader_steps_by_index_resume_where_they_would_have_been():
    """step(i) on map-style datasets reads what the i-th sequential step read (a resumed run);
    an iterable one only goes on in order."""
    class MapDS(torch.utils.data.Dataset):
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return {"label": torch.tensor(i)}

    class IterDS(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([{"v": torch.tensor([float(i)])} for i in range(3)])

    def labels(step):
        return {t: b["label"].tolist() for t, b in step.items()}

    datasets, sizes = {"a": MapDS(), "b": MapDS()}, {"a": 3, "b": 5}
    sequential = [labels(s) for s in itertools.islice(MultiTaskLoader(datasets, sizes, 1), 6)]
    resumed = MultiTaskLoader(datasets, sizes, 1)
    assert [labels(resumed.step(i)) for i in (4, 5, 0, 2)] == [sequential[i] for i in (4, 5, 0, 2)]
    assert sorted(sequential[0]["b"] + sequential[1]["b"][:2]) == list(range(7))  # an epoch
    mixed = MultiTaskLoader({"a": MapDS(), "it": IterDS()}, {"a": 3, "it": 2})
    mixed.step(0)
    mixed.step(1)
    with pytest.raises(ValueError, match=r"^index: datasets\['it'\] is iterable.*at its batch 2, not 5"):
        mixed.step(5)


class _Labels(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"label": torch.tensor(i)}


def test_loader_samples_tasks_per_step_by_weight_and_resumes():
    """tasks_per_step=k: k distinct tasks a step, drawn by weight from (seed, step) alone;
    step(i) reads what the i-th sequential step read, each map-style dataset at the batches
    its task had before; an iterable one advances only in the steps that draw its task."""
    sizes = {"a": 2, "b": 3, "c": 1, "d": 2}
    datasets = {t: _Labels(5 + i) for i, t in enumerate(sizes)}
    weights = {"a": 1.0, "b": 2.0, "c": 4.0, "d": 1e-6}
    loader = MultiTaskLoader(datasets, sizes, 3, tasks_per_step=2, task_weights=weights)
    steps = [loader.step() for _ in range(600)]
    assert all(len(s) == 2 for s in steps)
    assert all(list(s) == [t for t in sizes if t in s] for s in steps)  # the loader's order
    seen = {t: sum(t in s for s in steps) for t in sizes}
    assert seen["d"] <= 3 and seen["c"] > seen["b"] > seen["a"] > 100
    # the same tasks from the same seed, other ones from another
    again = MultiTaskLoader(datasets, sizes, 3, tasks_per_step=2, task_weights=weights)
    assert [again.tasks_of(i) for i in range(600)] == [tuple(s) for s in steps]
    other = MultiTaskLoader(datasets, sizes, 4, tasks_per_step=2, task_weights=weights)
    assert [other.tasks_of(i) for i in range(50)] != [tuple(s) for s in steps[:50]]
    # resumed by index: the labels the sequential run read
    resumed = MultiTaskLoader(datasets, sizes, 3, tasks_per_step=2, task_weights=weights)
    for i in (17, 3, 599, 0):
        got = resumed.step(i)
        assert {t: b["label"].tolist() for t, b in got.items()} == \
            {t: b["label"].tolist() for t, b in steps[i].items()}, i
    # a map-style task's epoch: every sample once in its first len/size batches
    firsts = [s["c"]["label"].item() for s in steps if "c" in s][:7]
    assert sorted(firsts) == list(range(7))


def test_loader_sampling_reads_an_iterable_dataset_only_when_its_task_is_drawn():
    class IterDS(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([{"v": torch.tensor([float(i)])} for i in range(100)])

    loader = MultiTaskLoader({"m": _Labels(4), "it": IterDS()}, {"m": 1, "it": 1}, 0,
                             tasks_per_step=1)
    steps = [loader.step() for _ in range(20)]
    read = [s["it"]["v"].item() for s in steps if "it" in s]
    assert 0 < len(read) < 20 and read == list(range(len(read)))
    assert loader.step(20) is not None  # in order
    with pytest.raises(ValueError, match=r"datasets\['it'\] is iterable"):
        loader.step(5)


def test_loader_sampling_settings_are_checked():
    sets, sizes = {"a": _Labels(3), "b": _Labels(3)}, {"a": 1, "b": 1}
    for bad in (0, 3, True, 1.0):
        with pytest.raises(ValueError, match=r"tasks_per_step: expected None or an int in \[1, 2\]"):
            MultiTaskLoader(sets, sizes, tasks_per_step=bad)
    with pytest.raises(ValueError, match="task_weights: only with tasks_per_step"):
        MultiTaskLoader(sets, sizes, task_weights={"a": 1, "b": 1})
    with pytest.raises(ValueError, match=r"task_weights: expected a weight for each of \['a', 'b'\]"):
        MultiTaskLoader(sets, sizes, tasks_per_step=1, task_weights={"a": 1})
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="task_weights: expected a positive finite weight for 'b'"):
            MultiTaskLoader(sets, sizes, tasks_per_step=1, task_weights={"a": 1, "b": bad})
    with pytest.raises(ValueError, match="index: expected an int >= 0"):
        MultiTaskLoader(sets, sizes).step(-1)


def test_collate_and_shard():
    b = collate([{"t": torch.tensor([1, 2, 3])}, {"t": torch.tensor([4])}])
    assert b["t"].tolist() == [[1, 2, 3], [4, 0, 0]] and b["t_len"].tolist() == [3, 1]
    s = shard_batch(b, 1, 2)
    assert s["t"].tolist() == [[4, 0, 0]] and s["t_len"].tolist() == [1]
    with pytest.raises(ValueError, match="shapes differ beyond dim 0"):
        collate([{"t": torch.zeros(2, 3)}, {"t": torch.zeros(2, 4)}])


def test_profiled_cost_times_every_metaop_and_plans():
    from scheduler.modelapi import profiled_cost

    model = get_trainable_model("tiny-clip")
    cost = profiled_cost(get_trainable_model("tiny-clip"), reps=2)
    problem = model.to_problem(2, cost=cost)
    for op in problem["metaops"]:
        assert op["time_ms"]["1"] > 0
        assert list(op["time_ms"]) == sorted(op["time_ms"], key=int)
    plan_mod = pytest.importorskip("scheduler.plan")
    plan_mod.Problem.from_dict(problem)
