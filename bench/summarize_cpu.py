"""Markdown table of the CPU benchmarks (planner time C++ vs Python; gloo iteration vs simulator).

    python bench/summarize_cpu.py bench/results/cpu_planner_and_train.json > bench/results/cpu_planner_and_train.md
"""

from __future__ import annotations

import json
import sys


def summarize(data: dict) -> str:
    rows, trains = {}, []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "per_method" in info:
            trains.append(info)
        elif "core_ms" in info:
            p = bench["params"]
            rows[(p["case"], p["method"], p["backend"])] = info
    machine = data.get("machine_info", {})
    out = [
        "# Planner time and the CPU training iteration vs the simulator",
        "",
        f"Measured {data.get('datetime', '?')[:10]} on a CPU machine without GPU "
        f"({machine.get('cpu', {}).get('brand_raw', '?')}), Python {machine.get('python_version', '?')}, by "
        "`pytest bench/bench_planner.py bench/bench_train_step.py -m 'not gpu' -k 'not ablation' "
        "--benchmark-json ...`. Times in ms: the whole `plan_problem` call / the algorithm alone "
        "(core). Speed-up = Python twin / C++, same case and method, same run.",
        "",
        "| case | method | C++ ms (call / core) | Python ms (call / core) | speed-up (call / core) "
        "| makespan / relaxed | waves |",
        "|---|---|---|---|---|---|---|",
    ]
    for (case, method, backend), e in rows.items():
        if backend != "cpp":
            continue
        py = rows.get((case, method, "python"))
        py_ms = f"{py['device_ms']:.3f} / {py['core_ms']:.3f}" if py else "skipped"
        speedup = (f"{py['device_ms'] / e['device_ms']:.0f}x / {py['core_ms'] / e['core_ms']:.0f}x"
                   if py else "-")
        out.append(f"| {case} | {method} | {e['device_ms']:.3f} / {e['core_ms']:.3f} | {py_ms} "
                   f"| {speedup} | {e['makespan_over_relaxed']:.4f} | {e['waves']} |")
    for train in sorted(trains, key=lambda t: t["processes"]):
        out += [
            "",
            f"## {train['model']} on {train['processes']} gloo processes: measured iteration vs "
            "the simulator's prediction",
            "",
            f"Measured p2p exchange {train['p2p_us']:.0f} us, all-reduce {train['allreduce_us']:.0f} us.",
            "",
            "| method | measured ms | simulated ms | error |",
            "|---|---|---|---|",
        ]
        for method, r in train["per_method"].items():
            out.append(f"| {method} | {r['measured_ms']:.2f} | {r['predicted_ms']:.2f} "
                       f"| {r['error']:+.0%} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        print(summarize(json.load(f)), end="")
