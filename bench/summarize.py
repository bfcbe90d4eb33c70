"""Turn a pytest-benchmark JSON file into a short Markdown table (one row per benchmark).

    python bench/summarize.py OUT/bench.json > OUT/bench.md
"""

from __future__ import annotations

import json
import sys


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def summarize(data: dict) -> str:
    machine = data.get("machine_info", {})
    rows = [
        f"Date: {data.get('datetime', '?')}; host CPU: {machine.get('cpu', {}).get('brand_raw', '?')}",
        "",
        "| benchmark | case | method | device | dtype | ms | TFLOP/s | GB/s | of ceiling |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        ms = info.get("device_ms", bench["stats"]["median"] * 1e3)
        rows.append(
            f"| {bench['name']} | {info.get('case', '')} | {info.get('method', '')} "
            f"| {info.get('device', '?')} | {info.get('dtype') or '-'} | {_fmt(ms, '.4f')} "
            f"| {_fmt(info.get('tflops'), '.1f')} | {_fmt(info.get('gbps'), '.0f')} "
            f"| {_fmt(info.get('fraction_of_ceiling'), '.1%')} |"
        )
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
