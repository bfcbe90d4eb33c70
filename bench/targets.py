"""The grouped GEMM's targets (issue 4) read from a bench_grouped_gemm JSON, basis by basis.

Targets, bf16 on an H100/H200:
- forward and forward+backward at >= 1.0x ``torch._grouped_mm`` on every case, and >= 1.3x on
  the 32-small-groups case;
- >= 90% of the dense GEMM of the same FLOPs on the large-group cases;
- tokens in any order (by ids) >= 1.3x sort + ``torch._grouped_mm`` + unsort.

A ratio is read on each timing basis the run has: latency (one call at a time, synchronised),
pipelined (calls back to back), kernel (the device's kernel time) and, where the methods were
timed in alternation (the clock drift shared), pipelined and latency in alternation. The
verdict names the bases that meet the target; which basis a target means is the reader's
call, and the table shows them all.

    python bench/targets.py OUT/bench_grouped_gemm.json > OUT/targets.md
"""

from __future__ import annotations

import json
import sys

SMALL_CASE = "lognormal32_k1024"
LARGE_CASES = ("skewed8_k4096", "equal8_k4096", "empty2of8_k2048")
PEER = "torch_grouped_mm"
BY_IDS_PEER = "sort_torch_grouped_mm_unsort"
CEILING = "dense"
BASES = (("latency", "device_ms"), ("pipelined", "pipelined_ms"), ("kernel", "kernel_ms"),
         ("alternated", "interleaved_ms"), ("alternated latency", "interleaved_latency_ms"))


def _times(data: dict) -> dict[str, dict[str, dict[str, float]]]:
    """case label ("<case>[ by_ids] <mode>") -> basis -> method -> ms."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        case = info.get("case")
        if not case:
            continue
        bases = out.setdefault(case, {})
        for basis, key in BASES:
            value = info.get(key)
            if isinstance(value, dict):  # the alternated timings: every method of the case
                bases.setdefault(basis, {}).update(value)
            elif isinstance(value, (int, float)) and value > 0 and info.get("method"):
                bases.setdefault(basis, {})[info["method"]] = float(value)
    return out


def verdict(data: dict) -> list[dict]:
    """One row per target and case: the ratio on each basis (speed ratio: > 1 is faster;
    of the ceiling for the dense target) and the bases that meet the threshold."""
    rows = []

    def add(target: str, case: str, threshold: float, ratios: dict[str, float]):
        if ratios:
            rows.append({"target": target, "case": case, "threshold": threshold,
                         "ratios": ratios,
                         "met": [b for b, r in ratios.items() if r >= threshold]})

    def ratio(bases: dict, mine: str, other: str) -> dict[str, float]:
        return {basis: times[other] / times[mine] for basis, times in bases.items()
                if times.get(mine) and times.get(other)}

    for case, bases in _times(data).items():
        name, mode = case.rsplit(" ", 1)
        if name.endswith(" by_ids"):
            add("by ids >= 1.3x sort + grouped_mm + unsort", case, 1.3,
                ratio(bases, "mtmm_by_ids", BY_IDS_PEER))
            continue
        threshold = 1.3 if name == SMALL_CASE else 1.0
        add(f">= {threshold:.1f}x torch._grouped_mm", case, threshold, ratio(bases, "mtmm", PEER))
        if name in LARGE_CASES:
            add(">= 90% of dense", case, 0.9, ratio(bases, "mtmm", CEILING))
    return rows


def markdown(rows: list[dict]) -> str:
    bases = [b for b, _ in BASES if any(b in r["ratios"] for r in rows)]
    lines = ["| target | case | " + " | ".join(bases) + " | met on |",
             "|---|---|" + "---|" * len(bases) + "---|"]
    for r in rows:
        pct = r["threshold"] < 1.0
        cells = [("-" if b not in r["ratios"] else
                  f"{r['ratios'][b]:.0%}" if pct else f"{r['ratios'][b]:.2f}x") for b in bases]
        met = ", ".join(r["met"]) if r["met"] else "none"
        if len(r["met"]) == len(r["ratios"]):
            met = "all bases"
        lines.append(f"| {r['target']} | {r['case']} | " + " | ".join(cells) + f" | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        rows = verdict(json.load(f))
    print("Issue 4's targets, basis by basis (speed ratios; the dense target as a share of "
          "the ceiling):\n")
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
