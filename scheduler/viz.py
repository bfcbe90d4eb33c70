"""Pictures of a plan: a Gantt chart (PNG) and a Chrome/Perfetto trace (JSON).

Both draw the simulated timeline (``scheduler.simulate``), so transfers and gradient sync
appear where they cost time. Each wave is drawn once with its forward and backward folded
together (as the plan format times it): the band before a wave is its inbound transfers
(activations forward plus their gradients backward), the band after the last wave is the
gradient all-reduce. matplotlib is imported only when a PNG is drawn.

Trace layout: one process per node, one thread per device, and one complete event ("ph": "X")
per slice per device (a slice on 4 devices gives 4 events, category "compute"), plus one
"transfer" event per device that sends or receives in a wave's inbound phase and one
"grad_sync" event per device that takes part in an all-reduce. Times are microseconds.
"""

from __future__ import annotations

import json
from collections import defaultdict

__all__ = ["trace_events", "save_trace", "gantt_figure", "save_gantt"]


def _sim(problem, plan, sim, cluster):
    from scheduler.simulate import simulate

    return sim if sim is not None else simulate(problem, plan, cluster)


def _problem(problem):
    from scheduler.simulate import _as_problem

    return _as_problem(problem)


def _transfer_devices(wave) -> set[int]:
    devs: set[int] = set()
    for t in wave.transfers:
        devs.update(t["src"])
        devs.update(t["dst"])
    return devs


def _label_row(devices: list[int]) -> float:
    """Middle of the longest run of consecutive devices (a group may be split across nodes)."""
    runs, start = [], devices[0]
    for prev, d in zip(devices, devices[1:] + [None]):
        if d != prev + 1:
            runs.append((prev - start, start, prev))
            start = d
    _, lo, hi = max(runs)
    return (lo + hi) / 2


# --- trace --------------------------------------------------------------------------------------

def trace_events(problem, plan: dict, sim=None, cluster=None) -> dict:
    """The plan's simulated timeline as a Trace Event Format object (``{"traceEvents": [...]}``)."""
    problem = _problem(problem)
    sim = _sim(problem, plan, sim, cluster)
    per_node = cluster.devices_per_node if cluster is not None else problem.island_size
    ops = {op.name: op for op in problem.metaops}
    us = 1e3
    events: list[dict] = []
    for d in range(problem.num_devices):
        node = d // per_node
        if d % per_node == 0:
            events.append({"name": "process_name", "ph": "M", "pid": node, "tid": 0,
                           "args": {"name": f"node {node}"}})
        events.append({"name": "thread_name", "ph": "M", "pid": node, "tid": d,
                       "args": {"name": f"device {d}"}})
    for w in sim.waves:
        if w.transfer_ms > 0:
            for d in sorted(_transfer_devices(w)):
                events.append({"name": f"transfer -> wave {w.index}", "cat": "transfer", "ph": "X",
                               "ts": w.start_ms * us, "dur": w.transfer_ms * us,
                               "pid": d // per_node, "tid": d,
                               "args": {"wave": w.index, "mb": sum(t["mb"] for t in w.transfers)}})
        for s in w.slices:
            op = ops[s["metaop"]]
            for d in s["devices"]:
                events.append({"name": s["metaop"], "cat": "compute", "ph": "X",
                               "ts": w.compute_start_ms * us, "dur": s["compute_ms"] * us,
                               "pid": d // per_node, "tid": d,
                               "args": {"wave": w.index, "task": op.task, "component": op.component,
                                        "layers": [s["layer_begin"], s["layer_end"]],
                                        "devices": s["devices"]}})
    for d, ms in enumerate(sim.sync_per_device_ms):
        if ms > 0:
            events.append({"name": "gradient all-reduce", "cat": "grad_sync", "ph": "X",
                           "ts": sim.sync_start_ms * us, "dur": ms * us,
                           "pid": d // per_node, "tid": d, "args": {}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"method": plan.get("method", ""), "iteration_ms": sim.iteration_ms,
                          **sim.breakdown}}


def save_trace(problem, plan: dict, path, sim=None, cluster=None) -> None:
    """Write the Chrome/Perfetto trace (open in ui.perfetto.dev or chrome://tracing)."""
    with open(path, "w") as f:
        json.dump(trace_events(problem, plan, sim, cluster), f)


# --- Gantt chart --------------------------------------------------------------------------------

def gantt_figure(problem, plan: dict, sim=None, cluster=None, title: str | None = None):
    """A matplotlib Figure: devices on y, simulated time on x, one colour per MetaOp."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    problem = _problem(problem)
    sim = _sim(problem, plan, sim, cluster)
    per_node = cluster.devices_per_node if cluster is not None else problem.island_size
    n = problem.num_devices
    names = [op.name for op in problem.metaops]
    palette = [plt.get_cmap(m)(i) for m in ("tab20", "tab20b", "tab20c") for i in range(20)]
    colour = {name: palette[i % len(palette)] for i, name in enumerate(names)}

    fig, ax = plt.subplots(figsize=(14, max(3.0, 0.22 * n + 1.8)))
    total = max(sim.iteration_ms, 1e-9)
    bars: dict[object, list[tuple[float, float, int]]] = defaultdict(list)
    for w in sim.waves:
        if w.transfer_ms > 0:
            for d in _transfer_devices(w):
                bars["transfer"].append((w.start_ms, w.transfer_ms, d))
        for s in w.slices:
            for d in s["devices"]:
                bars[s["metaop"]].append((w.compute_start_ms, s["compute_ms"], d))
            if s["compute_ms"] > 0.05 * total:  # label blocks wide enough to read
                label = f"{s['metaop']}\nL{s['layer_begin']}-{s['layer_end']}"
                y = _label_row(s["devices"])
                ax.text(w.compute_start_ms + s["compute_ms"] / 2, y, label, ha="center",
                        va="center", fontsize=6, clip_on=True)
    for d, ms in enumerate(sim.sync_per_device_ms):
        if ms > 0:
            bars["sync"].append((sim.sync_start_ms, ms, d))

    style = {"transfer": dict(facecolor="#bbbbbb", hatch="////", edgecolor="#666666"),
             "sync": dict(facecolor="#444444", edgecolor="#222222")}
    for key, items in bars.items():
        kw = style.get(key, dict(facecolor=colour.get(key, "grey"), edgecolor="white"))
        by_dev: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for start, dur, d in items:
            by_dev[d].append((start, dur))
        for d, spans in by_dev.items():
            ax.broken_barh(spans, (d - 0.4, 0.8), linewidth=0.3, **kw)

    for w in sim.waves:  # wave boundaries
        ax.axvline(w.start_ms, color="#999999", linewidth=0.4, linestyle=":")
    for b in range(per_node, n, per_node):  # node boundaries
        ax.axhline(b - 0.5, color="black", linewidth=0.8)
    busy = sim.device_busy_ms()
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"dev {d} ({100 * busy[d] / total:.0f}%)" for d in range(n)], fontsize=6)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, total)
    ax.set_xlabel("time (ms); white = idle; per-device compute utilisation in brackets")
    b = sim.breakdown
    ax.set_title(title or (f"{plan.get('method', 'plan')}: iteration {sim.iteration_ms:.1f} ms "
                           f"(compute {b['compute_ms']:.1f}, transfers {b['transfer_ms']:.1f}, "
                           f"gradient sync {b['sync_ms']:.1f})"), fontsize=9)
    handles = [Patch(color=colour[name], label=name) for name in names if name in bars]
    handles += [Patch(label="transfer", **style["transfer"]),
                Patch(label="gradient sync", **style["sync"])]
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.005, 1.0),
              ncol=1 if len(handles) <= 30 else 2, frameon=False)
    fig.tight_layout()
    return fig


def save_gantt(problem, plan: dict, path, sim=None, cluster=None, title: str | None = None) -> None:
    """Write the Gantt chart of ``plan`` as an image (format from the file suffix, e.g. PNG)."""
    import matplotlib.pyplot as plt

    fig = gantt_figure(problem, plan, sim, cluster, title)
    try:
        fig.savefig(path, dpi=130)
    finally:
        plt.close(fig)
