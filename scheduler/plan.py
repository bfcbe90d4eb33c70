"""Planner problem and plan: the JSON formats (docs/formats.md), parsing, validation, lower bound.

A *problem* is a MetaGraph (MetaOps with per-layer times at their valid device counts, data
flows between them) plus the cluster (devices, island size, device memory). A *plan* is a list
of waves; each wave runs slices (a range of one MetaOp's layers on a set of devices).

Memory model (shared by the planner and ``validate``): a device that runs layer j of component
c holds that layer's parameters once (``param_gb``, the largest over the component's MetaOps),
however many MetaOps and waves use it; every slice leaves ``layers * activation_gb / n`` of
activations on each of its n devices for the whole iteration (forward runs wave by wave, the
backward in reverse, so the peak holds all of them). With ``optimizer_shard_fraction`` f, the
share f of ``param_gb`` (optimizer state) is split evenly among the H devices that hold the
layer in the whole plan: each holds (1 - f + f / H) of it. The planner, which places wave by
wave, charges (1 - f + f / n) for a slice on n devices, never less than the final share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = [
    "MetaOpSpec",
    "Problem",
    "PlanError",
    "PlanMemoryError",
    "validate",
    "lower_bound",
    "memory_per_device",
    "memory_summary",
]

# Relative slack for float comparisons in validate (the planner itself never relies on it).
_REL_TOL = 1e-9


class PlanError(ValueError):
    """A plan breaks an invariant of the plan format; the message says which and where."""


class PlanMemoryError(ValueError):
    """No plan was found within ``device_memory_gb``: a MetaOp's layer fits no device, the
    problem needs more than all devices hold, or a wave fits no devices' free memory (the
    planner's placement; the memory fallback then tries capped device counts). The message
    names the MetaOp and the memory."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class MetaOpSpec:
    """One MetaOp: ``layers`` identical consecutive layers of ``component`` for ``task``.

    ``time_ms[n]``: time of ONE layer (forward + backward) on n devices; the keys are the valid
    device counts. Times are positive and never increase with n (a larger count may be as fast,
    never slower). ``param_gb``: weights + gradients + optimizer state of one layer;
    ``activation_gb``: activations of one layer for the whole batch (split over the devices);
    ``output_mb``: what the MetaOp sends to each successor; ``hidden_mb``: what one of its layers
    hands to the next (the hidden state, whole batch), None when unknown.
    """

    name: str
    task: str
    component: str
    layers: int
    time_ms: dict[int, float]
    param_gb: float = 0.0
    activation_gb: float = 0.0
    output_mb: float = 0.0
    hidden_mb: float | None = None
    _counts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"MetaOp name must be a non-empty string, got {self.name!r}")
        who = f"MetaOp {self.name!r}"
        for key in ("task", "component"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{who}: {key} must be a string, got {getattr(self, key)!r}")
        if not _is_int(self.layers) or self.layers < 1:
            raise ValueError(f"{who}: layers must be an integer >= 1, got {self.layers!r}")
        if not isinstance(self.time_ms, Mapping) or not self.time_ms:
            raise ValueError(f"{who}: time_ms must be a non-empty mapping count -> ms")
        times: dict[int, float] = {}
        for k, v in self.time_ms.items():
            try:
                n = int(k)
            except (TypeError, ValueError):
                raise ValueError(f"{who}: time_ms key {k!r} is not a device count") from None
            if n < 1 or str(n) != str(k).strip():
                raise ValueError(f"{who}: time_ms key {k!r} is not a device count >= 1")
            if not _finite_number(v) or v <= 0:
                raise ValueError(f"{who}: time_ms[{n}] must be a positive finite number, got {v!r}")
            if n in times:
                raise ValueError(f"{who}: time_ms has device count {n} twice")
            times[n] = float(v)
        counts = tuple(sorted(times))
        for a, b in zip(counts, counts[1:]):
            if times[b] > times[a]:
                raise ValueError(
                    f"{who}: non-monotonic times: time_ms[{b}] = {times[b]} is slower than "
                    f"time_ms[{a}] = {times[a]} (a larger count must not be slower; leave such "
                    "counts out)"
                )
        object.__setattr__(self, "time_ms", {n: times[n] for n in counts})
        object.__setattr__(self, "_counts", counts)
        for key in ("param_gb", "activation_gb", "output_mb"):
            v = getattr(self, key)
            if not _finite_number(v) or v < 0:
                raise ValueError(f"{who}: {key} must be a finite number >= 0, got {v!r}")
            object.__setattr__(self, key, float(v))
        if self.hidden_mb is not None:
            if not _finite_number(self.hidden_mb) or self.hidden_mb < 0:
                raise ValueError(f"{who}: hidden_mb must be a finite number >= 0, got "
                                 f"{self.hidden_mb!r}")
            object.__setattr__(self, "hidden_mb", float(self.hidden_mb))

    @property
    def counts(self) -> tuple[int, ...]:
        """The valid device counts, ascending."""
        return self._counts

    @staticmethod
    def from_dict(d: Mapping) -> "MetaOpSpec":
        if not isinstance(d, Mapping):
            raise ValueError(f"a MetaOp must be a JSON object, got {type(d).__name__}")
        name = d.get("name")
        unknown = set(d) - {"name", "task", "component", "layers", "time_ms", "param_gb",
                            "activation_gb", "output_mb", "hidden_mb"}
        if unknown:
            raise ValueError(f"MetaOp {name!r}: unknown keys {sorted(unknown)}")
        for key in ("name", "layers", "time_ms"):
            if key not in d:
                raise ValueError(f"MetaOp {name!r}: missing {key!r}")
        task = d.get("task", name.split("/")[0] if isinstance(name, str) else "")
        return MetaOpSpec(
            name=name, task=task, component=d.get("component", name), layers=d["layers"],
            time_ms=d["time_ms"], param_gb=d.get("param_gb", 0.0),
            activation_gb=d.get("activation_gb", 0.0), output_mb=d.get("output_mb", 0.0),
            hidden_mb=d.get("hidden_mb"),
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name, "task": self.task, "component": self.component,
            "layers": self.layers, "time_ms": {str(n): t for n, t in self.time_ms.items()},
            "param_gb": self.param_gb, "activation_gb": self.activation_gb,
            "output_mb": self.output_mb,
            **({} if self.hidden_mb is None else {"hidden_mb": self.hidden_mb}),
        }


@dataclass(frozen=True)
class Problem:
    """A planning problem: MetaOps, flows (src index, dst index), and the cluster."""

    num_devices: int
    island_size: int
    metaops: tuple[MetaOpSpec, ...]
    flows: tuple[tuple[int, int], ...] = ()
    device_memory_gb: float | None = None
    # the share of every param_gb that is optimizer state sharded among the devices holding
    # the layer (ZeRO-1: 12 of mixed-precision Adam's 16 bytes per parameter); 0: replicated
    optimizer_shard_fraction: float = 0.0
    # Where a running job keeps each component's layers: {component: [devices holding layer 0,
    # layer 1, ...]}, layers past the list held nowhere. A re-plan's input: placement prefers
    # those devices, so that switching to the plan moves less state. Stored as sorted
    # (component, ((device, ...), ...)) pairs; see held_devices.
    held_state: Mapping[str, Sequence[Sequence[int]]] = ()
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    _levels: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.num_devices
        if not _is_int(n) or n < 1:
            raise ValueError(f"num_devices must be an integer >= 1, got {n!r}")
        if not _is_int(self.island_size) or self.island_size < 1:
            raise ValueError(f"island_size must be an integer >= 1, got {self.island_size!r}")
        if self.device_memory_gb is not None and (
            not _finite_number(self.device_memory_gb) or self.device_memory_gb <= 0
        ):
            raise ValueError(f"device_memory_gb must be a positive number or null, got "
                             f"{self.device_memory_gb!r}")
        f = self.optimizer_shard_fraction
        if not _finite_number(f) or not 0.0 <= f < 1.0:
            raise ValueError(f"optimizer_shard_fraction must be a number in [0, 1), got {f!r}")
        metaops = tuple(self.metaops)
        if not metaops:
            raise ValueError("metaops must hold at least one MetaOp")
        index: dict[str, int] = {}
        for i, m in enumerate(metaops):
            if not isinstance(m, MetaOpSpec):
                raise TypeError(f"metaops[{i}] must be a MetaOpSpec, got {type(m).__name__}")
            if m.name in index:
                raise ValueError(f"MetaOp {m.name!r} appears twice (names must be unique)")
            index[m.name] = i
            if m.counts[0] > n:
                raise ValueError(f"MetaOp {m.name!r}: no valid device count <= num_devices = {n} "
                                 f"(smallest is {m.counts[0]})")
        flows = []
        for e, f in enumerate(self.flows):
            if len(f) != 2 or not all(_is_int(x) and 0 <= x < len(metaops) for x in f):
                raise ValueError(f"flow {e} {f!r} must be two MetaOp indices in "
                                 f"[0, {len(metaops)})")
            flows.append((f[0], f[1]))
        object.__setattr__(self, "metaops", metaops)
        object.__setattr__(self, "flows", tuple(flows))
        object.__setattr__(self, "held_state", _check_held_state(self.held_state, metaops, n))
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_levels", _longest_path_levels(metaops, flows))

    # --- JSON
    @staticmethod
    def from_dict(d: Mapping) -> "Problem":
        """Parse the problem JSON dict (docs/formats.md); ValueError naming the MetaOp and why."""
        if isinstance(d, Problem):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"problem must be a dict, got {type(d).__name__}")
        for key in ("num_devices", "metaops"):
            if key not in d:
                raise ValueError(f"problem: missing {key!r}")
        unknown = set(d) - {"num_devices", "island_size", "metaops", "flows", "device_memory_gb",
                            "optimizer_shard_fraction", "held_state"}
        if unknown:
            raise ValueError(f"problem: unknown keys {sorted(unknown)}")
        if not isinstance(d["metaops"], (list, tuple)):
            raise ValueError("problem: metaops must be a list")
        metaops = tuple(MetaOpSpec.from_dict(m) for m in d["metaops"])
        names: dict[str, int] = {}
        for i, m in enumerate(metaops):
            if m.name in names:
                raise ValueError(f"MetaOp {m.name!r} appears twice (names must be unique)")
            names[m.name] = i
        flows = []
        for e, f in enumerate(d.get("flows", [])):
            if not isinstance(f, (list, tuple)) or len(f) != 2:
                raise ValueError(f"flow {e} must be [src, dst], got {f!r}")
            for end in f:
                if end not in names:
                    raise ValueError(f"flow {e} {list(f)!r} names unknown MetaOp {end!r}")
            flows.append((names[f[0]], names[f[1]]))
        n = d["num_devices"]
        return Problem(
            num_devices=n, island_size=d.get("island_size", min(8, n) if _is_int(n) else 8),
            metaops=metaops, flows=tuple(flows), device_memory_gb=d.get("device_memory_gb"),
            optimizer_shard_fraction=d.get("optimizer_shard_fraction", 0.0),
            held_state=d.get("held_state") or (),
        )

    def to_dict(self) -> dict:
        out = {
            "num_devices": self.num_devices,
            "island_size": self.island_size,
            "metaops": [m.to_dict() for m in self.metaops],
            "flows": [[self.metaops[s].name, self.metaops[t].name] for s, t in self.flows],
            "device_memory_gb": self.device_memory_gb,
        }
        if self.optimizer_shard_fraction:
            out["optimizer_shard_fraction"] = self.optimizer_shard_fraction
        if self.held_state:
            out["held_state"] = {c: [list(d) for d in layers] for c, layers in self.held_state}
        return out

    # --- queries
    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ValueError(f"unknown MetaOp {name!r}") from None

    def levels(self) -> list[int]:
        """MetaLevel of each MetaOp: 0 for sources, else 1 + the largest level of its
        predecessors (longest-path depth)."""
        return list(self._levels)

    def usable_counts(self, i: int) -> tuple[int, ...]:
        """Valid device counts of MetaOp i that fit the cluster (<= num_devices), ascending."""
        return tuple(c for c in self.metaops[i].counts if c <= self.num_devices)

    def held_devices(self, component: str) -> tuple[tuple[int, ...], ...]:
        """The devices holding each of ``component``'s layers now (``held_state``), ascending;
        () when none is given."""
        for c, layers in self.held_state:
            if c == component:
                return layers
        return ()

    def component_layers(self) -> dict[str, int]:
        """Layers of every component: the most among its MetaOps (in first-appearance order)."""
        return _component_layers(self.metaops)

    def component_param_gb(self) -> dict[str, float]:
        """Per-layer parameter memory of every component: the largest over its MetaOps."""
        out: dict[str, float] = {}
        for m in self.metaops:
            out[m.component] = max(out.get(m.component, 0.0), m.param_gb)
        return out


def _component_layers(metaops) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in metaops:
        out[m.component] = max(out.get(m.component, 0), m.layers)
    return out


def _check_held_state(held, metaops, num_devices: int) -> tuple:
    """``held_state`` as sorted (component, ((device, ...), ...)) pairs, checked."""
    if isinstance(held, tuple) and all(isinstance(e, tuple) and len(e) == 2 for e in held):
        held = dict(held)  # already normalised (dataclasses.replace passes it back)
    if not isinstance(held, Mapping):
        raise ValueError(f"held_state must map components to per-layer device lists, got "
                         f"{type(held).__name__}")
    max_layers = _component_layers(metaops)
    out = []
    for c, layers in held.items():
        if c not in max_layers:
            raise ValueError(f"held_state: unknown component {c!r}")
        if not isinstance(layers, (list, tuple)) or len(layers) > max_layers[c]:
            raise ValueError(f"held_state[{c!r}]: expected a list of at most {max_layers[c]} "
                             f"layers' device lists, got {layers!r}")
        norm = []
        for j, devices in enumerate(layers):
            if not isinstance(devices, (list, tuple, set, frozenset)) or not all(
                    _is_int(d) and 0 <= d < num_devices for d in devices):
                raise ValueError(f"held_state[{c!r}][{j}]: expected device ids in "
                                 f"[0, {num_devices}), got {devices!r}")
            if len(set(devices)) != len(devices):
                raise ValueError(f"held_state[{c!r}][{j}]: a device appears twice in {devices!r}")
            norm.append(tuple(sorted(devices)))
        out.append((c, tuple(norm)))
    return tuple(sorted(out))


def _longest_path_levels(metaops, flows) -> list[int]:
    n = len(metaops)
    succ: list[list[int]] = [[] for _ in range(n)]
    indeg = [0] * n
    for s, t in flows:
        succ[s].append(t)
        indeg[t] += 1
    level = [0] * n
    ready = [v for v in range(n) if indeg[v] == 0]
    seen = 0
    while ready:
        u = ready.pop()
        seen += 1
        for v in succ[u]:
            level[v] = max(level[v], level[u] + 1)
            indeg[v] -= 1
            if indeg[v] == 0:
                ready.append(v)
    if seen != n:
        culprit = min(v for v in range(n) if indeg[v] > 0)
        raise ValueError(f"the flows have a cycle through or after MetaOp "
                         f"{metaops[culprit].name!r}")
    return level


def _as_problem(problem: Problem | Mapping) -> Problem:
    if isinstance(problem, Problem):
        return problem
    return Problem.from_dict(problem)


def lower_bound(problem: Problem | Mapping) -> float:
    """A makespan no plan can beat (ms): the larger of the critical path with every MetaOp at
    its fastest usable count and the least total device-time divided by num_devices."""
    p = _as_problem(problem)
    n = len(p.metaops)
    fastest = [0.0] * n
    device_time = 0.0
    for i, m in enumerate(p.metaops):
        counts = p.usable_counts(i)
        fastest[i] = min(m.time_ms[c] * m.layers for c in counts)
        device_time += min(c * m.time_ms[c] * m.layers for c in counts)
    preds: list[list[int]] = [[] for _ in range(n)]
    for s, t in p.flows:
        preds[t].append(s)
    finish = [0.0] * n
    for v in sorted(range(n), key=lambda v: p._levels[v]):
        finish[v] = fastest[v] + max((finish[u] for u in preds[v]), default=0.0)
    return max(max(finish), device_time / p.num_devices)


def memory_per_device(problem: Problem | Mapping, plan: Mapping) -> list[float]:
    """GB held by every device at the iteration's peak under the memory model above."""
    p = _as_problem(problem)
    param = p.component_param_gb()
    f = p.optimizer_shard_fraction
    used = [0.0] * p.num_devices
    held: dict[tuple[int, str, int], None] = {}  # in the order first held
    holders: dict[tuple[str, int], int] = {}
    for wave in plan["waves"]:
        for s in wave["slices"]:
            m = p.metaops[p.index(s["metaop"])]
            devices = s["devices"]
            act = (s["layer_end"] - s["layer_begin"]) * m.activation_gb / len(devices)
            for d in devices:
                used[d] += act
                for j in range(s["layer_begin"], s["layer_end"]):
                    if (d, m.component, j) not in held:
                        held[d, m.component, j] = None
                        holders[m.component, j] = holders.get((m.component, j), 0) + 1
    for d, c, j in held:
        used[d] += param[c] * ((1.0 - f) + f / holders[c, j])
    return used


def memory_summary(problem: Problem | Mapping, plan: Mapping) -> str:
    """"peak P GB per device (mean M), of L GB": ``memory_per_device`` against the problem's
    ``device_memory_gb`` (which must be set), as ``mtmm plan`` and ``mtmm simulate`` print it."""
    p = _as_problem(problem)
    used = memory_per_device(p, plan)
    return (f"peak {max(used):.1f} GB per device (mean {sum(used) / len(used):.1f}), "
            f"of {p.device_memory_gb:g} GB")


def validate(problem: Problem | Mapping, plan: Mapping) -> None:
    """Check every invariant of a plan for this problem; raise PlanError saying what is wrong.

    Waves are listed in time order and do not overlap; inside a wave the device sets are
    disjoint, within [0, N), and their sizes are valid counts; each slice fits its wave; every
    layer of every MetaOp runs exactly once, in order, at most one slice of a MetaOp per wave;
    every layer of a flow's source finishes (in an earlier wave) before its destination starts;
    memory per device within device_memory_gb when given; makespan_ms is the end of the last
    wave.
    """
    p = _as_problem(problem)
    if not isinstance(plan, Mapping) or not isinstance(plan.get("waves"), list):
        raise PlanError("plan must be a dict with a list 'waves'")
    N = p.num_devices
    done = [0] * len(p.metaops)  # layers placed so far per MetaOp
    first_wave = [-1] * len(p.metaops)
    last_wave = [-1] * len(p.metaops)
    prev_end = 0.0
    for w, wave in enumerate(plan["waves"]):
        start, dur = wave.get("start_ms"), wave.get("duration_ms")
        if not _finite_number(start) or not _finite_number(dur) or start < 0 or dur < 0:
            raise PlanError(f"wave {w}: start_ms and duration_ms must be finite and >= 0")
        if start < prev_end - _REL_TOL * max(1.0, prev_end):
            raise PlanError(f"wave {w} starts at {start} ms, before wave {w - 1} ends at "
                            f"{prev_end} ms (waves must be in time order and not overlap)")
        prev_end = start + dur
        used_devices: set[int] = set()
        seen_here: set[int] = set()
        for s in wave.get("slices", []):
            name = s.get("metaop")
            if name not in p._index:
                raise PlanError(f"wave {w}: slice names unknown MetaOp {name!r}")
            i = p._index[name]
            m = p.metaops[i]
            where = f"wave {w}, MetaOp {name!r}"
            if i in seen_here:
                raise PlanError(f"{where}: more than one slice of this MetaOp in the wave")
            seen_here.add(i)
            b, e, devices = s.get("layer_begin"), s.get("layer_end"), s.get("devices")
            if not (_is_int(b) and _is_int(e) and 0 <= b < e <= m.layers):
                raise PlanError(f"{where}: layers [{b}, {e}) not a non-empty range in "
                                f"[0, {m.layers})")
            if b != done[i]:
                raise PlanError(f"{where}: slice starts at layer {b}, expected {done[i]} "
                                "(layers must run exactly once, in order)")
            if not isinstance(devices, list) or not all(_is_int(d) for d in devices):
                raise PlanError(f"{where}: devices must be a list of integers")
            if len(set(devices)) != len(devices):
                raise PlanError(f"{where}: a device appears twice in {devices}")
            bad = [d for d in devices if not 0 <= d < N]
            if bad:
                raise PlanError(f"{where}: devices {bad} outside [0, {N})")
            clash = used_devices.intersection(devices)
            if clash:
                raise PlanError(f"{where}: devices {sorted(clash)} already busy in this wave")
            used_devices.update(devices)
            if len(devices) not in m.time_ms:
                raise PlanError(f"{where}: {len(devices)} devices is not a valid count "
                                f"{list(m.counts)}")
            need = (e - b) * m.time_ms[len(devices)]
            if need > dur * (1 + _REL_TOL) + 1e-12:
                raise PlanError(f"{where}: {e - b} layers take {need} ms, longer than the wave "
                                f"({dur} ms)")
            if first_wave[i] < 0:
                first_wave[i] = w
            last_wave[i] = w
            done[i] = e
    for i, m in enumerate(p.metaops):
        if done[i] != m.layers:
            raise PlanError(f"MetaOp {m.name!r}: {done[i]} of {m.layers} layers scheduled")
    for s, t in p.flows:
        if last_wave[s] >= first_wave[t]:
            raise PlanError(f"flow {p.metaops[s].name!r} -> {p.metaops[t].name!r}: the "
                            f"destination starts in wave {first_wave[t]}, before the source "
                            f"ends (wave {last_wave[s]})")
    makespan = plan.get("makespan_ms")
    if makespan is not None and abs(makespan - prev_end) > _REL_TOL * max(1.0, prev_end):
        raise PlanError(f"makespan_ms = {makespan} but the last wave ends at {prev_end}")
    if p.device_memory_gb is not None:
        cap = p.device_memory_gb
        for d, gb in enumerate(memory_per_device(p, plan)):
            if gb > cap * (1 + _REL_TOL):
                raise PlanError(f"device {d} holds {gb:.6g} GB, more than device_memory_gb = "
                                f"{cap}")
