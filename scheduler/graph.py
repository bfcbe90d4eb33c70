"""Model declarations, the op graph, and its Spindle contraction into MetaOps.

A model is declared as components (stacks of identical layers that own parameters) and tasks
(each sends its own batch through its own subset of components along its own flows).
`build_op_graph` expands that into one operator per (task, component, layer); `contract`
merges chains of identical operators into MetaOps exactly as the paper does: i -> j merges when
i has out-degree 1, j has in-degree 1, and both have the same type and input shape. The C++
core does the contraction (`scheduler._core.contract`); `contract_python` is its twin and the
tests' oracle. `to_problem` turns a model into the planner's problem dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import costmodel

__all__ = [
    "Component",
    "MetaGraph",
    "MetaOp",
    "ModelSpec",
    "OpGraph",
    "OpNode",
    "Task",
    "build_op_graph",
    "contract",
    "contract_python",
    "to_problem",
]

KINDS = ("transformer", "linear", "loss")


def _check_name(what: str, name) -> None:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"{what} must be a non-empty string without '/', got {name!r}")


# --- declarations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """A stack of `layers` identical layers with shared parameters.

    kind "transformer": pre-LN layer, width `hidden`, `heads` heads, MLP width `mlp`
    (default 4*hidden). "linear": one projection from `hidden` to `mlp` features per layer.
    "loss": a parameter-free contrastive loss over `hidden`-wide embeddings.
    out_tokens: tokens per sample the component hands on (1 for a pooled embedding, 256 for a
    resampler); None means its whole input sequence.
    gated: a gated (SwiGLU) MLP with three `mlp`-wide matrices instead of two.
    """

    name: str
    layers: int
    hidden: int
    heads: int = 0
    mlp: int | None = None
    kind: str = "transformer"
    out_tokens: int | None = None
    gated: bool = False

    def __post_init__(self):
        _check_name("Component.name", self.name)
        if self.kind not in KINDS:
            raise ValueError(f"Component {self.name!r}: kind must be one of {KINDS}, "
                             f"got {self.kind!r}")
        if not isinstance(self.layers, int) or self.layers < 1:
            raise ValueError(f"Component {self.name!r}: layers must be an int >= 1, "
                             f"got {self.layers!r}")
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"Component {self.name!r}: hidden must be an int >= 1, "
                             f"got {self.hidden!r}")
        if self.kind == "transformer" and (self.heads < 1 or self.hidden % self.heads):
            raise ValueError(f"Component {self.name!r}: a transformer needs heads >= 1 dividing "
                             f"hidden={self.hidden}, got heads={self.heads}")
        if self.mlp is not None and self.mlp < 1:
            raise ValueError(f"Component {self.name!r}: mlp must be >= 1, got {self.mlp}")
        if self.out_tokens is not None and self.out_tokens < 1:
            raise ValueError(f"Component {self.name!r}: out_tokens must be >= 1, "
                             f"got {self.out_tokens}")

    @property
    def params(self) -> int:
        """Parameters of the whole stack."""
        return self.layers * costmodel.layer_params(self)


@dataclass(frozen=True)
class Task:
    """One task: its global batch (samples per iteration), the tokens per sample it feeds each
    component it uses (the keys of `seq_lens`, in data-flow order), and its data flows."""

    name: str
    batch: int
    seq_lens: dict[str, int]
    flows: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        _check_name("Task.name", self.name)
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"Task {self.name!r}: batch must be an int >= 1, got {self.batch!r}")
        if not self.seq_lens:
            raise ValueError(f"Task {self.name!r}: seq_lens is empty (a task uses >= 1 component)")
        for comp, s in self.seq_lens.items():
            if not isinstance(s, int) or s < 1:
                raise ValueError(f"Task {self.name!r}: seq_lens[{comp!r}] must be an int >= 1, "
                                 f"got {s!r}")
        object.__setattr__(self, "flows", tuple(tuple(f) for f in self.flows))
        for src, dst in self.flows:
            for end in (src, dst):
                if end not in self.seq_lens:
                    raise ValueError(f"Task {self.name!r}: flow ({src!r}, {dst!r}) names {end!r}, "
                                     f"which is not in seq_lens")
            if src == dst:
                raise ValueError(f"Task {self.name!r}: flow ({src!r}, {dst!r}) is a self-loop")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    components: tuple[Component, ...]
    tasks: tuple[Task, ...]

    def __post_init__(self):
        object.__setattr__(self, "components", tuple(self.components))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"ModelSpec {self.name!r}: duplicate component names in {names}")
        tnames = [t.name for t in self.tasks]
        if not tnames or len(set(tnames)) != len(tnames):
            raise ValueError(f"ModelSpec {self.name!r}: tasks must be non-empty with unique "
                             f"names, got {tnames}")
        for t in self.tasks:
            for comp in t.seq_lens:
                if comp not in names:
                    raise ValueError(f"ModelSpec {self.name!r}: task {t.name!r} uses unknown "
                                     f"component {comp!r}")

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def params(self) -> int:
        return sum(c.params for c in self.components)


# --- op graph and contraction ----------------------------------------------------------------


@dataclass(frozen=True)
class OpNode:
    """One operator: `op_type` says what it computes with which parameters, `shape` its input."""

    task: str
    component: str
    layer: int
    op_type: tuple
    shape: tuple[int, ...]


@dataclass
class OpGraph:
    nodes: list[OpNode] = field(default_factory=list)
    edges: list[tuple[int, int]] = field(default_factory=list)


def _op_type(c: Component) -> tuple:
    # Layers of different components own different parameters, so they are never "identical"
    # operators even when their shapes agree: the component name is part of the type.
    return (c.kind, c.name, c.hidden, c.heads, c.mlp, c.gated)


def build_op_graph(spec: ModelSpec) -> OpGraph:
    """One node per (task, component, layer); layer k -> k+1 inside a component, and the last
    layer of src -> the first layer of dst for every flow of a task."""
    g = OpGraph()
    for t in spec.tasks:
        first, last = {}, {}
        for comp_name, seq in t.seq_lens.items():
            c = spec.component(comp_name)
            kind = _op_type(c)
            shape = (t.batch, seq, c.hidden)
            for k in range(c.layers):
                g.nodes.append(OpNode(t.name, c.name, k, kind, shape))
                idx = len(g.nodes) - 1
                if k == 0:
                    first[comp_name] = idx
                else:
                    g.edges.append((idx - 1, idx))
            last[comp_name] = len(g.nodes) - 1
        for src, dst in t.flows:
            g.edges.append((last[src], first[dst]))
    return g


@dataclass(frozen=True)
class MetaOp:
    """L identical consecutive operators: `nodes` are their op-graph ids in chain order."""

    name: str
    task: str
    component: str
    op_type: tuple
    shape: tuple[int, ...]
    nodes: tuple[int, ...]

    @property
    def layers(self) -> int:
        return len(self.nodes)


@dataclass(frozen=True)
class MetaGraph:
    metaops: tuple[MetaOp, ...]
    edges: tuple[tuple[int, int], ...]  # (src, dst) indices into metaops, sorted, no duplicates
    levels: tuple[int, ...]  # MetaLevel (longest-path depth) of each MetaOp


def _node_keys(graph: OpGraph) -> list[int]:
    ids: dict[tuple, int] = {}
    return [ids.setdefault((n.op_type, n.shape), len(ids)) for n in graph.nodes]


def contract_python(num_nodes: int, keys: list[int], edges: list[tuple[int, int]]
                    ) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Twin of `scheduler._core.contract`: (groups, meta_edges).

    Nodes are visited in the deterministic topological order (smallest ready id first); a node
    joins its predecessor's group when the edge between them is contractible, else opens a new
    group. Groups are numbered in that order and list their nodes in chain order; meta_edges are
    the distinct (group, group) pairs of the remaining edges, sorted. Merging a contractible
    edge i -> j leaves a node with i's in-edges and j's out-edges, so no other edge's
    contractibility changes: "repeat until no merge applies" is the same as taking maximal
    chains of contractible edges.
    """
    if len(keys) != num_nodes:
        raise ValueError(f"keys has {len(keys)} entries for {num_nodes} nodes")
    succ = [[] for _ in range(num_nodes)]
    pred = [[] for _ in range(num_nodes)]
    for e, (u, v) in enumerate(edges):
        if not (0 <= u < num_nodes and 0 <= v < num_nodes):
            raise ValueError(f"edge {e} ({u} -> {v}) names a node outside [0, {num_nodes})")
        succ[u].append(v)
        pred[v].append(u)
    import heapq

    indeg = [len(p) for p in pred]
    ready = [v for v in range(num_nodes) if indeg[v] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        u = heapq.heappop(ready)
        order.append(u)
        for v in succ[u]:
            indeg[v] -= 1
            if indeg[v] == 0:
                heapq.heappush(ready, v)
    if len(order) != num_nodes:
        culprit = next(v for v in range(num_nodes) if indeg[v] > 0)
        raise ValueError(f"the graph has a cycle through or before node {culprit}")
    group_of = [-1] * num_nodes
    groups: list[list[int]] = []
    for v in order:
        if len(pred[v]) == 1 and len(succ[pred[v][0]]) == 1 and keys[pred[v][0]] == keys[v]:
            group_of[v] = group_of[pred[v][0]]
            groups[group_of[v]].append(v)
        else:
            group_of[v] = len(groups)
            groups.append([v])
    meta = sorted({(group_of[u], group_of[v]) for u, v in edges if group_of[u] != group_of[v]})
    return groups, meta


def contract(graph: OpGraph, backend: str = "cpp") -> MetaGraph:
    """Spindle contraction of an op graph into MetaOps (backend "cpp" or "python").

    MetaOp names are "task/component"; a task whose component splits into several MetaOps
    (possible only in hand-built op graphs) numbers them "task/component.1", ".2", ...
    """
    keys = _node_keys(graph)
    n = len(graph.nodes)
    if backend == "cpp":
        from . import _core

        groups, meta = _core.contract(n, keys, graph.edges)
    elif backend == "python":
        groups, meta = contract_python(n, keys, graph.edges)
    else:
        raise ValueError(f"backend must be 'cpp' or 'python', got {backend!r}")
    base = [f"{graph.nodes[g[0]].task}/{graph.nodes[g[0]].component}" for g in groups]
    counts = {b: base.count(b) for b in base}
    seen: dict[str, int] = {}
    metaops = []
    for g, b in zip(groups, base):
        name = b
        if counts[b] > 1:
            seen[b] = seen.get(b, 0) + 1
            name = f"{b}.{seen[b]}"
        head = graph.nodes[g[0]]
        metaops.append(MetaOp(name, head.task, head.component, head.op_type, head.shape, tuple(g)))
    levels = [0] * len(metaops)
    for u, v in sorted(meta, key=lambda e: e[0]):  # groups are numbered in topological order
        levels[v] = max(levels[v], levels[u] + 1)
    return MetaGraph(tuple(metaops), tuple(tuple(e) for e in meta), tuple(levels))


# --- to a planner problem --------------------------------------------------------------------


def to_problem(spec: ModelSpec, num_devices: int, island_size: int = 8, cost=None,
               device_memory_gb: float | None = None, backend: str = "cpp",
               activation_checkpointing: bool = False, optimizer_sharding: bool = False) -> dict:
    """The planner's problem dict (issue-5 format) for one iteration of `spec` on N devices.

    cost: an `AnalyticCost` (default: the paper's A800 cluster, `costmodel.A800`, with this
    island size), or any object with `time_table(component, batch, seq_len, max_devices)`.
    activation_checkpointing: every layer with weights keeps only its input and is recomputed
    in the backward: `activation_gb` shrinks (`costmodel.activation_gb`) and those layers'
    times grow by `costmodel.RECOMPUTE_FACTOR` (an `AnalyticCost` scales their compute only;
    another cost object's whole table is scaled, its sync included: an upper bound).
    optimizer_sharding: ZeRO stage 1 among each layer's holders (the problem's
    `optimizer_shard_fraction` = `costmodel.SHARDED_STATE_FRACTION`).
    """
    if not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be an int >= 1, got {num_devices!r}")
    if not isinstance(island_size, int) or island_size < 1:
        raise ValueError(f"island_size must be an int >= 1, got {island_size!r}")
    for name, flag in (("activation_checkpointing", activation_checkpointing),
                       ("optimizer_sharding", optimizer_sharding)):
        if flag not in (True, False):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    if cost is None:
        cost = costmodel.A800.with_(island_size=island_size)
    factor = 1.0
    if activation_checkpointing:
        if isinstance(cost, costmodel.AnalyticCost):
            cost = cost.with_(recompute=True)
        else:
            factor = costmodel.RECOMPUTE_FACTOR
    mg = contract(build_op_graph(spec), backend=backend)
    tasks = {t.name: t for t in spec.tasks}
    metaops = []
    for m in mg.metaops:
        c = spec.component(m.component)
        t = tasks[m.task]
        seq = t.seq_lens[c.name]
        table = cost.time_table(c, t.batch, seq, num_devices)
        scale = factor if costmodel.recomputed(c) else 1.0
        metaops.append({
            "name": m.name, "task": m.task, "component": m.component, "layers": m.layers,
            "time_ms": {str(n): round(ms * scale, 6) for n, ms in table.items()},
            "param_gb": round(costmodel.param_gb(c), 9),
            "activation_gb": round(costmodel.activation_gb(
                c, t.batch, seq, m.layers, checkpointing=activation_checkpointing), 9),
            "output_mb": round(costmodel.output_mb(c, t.batch, c.out_tokens or seq), 6),
            # between two layers the whole sequence is live, not only the tokens handed on
            "hidden_mb": round(costmodel.output_mb(c, t.batch, seq), 6),
        })
    problem = {
        "num_devices": num_devices, "island_size": island_size, "metaops": metaops,
        "flows": [[mg.metaops[u].name, mg.metaops[v].name] for u, v in mg.edges],
    }
    if device_memory_gb is not None:
        problem["device_memory_gb"] = device_memory_gb
    if optimizer_sharding:
        problem["optimizer_shard_fraction"] = costmodel.SHARDED_STATE_FRACTION
    return problem
