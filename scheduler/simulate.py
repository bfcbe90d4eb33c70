"""Cluster simulator: what one training iteration of a plan costs on a given cluster.

The same function prices every method's plan (sequential, distmm, optimus, uniform, spindle,
mtmm), so methods are compared on equal terms. The model, documented in docs/simulator.md:

* **Compute**: waves run one after another (the wavefront runtime: data moves only between
  waves). A slice takes ``layers x time_ms[n]`` on its n devices; a wave lasts as long as its
  longest slice. ``time_ms`` is forward plus backward, so one wave block is the wave's forward
  and its backward folded together.
* **Inter-wave transfers**: before each wave, every activation it needs that lives on other
  devices is moved: a MetaOp's output to the first slice of each successor (``output_mb``), and
  a MetaOp's hidden state from one of its slices to the next when it is split across waves
  (``Cluster.hidden_mb``: the problem format has no field for it, so it is estimated from the
  layer's stored activations). Data is sharded by sample over the n devices of a group; each
  slice orders its devices to keep its largest input in place (``align_layout``); a re-shard
  from a devices to b devices moves each overlap of source and destination shards, free when
  both are the same device, over NVLink inside a node, over the network across nodes. A
  boundary lasts as long as its busiest link (per-device NVLink in/out, per-node network
  in/out) plus one latency; it is paid twice: activations forward, their gradients backward.
* **Gradient synchronisation**: after the backward pass each layer's gradient is all-reduced
  among the devices that hold that layer of that component (every device that ran it for any
  MetaOp: shared parameters are synchronised group-wise, not over the cluster). The cost model's
  ``time_ms[n]`` already holds the all-reduce inside one data-parallel group of n devices
  (``costmodel.AnalyticCost.layer_ms``), so by default (``Cluster.group_sync_in_times``) only a
  layer that several different groups ran (a component shared by MetaOps placed apart) is
  synchronised here, over the union of their devices. Layers with the same holders form one
  bucket. A bucket inside one node is a ring over NVLink; across nodes it is hierarchical
  (reduce-scatter in the node, ring across nodes on each shard, all-gather in the node).
  Buckets on disjoint devices run concurrently; buckets sharing a device or a node's network
  link are serialised on it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from .checks import check_positive_int

__all__ = ["Cluster", "SimResult", "WaveTiming", "simulate", "reshard_bytes", "align_layout",
           "allreduce_ms"]


@dataclass(frozen=True)
class Cluster:
    """A cluster of identical nodes; defaults are the paper's 8 x A800-80GB nodes.

    Bandwidths are in GB/s per direction: ``intra_gbps`` per device over NVLink (A800: 400 GB/s
    bidirectional), ``inter_gbps`` per node over the network (400 Gb/s InfiniBand = 50 GB/s).
    The defaults are achievable rates, the same as ``costmodel.A800``'s all-reduce bus bandwidths
    (NVLink 200 GB/s per direction, ~150 achieved; InfiniBand 50 GB/s, ~45 achieved), so that
    the cost model and the simulator price communication alike.
    ``grad_fraction`` is the share of a layer's ``param_gb`` (weights, gradients, optimizer state)
    that is the gradient sent in the all-reduce: 2 of 16 bytes per parameter for bf16 gradients
    under mixed-precision Adam (``costmodel.BYTES_PER_PARAM_STATE``).
    ``group_sync_in_times``: the MetaOps' ``time_ms`` include their own group's data-parallel
    all-reduce (true of ``costmodel.AnalyticCost``), so only parameters shared between
    different groups are synchronised by the simulator; False synchronises every layer held by
    more than one device (for times that are pure compute).
    ``hidden_fraction``: for MetaOps without ``hidden_mb``, the hidden state between two layers
    as a share of the activations one layer stores (``activation_gb``): bf16 ``2h`` bytes per
    token of the ``18h + 4 mlp`` that ``costmodel`` counts for a pre-LN layer, 1/17 at mlp = 4h.
    """

    devices_per_node: int = 8
    intra_gbps: float = 150.0
    inter_gbps: float = 45.0
    intra_latency_us: float = 5.0
    inter_latency_us: float = 10.0
    grad_fraction: float = 0.125
    group_sync_in_times: bool = True
    hidden_fraction: float = 1 / 17

    def __post_init__(self):
        check_positive_int("devices_per_node", self.devices_per_node)
        for name in ("intra_gbps", "inter_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("intra_latency_us", "inter_latency_us", "grad_fraction", "hidden_fraction"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def node(self, device: int) -> int:
        return device // self.devices_per_node

    def hidden_mb(self, op) -> float:
        """The activation between two consecutive layers of MetaOp ``op``, whole batch, MB: the
        problem's ``hidden_mb`` when it gives one, else estimated from ``activation_gb``."""
        if op.hidden_mb is not None:
            return op.hidden_mb
        return max(op.output_mb, op.activation_gb * 1e3 * self.hidden_fraction)


@dataclass
class WaveTiming:
    """One wave on the simulated timeline: its inbound transfer phase, then its compute."""

    index: int
    start_ms: float          # start of the inbound transfer phase
    transfer_ms: float       # forward activations + backward gradients across the boundary
    compute_start_ms: float
    compute_ms: float
    # each slice: metaop, layer_begin, layer_end, devices, compute_ms
    slices: list[dict] = field(default_factory=list)
    transfers: list[dict] = field(default_factory=list)  # src, dst (device lists), mb, kind

    @property
    def end_ms(self) -> float:
        return self.compute_start_ms + self.compute_ms


@dataclass
class SimResult:
    iteration_ms: float
    compute_ms: float
    transfer_ms: float
    sync_ms: float
    waves: list[WaveTiming]
    sync_start_ms: float
    sync_per_device_ms: list[float]       # time each device spends in its all-reduces
    sync_buckets: list[dict]              # component, devices, mb, ms
    transfer_mb: float                    # bytes moved between devices per direction, MB
    num_devices: int

    @property
    def breakdown(self) -> dict[str, float]:
        return {"compute_ms": self.compute_ms, "transfer_ms": self.transfer_ms,
                "sync_ms": self.sync_ms}

    @property
    def transfer_fraction(self) -> float:
        return self.transfer_ms / self.iteration_ms if self.iteration_ms > 0 else 0.0

    @property
    def compute_per_wave_ms(self) -> list[float]:
        return [w.compute_ms for w in self.waves]

    def device_busy_ms(self) -> list[float]:
        """Compute time of each device (its utilisation is this over ``iteration_ms``)."""
        busy = [0.0] * self.num_devices
        for w in self.waves:
            for s in w.slices:
                for d in s["devices"]:
                    busy[d] += s["compute_ms"]
        return busy

    def to_dict(self) -> dict:
        return {
            "iteration_ms": self.iteration_ms,
            **self.breakdown,
            "transfer_fraction": self.transfer_fraction,
            "transfer_mb": self.transfer_mb,
            "compute_per_wave_ms": self.compute_per_wave_ms,
            "sync_buckets": self.sync_buckets,
        }


# --- cost primitives --------------------------------------------------------------------------

def reshard_bytes(src: list[int], dst: list[int], mb: float) -> list[tuple[int, int, float]]:
    """Moves needed to re-shard ``mb`` MB split evenly over layout ``src`` into layout ``dst``.

    A layout is an ordered device list: its i-th device holds the i-th n-th of the samples.
    Returns (from, to, MB) for every non-empty overlap between different devices.
    """
    a, b = len(src), len(dst)
    if a == 0 or b == 0 or mb <= 0:
        return []
    # In units of 1/(a*b) of the data: src i holds [i*b, (i+1)*b), dst j needs [j*a, (j+1)*a).
    moves, i, j = [], 0, 0
    while i < a and j < b:
        lo, hi = max(i * b, j * a), min((i + 1) * b, (j + 1) * a)
        if hi > lo and src[i] != dst[j]:
            moves.append((src[i], dst[j], mb * (hi - lo) / (a * b)))
        if (i + 1) * b <= (j + 1) * a:
            i += 1
        else:
            j += 1
    return moves


def _overlap(i: int, a: int, j: int, b: int) -> int:
    return max(0, min((i + 1) * b, (j + 1) * a) - max(i * b, j * a))


def align_layout(src: list[int], devices: list[int], node=lambda d: 0) -> list[int]:
    """The order of ``devices`` that keeps the most of layout ``src``'s data in place.

    What a runtime does when it re-shards: a device in both groups takes the destination shard
    that overlaps most with the shard it already holds; every other shard goes to a device on
    the node of the source device it mostly comes from when one is free (NVLink, not the
    network), else to the lowest-numbered free device.
    """
    a, b = len(src), len(devices)
    if a == 0:
        return sorted(devices)
    layout: list[int | None] = [None] * b
    free = set(devices)
    for i, d in enumerate(src):
        if d not in free:
            continue
        js = range((i * b) // a, min(b, ((i + 1) * b + a - 1) // a))
        best = max((j for j in js if layout[j] is None), key=lambda j: (_overlap(i, a, j, b), -j),
                   default=None)
        if best is not None and _overlap(i, a, best, b) > 0:
            layout[best] = d
            free.discard(d)
    for j in range(b):
        if layout[j] is not None:
            continue
        is_ = range((j * a) // b, min(a, ((j + 1) * a + b - 1) // b))
        home = node(src[max(is_, key=lambda i: (_overlap(i, a, j, b), -i))])
        near = [d for d in free if node(d) == home]
        d = min(near) if near else min(free)
        layout[j] = d
        free.discard(d)
    return layout  # type: ignore[return-value]


def allreduce_ms(devices: list[int], mb: float, cluster: Cluster) -> tuple[float, float]:
    """(in-node ms, across-node ms) of a hierarchical ring all-reduce of ``mb`` MB over ``devices``.

    In the node: reduce-scatter and all-gather, 2(g-1)/g of the data over NVLink each device
    (g the largest number of the group's devices on one node). Across k nodes: a ring per shard,
    2(k-1)/k of the data through each node's network link. Latency per ring step.
    """
    per_node: dict[int, int] = defaultdict(int)
    for d in devices:
        per_node[cluster.node(d)] += 1
    g, k = max(per_node.values()), len(per_node)
    intra = 0.0
    if g > 1:
        intra = (2 * (g - 1) / g * mb / cluster.intra_gbps
                 + 2 * (g - 1) * cluster.intra_latency_us / 1e3)
    inter = 0.0
    if k > 1:
        inter = (2 * (k - 1) / k * mb / cluster.inter_gbps
                 + 2 * (k - 1) * cluster.inter_latency_us / 1e3)
    return intra, inter


def _phase_ms(moves: list[tuple[int, int, float]], cluster: Cluster) -> float:
    """A set of concurrent point-to-point moves: the busiest link's load plus one latency."""
    if not moves:
        return 0.0
    dev_out, dev_in = defaultdict(float), defaultdict(float)
    node_out, node_in = defaultdict(float), defaultdict(float)
    crosses = False
    for s, d, mb in moves:
        ns, nd = cluster.node(s), cluster.node(d)
        if ns == nd:
            dev_out[s] += mb
            dev_in[d] += mb
        else:
            node_out[ns] += mb
            node_in[nd] += mb
            crosses = True
    intra = max([*dev_out.values(), *dev_in.values(), 0.0]) / cluster.intra_gbps
    inter = max([*node_out.values(), *node_in.values(), 0.0]) / cluster.inter_gbps
    latency = cluster.inter_latency_us if crosses else cluster.intra_latency_us
    return max(intra, inter) + latency / 1e3


# --- plan reading -------------------------------------------------------------------------------

def _as_problem(problem):
    from scheduler.plan import Problem

    if isinstance(problem, Problem):
        return problem
    if isinstance(problem, dict):
        return Problem.from_dict(problem)
    raise TypeError(f"problem must be a Problem or a problem dict, got {type(problem).__name__}")


def _layer_ms(op, n: int, strict: bool) -> float:
    """Time of one layer of ``op`` on ``n`` devices."""
    t = op.time_ms
    if n in t:
        return t[n]
    if strict:
        raise ValueError(f"plan: MetaOp {op.name!r} runs on {n} devices, "
                         f"not a valid count {sorted(t)}")
    # A fixed plan replayed on changed data: interpolate in n between the valid counts around it.
    counts = sorted(t)
    if n <= counts[0]:
        return t[counts[0]] * counts[0] / n if n < counts[0] else t[counts[0]]
    if n >= counts[-1]:
        return t[counts[-1]]
    hi = next(c for c in counts if c > n)
    lo = max(c for c in counts if c < n)
    return t[lo] + (t[hi] - t[lo]) * (n - lo) / (hi - lo)


def _read_waves(problem, plan: dict, strict: bool) -> list[list[dict]]:
    if not isinstance(plan, dict):
        raise TypeError(f"plan must be a dict, got {type(plan).__name__}")
    waves = plan.get("waves")
    if not isinstance(waves, list):
        raise ValueError("plan: 'waves' must be a list")
    names = {op.name: i for i, op in enumerate(problem.metaops)}
    out = []
    for w_idx, wave in enumerate(sorted(waves, key=lambda w: w.get("start_ms", 0.0))):
        seen: set[int] = set()
        slices = []
        for s in wave.get("slices", []):
            name = s.get("metaop")
            if name not in names:
                if strict:
                    raise ValueError(f"plan: wave {w_idx} names unknown MetaOp {name!r}")
                continue  # a task that left: its devices idle in this wave
            devices = [int(d) for d in s.get("devices", [])]
            if not devices:
                raise ValueError(f"plan: wave {w_idx} slice of {name!r} has no devices")
            for d in devices:
                if not 0 <= d < problem.num_devices:
                    raise ValueError(f"plan: wave {w_idx} slice of {name!r} uses device {d}, "
                                     f"outside [0, {problem.num_devices})")
                if d in seen:
                    raise ValueError(f"plan: wave {w_idx} uses device {d} twice")
                seen.add(d)
            try:
                lb, le = int(s["layer_begin"]), int(s["layer_end"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"plan: wave {w_idx} slice of {name!r} needs integer "
                                 "layer_begin and layer_end") from None
            op = problem.metaops[names[name]]
            if not 0 <= lb < le <= op.layers:
                raise ValueError(f"plan: wave {w_idx} slice of {name!r} has layers [{lb}, {le}), "
                                 f"outside [0, {op.layers}]")
            slices.append({"op": names[name], "metaop": name, "layer_begin": lb, "layer_end": le,
                           "devices": sorted(devices),
                           "compute_ms": (le - lb) * _layer_ms(op, len(devices), strict)})
        out.append(slices)
    return out


# --- the simulator ------------------------------------------------------------------------------

def simulate(problem, plan: dict, cluster: Cluster | None = None, *,
             strict: bool = True) -> SimResult:
    """Simulate one training iteration of ``plan`` for ``problem`` on ``cluster``.

    Args:
        problem: a ``scheduler.plan.Problem`` or a problem dict (issue-5 format).
        plan: a plan dict (issue-5 format); slices may carry extra keys.
        cluster: the cluster; default ``Cluster(devices_per_node=problem.island_size)``, the
            paper's 8-GPU nodes for the zoo problems.
        strict: when False, slices naming MetaOps absent from ``problem`` leave their devices
            idle and device counts that are not valid counts are interpolated, so that a plan
            made for one iteration's data can be replayed on another's (the dynamic study).

    Returns:
        a ``SimResult``: ``iteration_ms`` = compute + transfers + gradient sync, with per-wave
        timings for the Gantt chart and the trace.
    """
    problem = _as_problem(problem)
    if cluster is None:
        cluster = Cluster(devices_per_node=problem.island_size)
    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster must be a Cluster, got {type(cluster).__name__}")
    waves = _read_waves(problem, plan, strict)

    # Where each MetaOp's layers ran: (wave, slice) in layer order.
    runs: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    for w, slices in enumerate(waves):
        for s in slices:
            runs[s["op"]].append((w, s))
    for r in runs.values():
        r.sort(key=lambda ws: ws[1]["layer_begin"])
    if strict:
        for i, op in enumerate(problem.metaops):
            covered = sum(s["layer_end"] - s["layer_begin"] for _, s in runs.get(i, []))
            if covered != op.layers:
                raise ValueError(f"plan: MetaOp {op.name!r} runs {covered} of its "
                                 f"{op.layers} layers")

    # Inputs of each slice that come from another slice: (source slice, MB, kind).
    inputs: dict[int, list[tuple[dict, float, str]]] = defaultdict(list)
    for i, r in runs.items():
        mb = cluster.hidden_mb(problem.metaops[i])
        for (wa, sa), (wb, sb) in zip(r, r[1:]):
            if strict and (wa >= wb or sa["layer_end"] != sb["layer_begin"]):
                raise ValueError(f"plan: layers of MetaOp {problem.metaops[i].name!r} do not run "
                                 "once each, in order, one slice per wave")
            inputs[id(sb)].append((sa, mb, "reshard"))
    for src, dst in problem.flows:
        if src in runs and dst in runs:
            (wa, sa), (wb, sb) = runs[src][-1], runs[dst][0]
            if strict and wa >= wb:
                raise ValueError(f"plan: flow {problem.metaops[src].name!r} -> "
                                 f"{problem.metaops[dst].name!r} is not ordered in time")
            inputs[id(sb)].append((sa, problem.metaops[src].output_mb, "flow"))

    timeline, t, transfer_total, compute_total, moved_mb = [], 0.0, 0.0, 0.0, 0.0
    for w, slices in enumerate(waves):
        moves, shown = [], []
        for s in slices:
            ins = inputs.get(id(s), [])
            # The slice lays its shards out to keep its largest input where it already is.
            main = max(ins, key=lambda x: x[1], default=None)
            s["layout"] = (align_layout(main[0].get("layout", main[0]["devices"]), s["devices"],
                                        cluster.node) if main else list(s["devices"]))
            for src, mb, kind in ins:
                m = reshard_bytes(src.get("layout", src["devices"]), s["layout"], mb)
                if m:
                    moves.extend(m)
                    shown.append({"src": src["devices"], "dst": s["devices"],
                                  "mb": sum(x[2] for x in m), "kind": kind})
        moved_mb += sum(x[2] for x in moves)
        tr = 2.0 * _phase_ms(moves, cluster)  # activations forward, their gradients backward
        comp = max((s["compute_ms"] for s in slices), default=0.0)
        timeline.append(WaveTiming(w, t, tr, t + tr, comp,
                                   [{k: v for k, v in s.items() if k not in ("op", "layout")}
                                    for s in slices], shown))
        t += tr + comp
        transfer_total += tr
        compute_total += comp

    sync_ms, per_device, buckets = _grad_sync(problem, waves, cluster)
    return SimResult(iteration_ms=t + sync_ms, compute_ms=compute_total, transfer_ms=transfer_total,
                     sync_ms=sync_ms, waves=timeline, sync_start_ms=t,
                     sync_per_device_ms=per_device, sync_buckets=buckets, transfer_mb=moved_mb,
                     num_devices=problem.num_devices)


def _grad_sync(problem, waves, cluster: Cluster) -> tuple[float, list[float], list[dict]]:
    """Group-wise all-reduce of every layer's gradient among the devices that hold that layer."""
    groups: dict[tuple[str, int], set[tuple[int, ...]]] = defaultdict(set)
    grad_mb: dict[tuple[str, int], float] = defaultdict(float)
    for slices in waves:
        for s in slices:
            op = problem.metaops[s["op"]]
            mb = op.param_gb * 1e3 * cluster.grad_fraction
            for layer in range(s["layer_begin"], s["layer_end"]):
                key = (op.component, layer)
                groups[key].add(tuple(s["devices"]))
                grad_mb[key] = max(grad_mb[key], mb)
    bucket_mb: dict[tuple[str, tuple[int, ...]], float] = defaultdict(float)
    for key, gs in groups.items():
        if cluster.group_sync_in_times and len(gs) == 1:
            continue  # one group: its all-reduce is inside time_ms already
        devs = set().union(*gs)
        if len(devs) > 1 and grad_mb[key] > 0:
            bucket_mb[(key[0], tuple(sorted(devs)))] += grad_mb[key]
    dev_ms = [0.0] * problem.num_devices
    dev_inter = [0.0] * problem.num_devices
    node_ms: dict[int, float] = defaultdict(float)
    buckets = []
    for (component, devs), mb in sorted(bucket_mb.items()):
        intra, inter = allreduce_ms(list(devs), mb, cluster)
        for d in devs:
            dev_ms[d] += intra
            dev_inter[d] += inter
        if inter > 0:
            for n in {cluster.node(d) for d in devs}:
                node_ms[n] += inter
        buckets.append({"component": component, "devices": list(devs), "mb": mb,
                        "intra_ms": intra, "inter_ms": inter})
    # In-node phases (reduce-scatter + all-gather) and the across-node rings are serialised on
    # the busiest device and the busiest network link respectively.
    inter_max = max(node_ms.values(), default=0.0)
    total = max(dev_ms, default=0.0) + inter_max
    per_device = [dev_ms[d] + dev_inter[d] for d in range(problem.num_devices)]
    assert math.isfinite(total)
    return total, per_device, buckets
