"""How evenly the persistent dW programs share the work, in group order and balanced.

A model, not a measurement: a dW tile's time is its group's row steps plus a fixed cost for
its pipeline fill and epilogue (``--tile-cost``, in row steps), and a program's time is the sum
of its tiles'. For each benchmark case and persistent dW config of the autotuner it prints the
mean program's time over the busiest one's (1.0: even; below, the share of the kernel's time
the SMs spend idle at the end), for the tile orders of reference.dw_tile_order: in group order
(round-robin) and balanced (longest group first, the programs in a snake), and for one
program per tile handed out by the hardware as SMs free up, in group order (greedy).

    python bench/dw_order_model.py [--sms 132] [--tile-cost 3]
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # mtmm_kernels without install

from bench_grouped_gemm import CASES  # noqa: E402
from mtmm_kernels import grouped_gemm, reference  # noqa: E402


def tile_steps(rows: int, block_m: int) -> int:
    return max(math.ceil(rows / block_m), 1)


def persistent_evenness(sizes, per_g: int, block_m: int, programs: int, balanced: bool,
                        tile_cost: float) -> float:
    work = [sum(tile_steps(sizes[t // per_g], block_m) + tile_cost for t in tiles)
            for tiles in reference.dw_tile_order(sizes, per_g, programs, balanced)]
    return sum(work) / programs / max(work)


def greedy_evenness(sizes, per_g: int, block_m: int, slots: int, tile_cost: float) -> float:
    """One program per tile, in tile order, each to the first slot free (what the hardware's
    block scheduler does, roughly)."""
    free = [0.0] * slots
    total = 0.0
    for g, rows in enumerate(sizes):
        for _ in range(per_g):
            t = tile_steps(rows, block_m) + tile_cost
            total += t
            heapq.heappush(free, heapq.heappop(free) + t)
    return total / slots / max(free)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sms", type=int, default=132, help="SMs (H100 and H200: 132)")
    parser.add_argument("--tile-cost", type=float, default=3.0,
                        help="a tile's fill and epilogue, in row steps")
    args = parser.parse_args()
    configs = [c for c in grouped_gemm._dw_configs(False) if c.kwargs.get("PROGS_PER_SM")]
    shapes = sorted({(c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"],
                      c.kwargs["PROGS_PER_SM"]) for c in configs})
    print("| case | dW tile (K x N, rows per step, programs per SM) | group order | balanced "
          "| one program per tile |")
    print("|---|---|---|---|---|")
    for name, (sizes, K, N) in CASES.items():
        for bk, bn, bm, per_sm in shapes:
            per_g = math.ceil(K / bk) * math.ceil(N / bn)
            programs = min(args.sms * per_sm, len(sizes) * per_g)
            rr, bal = (persistent_evenness(sizes, per_g, bm, programs, b, args.tile_cost)
                       for b in (False, True))
            greedy = greedy_evenness(sizes, per_g, bm, args.sms * per_sm, args.tile_cost)
            print(f"| {name} | {bk} x {bn}, {bm}, {per_sm} | {rr:.3f} | {bal:.3f} "
                  f"| {greedy:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
