"""Executes a wavefront plan (issue-5 format) for one training step across torch.distributed ranks.

Rank r plays device r of the plan. Each rank:
- builds only the layers its slices run (plus a component's pre part with its layer 0 and
  post part with its last layer): selective parameter storage;
- runs forward wave by wave: its slice (at most one per wave) on its shard of the MetaOp's
  batch (a MetaOp on n devices splits the task's samples into n contiguous ranges);
- after each wave, moves the activations produced in it to the ranks of the consuming slices
  with point-to-point ops, re-sharding when the device count changes (each receiver gets
  exactly the rows of its samples, from one or several senders); a piece that stays on the
  same rank is a local view, no copy;
- runs backward wave by wave in reverse; the gradient of every received activation goes back
  to the rank that sent it, the exact reverse of the forward moves;
- all-reduces each parameter's gradient (summed) inside the group of ranks that hold it; one
  group per distinct holder set, created once, in the same order on every rank. With
  ``overlap_grad_reduce`` (the default on GPUs) a bucket's reduction starts in the backward
  as soon as no holder has a slice left that runs one of its layers (after the exchange of
  the first forward wave that runs one), so it overlaps the remaining backward waves; every
  rank starts them at the same points in the same order;
- with ``shard_optimizer`` (ZeRO stage 1 inside each holder group), gives each parameter held
  by several ranks one owner among them, balanced by size: its gradient is reduced to the
  owner only, the owner's optimizer alone keeps its state and updates it, and
  ``sync_parameters`` broadcasts the updated values to the other holders;
- skips the slices and messages of tasks a step's data leaves out, and leaves no gradient on
  a parameter no task of the step ran (as one process would, so AdamW skips it);
- counts the tokens each MetaOp's first layer receives and times each slice, the measured
  workload a re-plan uses (``take_token_counts``, ``take_slice_times``; scheduler/replan.py).

Transfers: every rank derives the same ordered list of messages from the plan, so each pair of
ranks posts its sends and receives in the same order (no tags, no deadlock). A forward message
is preceded by a small header with the piece's shape and dtype; backward shapes are known.
The loss of a task is its loss summed over each shard divided by the units of its whole batch,
so shard losses add up to the single-process loss and gradients add up by the all-reduce.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.distributed as dist

from scheduler.data import shard_batch
from scheduler.modelapi import MultiTaskModel

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_HEADER = 10  # ndim, dtype code, up to 8 dims


class PlanMismatchError(ValueError):
    """The plan does not fit this model or this world size."""


def split_range(total: int, parts: int, k: int) -> tuple[int, int]:
    """Samples of shard k when ``total`` samples are split into ``parts`` contiguous ranges
    whose sizes differ by at most one (the larger ones first)."""
    base, extra = divmod(total, parts)
    start = k * base + min(k, extra)
    return start, start + base + (1 if k < extra else 0)


@dataclass(frozen=True)
class Slice:
    id: int
    wave: int
    metaop: str
    task: str
    component: str
    begin: int
    end: int
    devices: tuple[int, ...]


@dataclass(frozen=True)
class Message:
    """Samples [s0, s1) of producer's output going to one consumer shard (forward)."""

    src: int
    dst: int
    producer: int  # slice id
    consumer: int  # slice id
    key: str  # the consumer's input: the upstream component, or "" for its own earlier layers
    s0: int
    s1: int


@dataclass
class _Record:
    shard: tuple[int, int] = (0, 0)
    leaves: dict[str, torch.Tensor] = field(default_factory=dict)
    out: torch.Tensor | None = None
    loss: torch.Tensor | None = None


class Schedule:
    """The plan checked against the model and world size, turned into slices, messages and
    parameter holder sets; identical on every rank."""

    def __init__(self, model: MultiTaskModel, plan: Mapping, world_size: int):
        if not isinstance(plan, Mapping) or not isinstance(plan.get("waves"), list):
            raise PlanMismatchError("plan: expected a dict with a list under 'waves'")
        if "num_devices" in plan and plan["num_devices"] != world_size:
            raise PlanMismatchError(
                f"plan: made for {plan['num_devices']} devices, but the world has {world_size} processes"
            )
        if "model" in plan and plan["model"] != model.name:
            raise PlanMismatchError(f"plan: made for model {plan['model']!r}, not {model.name!r}")
        self.model, self.world_size = model, world_size
        self._sinks = {t: model.sink(t) for t in model.tasks}
        names = model.metaops()
        self.slices: list[Slice] = []
        self.by_metaop: dict[str, list[Slice]] = {m: [] for m in names}
        for w, wave in enumerate(plan["waves"]):
            used: set[int] = set()
            for s in wave.get("slices", []):
                m = s.get("metaop")
                if m not in self.by_metaop:
                    raise PlanMismatchError(
                        f"plan wave {w}: MetaOp {m!r} is not in model {model.name!r} (its MetaOps: {names})"
                    )
                task, comp = m.split("/", 1)
                devs = tuple(int(d) for d in s["devices"])
                bad = [d for d in devs if not 0 <= d < world_size]
                if bad:
                    raise PlanMismatchError(
                        f"plan wave {w}, MetaOp {m!r}: devices {bad} outside the world of {world_size} processes"
                    )
                if used & set(devs) or len(set(devs)) != len(devs):
                    raise PlanMismatchError(f"plan wave {w}: device sets overlap (MetaOp {m!r})")
                used |= set(devs)
                n_ok = 1 if not model.components[comp].splittable else model.tasks[task].batch
                if not 1 <= len(devs) <= n_ok:
                    raise PlanMismatchError(
                        f"plan wave {w}, MetaOp {m!r}: {len(devs)} devices, but it can use 1 to {n_ok}"
                    )
                sl = Slice(len(self.slices), w, m, task, comp, int(s["layer_begin"]), int(s["layer_end"]), devs)
                prev = self.by_metaop[m]
                expect = prev[-1].end if prev else 0
                if sl.begin != expect or sl.end <= sl.begin:
                    raise PlanMismatchError(
                        f"plan wave {w}, MetaOp {m!r}: layers [{sl.begin}, {sl.end}) do not continue at layer {expect}"
                    )
                if prev and prev[-1].wave == w:
                    raise PlanMismatchError(f"plan wave {w}: two slices of MetaOp {m!r}")
                self.slices.append(sl)
                prev.append(sl)
        self.num_waves = len(plan["waves"])
        for m, sls in self.by_metaop.items():
            layers = model.components[m.split("/", 1)[1]].num_layers
            if not sls or sls[-1].end != layers:
                done = sls[-1].end if sls else 0
                raise PlanMismatchError(f"plan: MetaOp {m!r} runs {done} of its {layers} layers")
        self._build_messages()
        self._build_holders()

    def _producers(self, sl: Slice) -> list[tuple[Slice, str]]:
        if sl.begin > 0:
            prev = self.by_metaop[sl.metaop]
            return [(prev[prev.index(sl) - 1], "")]
        task = self.model.tasks[sl.task]
        out = []
        for src in task.predecessors(sl.component):
            p = self.by_metaop[f"{sl.task}/{src}"][-1]
            if p.wave >= sl.wave:
                raise PlanMismatchError(
                    f"plan: MetaOp {sl.metaop!r} starts in wave {sl.wave} before its input {p.metaop!r} "
                    f"ends (wave {p.wave})"
                )
            out.append((p, src))
        return out

    def _build_messages(self) -> None:
        self.inputs: dict[int, list[tuple[int, str]]] = {}
        self.fwd: list[list[Message]] = [[] for _ in range(self.num_waves)]
        self.bwd: list[list[Message]] = [[] for _ in range(self.num_waves)]
        for c in self.slices:
            self.inputs[c.id] = []
            b = self.model.tasks[c.task].batch
            for p, key in self._producers(c):
                self.inputs[c.id].append((p.id, key))
                for kc, dst in enumerate(c.devices):
                    c0, c1 = split_range(b, len(c.devices), kc)
                    for kp, src in enumerate(p.devices):
                        p0, p1 = split_range(b, len(p.devices), kp)
                        s0, s1 = max(c0, p0), min(c1, p1)
                        if s0 < s1:
                            msg = Message(src, dst, p.id, c.id, key, s0, s1)
                            self.fwd[p.wave].append(msg)
                            self.bwd[c.wave].append(msg)

    def _build_holders(self) -> None:
        holders: dict[tuple[str, int], set[int]] = {}
        for sl in self.slices:
            for i in range(sl.begin, sl.end):
                holders.setdefault((sl.component, i), set()).update(sl.devices)
        self.holders = {k: tuple(sorted(v)) for k, v in holders.items()}
        self.groups = sorted({h for h in self.holders.values() if len(h) > 1}, key=lambda h: (len(h), h))

    def holdings(self, rank: int) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for (comp, i), h in sorted(self.holders.items()):
            if rank in h:
                out.setdefault(comp, []).append(i)
        return out

    def slice_of(self, rank: int, wave: int) -> Slice | None:
        for sl in self.slices:
            if sl.wave == wave and rank in sl.devices:
                return sl
        return None

    def is_sink(self, sl: Slice) -> bool:
        layers = self.model.components[sl.component].num_layers
        return sl.end == layers and self._sinks[sl.task] == sl.component


def _rows_prefix(model: MultiTaskModel, sl: Slice, batch) -> list[int]:
    rows = model.components[sl.component].rows(sl.task, batch)
    n = model.tasks[sl.task].batch
    return list(range(n + 1)) if rows is None else [0, *itertools.accumulate(rows)]


class Executor:
    """Runs steps of ``plan`` for ``model`` on the current process group.

    ``model`` must be unbuilt; the executor builds this rank's share on ``device``. Use
    ``parameters()``/``named_parameters()`` for the optimizer, ``step(data)`` for one forward
    and backward (gradients reduced), ``owned(name)`` to count each parameter once."""

    def __init__(self, model: MultiTaskModel, plan: Mapping, *, device: torch.device | str = "cpu",
                 autocast_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None,
                 activation_checkpointing: bool = False, compile: str | None = None,
                 shard_optimizer: bool = False, overlap_grad_reduce: bool | None = None,
                 group_cache: dict | None = None):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.schedule = Schedule(model, plan, self.world)
        # dtype: the parameters' (float64 for numerics checks); None keeps the built ones
        self.model = model.build(self.schedule.holdings(self.rank)).to(device=device, dtype=dtype)
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        # every component layer recomputed in the backward (Component.run_layers)
        self.activation_checkpointing = activation_checkpointing
        if compile is not None:  # every layer this rank built, by that torch.compile backend
            for comp in self.model.components.values():
                for layer in comp.layers.values():
                    layer.compile(backend=compile)
        # Groups: every rank creates every group, in the same order (torch requires it).
        # ``group_cache`` ({ranks: group}, shared by the executors of one run on every rank)
        # keeps a plan switch from making a new communicator for a holder set it already has;
        # every rank holds the same cache, so each makes the same new groups.
        cache = {} if group_cache is None else group_cache
        self._groups = {}
        for ranks in self.schedule.groups:
            if ranks not in cache:
                cache[ranks] = dist.new_group(list(ranks))
            if self.rank in ranks:
                self._groups[ranks] = cache[ranks]
        self._buckets = self._make_buckets()
        # backward wave after which each bucket's all-reduce starts ({}: all after the
        # backward). By default only on GPUs: on CPUs gloo's threads take the cores the
        # backward computes on (bench/results/cpu_grad_reduce_overlap.md: 0.93-0.98x)
        if overlap_grad_reduce is None:
            overlap_grad_reduce = self.device.type == "cuda"
        self._reduce_after = self._reduce_waves() if overlap_grad_reduce else {}
        self.shard_optimizer = shard_optimizer
        # labelled spans (torch.profiler.record_function) around every phase of a step, for a
        # trace; off: no span is made
        self.trace = False
        # {metaop: [rows, samples]} its first layer received on this rank in training steps
        # since the last take_token_counts (the workload a re-plan measures)
        self._tokens_seen: dict[str, list[int]] = {}
        self._counting = False
        # per slice: compute ms (forward and backward) and the step() calls that ran it on
        # this rank since the last take_slice_times; CUDA events wait in _events until _end
        self._slice_ms = [0.0] * len(self.schedule.slices)
        self._slice_runs = [0] * len(self.schedule.slices)
        self._events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        # (component, layer)s that a task of the steps since the last reduction ran (None: all
        # of them; every rank sees the same data, so the same set). While a task is absent, the
        # reduction skips holder groups none of whose layers ran and carries has-gradient flags,
        # so that a parameter no holder has a gradient for keeps none, as in one process, and
        # AdamW skips it (_start_reduce).
        self._used: set[tuple[str, int]] | None = set()
        self._present: set[str] | None = None
        self._persistent: dict[str, torch.Tensor] | None = None  # named_buffers, once built
        self._param_layer = {id(p): self._layer_of(n) for n, p in self.model.named_parameters()}
        self._owner = self._assign_owners() if shard_optimizer else {}
        # per bucket, (owner, the owner's parameters in bucket order) for each owner with any
        self._shards = [[(r, [p for n, p in zip(names, params) if self._owner[n] == r])
                         for r in ranks if any(self._owner[n] == r for n in names)]
                        for (ranks, params), names in zip(self._buckets, self._bucket_names)
                        ] if shard_optimizer else []
        if self.world > 1:
            # The first batched p2p call on a group must involve every rank (NCCL) unless a
            # collective ran before it: this barrier is that collective.
            dist.barrier()

    # --- parameters ----------------------------------------------------------------------
    def _param_holders(self) -> dict[str, tuple[int, ...]]:
        out = {}
        self._part_layer: dict[str, tuple[str, int]] = {}
        for (comp, i), h in self.schedule.holders.items():
            c = self.model.components[comp]
            for part in c.part_names(i):
                out[f"components.{comp}.{part}"] = h
                self._part_layer[f"components.{comp}.{part}"] = (comp, i)
        return out

    def _layer_of(self, name: str) -> tuple[str, int]:
        """(component, layer) whose part holds parameter ``name``."""
        return _part_entry(self._part_layer, name)

    def _reduce_waves(self) -> dict[int, list[int]]:
        """{wave: this rank's bucket indices} whose all-reduce starts after that wave's
        backward exchange (the bucket's first wave). Every holder derives the same waves from
        the schedule, so on each group the collectives start in the same order everywhere."""
        out: dict[int, list[int]] = {}
        for b, wave in enumerate(self._bucket_wave):
            out.setdefault(wave, []).append(b)
        return out

    def holders_of(self, name: str) -> tuple[int, ...]:
        return _part_entry(self._part_holders, name)

    def _make_buckets(self) -> list[tuple[tuple[int, ...], list[torch.nn.Parameter]]]:
        """This rank's parameters held by several ranks, one bucket per holder group and first
        wave (the first forward wave of any slice that runs the parameter's layer: once the
        backward is past it no holder adds to that gradient). Ordered by group (the global
        order), then first wave descending: the order the backward finishes them."""
        self._part_holders = self._param_holders()
        first: dict[tuple[str, int], int] = {}
        for sl in self.schedule.slices:
            for i in range(sl.begin, sl.end):
                first[sl.component, i] = min(first.get((sl.component, i), sl.wave), sl.wave)
        by_key: dict[tuple[tuple[int, ...], int], list] = {}
        for name, p in sorted(self.model.named_parameters()):
            holders = self.holders_of(name)
            if len(holders) > 1:
                by_key.setdefault((holders, first[self._layer_of(name)]), []).append((name, p))
        order = {g: i for i, g in enumerate(self.schedule.groups)}
        keys = sorted(by_key, key=lambda k: (order[k[0]], -k[1]))
        self._bucket_names = [[n for n, _ in by_key[k]] for k in keys]
        self._bucket_wave = [k[1] for k in keys]
        return [(k[0], [p for _, p in by_key[k]]) for k in keys]

    def _assign_owners(self) -> dict[str, int]:
        """Each parameter of a holder group to one of its holders: largest first, each to the
        holder with the fewest elements so far (then the lowest rank). Every holder has the
        same parameters, so every holder computes the same owners."""
        owner = {}
        for (ranks, params), names in zip(self._buckets, self._bucket_names):
            load = dict.fromkeys(ranks, 0)
            for n, p in sorted(zip(names, params), key=lambda t: (-t[1].numel(), t[0])):
                r = min(ranks, key=lambda r: (load[r], r))
                owner[n] = r
                load[r] += p.numel()
        return owner

    def named_parameters(self):
        return self.model.named_parameters()

    def named_buffers(self) -> dict[str, torch.Tensor]:
        """This rank's persistent buffers (a BatchNorm's running statistics: the state a
        ``state_dict`` keeps besides parameters), by global name."""
        if self._persistent is None:  # once: a state_dict walk every step adds up on big models
            params = dict(self.model.named_parameters())
            self._persistent = {n: t for n, t in self.model.state_dict(keep_vars=True).items()
                                if n not in params}
        return self._persistent

    def sync_buffers(self) -> None:
        """Every persistent buffer held by several ranks takes its lowest holder's value (one
        broadcast per holder group and dtype, as DDP broadcasts rank 0's buffers), so holders
        that ran different shards keep one model. Without such buffers, a no-op."""
        buffers = self.named_buffers()
        if not buffers or self.world == 1:
            return
        by_group: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        for name, t in sorted(buffers.items()):
            holders = self.holders_of(name)
            if len(holders) > 1:
                by_group.setdefault((holders, t.dtype), []).append(t)
        order = {g: i for i, g in enumerate(self.schedule.groups)}
        with torch.no_grad():
            for (ranks, dtype), ts in sorted(by_group.items(), key=lambda kv: (order[kv[0][0]], str(kv[0][1]))):
                flat = torch.cat([t.reshape(-1) for t in ts])
                dist.broadcast(flat, src=ranks[0], group=self._groups[ranks])
                offset = 0
                for t in ts:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()

    def parameters(self):
        return self.model.parameters()

    def zero_grad(self) -> None:
        """Drops every gradient on this rank, the optimizer's or not (with ``shard_optimizer``
        a rank's optimizer holds only the parameters it owns, but it accumulates gradients of
        the others too, which its next reduction would otherwise add in again)."""
        for p in self.model.parameters():
            p.grad = None
        self._used = set()

    def owned(self, name: str) -> bool:
        """True on exactly one holder of each parameter: its owner with ``shard_optimizer``,
        else the lowest rank."""
        if name in self._owner:
            return self._owner[name] == self.rank
        return self.holders_of(name)[0] == self.rank

    def updates(self, name: str) -> bool:
        """Whether this rank's optimizer updates the parameter (and keeps its state): every
        holder, or only its owner with ``shard_optimizer``."""
        return name not in self._owner or self._owner[name] == self.rank

    def sync_parameters(self) -> None:
        """After the optimizer step, with ``shard_optimizer``: every parameter's value from its
        owner to the other holders (one broadcast per owner and holder group, all in flight
        at once, issued in the global group order). Without it, a no-op."""
        if not self._owner:
            return
        pending = []
        for (ranks, _), shards in zip(self._buckets, self._shards):
            for src, mine in shards:
                flat = torch.cat([p.detach().reshape(-1) for p in mine])
                work = dist.broadcast(flat, src=src, group=self._groups[ranks], async_op=True)
                pending.append((work, flat, mine, src))
        with torch.no_grad():
            for work, flat, mine, src in pending:
                work.wait()
                if src == self.rank:
                    continue
                offset = 0
                for p in mine:
                    p.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    def take_token_counts(self) -> dict[str, float]:
        """Each MetaOp's mean rows per sample (tokens; 1 for a pooled [batch, hidden] input)
        at its first layer over the training steps since the last call, summed over all ranks,
        then reset. Collective: every rank calls it and gets the same counts. MetaOps that ran
        no sample are left out."""
        names = self.model.metaops()
        counts = torch.tensor([self._tokens_seen.get(m, [0, 0]) for m in names], dtype=torch.float64)
        if self.world > 1:
            counts = counts.to(self.device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        self._tokens_seen = {}
        return {m: rows / samples for m, (rows, samples) in zip(names, counts.tolist()) if samples > 0}

    # --- one step ----------------------------------------------------------------------------
    def step(self, data: Mapping[str, Mapping[str, torch.Tensor]], *,
             units: Mapping[str, int] | None = None, reduce: bool = True,
             loss_scale: torch.Tensor | float | None = None) -> dict[str, float]:
        """Forward and backward of every task on its whole batch; gradients are accumulated
        into ``.grad`` and, with ``reduce``, reduced among holders. Returns each task's loss
        (the same on every rank).

        Gradient accumulation: ``units`` (per task) replaces the batch's own count of loss
        units (samples, or tokens for token losses) as the divisor of its loss; a trainer passes
        the count over all its micro-batches, so that their summed gradients weigh every unit
        alike, as one batch of them all would. ``reduce=False`` leaves the gradients local;
        the reduction is linear, so reducing the sum once, with the last micro-batch, is
        reducing each.

        Loss scaling: ``loss_scale`` (a GradScaler's factor, a 0-d tensor or a number)
        multiplies every task's loss before its backward, so the gradients come out scaled by
        it; the returned losses are not."""
        self._begin(data, units)
        if torch.is_tensor(loss_scale) and loss_scale.dim() != 0:
            raise ValueError(f"loss_scale: expected a 0-d tensor, got shape {tuple(loss_scale.shape)}")
        if loss_scale is not None and not torch.is_tensor(loss_scale) and (
                isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float))
                or not 0 < loss_scale < float("inf")):
            raise ValueError(f"loss_scale: expected a positive finite number or a 0-d tensor, "
                             f"got {loss_scale!r}")
        self._loss_scale = loss_scale
        self._counting = True
        if self._used is not None:  # the layers some task of this call runs
            self._used = None if self._present is None else self._used | {
                (sl.component, i) for sl in self.schedule.slices if sl.task in self._present
                for i in range(sl.begin, sl.end)}
        stats = dict.fromkeys(("compute_s", "transfer_s", "reduce_s"), 0.0)
        waves = range(self.schedule.num_waves)
        self._run_waves(waves, self._forward, self._exchange_forward, stats)
        pending: list = []
        starts = self._reduce_after if reduce else {}
        self._run_waves(reversed(waves), self._backward, self._exchange_backward, stats,
                        after=lambda w: self._start_reduce(starts.get(w, ()), pending, stats),
                        phase="backward")
        if reduce:
            started = {b for bs in starts.values() for b in bs}
            self._start_reduce([b for b in range(len(self._buckets)) if b not in started], pending, stats)
            t0 = time.perf_counter()
            self._finish_reduce(pending)
            stats["reduce_s"] += time.perf_counter() - t0
            self._used = set()
        # Wall time per phase on this rank (CPU: exact; GPU: launch time unless synchronised).
        # Waiting for a slower peer counts as transfer time.
        self.last_stats = stats
        return self._end()

    def evaluate(self, data: Mapping[str, Mapping[str, torch.Tensor]], *,
                 units: Mapping[str, int] | None = None) -> dict[str, float]:
        """Every task's loss on its whole batch, forward only (no autograd graph, gradients
        untouched), through the same plan and transfers as ``step``; ``units`` as there (an
        evaluation over several batches passes their total). The same on every rank."""
        self._begin(data, units)
        with torch.no_grad():
            self._run_waves(range(self.schedule.num_waves), self._forward,
                            self._exchange_forward, dict.fromkeys(("compute_s", "transfer_s"), 0.0),
                            phase="eval")
        return self._end()

    def _begin(self, data, units) -> None:
        model = self.model
        if not isinstance(data, Mapping):
            raise ValueError(f"data: expected a mapping of task to batch, got {type(data).__name__}")
        unknown = [t for t in data if t not in model.tasks]
        if unknown:
            raise ValueError(f"data: {unknown} are not tasks of {model.name!r} "
                             f"(its tasks: {list(model.tasks)})")
        present = [t for t in model.tasks if t in data]
        if not present:
            raise ValueError(f"data: no batch for any task of {model.name!r}")
        for task in present:
            model.check_batch(task, data[task])
        # the tasks of this call where some are absent (their slices and messages skipped);
        # None: every task, every slice runs
        self._present = set(present) if len(present) < len(model.tasks) else None
        if units is not None:
            if not isinstance(units, Mapping):
                raise ValueError(f"units: expected a mapping of task to count, got "
                                 f"{type(units).__name__}")
            for task in present:
                n = units.get(task)
                if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                    raise ValueError(f"units: expected a positive int for task {task!r}, "
                                     f"got {n!r}")
        self._units = units
        self._loss_scale = None
        self._counting = False  # step() turns it on; an evaluation is not the training workload
        self._data = data
        self._rec: dict[int, _Record] = {}
        self._inbox: dict[tuple[int, str], list[tuple[int, torch.Tensor]]] = {}
        self._grad_out: dict[int, torch.Tensor] = {}
        self._prefix: dict[int, list[int]] = {}

    def span(self, label: str):
        """A ``torch.profiler.record_function`` named ``label`` where ``trace`` is on."""
        return torch.profiler.record_function(label) if self.trace else contextlib.nullcontext()

    def _run_waves(self, waves, compute, exchange, stats: dict[str, float], after=None,
                   phase: str = "forward") -> None:
        """``compute`` this rank's slice of each wave (if it has one), then ``exchange`` the
        wave's transfers, then ``after(wave)`` if given; wall times added to ``stats``."""
        clock = time.perf_counter
        for w in waves:
            sl = self._runs(self.schedule.slice_of(self.rank, w))
            t0 = clock()
            if sl is not None:
                mark = self._clock_start() if self._counting else None
                with self.span(f"mtmm {phase} wave {w} {sl.metaop}[{sl.begin}:{sl.end}]"):
                    compute(sl)
                if mark is not None:
                    self._clock_stop(sl, mark, first=phase == "forward")
            t1 = clock()
            with self.span(f"mtmm {phase} exchange wave {w}"):
                exchange(w)
            stats["compute_s"] += t1 - t0
            stats["transfer_s"] += clock() - t1
            if after is not None:
                after(w)

    def _clock_start(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _clock_stop(self, sl: Slice, mark, first: bool) -> None:
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((sl.id, mark, end))
        else:
            self._slice_ms[sl.id] += (time.perf_counter() - mark) * 1e3
        self._slice_runs[sl.id] += first  # once per call: the forward

    def take_slice_times(self) -> dict[str, list[tuple[int, int, float]]]:
        """Each MetaOp's measured compute since the last call, as [(devices, layers, ms)], one
        entry per slice that ran: its forward and backward in training steps (the slowest of
        its ranks), per step() call that ran it. Collective: every rank calls it and gets the
        same times; then reset. A MetaOp none of whose slices ran is left out."""
        ms = torch.tensor(self._slice_ms, dtype=torch.float64)
        runs = torch.tensor(self._slice_runs, dtype=torch.float64)
        if self.world > 1:
            both = torch.stack([ms, runs]).to(self.device)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            ms, runs = both.cpu()
        self._slice_ms = [0.0] * len(self.schedule.slices)
        self._slice_runs = [0] * len(self.schedule.slices)
        out: dict[str, list[tuple[int, int, float]]] = {}
        for sl, t, n in zip(self.schedule.slices, ms.tolist(), runs.tolist()):
            if n > 0:
                out.setdefault(sl.metaop, []).append((len(sl.devices), sl.end - sl.begin, t / n))
        return out

    def _runs(self, sl: Slice | None) -> Slice | None:
        """``sl`` if its task is in this call's data, else None (the slice sits it out)."""
        if sl is None or self._present is None or sl.task in self._present:
            return sl
        return None

    def _end(self) -> dict[str, float]:
        """Each task's loss summed over the ranks' shards; the step's state dropped."""
        names = [t for t in self.model.tasks if self._present is None or t in self._present]
        losses = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        for sid, rec in self._rec.items():
            if rec.loss is not None:
                losses[names.index(self.schedule.slices[sid].task)] += rec.loss.detach().double()
        if self.world > 1:
            dist.all_reduce(losses)
        values = losses.tolist()  # waits for the step's work: its timing events are done
        for sid, start, end in self._events:
            end.synchronize()
            self._slice_ms[sid] += start.elapsed_time(end)
        self._events = []
        self._rec, self._inbox, self._grad_out, self._prefix = {}, {}, {}, {}
        self._data = self._units = self._loss_scale = self._present = None
        self._counting = False
        return dict(zip(names, values))

    def _shard(self, sl: Slice) -> tuple[int, int]:
        k = sl.devices.index(self.rank)
        return split_range(self.model.tasks[sl.task].batch, len(sl.devices), k)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward(self, sl: Slice) -> None:
        model = self.model
        comp, task = model.components[sl.component], model.tasks[sl.task]
        full = self._data[sl.task]
        s0, s1 = self._shard(sl)
        batch = shard_batch(full, s0, s1)
        rec = _Record(shard=(s0, s1))
        for pid, key in self.schedule.inputs[sl.id]:
            pieces = sorted(self._inbox.pop((sl.id, key)), key=lambda t: t[0])
            x = pieces[0][1] if len(pieces) == 1 else torch.cat([t for _, t in pieces])
            rec.leaves[key] = x.detach().requires_grad_(x.is_floating_point())
        with self._autocast():
            ctx = comp.context(sl.task, batch)
            if sl.begin == 0:
                x = comp.run_pre({k: v for k, v in rec.leaves.items()}, batch, ctx)
            else:
                x = rec.leaves[""]
            if sl.begin == 0 and self._counting and torch.is_tensor(x):
                seen = self._tokens_seen.setdefault(sl.metaop, [0, 0])
                seen[0] += x.shape[:-1].numel()  # rows, the hidden dimension last
                seen[1] += s1 - s0
            x = comp.run_layers(x, sl.begin, sl.end, ctx,
                                checkpoint=self.activation_checkpointing)
            if sl.end == comp.num_layers:
                x = comp.run_post(x, ctx)
            if self.schedule.is_sink(sl):
                loss = task.loss({sl.component: x}, batch)  # at least fp32 (bf16 under autocast)
                loss = loss.to(torch.promote_types(loss.dtype, torch.float32))
                units = (task.count_units(full) if self._units is None
                         else self._units[sl.task])
                rec.loss = loss * (task.weight / units)
        rec.out = x
        self._rec[sl.id] = rec

    def _backward(self, sl: Slice) -> None:
        rec = self._rec[sl.id]
        if rec.loss is not None:
            target, grad = rec.loss, None
            if self._loss_scale is not None:
                target = target * self._loss_scale
        else:
            target = rec.out
            grad = self._grad_out.pop(sl.id, None)
            if grad is None:
                grad = torch.zeros_like(target)
        if target.requires_grad:
            torch.autograd.backward(target, grad)
        rec.out = None

    # --- transfers -----------------------------------------------------------------------------
    def _piece_rows(self, msg: Message, slice_id: int, shard: tuple[int, int]) -> tuple[int, int]:
        """Rows of the message's samples inside the shard tensor of slice ``slice_id`` (the
        activation rows are the producer component's)."""
        prefix = self._prefix.get(msg.producer)
        if prefix is None:
            p = self.schedule.slices[msg.producer]
            prefix = self._prefix[msg.producer] = _rows_prefix(self.model, p, self._data[p.task])
        return prefix[msg.s0] - prefix[shard[0]], prefix[msg.s1] - prefix[shard[0]]

    def _exchange_forward(self, wave: int) -> None:
        msgs = self._live(self.schedule.fwd[wave])
        sends, recvs = [], []
        for m in msgs:
            if m.src == self.rank:
                rec = self._rec[m.producer]
                r0, r1 = self._piece_rows(m, m.producer, rec.shard)
                piece = rec.out.detach()[r0:r1]
                if m.dst == self.rank:
                    self._inbox.setdefault((m.consumer, m.key), []).append((m.s0, piece))
                else:
                    sends.append((m, piece.contiguous()))
            elif m.dst == self.rank:
                recvs.append(m)
        if not sends and not recvs:
            return
        headers_out = []
        for _, piece in sends:
            if piece.dim() > _HEADER - 2:
                raise ValueError(f"activation with {piece.dim()} dims: at most {_HEADER - 2} supported")
            h = [piece.dim(), _DTYPES.index(piece.dtype), *piece.shape]
            headers_out.append(torch.tensor(h + [0] * (_HEADER - len(h)), dtype=torch.int64, device=self.device))
        headers_in = [torch.empty(_HEADER, dtype=torch.int64, device=self.device) for _ in recvs]
        self._p2p([(m, h) for (m, _), h in zip(sends, headers_out)], list(zip(recvs, headers_in)))
        bufs = []
        for h in headers_in:
            nd, code, *dims = h.tolist()
            bufs.append(torch.empty(dims[:nd], dtype=_DTYPES[code], device=self.device))
        self._p2p(sends, list(zip(recvs, bufs)))
        for m, buf in zip(recvs, bufs):
            self._inbox.setdefault((m.consumer, m.key), []).append((m.s0, buf))

    def _live(self, msgs: list[Message]) -> list[Message]:
        """The messages of tasks in this call's data (a message stays inside its task)."""
        if self._present is None:
            return msgs
        return [m for m in msgs if self.schedule.slices[m.producer].task in self._present]

    def _p2p(self, sends, recvs) -> None:
        """Posts ``sends`` and ``recvs`` ([(message, tensor)], in message order, which is the
        same on both ends of every pair) and waits for all of them."""
        ops = [dist.P2POp(dist.isend, t, m.dst) for m, t in sends]
        ops += [dist.P2POp(dist.irecv, t, m.src) for m, t in recvs]
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    def _exchange_backward(self, wave: int) -> None:
        msgs = self._live(self.schedule.bwd[wave])
        sends, recvs = [], []
        for m in msgs:
            if m.dst == self.rank:
                rec = self._rec[m.consumer]
                leaf = rec.leaves[m.key]
                g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                r0, r1 = self._piece_rows(m, m.consumer, rec.shard)
                piece = g[r0:r1]
                if m.src == self.rank:
                    self._add_grad(m, piece)
                else:
                    sends.append((_Flip(m), piece.contiguous()))
            elif m.src == self.rank:
                out = self._rec[m.producer].out
                r0, r1 = self._piece_rows(m, m.producer, self._rec[m.producer].shard)
                recvs.append((_Flip(m), torch.empty((r1 - r0, *out.shape[1:]), dtype=out.dtype, device=self.device)))
        if sends or recvs:
            self._p2p(sends, recvs)
            for fm, buf in recvs:
                self._add_grad(fm.msg, buf)
        # Inputs of this wave's slice are no longer needed.
        sl = self._runs(self.schedule.slice_of(self.rank, wave))
        if sl is not None:
            self._rec[sl.id].leaves.clear()

    def _add_grad(self, m: Message, piece: torch.Tensor) -> None:
        rec = self._rec[m.producer]
        if m.producer not in self._grad_out:
            self._grad_out[m.producer] = torch.zeros_like(rec.out)
        r0, r1 = self._piece_rows(m, m.producer, rec.shard)
        self._grad_out[m.producer][r0:r1] += piece.to(rec.out.dtype)

    def _start_reduce(self, buckets, pending: list, stats: dict[str, float]) -> None:
        """Starts the reduction of every bucket in ``buckets`` (ascending: the global group
        order) on its holder group's communicator, and leaves it in flight: one flat
        all-reduce, or with ``shard_optimizer`` one flat reduce to each owner of the owner's
        parameters (only the owner steps them: half an all-reduce's traffic)."""
        t0 = time.perf_counter()
        for b in buckets:
            ranks, params = self._buckets[b]
            # With a task absent, some holders may have no gradient for a parameter that
            # others have; each flat buffer then also sums a has-gradient flag per parameter.
            flags = self._used is not None
            if flags and not any(self._param_layer[id(p)] in self._used for p in params):
                continue  # no holder ran any of them: no gradient anywhere, nothing to reduce
            group = self._groups[ranks]
            with self.span(f"mtmm reduce start {ranks}"):
                if not self._owner:
                    flat = _flat_grads(params, flags)
                    pending.append((dist.all_reduce(flat, group=group, async_op=True), flat, params,
                                    None, flags))
                    continue
                for dst, mine in self._shards[b]:
                    flat = _flat_grads(mine, flags)
                    work = dist.reduce(flat, dst=dst, group=group, async_op=True)
                    pending.append((work, flat, mine, dst, flags))
        stats["reduce_s"] += time.perf_counter() - t0

    def _finish_reduce(self, pending: list) -> None:
        """Waits for the reductions and gives every parameter this rank steps its summed
        gradient; a reduce's other ranks drop theirs (partial sums nobody reads)."""
        for work, flat, params, dst, flags in pending:
            with self.span("mtmm reduce wait"):
                work.wait()
            if dst is not None and dst != self.rank:
                for p in params:
                    p.grad = None
                continue
            # a parameter no holder had a gradient for keeps none (AdamW skips it, as in one
            # process); reading the flags syncs, so only steps with a task absent carry them
            had = flat[-len(params):].tolist() if flags else [1.0] * len(params)
            offset = 0
            for p, h in zip(params, had):
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone() if h > 0 else None
                offset += p.numel()


def _part_entry(table: Mapping[str, object], name: str):
    """The entry of the part (its dotted prefix in ``table``) that holds parameter ``name``."""
    prefix = name
    while prefix:
        if prefix in table:
            return table[prefix]
        prefix = prefix.rpartition(".")[0]
    raise KeyError(name)


def _flat_grads(params, flags: bool = False) -> torch.Tensor:
    """The parameters' gradients (zeros where there is none) in one flat tensor; with
    ``flags``, followed by one element per parameter: 1 where it has a gradient, else 0."""
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    if flags:
        parts.append(torch.tensor([float(p.grad is not None) for p in params],
                                  dtype=params[0].dtype, device=params[0].device))
    return torch.cat(parts)


@dataclass(frozen=True)
class _Flip:
    """A forward message travelling backward: the consumer sends, the producer receives."""

    msg: Message

    @property
    def dst(self) -> int:
        return self.msg.src

    @property
    def src(self) -> int:
        return self.msg.dst


# --- plans for a model ------------------------------------------------------------------------
def plan_methods() -> list[str]:
    """The plan methods the executor accepts: every method of the planner."""
    from scheduler.planner import METHODS

    return list(METHODS)


def make_plan(model: MultiTaskModel, num_devices: int, method: str = "spindle", *, problem: dict | None = None,
              cost=None, backend: str = "cpp", options: dict | None = None, **problem_options) -> dict:
    """A plan of ``method`` for ``model`` on ``num_devices`` devices, stamped with the model
    name and device count (the executor refuses a plan made for something else).
    ``backend`` and ``options`` go to ``plan_problem``; ``problem_options`` to
    ``model.to_problem`` (device memory, checkpointing, sharding)."""
    from scheduler.planner import plan_problem

    problem = problem or model.to_problem(num_devices, cost=cost, **problem_options)
    plan = dict(plan_problem(problem, method=method, backend=backend, **(options or {})))
    plan["num_devices"], plan["model"] = num_devices, model.name
    return plan
