"""Turn a pytest-benchmark JSON file into short Markdown tables.

The first table has one row per benchmark: its three timings (bench/device_timing.py: latency
with a sync per call, pipelined calls, the device's kernel time) and the rate and fraction of
the ceiling on the kernel-time basis (on the latency basis for runs that predate kernel
times). The second has one row per case and mtmm method: its speed against the fastest other
method of the same case and run (the dense-GEMM ceiling excluded), on each timing basis. A
third, where the run timed methods in alternation, gives those ratios with the GPU's clock
drift shared; a fourth splits each multi-kernel call's kernel time by kernel.

    python bench/summarize.py OUT/bench.json > OUT/bench.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_timing import TIMINGS  # noqa: E402

BASES = tuple(TIMINGS.items())
CEILINGS = ("dense",)  # methods that are a ceiling, not a peer


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def _rows(data: dict):
    """(name, extra_info) of each benchmark of one method (not the alternated timings)."""
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        if "interleaved_ms" in info:
            continue
        info.setdefault("device_ms", bench["stats"]["median"] * 1e3)
        yield bench["name"], info


def interleaved(data: dict) -> list[tuple[str, str, str, float, float | None, float | None]]:
    """(case, mtmm method, fastest peer, peer ms / mtmm ms, dense ms / mtmm ms, the same peer's
    latency / mtmm's latency) of each timing of several methods in alternation
    (bench/device_timing.interleaved_ms; the latencies from interleaved_latency_ms, where the
    run has them)."""
    out = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        times = info.get("interleaved_ms")
        if not times:
            continue
        latencies = info.get("interleaved_latency_ms") or {}
        peers = {m: t for m, t in times.items() if not m.startswith("mtmm") and m not in CEILINGS}
        peer = min(peers, key=peers.get) if peers else None
        for method, t in times.items():
            if method.startswith("mtmm") and peer is not None:
                dense = times.get("dense")
                latency = (latencies[peer] / latencies[method]
                           if latencies.get(peer) and latencies.get(method) else None)
                out.append((info.get("case", ""), method, peer, peers[peer] / t,
                            dense / t if dense else None, latency))
    return out


def _rate(info: dict) -> tuple[str, str, str]:
    """(TFLOP/s, GB/s, of ceiling), kernel-time based where the run measured kernel time."""
    prefix = "kernel_" if info.get("kernel_ms") else ""
    return (_fmt(info.get(f"{prefix}tflops"), ".1f"), _fmt(info.get(f"{prefix}gbps"), ".0f"),
            _fmt(info.get(f"{prefix}fraction_of_ceiling"), ".1%"))


def speedups(data: dict) -> list[tuple[str, str, str, dict[str, float]]]:
    """(case, mtmm method, fastest peer by latency, {basis: peer time / mtmm time})."""
    by_case: dict[str, list[dict]] = defaultdict(list)
    for _, info in _rows(data):
        by_case[info.get("case", "")].append(info)
    out = []
    for case, infos in by_case.items():
        peers = [i for i in infos if not str(i.get("method", "")).startswith("mtmm")
                 and i.get("method") not in CEILINGS]
        if not peers:
            continue
        fastest = min(peers, key=lambda i: i["device_ms"])
        for info in infos:
            if not str(info.get("method", "")).startswith("mtmm"):
                continue
            ratios = {}
            for key, basis in BASES:
                times = [p[key] for p in peers if p.get(key)]
                if times and info.get(key):
                    ratios[basis] = min(times) / info[key]
            out.append((case, info["method"], fastest.get("method", "?"), ratios))
    return out


def by_kernel(data: dict) -> list[str]:
    """Lines of a table of each multi-kernel call's device time by kernel (a forward +
    backward: which of its kernels the time goes to), for the runs that record it."""
    lines = []
    for name, info in _rows(data):
        kernels = info.get("kernels_ms") or {}
        if len(kernels) < 2 or info.get("method") in CEILINGS:
            continue
        parts = sorted(kernels.items(), key=lambda kv: -kv[1])
        cells = "; ".join(f"{k[:48]} {v:.4f}" for k, v in parts)
        lines.append(f"| {info.get('case', '')} | {info.get('method', '')} | {cells} |")
    if not lines:
        return []
    return ["", "Kernel time by kernel (ms per call, CUPTI), calls of several kernels:", "",
            "| case | method | kernels |", "|---|---|---|", *lines]


def summarize(data: dict) -> str:
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", "?")
    rows = [
        f"Date: {data.get('datetime', '?')}; host CPU: {cpu}",
        "",
        "| benchmark | case | method | device | dtype | latency ms | pipelined ms | kernel ms "
        "| TFLOP/s | GB/s | of ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, info in _rows(data):
        tflops, gbps, frac = _rate(info)
        rows.append(
            f"| {name} | {info.get('case', '')} | {info.get('method', '')} "
            f"| {info.get('device', '?')} | {info.get('dtype') or '-'} "
            f"| {_fmt(info['device_ms'], '.4f')} | {_fmt(info.get('pipelined_ms'), '.4f')} "
            f"| {_fmt(info.get('kernel_ms'), '.4f')} | {tflops} | {gbps} | {frac} |"
        )
    table = speedups(data)
    if table:
        rows += ["", "mtmm against the fastest other method of its case (speed ratio, > 1 is "
                     "faster), per timing basis:", "",
                 "| case | method | fastest peer (latency) | latency | pipelined | kernel |",
                 "|---|---|---|---|---|---|"]
        for case, method, peer, ratios in table:
            cells = " | ".join(_fmt(ratios.get(b), ".2f") + ("x" if b in ratios else "")
                               for _, b in BASES)
            rows.append(f"| {case} | {method} | {peer} | {cells} |")
    alternated = interleaved(data)
    if alternated:
        rows += ["", "Timed in alternation (pipelined calls, rotated order; the clock drift "
                     "shared): mtmm against its peer and against the dense GEMM of the same "
                     "FLOPs (speed ratio); the last column times lone synchronised calls "
                     "(the latency basis) in alternation too:", "",
                 "| case | method | peer | vs peer | of dense | latency vs peer |",
                 "|---|---|---|---|---|---|"]
        rows += [f"| {case} | {method} | {peer} | {vs_peer:.2f}x | {_fmt(of_dense, '.0%')} | "
                 f"{_fmt(latency, '.2f')}{'x' if latency is not None else ''} |"
                 for case, method, peer, vs_peer, of_dense, latency in alternated]
    rows += by_kernel(data)
    tuned = {}
    for _, info in _rows(data):
        for c in info.get("tuned_configs", []):
            cfg = {k: v for k, v in c.items() if k not in ("kernel", "dtype", "K_N_M_BUCKET")}
            tuned[(c["kernel"], tuple(c["K_N_M_BUCKET"]))] = cfg
    if tuned:
        rows += ["", "Configs the autotuner chose (kernel, K, N, M_BUCKET):", ""]
        rows += [f"- {kernel} {list(key)}: {cfg}" for (kernel, key), cfg in sorted(tuned.items())]
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        print(summarize(json.load(f)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
