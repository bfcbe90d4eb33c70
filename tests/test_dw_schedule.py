"""The order in which the persistent dW programs take their tiles (grouped_gemm._dw_order,
_position, _positions_below, _ranked_group) against its Python twin, reference.dw_tile_order.

A tile's work in dW is its group's rows: in group order a program can get several of the
longest groups' tiles while the others idle. The balanced order (longest groups first, the
programs in a snake) exists for that; these tests hold that every tile is taken exactly once,
by the program and at the step the twin says, and that the balanced order does even out the
programs' rows where the group order does not.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtmm_kernels import reference as ref
from mtmm_kernels.grouped_gemm import (_block_g, _dw_order, _position, _positions_below,
                                       _ranked_group)


@triton.jit
def _probe_kernel(offsets_ptr, tiles_ptr, rows_ptr, count_ptr, G, T, per_g,
                  MAX_TILES: tl.constexpr, BLOCK_G: tl.constexpr, BALANCED: tl.constexpr):
    """Program pid writes its tiles, in the order it takes them, each tile's group's rows
    (start, end), and how many tiles it takes."""
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    idx_G, start_G, end_G, key_R = _dw_order(offsets_ptr, G, T, BLOCK_G, BALANCED)
    count = _positions_below(G * per_g, pid, progs, BALANCED)
    tl.store(count_ptr + pid, count)
    for i in range(0, count):
        pos = _position(i, pid, progs, BALANCED)
        g, start, end = _ranked_group(pos // per_g, idx_G, start_G, end_G, key_R, BLOCK_G,
                                      BALANCED)
        tl.store(tiles_ptr + pid * MAX_TILES + i, g * per_g + pos % per_g)
        tl.store(rows_ptr + 2 * (pid * MAX_TILES + i), start)
        tl.store(rows_ptr + 2 * (pid * MAX_TILES + i) + 1, end)


def _probe(rows: list[int], per_g: int, programs: int, balanced: bool, device):
    offsets = torch.tensor(rows, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    T = int(sum(rows)) + 3  # rows past the last group belong to none
    max_tiles = triton.cdiv(len(rows) * per_g, programs) + 1
    tiles = torch.full((programs, max_tiles), -1, dtype=torch.int32, device=device)
    bounds = torch.full((programs, max_tiles, 2), -1, dtype=torch.int32, device=device)
    count = torch.full((programs,), -1, dtype=torch.int32, device=device)
    _probe_kernel[(programs,)](offsets, tiles, bounds, count, len(rows), T, per_g,
                               MAX_TILES=max_tiles, BLOCK_G=_block_g(len(rows)),
                               BALANCED=balanced)
    count = count.tolist()
    ends = offsets.cpu().tolist()
    for p in range(programs):  # each tile's rows are its group's
        for tile, (start, end) in zip(tiles[p, :count[p]].tolist(), bounds[p].tolist()):
            g = tile // per_g
            assert (start, end) == ((ends[g - 1] if g else 0), ends[g]), (p, tile, start, end)
    return [tiles[p, :count[p]].tolist() for p in range(programs)], tiles, count


CASES = [  # group rows, tiles per group, programs
    ([5, 0, 33, 9, 16], 6, 4),
    ([7, 7, 7], 2, 4),  # ties, and fewer tiles than programs
    ([0, 0, 1], 3, 2),  # empty groups first
    ([30, 86, 1189, 87, 110, 0, 749, 431, 1117, 64], 5, 7),
]


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("rows, per_g, programs", CASES)
def test_programs_take_the_tiles_the_twin_says(device, rows, per_g, programs, balanced):
    taken, tiles, count = _probe(rows, per_g, programs, balanced, device)
    assert taken == ref.dw_tile_order(rows, per_g, programs, balanced)
    flat = sorted(t for program in taken for t in program)
    assert flat == list(range(len(rows) * per_g))  # each tile once
    # nothing written past a program's count
    assert all((tiles[p, count[p]:] == -1).all() for p in range(programs))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.integers(0, 3000), min_size=1, max_size=40),
       per_g=st.integers(1, 6), programs=st.integers(1, 24), balanced=st.booleans())
def test_random_schedules_match_the_twin(rows, per_g, programs, balanced):
    """Random group sizes (ties and empty groups likely), tiles per group and program counts,
    including more programs than tiles."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    taken, _, _ = _probe(rows, per_g, programs, balanced, device)
    assert taken == ref.dw_tile_order(rows, per_g, programs, balanced)
    assert sorted(t for program in taken for t in program) == list(range(len(rows) * per_g))


def test_more_groups_than_the_narrowest_vectors(device):
    """70 groups: the schedule vectors are 128 wide, the sort runs over them all."""
    rows = torch.randint(0, 50, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    taken, _, _ = _probe(rows, 2, 9, True, device)
    assert taken == ref.dw_tile_order(rows, 2, 9, True)


def test_the_twin_orders_longest_groups_first_in_a_snake():
    """The twin itself, by hand: groups by rows (5, 33, 9 -> 1, 2, 0), two tiles each, over
    two programs: round 0 forward, round 1 backward, round 2 forward."""
    assert ref.dw_tile_order([5, 33, 9], 2, 2, True) == [[2, 5, 0], [3, 4, 1]]
    assert ref.dw_tile_order([5, 33, 9], 2, 2, False) == [[0, 2, 4], [1, 3, 5]]


def _makespan(rows: list[int], per_g: int, programs: int, balanced: bool) -> float:
    """The busiest program's rows over the mean's (1.0: even)."""
    work = [sum(rows[t // per_g] for t in tiles)
            for tiles in ref.dw_tile_order(rows, per_g, programs, balanced)]
    return max(work) / (sum(work) / programs)


def test_balanced_order_evens_out_ragged_groups():
    """The benchmark's 32 log-normal groups (bench_grouped_gemm.py, in its order), 64 tiles
    each (dW 1024 x 1024 in 128 x 128 tiles), over 132 programs: in group order the busiest
    program has 1.25x the mean rows; balanced, 1.03x."""
    rows = [344, 266, 575, 337, 177, 435, 1117, 782, 150, 86, 163, 316, 30, 244, 87, 146, 176,
            221, 458, 860, 267, 1189, 156, 431, 749, 333, 144, 121, 192, 378, 110, 246]
    assert _makespan(rows, 64, 132, False) > 1.2
    assert _makespan(rows, 64, 132, True) < 1.04
