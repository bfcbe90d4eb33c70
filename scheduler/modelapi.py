"""Model API for the runtime: components made of identical layers, tasks that route data through them.

A :class:`Component` is an ``nn.Module`` holding a stack of ``num_layers`` identical layers plus
optional ``pre`` (input adaptor, runs before layer 0) and ``post`` (output adaptor, runs after
the last layer) parts. Parts are built from factories, each under its own seed, so that any rank
can build exactly the parts it runs and still get the same weights as every other rank and as a
single-process run (selective parameter storage).

A :class:`Task` declares its batch (size, modalities with their trailing shapes), its flows
through components and its loss. A :class:`MultiTaskModel` holds both and derives the planner's
view of itself: one MetaOp ``"task/component"`` per component a task uses (the Spindle
contraction of a stack of identical layers), ``graph.ModelSpec`` and the problem dict.

Calling conventions (what the executor and the reference run call):
  ``ctx = component.context(task, batch)``   per-shard extras (masks, cu_seqlens); default None
  ``x = pre(inputs, batch, ctx)``            inputs: {upstream component: its output}
  ``x = layer(x, ctx)``                      for every layer of the stack
  ``y = post(x, ctx)``
  ``loss_sum = task.loss({sink: y}, batch)`` the loss SUMMED over the shard's units
  ``task.units(batch)``                      how many units the full batch has (the divisor)
Every tensor passed between components has one row (dim 0) per sample, unless the component
declares ``rows(task, batch) -> list[int]`` (packed activations: rows of each sample).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

Batch = dict[str, torch.Tensor]


def _seed_for(model_seed: int, *parts: object) -> int:
    return zlib.crc32("/".join(map(str, (model_seed, *parts))).encode()) & 0x7FFFFFFF


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Component(nn.Module):
    """A stack of ``num_layers`` identical layers with optional ``pre``/``post`` parts.

    Args:
        name: component name (parameters are shared by every task that uses it).
        layer: factory ``(index) -> nn.Module`` called as ``layer(x, ctx)``.
        num_layers: length of the stack (>= 1).
        pre: optional factory of a module called as ``pre(inputs, batch, ctx)``. Without one,
            the component's single upstream output is its input.
        post: optional factory of a module called as ``post(x, ctx)``.
        context: optional ``(task, batch) -> ctx`` computing per-shard extras.
        rows: optional ``(task, batch) -> list[int]`` rows per sample of packed activations.
        hidden, heads, mlp, kind: the shape the cost model uses (see ``graph.Component``).
        splittable: False when a layer needs the whole batch (e.g. a contrastive loss): its
            MetaOps then only run on one device.
        tokens: optional ``(task) -> int`` tokens per sample this component sees for ``task``
            (for the cost model); default: the task's ``seq_lens[name]`` or 1.
    """

    def __init__(
        self,
        name: str,
        *,
        layer: Callable[[int], nn.Module],
        num_layers: int,
        pre: Callable[[], nn.Module] | None = None,
        post: Callable[[], nn.Module] | None = None,
        context: Callable[[str, Batch], Any] | None = None,
        rows: Callable[[str, Batch], Sequence[int]] | None = None,
        hidden: int,
        heads: int = 0,
        mlp: int | None = None,
        kind: str = "transformer",
        splittable: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"name: expected a non-empty string without '/', got {name!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers of component {name!r}: expected an int >= 1, got {num_layers!r}")
        if not callable(layer):
            raise TypeError(f"layer of component {name!r}: expected a factory (index) -> nn.Module")
        self.name, self.num_layers = name, num_layers
        self.hidden, self.heads, self.mlp, self.kind = hidden, heads, mlp, kind
        self.splittable = splittable
        self._factories = {"layer": layer, "pre": pre, "post": post}
        self._context, self._rows = context, rows
        self.layers = nn.ModuleDict()
        self.pre: nn.Module | None = None
        self.post: nn.Module | None = None
        self._seed = 0

    @property
    def has_pre(self) -> bool:
        return self._factories["pre"] is not None

    @property
    def has_post(self) -> bool:
        return self._factories["post"] is not None

    def build(self, layers: Iterable[int] | None = None, *, seed: int = 0) -> "Component":
        """Builds the given layers (all when None), plus pre if layer 0 and post if the last
        layer is among them. Each part is seeded from (seed, name, part), so the weights do not
        depend on which other parts a process builds."""
        self._seed = seed
        wanted = range(self.num_layers) if layers is None else sorted(set(layers))
        for i in wanted:
            if not 0 <= i < self.num_layers:
                raise ValueError(f"layers: {i} outside [0, {self.num_layers}) of component {self.name!r}")
            if str(i) not in self.layers:
                with _seeded(_seed_for(seed, self.name, "layer", i)):
                    self.layers[str(i)] = self._factories["layer"](i)
        if 0 in wanted and self.has_pre and self.pre is None:
            with _seeded(_seed_for(seed, self.name, "pre")):
                self.pre = self._factories["pre"]()
        if self.num_layers - 1 in wanted and self.has_post and self.post is None:
            with _seeded(_seed_for(seed, self.name, "post")):
                self.post = self._factories["post"]()
        return self

    def part_names(self, index: int) -> list[str]:
        """Names (relative to the component) of the parts that belong to layer ``index``:
        the layer itself, plus pre with layer 0 and post with the last layer."""
        parts = [f"layers.{index}"]
        if index == 0 and self.has_pre:
            parts.append("pre")
        if index == self.num_layers - 1 and self.has_post:
            parts.append("post")
        return parts

    def context(self, task: str, batch: Batch) -> Any:
        return None if self._context is None else self._context(task, batch)

    def rows(self, task: str, batch: Batch) -> list[int] | None:
        """Rows (dim 0) per sample of this component's activations; None means one per sample."""
        if self._rows is None:
            return None
        return [int(r) for r in self._rows(task, batch)]

    def run_pre(self, inputs: Mapping[str, torch.Tensor], batch: Batch, ctx: Any) -> torch.Tensor:
        if self.pre is not None:
            return self.pre(dict(inputs), batch, ctx)
        if len(inputs) != 1:
            raise ValueError(
                f"component {self.name!r} has no pre part, so it needs exactly one upstream "
                f"component, got {sorted(inputs)}"
            )
        return next(iter(inputs.values()))

    def run_layers(self, x: torch.Tensor, begin: int, end: int, ctx: Any, *,
                   checkpoint: bool = False) -> torch.Tensor:
        """Layers [begin, end). With ``checkpoint`` (activation checkpointing), where autograd
        records, each layer keeps only its input: its inner activations are recomputed in the
        backward (``torch.utils.checkpoint``, non-reentrant: autocast and RNG states as in
        the forward), about one more forward of compute for that memory."""
        for i in range(begin, end):
            layer = self.layers[str(i)]
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        return x

    def run_post(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        return x if self.post is None else self.post(x, ctx)


@dataclass(frozen=True)
class Task:
    """One task: its batch, its route through components, its loss.

    Args:
        name: task name (no '/').
        batch: samples per step.
        flows: (src component, dst component) pairs; exactly one component has no successor
            (the sink; its output goes to ``loss``). Components without predecessors read the
            task's raw data in their ``pre`` part.
        modalities: batch key -> trailing shape of that tensor (None where the length varies
            between steps) and the expected dtype kind ("float" or "int").
        loss: ``(outputs, batch) -> 0-d tensor``: the loss SUMMED over the shard's units;
            ``outputs`` maps the sink component to its output on the shard.
        units: ``(batch) -> int``: units of the full batch the summed loss is divided by
            (default: the number of samples).
        seq_lens: component -> mean tokens per sample, for the cost model.
        weight: factor of this task's loss in the total.
        components: extra components the task uses that have no flow (a one-component task).
    """

    name: str
    batch: int
    flows: tuple[tuple[str, str], ...]
    modalities: Mapping[str, tuple[tuple[int | None, ...], str]]
    loss: Callable[[dict[str, torch.Tensor], Batch], torch.Tensor]
    units: Callable[[Batch], int] | None = None
    seq_lens: Mapping[str, int] = field(default_factory=dict)
    weight: float = 1.0
    components: tuple[str, ...] = ()

    def used_components(self) -> list[str]:
        seen: list[str] = []
        for src, dst in self.flows:
            for c in (src, dst):
                if c not in seen:
                    seen.append(c)
        for c in self.components:
            if c not in seen:
                seen.append(c)
        return seen

    def predecessors(self, component: str) -> list[str]:
        return [s for s, d in self.flows if d == component]

    def count_units(self, batch: Batch) -> int:
        return self.batch if self.units is None else int(self.units(batch))


class MultiTaskModel(nn.Module):
    """Components plus tasks; ``build()`` materialises parameters (all, or a rank's share)."""

    def __init__(self, name: str, components: Sequence[Component], tasks: Sequence[Task], *, seed: int = 0):
        super().__init__()
        self.name, self.seed = name, seed
        self.components = nn.ModuleDict()
        for c in components:
            if not isinstance(c, Component):
                raise TypeError(f"components: expected Component, got {type(c).__name__}")
            if c.name in self.components:
                raise ValueError(f"components: duplicate name {c.name!r}")
            self.components[c.name] = c
        self.tasks: dict[str, Task] = {}
        for t in tasks:
            self._check_task(t)
            self.tasks[t.name] = t

    def _check_task(self, t: Task) -> None:
        if not isinstance(t, Task):
            raise TypeError(f"tasks: expected Task, got {type(t).__name__}")
        if "/" in t.name or not t.name or t.name in self.tasks:
            raise ValueError(f"tasks: bad or duplicate task name {t.name!r}")
        if not isinstance(t.batch, int) or t.batch < 1:
            raise ValueError(f"batch of task {t.name!r}: expected an int >= 1, got {t.batch!r}")
        used = t.used_components()
        if not used:
            raise ValueError(f"task {t.name!r} uses no component")
        for c in used:
            if c not in self.components:
                raise ValueError(f"task {t.name!r}: unknown component {c!r}")
        sinks = [c for c in used if not any(s == c for s, _ in t.flows)]
        if len(sinks) != 1:
            raise ValueError(f"task {t.name!r}: expected exactly one sink component, got {sinks}")
        order = self._topo(t)  # raises on a cycle
        for c in order:
            if not t.predecessors(c) and not self.components[c].has_pre:
                raise ValueError(f"task {t.name!r}: source component {c!r} has no pre part to read the data")

    @staticmethod
    def _topo(t: Task) -> list[str]:
        used = t.used_components()
        indeg = {c: 0 for c in used}
        for _, d in t.flows:
            indeg[d] += 1
        ready = [c for c in used if indeg[c] == 0]
        order: list[str] = []
        while ready:
            c = ready.pop(0)
            order.append(c)
            for s, d in t.flows:
                if s == c:
                    indeg[d] -= 1
                    if indeg[d] == 0:
                        ready.append(d)
        if len(order) != len(used):
            raise ValueError(f"task {t.name!r}: flows contain a cycle")
        return order

    # --- the planner's view ---------------------------------------------------------------
    def task_order(self, task: str) -> list[str]:
        """Components of ``task`` in topological order."""
        return self._topo(self.tasks[task])

    def sink(self, task: str) -> str:
        return self.task_order(task)[-1]

    def metaops(self) -> list[str]:
        """MetaOp names, ``task/component``, tasks in declaration order."""
        return [f"{t}/{c}" for t in self.tasks for c in self.task_order(t)]

    def metaop_flows(self) -> list[tuple[str, str]]:
        return [(f"{t.name}/{s}", f"{t.name}/{d}") for t in self.tasks.values() for s, d in t.flows]

    def valid_counts(self, task: str, component: str, num_devices: int) -> list[int]:
        """Device counts a MetaOp may run on: data parallel over the task's batch (n divides it)."""
        if not self.components[component].splittable:
            return [1]
        b = self.tasks[task].batch
        return [n for n in range(1, min(num_devices, b) + 1) if b % n == 0]

    def to_model_spec(self):
        """This model as a ``scheduler.graph.ModelSpec`` (for the planner's own tools)."""
        from scheduler import graph

        comps = tuple(
            graph.Component(name=c.name, layers=c.num_layers, hidden=c.hidden, heads=c.heads, mlp=c.mlp, kind=c.kind)
            for c in self.components.values()
        )
        tasks = tuple(
            graph.Task(
                name=t.name,
                batch=t.batch,
                seq_lens={c: int(t.seq_lens.get(c, 1)) for c in t.used_components()},
                flows=tuple(t.flows),
            )
            for t in self.tasks.values()
        )
        return graph.ModelSpec(name=self.name, components=comps, tasks=tasks)

    def param_counts(self) -> dict[str, int]:
        """Parameters of ONE layer of each component (with pre/post averaged in), built on the
        meta device so nothing is allocated."""
        out = {}
        for c in self.components.values():
            with torch.device("meta"):
                n = sum(p.numel() for p in c._factories["layer"](0).parameters())
                for part in ("pre", "post"):
                    f = c._factories[part]
                    if f is not None:
                        n += sum(p.numel() for p in f().parameters()) / c.num_layers
            out[c.name] = int(n)
        return out

    def to_problem(self, num_devices: int, *, island_size: int = 8, cost=None, device_memory_gb=None,
                   activation_checkpointing: bool = False, shard_optimizer: bool = False,
                   param_dtype: torch.dtype = torch.float32, activation_dtype: torch.dtype | None = None,
                   seq_lens: Mapping[str, float] | None = None) -> dict:
        """The planner problem (issue-5 format) for ``num_devices`` devices.

        ``cost`` is ``(component, task, tokens_per_device, n) -> ms`` for one layer forward and
        backward; default: ``scheduler.costmodel.AnalyticCost`` when present, else a FLOP count
        at a nominal CPU rate. ``time_ms`` keys are the valid counts (``valid_counts``).

        Memory, as the runtime keeps it (it matters to the plan only under ``device_memory_gb``):
        each parameter holds its weight, gradient and AdamW's two moments in ``param_dtype``;
        ``shard_optimizer`` shards the moments among the parameter's holders
        (``optimizer_shard_fraction`` 1/2, as ``Executor(shard_optimizer=True)``). Activations:
        ``costmodel.activation_gb`` (per-token bytes of a transformer layer) scaled from bf16 to
        ``activation_dtype`` (default ``param_dtype``: no autocast); ``activation_checkpointing``
        keeps each layer's input only and charges recompute time (``costmodel.RECOMPUTE_FACTOR``
        on the whole layer time, an upper bound).

        ``seq_lens`` ({"task/component": tokens per sample}, e.g. measured by
        ``Executor.take_token_counts``) replaces the tasks' declared ``seq_lens`` for the
        MetaOps it names; tokens may be fractional (a mean), each device's token count is
        rounded."""
        from scheduler import costmodel

        if not isinstance(num_devices, int) or num_devices < 1:
            raise ValueError(f"num_devices: expected an int >= 1, got {num_devices!r}")
        for name, flag in (("activation_checkpointing", activation_checkpointing),
                           ("shard_optimizer", shard_optimizer)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}: expected a bool, got {flag!r}")
        for name, dt in (("param_dtype", param_dtype), ("activation_dtype", activation_dtype)):
            if dt is not None and (not isinstance(dt, torch.dtype) or not dt.is_floating_point):
                raise ValueError(f"{name}: expected a floating torch.dtype, got {dt!r}")
        measured = self._check_seq_lens(seq_lens)
        cost = cost or default_cost()
        params = self.param_counts()
        state_bytes = 4 * param_dtype.itemsize  # weight, gradient, exp_avg, exp_avg_sq
        act_scale = (activation_dtype or param_dtype).itemsize / costmodel.BYTES_BF16
        metaops = []
        for t in self.tasks.values():
            for cname in self.task_order(t.name):
                c = self.components[cname]
                gc = _graph_component(c)
                tokens = measured.get(f"{t.name}/{cname}", int(t.seq_lens.get(cname, 1)))
                slower = costmodel.RECOMPUTE_FACTOR if (activation_checkpointing and costmodel.recomputed(gc)) else 1.0
                times: dict[str, float] = {}
                for n in self.valid_counts(t.name, cname, num_devices):
                    on_device = max(1, round(math.ceil(t.batch / n) * tokens))
                    ms = float(cost(c, t, on_device, n)) * slower
                    # A count slower than a smaller one is never worth it (and the planner
                    # requires monotonic tables): leave it out.
                    if not times or ms <= min(times.values()):
                        times[str(n)] = ms
                act_elems = t.batch * tokens * c.hidden
                activation_gb = costmodel.activation_gb(gc, t.batch, tokens, c.num_layers,
                                                        checkpointing=activation_checkpointing)
                metaops.append(
                    {
                        "name": f"{t.name}/{cname}",
                        "task": t.name,
                        "component": cname,
                        "layers": c.num_layers,
                        "time_ms": times,
                        "param_gb": params[cname] * state_bytes / 1e9,
                        "activation_gb": activation_gb * act_scale,
                        "output_mb": act_elems * 4 / 1e6,
                        "hidden_mb": act_elems * 4 / 1e6,
                    }
                )
        problem = {
            "num_devices": num_devices,
            "island_size": island_size,
            "metaops": metaops,
            "flows": [list(f) for f in self.metaop_flows()],
        }
        if device_memory_gb is not None:
            problem["device_memory_gb"] = device_memory_gb
        if shard_optimizer:
            problem["optimizer_shard_fraction"] = 0.5  # the two moments of weight+grad+moments
        return problem

    def _check_seq_lens(self, seq_lens: Mapping[str, float] | None) -> dict[str, float]:
        """``to_problem``'s ``seq_lens`` checked: MetaOp names, positive finite numbers."""
        if seq_lens is None:
            return {}
        if not isinstance(seq_lens, Mapping):
            raise ValueError(f"seq_lens: expected a mapping of MetaOp to tokens per sample, got "
                             f"{type(seq_lens).__name__}")
        known = set(self.metaops())
        for name, tokens in seq_lens.items():
            if name not in known:
                raise ValueError(f"seq_lens: {name!r} is not a MetaOp of {self.name!r} "
                                 f"(expected 'task/component': {sorted(known)})")
            if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not 0 < tokens < math.inf:
                raise ValueError(f"seq_lens: expected a positive finite number for {name!r}, got {tokens!r}")
        return dict(seq_lens)

    # --- materialisation and the reference run ---------------------------------------------
    def build(self, holdings: Mapping[str, Iterable[int]] | None = None) -> "MultiTaskModel":
        """Builds every part (holdings None) or, per component, only the listed layers."""
        for name, c in self.components.items():
            if holdings is None:
                c.build(seed=self.seed)
            elif name in holdings and list(holdings[name]):
                c.build(holdings[name], seed=self.seed)
        return self

    def check_batch(self, task: str, batch: Batch) -> None:
        """Raises ValueError/TypeError when ``batch`` does not match the task's declaration."""
        t = self.tasks[task]
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch of task {task!r}: expected a dict of tensors, got {type(batch).__name__}")
        for key, (shape, kind) in t.modalities.items():
            if key not in batch:
                raise ValueError(f"batch of task {task!r}: missing modality {key!r} (has {sorted(batch)})")
            x = batch[key]
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"batch of task {task!r}, modality {key!r}: expected a tensor, got {type(x).__name__}")
            if x.dim() != 1 + len(shape) or x.shape[0] != t.batch or any(
                want is not None and got != want for want, got in zip(shape, x.shape[1:])
            ):
                want = (t.batch, *["*" if s is None else s for s in shape])
                raise ValueError(
                    f"batch of task {task!r}, modality {key!r}: expected shape {want}, got {tuple(x.shape)}"
                )
            if (kind == "float") != x.is_floating_point():
                raise TypeError(f"batch of task {task!r}, modality {key!r}: expected {kind} data, got {x.dtype}")

    def reference_losses(self, batches: Mapping[str, Batch]) -> dict[str, torch.Tensor]:
        """Every task of ``batches`` on its whole batch in one process, components in
        topological order: the oracle the distributed executor is tested against. Needs a fully
        built model."""
        unknown = [t for t in batches if t not in self.tasks]
        if unknown:
            raise ValueError(f"batches: {unknown} are not tasks of {self.name!r}")
        losses = {}
        for tname, t in self.tasks.items():
            if tname not in batches:
                continue
            batch = batches[tname]
            self.check_batch(tname, batch)
            outs: dict[str, torch.Tensor] = {}
            for cname in self.task_order(tname):
                c = self.components[cname]
                ctx = c.context(tname, batch)
                x = c.run_pre({p: outs[p] for p in t.predecessors(cname)}, batch, ctx)
                x = c.run_layers(x, 0, c.num_layers, ctx)
                outs[cname] = c.run_post(x, ctx)
            sink = self.sink(tname)
            losses[tname] = t.loss({sink: outs[sink]}, batch) / t.count_units(batch)
        return losses


def default_cost() -> Callable:
    """Per-layer time model: on a GPU the analytic model of that GPU
    (``costmodel.preset_for(device name)``: H100, H200, else A800); on a CPU a FLOP count at a
    nominal CPU rate."""
    if torch.cuda.is_available():
        from scheduler.costmodel import preset_for

        return analytic_cost(preset_for(torch.cuda.get_device_name()))
    return flop_cost


def analytic_cost(model) -> Callable:
    """``to_problem``'s cost from a ``costmodel.AnalyticCost`` (e.g. ``costmodel.PRESETS["H100"]``):
    one layer's forward and backward on ``tokens_per_device`` tokens, its gradient sync on n."""

    def cost(component, task, tokens_per_device, n):
        return model.layer_ms(_graph_component(component), tokens_per_device, n)

    return cost


def _graph_component(c: Component):
    from scheduler import graph

    return graph.Component(name=c.name, layers=c.num_layers, hidden=c.hidden, heads=c.heads, mlp=c.mlp, kind=c.kind)


def flop_cost(component: Component, task, tokens_per_device: int, n: int, *, gflops: float = 20.0) -> float:
    """One layer fwd+bwd: 3 x 2 x tokens x (4 h^2 + 2 h mlp) FLOPs at ``gflops``, plus overhead."""
    h = component.hidden
    mlp = component.mlp or 4 * h
    flops = 6.0 * tokens_per_device * (4 * h * h + 2 * h * mlp)
    return 0.05 + flops / (gflops * 1e6)


def profiled_cost(model: "MultiTaskModel", *, reps: int = 9, data=None) -> Callable:
    """A cost function for ``to_problem`` that times the real thing on this device: each MetaOp
    run whole (pre part, every layer, post part, the task's loss at a sink), forward and
    backward, at the local batch of n devices (median of ``reps``), divided by its layer
    count. ``model`` is built whole (pass a fresh one); ``data`` is one step of data (default:
    the model's synthetic step 0). Results are cached per (component, task, n)."""
    from scheduler.data import SyntheticStream, shard_batch

    full = model.build()
    step = data if data is not None else SyntheticStream(full).step(0)
    device = next(full.parameters()).device
    cache: dict[tuple[str, str, int], float] = {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def cost(component, task, tokens_per_device, n):
        key = (component.name, task.name, n)
        if key not in cache:
            c = full.components[component.name]
            batch = {k: v.to(device) for k, v in shard_batch(step[task.name], 0, -(-task.batch // n)).items()}
            ins = {k: v.requires_grad_() for k, v in _upstream(full, task, c.name, batch).items()}
            times = []
            for _ in range(reps):
                sync()
                t0 = time.perf_counter()
                ctx = c.context(task.name, batch)
                y = c.run_post(c.run_layers(c.run_pre(ins, batch, ctx), 0, c.num_layers, ctx), ctx)
                out = task.loss({c.name: y}, batch) if full.sink(task.name) == c.name else y.float().sum()
                out.backward()
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
            cache[key] = statistics.median(times) / c.num_layers
        return cache[key]

    return cost


def _upstream(full: "MultiTaskModel", task: Task, comp: str, batch: Batch) -> dict[str, torch.Tensor]:
    """The (detached) outputs of ``comp``'s predecessors in ``task`` on ``batch``."""
    outs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for c in full.task_order(task.name):
            if c == comp:
                break
            cc = full.components[c]
            ctx = cc.context(task.name, batch)
            x = cc.run_pre({p: outs[p] for p in task.predecessors(c)}, batch, ctx)
            outs[c] = cc.run_post(cc.run_layers(x, 0, cc.num_layers, ctx), ctx)
    return {p: outs[p].detach() for p in task.predecessors(comp)}
