"""Rows sorted by group id (stable), and each group's END offset: a counting sort in two launches.

``grouped_mm_by_ids`` needs the permutation that orders tokens by group and the groups'
cumulative END offsets. ``torch.sort`` + ``torch.searchsorted`` (+ the clamp of unchecked ids)
take five or more launches, the radix sort's included, each a few microseconds of host time
on a path that is bound by host time for small groups. With few groups a counting sort does it
in two:

1. ``_group_counts_kernel``: program p counts the ids of its run of rows per group.
2. ``_group_scatter_kernel``: program p sums the counts of all programs (each group's total)
   and of the programs before it, which places its rows: a group's rows go after every
   smaller group's and, within the group, after the earlier programs' rows and the rows before
   them in its own run (a cumulative sum over a one-hot tile). Program 0 writes the offsets.

The order is stable and the result deterministic (no atomics). Ids outside [0, G) (only
possible unchecked, on a GPU) count as a pseudo-group G after the last: their rows land past
``offsets[-1]``, where the grouped GEMM writes zeros. Beyond ``MAX_GROUPS`` groups the one-hot
tile outgrows the registers and ``sort_by_group`` uses ``torch.sort``.

From its second call of a kind, the counting sort launches from C++ on CUDA
(``mtmm_kernels/_cpp_launch.py``): the first offers both kernels' plans.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _cpp_launch as cpp_launch
from . import _direct_launch as direct_launch
from ._triton_utils import (cdiv, next_power_of_2, num_sms, through_dispatcher, triton_runs_on,
                            under_functorch)

__all__ = ["sort_by_group", "MAX_GROUPS"]

MAX_GROUPS = 255  # G + 1 <= 256 lanes of one-hot per row
_TILE = 8192  # one-hot elements per step of a program: 64 per thread at 4 warps


# --- kernels --------------------------------------------------------------------------------


@triton.jit
def _group_of(ids_ptr, rows, T, G):
    """Group of each row (G for ids outside [0, G)), and which rows exist."""
    ok = rows < T
    raw = tl.load(ids_ptr + rows, mask=ok, other=0)
    gid = tl.where((raw >= 0) & (raw < G), raw, G).to(tl.int32)  # compare before narrowing
    return gid, ok


@triton.jit
def _group_counts_kernel(
    # pointers
    ids_ptr,            # [T] int32/int64 group id of each row
    counts_ptr,         # [P, BLOCK_G] int32: rows of each group in program p's run
    # sizes
    T, G, rows_per_program,
    # meta
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    groups = tl.arange(0, BLOCK_G)
    first = pid.to(tl.int64) * rows_per_program
    counts = tl.zeros((BLOCK_G,), dtype=tl.int32)
    for step in range(0, rows_per_program, BLOCK_T):
        rows = first + step + tl.arange(0, BLOCK_T)
        gid, ok = _group_of(ids_ptr, rows, T, G)
        one_hot = (gid[:, None] == groups[None, :]) & ok[:, None]
        counts += tl.sum(one_hot.to(tl.int32), axis=0)
    tl.store(counts_ptr + pid * BLOCK_G + groups, counts)


@triton.jit
def _group_scatter_kernel(
    # pointers
    ids_ptr,            # [T] int32/int64 group id of each row
    counts_ptr,         # [P, BLOCK_G] int32 from _group_counts_kernel
    perm_ptr,           # [T] int32 out: perm[r] = the row that goes r-th in group order
    offsets_ptr,        # [G] int32 out: cumulative END row of each group
    # sizes
    T, G, rows_per_program, num_programs,
    # meta
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    groups = tl.arange(0, BLOCK_G)

    # --- where this program's rows of each group start
    total = tl.zeros((BLOCK_G,), dtype=tl.int32)
    before = tl.zeros((BLOCK_G,), dtype=tl.int32)
    for p0 in range(0, num_programs, BLOCK_P):
        progs = p0 + tl.arange(0, BLOCK_P)
        c = tl.load(counts_ptr + progs[:, None] * BLOCK_G + groups[None, :],
                    mask=(progs < num_programs)[:, None], other=0)
        total += tl.sum(c, axis=0)
        before += tl.sum(tl.where((progs < pid)[:, None], c, 0), axis=0)
    group_end = tl.cumsum(total, 0)
    if pid == 0:
        tl.store(offsets_ptr + groups, group_end, mask=groups < G)
    base = group_end - total + before

    # --- place the rows, in order
    first = pid.to(tl.int64) * rows_per_program
    for step in range(0, rows_per_program, BLOCK_T):
        rows = first + step + tl.arange(0, BLOCK_T)
        gid, ok = _group_of(ids_ptr, rows, T, G)
        one_hot = ((gid[:, None] == groups[None, :]) & ok[:, None]).to(tl.int32)
        rank = tl.cumsum(one_hot, axis=0)  # 1-based rank of each row within its group
        dest = tl.sum(one_hot * (rank + base[None, :] - 1), axis=1)
        tl.store(perm_ptr + dest, rows.to(tl.int32), mask=ok)
        base += tl.sum(one_hot, axis=0)


# --- launcher -------------------------------------------------------------------------------


def _launch_group_sort(ids_T: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = ids_T.shape[0]
    device = ids_T.device
    perm_T = torch.empty(T, dtype=torch.int32, device=device)
    offsets_G = torch.empty(G, dtype=torch.int32, device=device)
    if T == 0:
        return perm_T, offsets_G.zero_()
    block_g = max(16, next_power_of_2(G + 1))
    block_t = max(16, min(1024, _TILE // block_g))
    # One program per SM at most: each reads every program's counts.
    max_programs = num_sms(device)
    rows_per_program = cdiv(cdiv(T, max_programs), block_t) * block_t
    P = cdiv(T, rows_per_program)
    block_p = max(16, min(next_power_of_2(P), _TILE // block_g))
    counts_PG = torch.empty(P, block_g, dtype=torch.int32, device=device)
    options = (("num_warps", 4),)
    launches = (
        (_group_counts_kernel, (ids_T, counts_PG, T, G, rows_per_program),
         direct_launch.named_tail(_group_counts_kernel, BLOCK_T=block_t, BLOCK_G=block_g),
         options),
        (_group_scatter_kernel, (ids_T, counts_PG, perm_T, offsets_G, T, G, rows_per_program, P),
         direct_launch.named_tail(_group_scatter_kernel, BLOCK_T=block_t, BLOCK_G=block_g,
                                  BLOCK_P=block_p),
         options),
    )
    for kernel, head, tail, launch_options in launches:
        direct_launch.launch(kernel, (P,), head, tail, launch_options)
    if cpp_launch.takes_ids(ids_T):  # the C++ launch path takes later calls like this one
        cpp_launch.offer_sort(launches, G, dict(
            max_programs=max_programs, row_step=block_t, block_g=block_g,
            block_p_cap=_TILE // block_g, rows_per_program=rows_per_program, programs=P,
            block_p=block_p))
    return perm_T, offsets_G


def _uses_counting_sort(ids_T: torch.Tensor, G: int) -> bool:
    return G <= MAX_GROUPS and ids_T.shape[0] < 2**31 and triton_runs_on(ids_T)


def _sort_by_group_impl(ids_T: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    if cpp_launch.ENABLED:  # the same two launches from C++, where it has their plans
        sorted_ = cpp_launch.sort_by_group(ids_T, G)
        if sorted_ is not None:
            return sorted_
    ids_T = ids_T.contiguous()
    if _uses_counting_sort(ids_T, G):
        return _launch_group_sort(ids_T, G)
    return _sort_by_torch(ids_T, G)


def _sort_by_torch(ids_T: torch.Tensor, G: int,
                   vmapped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The same order by torch ops (which torch.vmap batches): a stable sort, then searchsorted."""
    ids_T = ids_T.clamp(-1, G).remainder(G + 1)  # -1 and G both to G: the pseudo-group
    sorted_T, perm_T = torch.sort(ids_T, stable=True)
    groups_G = torch.arange(G, device=ids_T.device, dtype=sorted_T.dtype)
    if vmapped:  # batched like the ids, so vmap hands searchsorted a contiguous [B, G], not an
        groups_G = groups_G + sorted_T.sum() * 0  # expanded view (a copy and a warning)
    offsets_G = torch.searchsorted(sorted_T, groups_G, right=True, out_int32=True)
    return perm_T, offsets_G


# torch.compile traces the op (the launcher and the device checks are not traceable Python);
# eager calls skip its dispatch, which costs host time on a host-bound path.
@torch.library.custom_op("mtmm::sort_by_group", mutates_args=())
def _sort_by_group_op(ids: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _sort_by_group_impl(ids, num_groups)


@_sort_by_group_op.register_fake
def _(ids, num_groups):
    perm_dtype = torch.int32 if _uses_counting_sort(ids, num_groups) else torch.int64
    return ids.new_empty(ids.shape, dtype=perm_dtype), ids.new_empty((num_groups,),
                                                                     dtype=torch.int32)


def sort_by_group(ids_T: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stable order of rows by group id, and each group's END offset.

    Args:
        ids_T: [T] int32 or int64 group ids, any strides; ids outside [0, num_groups) form a
            pseudo-group after the last.
        num_groups: G >= 0.

    Returns:
        perm_T: [T] int32 (int64 where ``torch.sort`` did it): ``ids_T[perm_T]`` is sorted,
            rows of equal ids in their original order.
        offsets_G: [G] int32, cumulative END row of each group in that order.
    """
    if through_dispatcher(ids_T):  # tracing, dispatch modes, meta tensors, subclasses
        return torch.ops.mtmm.sort_by_group(ids_T, num_groups)
    if under_functorch():  # ids batched by torch.vmap have no storage to launch on
        return _sort_by_torch(ids_T, num_groups, vmapped=True)
    return _sort_by_group_impl(ids_T, num_groups)
