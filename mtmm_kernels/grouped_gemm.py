"""Grouped per-task GEMMs: every group's own weights applied to its own rows, in one launch.

Layout: one contiguous buffer of rows x [T, K], weights w [G, K, N] (any strides), and int32 or
int64 cumulative END offsets [G] exactly like ``torch.nn.functional.grouped_mm``'s ``offs``.

Kernels:
- forward and dX share one persistent kernel. Each program walks a tile schedule it derives
  itself from the offsets (group sizes -> M-tiles per group -> prefix sum -> tile to group by a
  vectorised search), so nothing is read back to the host and the op is CUDA-graph capturable.
  A pseudo-group after the last one covers the rows past offsets[-1] and writes their zeros.
- dW (and dBias) is a grouped GEMM with a ragged reduction dimension: one program per
  (group, K-tile, N-tile) loops over its group's rows in a fixed order. Deterministic, no
  atomics; an empty group's loop is empty and stores exact zeros.
``grouped_mm_by_ids`` sorts the group ids once (stable) and hands the permutation to the same
kernels, which gather x rows and scatter y rows through it inside their loads and stores.

Values of offsets and group ids are checked on the CPU only (on a GPU a check is a host sync);
on a GPU the kernels clamp them so that bad values can never address outside the buffers.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import warnings
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from . import _autocast as autocast
from . import _cpp_launch as cpp_launch
from . import _direct_launch as direct_launch
from . import reference
from .group_sort import sort_by_group
from ._triton_utils import (cdiv, has_values, holds_values, index_on_mesh, is_interpreter,
                            next_power_of_2, through_dispatcher, triton_runs_on, under_functorch,
                            wants_grad)
from ._triton_utils import num_sms as _num_sms

__all__ = ["grouped_mm", "grouped_mm_by_ids"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- kernels --------------------------------------------------------------------------------


@triton.jit
def _source_rows(perm_ptr, rows, row_ok, GATHER: tl.constexpr):
    """The x (and y or dy) rows of sorted rows: perm[rows] with GATHER, else rows; 64-bit."""
    if GATHER:
        return tl.load(perm_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _tile_schedule(offsets_ptr, G, T, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
                   SCAN_FREE: tl.constexpr = False):
    """Per group g <= G: first row, end row, first M-tile and end M-tile. Entry G is the pseudo-
    group of rows past offsets[-1]; entries past G are empty. Offsets are clamped into [0, T].
    SCAN_FREE sums the tile counts over a [BLOCK_G, BLOCK_G] triangle instead of a cumsum (the
    same integers): Triton 3.6's Hopper warp specialization cannot partition a kernel holding a
    scan."""
    idx_G = tl.arange(0, BLOCK_G)
    end_G = tl.load(offsets_ptr + idx_G, mask=idx_G < G, other=0)
    start_G = tl.load(offsets_ptr + idx_G - 1, mask=(idx_G >= 1) & (idx_G <= G), other=0)
    end_G = tl.where(idx_G == G, T, end_G)
    end_G = tl.minimum(tl.maximum(end_G, 0), T).to(tl.int32)
    start_G = tl.minimum(tl.maximum(start_G, 0), T).to(tl.int32)
    tiles_G = tl.where(idx_G <= G, tl.cdiv(tl.maximum(end_G - start_G, 0), BLOCK_M), 0)
    if SCAN_FREE:  # an inclusive scan in log2(BLOCK_G) doubling steps (Hillis-Steele)
        tile_end_G = tiles_G
        tl.static_assert(BLOCK_G <= 4096)
        for step in tl.static_range(12):
            if (1 << step) < BLOCK_G:
                back_G = tl.gather(tile_end_G, tl.maximum(idx_G - (1 << step), 0), 0)
                tile_end_G += tl.where(idx_G >= (1 << step), back_G, 0)
    else:
        tile_end_G = tl.cumsum(tiles_G, 0)
    return idx_G, start_G, end_G, tile_end_G - tiles_G, tile_end_G


@triton.jit
def _tile_rows(tile_m, T, idx_G, start_G, end_G, tile_begin_G, tile_end_G,
               BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """(g, first row, end row) of M-tile tile_m: the one schedule entry whose tile range holds
    it (an empty group's range is empty). The entries are spread over the warps, so every sum
    costs a shared-memory round trip and barriers: where the three fit one int32 they come out
    of one sum. There, the tile's row count and the entry's *lag* stand for its rows: the lag
    is how far the tiles before the group ran past their groups' rows, less than
    BLOCK_G * BLOCK_M for valid offsets. Bad (unchecked) offsets may give a wrong row range,
    never one outside [0, T)."""
    is_g = (tile_begin_G <= tile_m) & (tile_m < tile_end_G)
    row0_G = start_G + (tile_m - tile_begin_G) * BLOCK_M
    if BLOCK_G * BLOCK_M <= 32768:  # lag, rows - 1 and g: 2 * log2(BLOCK_G * BLOCK_M) bits
        lag_G = tl.minimum(tl.maximum(tile_begin_G * BLOCK_M - start_G, 0),
                           BLOCK_G * BLOCK_M - 1)
        n_G = tl.minimum(tl.maximum(end_G - row0_G, 1), BLOCK_M)
        packed = tl.sum(tl.where(is_g, (lag_G * BLOCK_M + n_G - 1) * BLOCK_G + idx_G, 0), 0)
        g = packed % BLOCK_G
        row0 = tile_m * BLOCK_M - packed // (BLOCK_G * BLOCK_M)
        row_end = tl.minimum(row0 + (packed // BLOCK_G) % BLOCK_M + 1, T)
    else:  # three independent sums (their rounds overlap)
        g = tl.sum(tl.where(is_g, idx_G, 0), 0)
        row0 = tl.sum(tl.where(is_g, row0_G, 0), 0)
        row_end = tl.sum(tl.where(is_g, end_G, 0), 0)
    return g, row0, row_end


@triton.jit
def _grouped_mm_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, y_ptr, offsets_ptr, perm_ptr,
    # sizes (M_BUCKET only keys the autotuner: log2 of the mean group size)
    T, K, N, G, M_BUCKET,
    # strides
    stride_xt, stride_xk,
    stride_wg, stride_wk, stride_wn,
    stride_bg, stride_bn,
    stride_yt, stride_yn,
    # meta
    HAS_BIAS: tl.constexpr, GATHER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PROGS_PER_SM: tl.constexpr,
    TMA: tl.constexpr, W_K_CONTIGUOUS: tl.constexpr, TMA_OK: tl.constexpr,
    FLATTEN: tl.constexpr, W_TMA_OK: tl.constexpr, Y_TMA_OK: tl.constexpr = False,
    TMA_STORE: tl.constexpr = False, WS: tl.constexpr = False,
):
    """y[rows of g] = x[rows of g] @ w[g] (+ bias[g]); persistent over (M-tile, N-tile) pairs.
    With GATHER, sorted row r is x[perm[r]] and is stored to y[perm[r]].
    With FLATTEN, Triton fuses the tile loop and the K loop into one software pipeline, so the
    loads of a program's next tile are in flight during the current tile's epilogue (the K
    loop has the same trip count on every tile for this: the pseudo-group's tiles multiply by
    zeros outside the descriptor, or by the last group's w, and the epilogue stores zeros).
    Without it the code is the one measured on an H200 (bench/results/h200).
    With TMA (Hopper and later), x and w tiles arrive through tensor descriptors: an x tile
    may run into the next group's rows (their results are never stored) and reads past T or
    K come back as zeros. TMA_OK says whether these operands allow descriptors; a config's
    TMA takes effect only where they do, so a config tuned on aligned operands stays correct
    on others of the same sizes. Gathered rows cannot come through a descriptor (Hopper's TMA
    has no row gather): with GATHER, W_TMA_OK lets w alone arrive through its descriptor
    while x rows take pointer loads. With TMA_STORE (where Y_TMA_OK: no gather, y's rows
    descriptor-ready), a tile wholly inside its group's rows is stored through y's descriptor,
    the others by masked pointer stores.
    With WS (warp specialization, Hopper and later), Triton splits the tile loop into a
    producer warp group that issues the descriptor loads, running ahead across tiles, and two
    consumer warp groups that each take half the tile's rows through the MMAs and the epilogue,
    with their registers rebalanced (setmaxnreg): num_warps=4 becomes 12 warps. It takes
    effect where the operands allow descriptors and BLOCK_G <= 64 (Triton 3.6 fails to
    partition the kernel with wider schedule vectors); elsewhere the config runs unspecialized,
    so a config tuned with it stays correct on every call of its key."""
    tl.static_assert(not (WS and (FLATTEN or TMA_STORE)),
                     "WS is for unflattened configs with pointer stores")
    SPECIALIZE: tl.constexpr = WS and TMA and TMA_OK and BLOCK_G <= 64
    idx_G, start_G, end_G, tile_begin_G, tile_end_G = _tile_schedule(
        offsets_ptr, G, T, BLOCK_M, BLOCK_G, SPECIALIZE)
    if TMA and TMA_OK:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, K], strides=[stride_xt, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    # (Triton 3.6 cannot fuse the loops around the epilogue's branch below)
    tl.static_assert(not (TMA_STORE and FLATTEN), "TMA_STORE is for unflattened configs")
    if TMA_STORE and Y_TMA_OK:  # half a tile's columns per store: half the staging memory
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[T, N], strides=[stride_yt, 1],
                                           block_shape=[BLOCK_M, BLOCK_N // 2])
    if TMA and (TMA_OK or W_TMA_OK):
        if W_K_CONTIGUOUS:  # w is a [G, N, K] tensor seen as [G, K, N]
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[G, N, K],
                                               strides=[stride_wg, stride_wn, 1],
                                               block_shape=[1, BLOCK_N, BLOCK_K])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[G, K, N],
                                               strides=[stride_wg, stride_wk, 1],
                                               block_shape=[1, BLOCK_K, BLOCK_N])
    num_m = tl.max(tile_end_G, 0)
    num_n = tl.cdiv(N, BLOCK_N)
    per_band = GROUP_M * num_n
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLATTEN,
                         warp_specialize=SPECIALIZE):
        # --- swizzle: GROUP_M consecutive M-tiles share each N-tile of w while it is in L2
        band = tile // per_band
        first_m = band * GROUP_M
        band_m = tl.minimum(num_m - first_m, GROUP_M)
        tile_m = first_m + (tile % per_band) % band_m
        tile_n = (tile % per_band) // band_m

        # --- the group of this M-tile, and its rows
        g, row0, row_end = _tile_rows(tile_m, T, idx_G, start_G, end_G, tile_begin_G,
                                      tile_end_G, BLOCK_M, BLOCK_G)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows_x = _source_rows(perm_ptr, rows, row_ok, GATHER)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N

        # --- main loop. The pseudo-group G (rows past offsets[-1]) stores zeros: without
        # FLATTEN it skips the loop; with FLATTEN every tile runs the same trip count (what lets
        # Triton fuse the loops), against w[G] outside the descriptor (zeros) or the last
        # group's w, and the epilogue selects zeros.
        if FLATTEN:
            k_stop = K
        else:
            k_stop = tl.where(g < G, K, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if TMA and TMA_OK:
            for k0 in range(0, k_stop, BLOCK_K):
                a = x_desc.load([row0, k0])
                if W_K_CONTIGUOUS:
                    b = w_desc.load([g, tile_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
                else:
                    b = w_desc.load([g, k0, tile_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        elif TMA and W_TMA_OK:  # gathered x rows by pointer, w through its descriptor
            x_ptrs = (x_ptr + rows_x[:, None] * stride_xt
                      + offs_k[None, :].to(tl.int64) * stride_xk)
            for k0 in range(0, k_stop, BLOCK_K):
                if EVEN_K:
                    a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
                else:
                    k_ok = offs_k < K - k0
                    a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                if W_K_CONTIGUOUS:
                    b = w_desc.load([g, tile_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
                else:
                    b = w_desc.load([g, k0, tile_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                x_ptrs += BLOCK_K * stride_xk
        else:
            x_ptrs = (x_ptr + rows_x[:, None] * stride_xt
                      + offs_k[None, :].to(tl.int64) * stride_xk)
            if FLATTEN:  # the pseudo-group reads the last group's w; its epilogue stores zeros
                w_g = tl.minimum(g, G - 1)
            else:  # the pseudo-group reads nothing
                w_g = g
            w_ptrs = (w_ptr + w_g.to(tl.int64) * stride_wg
                      + offs_k[:, None].to(tl.int64) * stride_wk
                      + cols[None, :].to(tl.int64) * stride_wn)
            for k0 in range(0, k_stop, BLOCK_K):
                if EVEN_K:
                    a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
                    b = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
                else:
                    k_ok = offs_k < K - k0
                    a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk

        # --- epilogue
        if FLATTEN:  # exact zeros for the pseudo-group (x rows there may hold inf or NaN)
            acc = tl.where((cols[None, :] * 0 + g) < G, acc, 0.0)  # block-shaped, like b_ok
        if HAS_BIAS:
            b_ptrs = bias_ptr + g.to(tl.int64) * stride_bg + cols.to(tl.int64) * stride_bn
            # a block-shaped mask: the interpreter rejects (block & scalar)
            b_ok = col_ok & ((cols * 0 + g) < G)
            acc += tl.load(b_ptrs, mask=b_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows_x[:, None] * stride_yt + cols[None, :].to(tl.int64) * stride_yn
        if TMA_STORE and Y_TMA_OK:
            # A tile wholly inside its group's rows leaves through y's descriptor (columns past
            # N are clipped); one that runs into the next group's rows takes the masked stores.
            y_tile = acc.to(y_ptr.dtype.element_ty)
            y_mask = row_ok[:, None] & col_ok[None, :]
            if row0 + BLOCK_M <= row_end:
                y_left, y_right = tl.split(tl.permute(
                    tl.reshape(y_tile, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                y_desc.store([row0, tile_n * BLOCK_N], y_left)
                y_desc.store([row0, tile_n * BLOCK_N + BLOCK_N // 2], y_right)
            else:
                tl.store(y_ptrs, y_tile, mask=y_mask)
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _group_rows(offsets_ptr, g, T):
    """First and end row of group g, clamped so that bad offsets stay inside [0, T]."""
    start = tl.load(offsets_ptr + g - 1, mask=g > 0, other=0)
    end = tl.load(offsets_ptr + g)
    start = tl.minimum(tl.maximum(start, 0), T).to(tl.int32)
    end = tl.minimum(tl.maximum(end, start), T).to(tl.int32)
    return start, end


@triton.jit
def _dw_loads(x_ptr, dy_ptr, rows_x, row_ok, ks, k_ok, cols, col_ok,
              stride_xt, stride_xk, stride_dyt, stride_dyn):
    """Masked pointer loads of x rows rows_x (columns ks) and the same dy rows (columns cols)."""
    a = tl.load(x_ptr + rows_x[:, None] * stride_xt + ks[None, :].to(tl.int64) * stride_xk,
                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    d = tl.load(dy_ptr + rows_x[:, None] * stride_dyt + cols[None, :].to(tl.int64) * stride_dyn,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    return a, d


@triton.jit
def _dw_rows(x_ptr, dy_ptr, perm_ptr, r0, end, ks, k_ok, cols, col_ok,
             stride_xt, stride_xk, stride_dyt, stride_dyn,
             GATHER: tl.constexpr, BLOCK_M: tl.constexpr):
    """Masked pointer loads of sorted rows [r0, min(r0 + BLOCK_M, end))."""
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    return _dw_loads(x_ptr, dy_ptr, _source_rows(perm_ptr, rows, row_ok, GATHER), row_ok,
                     ks, k_ok, cols, col_ok, stride_xt, stride_xk, stride_dyt, stride_dyn)


@triton.jit
def _row_steps(rows, BLOCK_M: tl.constexpr, FULL_ONLY: tl.constexpr):
    """A dW tile's steps over rows rows of its group (scalar or vector): its row tiles, or
    only its full ones (FULL_ONLY); at least one, so that every tile stores its result."""
    if FULL_ONLY:
        return tl.maximum(rows // BLOCK_M, 1)
    return tl.maximum(tl.cdiv(rows, BLOCK_M), 1)


@triton.jit
def _rows_of(g, idx_G, start_G, end_G):
    """First and end row of group g, from the schedule vectors (a sum, no memory read)."""
    is_g = idx_G == g
    return (tl.sum(tl.where(is_g, start_G, 0), 0).to(tl.int32),
            tl.sum(tl.where(is_g, end_G, 0), 0).to(tl.int32))


@triton.jit
def _dw_order(offsets_ptr, G, T, BLOCK_G: tl.constexpr, BALANCED: tl.constexpr):
    """The order in which persistent dW programs take the tiles: positions
    [r * per_g, (r + 1) * per_g) are the tiles of the group of rank r. Returns the schedule
    vectors (idx_G, and each group's rows [start_G, end_G), clamped into [0, T]) and, per rank
    r < G, key_R = rows * BLOCK_G + BLOCK_G - 1 - g of the group g of that rank.
    BALANCED: the groups with the most rows first (ties: the lower index first), so that the
    snake of _position can even out the programs' work; else in index order."""
    idx_G = tl.arange(0, BLOCK_G)
    end_G = tl.load(offsets_ptr + idx_G, mask=idx_G < G, other=0)
    start_G = tl.load(offsets_ptr + idx_G - 1, mask=(idx_G >= 1) & (idx_G < G), other=0)
    start_G = tl.minimum(tl.maximum(start_G, 0), T)
    end_G = tl.minimum(tl.maximum(end_G, start_G), T)
    # past G: negative keys, which a descending sort puts last
    key_R = tl.where(idx_G < G, (end_G - start_G).to(tl.int64) * BLOCK_G + (BLOCK_G - 1 - idx_G),
                     idx_G - BLOCK_G)
    if BALANCED:
        key_R = tl.sort(key_R, descending=True)
    return idx_G, start_G, end_G, key_R


@triton.jit
def _group_at(rank, idx_G, key_R, BLOCK_G: tl.constexpr, BALANCED: tl.constexpr):
    """The group of rank rank in _dw_order's order, and its key (BALANCED), by a sum over the
    vector (no memory read). A rank past the groups' gives a group past them (no rows), as the
    index order does."""
    if BALANCED:
        key = tl.sum(tl.where(idx_G == rank, key_R, 0), 0)
        g = tl.where(key >= 0, BLOCK_G - 1 - key % BLOCK_G, BLOCK_G - 1).to(tl.int32)
    else:
        g = rank
        key = rank.to(tl.int64)  # (unread)
    return g, key


@triton.jit
def _ranked_group(rank, idx_G, start_G, end_G, key_R, BLOCK_G: tl.constexpr,
                  BALANCED: tl.constexpr):
    """The group of rank rank in _dw_order's order and its rows [start, end): two sums over
    the vectors (BALANCED, one after the other: its rows are in the key), no memory read."""
    g, key = _group_at(rank, idx_G, key_R, BLOCK_G, BALANCED)
    if BALANCED:
        start = tl.sum(tl.where(idx_G == g, start_G, 0), 0).to(tl.int32)
        end = start + tl.maximum(key // BLOCK_G, 0).to(tl.int32)
    else:
        start, end = _rows_of(g, idx_G, start_G, end_G)
    return g, start, end


@triton.jit
def _position(i, pid, progs, BALANCED: tl.constexpr):
    """The position (in _dw_order's order) of program pid's i-th tile. BALANCED, a snake: the
    programs take round i's progs positions forward in even rounds and backward in odd ones,
    so that the program with a round's longest tile gets the next round's shortest; else
    pid + i * progs."""
    if BALANCED:
        return i * progs + tl.where(i % 2 == 0, pid, progs - 1 - pid)
    return pid + i * progs


@triton.jit
def _count_below(b, first, step):
    """How many of first, first + step, first + 2 * step, ... are below b (scalar or vector)."""
    return tl.where(b > first, tl.cdiv(b - first, step), 0)


@triton.jit
def _positions_below(b, pid, progs, BALANCED: tl.constexpr):
    """How many of program pid's positions (_position) are below b (scalar or vector)."""
    if BALANCED:  # the even rounds' and the odd rounds' positions, each a step of 2 * progs
        return (_count_below(b, pid, 2 * progs)
                + _count_below(b, 2 * progs - 1 - pid, 2 * progs))
    return _count_below(b, pid, progs)


@triton.jit
def _dw_store(acc, db_acc, g, tile_k, ks, k_ok, cols, col_ok, dw_ptr, db_ptr,
              stride_dwg, stride_dwk, stride_dwn, stride_dbg, stride_dbn,
              HAS_BIAS: tl.constexpr):
    """A finished dW tile, and its dBias share where it is the K-tile-0 tile."""
    g64 = g.to(tl.int64)
    dw_ptrs = (dw_ptr + g64 * stride_dwg + ks[:, None].to(tl.int64) * stride_dwk
               + cols[None, :].to(tl.int64) * stride_dwn)
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])
    if HAS_BIAS:
        db_ptrs = db_ptr + g64 * stride_dbg + cols.to(tl.int64) * stride_dbn
        db_ok = col_ok & ((cols * 0 + tile_k) == 0)  # a block mask: see the forward kernel
        tl.store(db_ptrs, db_acc.to(db_ptr.dtype.element_ty), mask=db_ok)


@triton.jit
def _dw_store_tma(acc, db_acc, g, tile_k, tile_n, cols, col_ok, dw_desc, db_ptr, stride_dbg,
                  stride_dbn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """A finished dW tile through dw's [G, K, N] descriptor, half the tile's columns per store
    (half the staging memory; the hardware clips rows past K and columns past N, and the
    store runs on while the program goes on), and its dBias share as _dw_store does."""
    tile = acc.to(dw_desc.dtype)
    left, right = tl.split(tl.permute(tl.reshape(tile, (BLOCK_K, 2, BLOCK_N // 2)), (0, 2, 1)))
    dw_desc.store([g, tile_k * BLOCK_K, tile_n * BLOCK_N],
                  left.reshape(1, BLOCK_K, BLOCK_N // 2))
    dw_desc.store([g, tile_k * BLOCK_K, tile_n * BLOCK_N + BLOCK_N // 2],
                  right.reshape(1, BLOCK_K, BLOCK_N // 2))
    if HAS_BIAS:
        db_ptrs = db_ptr + g.to(tl.int64) * stride_dbg + cols.to(tl.int64) * stride_dbn
        db_ok = col_ok & ((cols * 0 + tile_k) == 0)  # a block mask: see the forward kernel
        tl.store(db_ptrs, db_acc.to(db_ptr.dtype.element_ty), mask=db_ok)


@triton.jit
def _dw_tile(tile, x_desc, dy_desc,
             x_ptr, dy_ptr, offsets_ptr, perm_ptr, dw_ptr, db_ptr,
             T, K, N,
             stride_xt, stride_xk, stride_dyt, stride_dyn,
             stride_dwg, stride_dwk, stride_dwn, stride_dbg, stride_dbn,
             HAS_BIAS: tl.constexpr, GATHER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             TMA: tl.constexpr, TMA_OK: tl.constexpr, MAKE_DESCRIPTORS: tl.constexpr,
             BOUNDED: tl.constexpr, dw_desc, G, TMA_STORE: tl.constexpr,
             WS: tl.constexpr = False):
    """One (group, K-tile, N-tile) tile of dW (and its share of dBias). With MAKE_DESCRIPTORS
    the tile builds its own descriptors (x_desc and dy_desc are ignored); with BOUNDED too,
    they end at its group's last row: the rows past it (the next group's) read as zeros, so
    the group's last partial row tile arrives through them with the others. Otherwise the
    descriptors span all T rows, and that tile takes masked pointer loads after the others.
    With TMA_STORE the tile leaves through dw's descriptor (dw_desc, or one of its own with
    MAKE_DESCRIPTORS; G only sizes that one). With WS the row loop is warp specialized (the
    caller decides where it may be)."""
    num_k = tl.cdiv(K, BLOCK_K)
    num_n = tl.cdiv(N, BLOCK_N)
    g = tile // (num_k * num_n)
    tile = tile % (num_k * num_n)
    tile_k = tile // num_n
    tile_n = tile % num_n

    start, end = _group_rows(offsets_ptr, g, T)

    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    r_tail = start
    if TMA and TMA_OK:
        # --- row tiles through descriptors; reads past K or N are zeros. Bounded: every
        # row tile (rows past the group's end read as zeros; at least one row, as a
        # descriptor needs, where the group is empty and nothing is read). Over all rows: the
        # full row tiles, whose rows all belong to the group.
        if MAKE_DESCRIPTORS and BOUNDED:
            rows_end = tl.maximum(end, 1)
            x_desc = tl.make_tensor_descriptor(x_ptr, shape=[rows_end, K],
                                               strides=[stride_xt, 1],
                                               block_shape=[BLOCK_M, BLOCK_K])
            dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[rows_end, N],
                                                strides=[stride_dyt, 1],
                                                block_shape=[BLOCK_M, BLOCK_N])
            r_tail = end
        else:
            if MAKE_DESCRIPTORS:
                x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, K], strides=[stride_xt, 1],
                                                   block_shape=[BLOCK_M, BLOCK_K])
                dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[T, N],
                                                    strides=[stride_dyt, 1],
                                                    block_shape=[BLOCK_M, BLOCK_N])
            r_tail = start + (end - start) // BLOCK_M * BLOCK_M
        for r0 in tl.range(start, r_tail, BLOCK_M, warp_specialize=WS):
            a = x_desc.load([r0, tile_k * BLOCK_K])
            d = dy_desc.load([r0, tile_n * BLOCK_N])
            acc = tl.dot(tl.trans(a), d, acc, input_precision=INPUT_PRECISION)
            if HAS_BIAS and not WS:
                db_acc += tl.sum(d.to(tl.float32), 0)
        if HAS_BIAS and WS:
            # dBias in a loop of its own, run by the K-tile-0 tiles only (Triton 3.6 cannot
            # partition a sum of the loaded dy tiles inside the specialized loop, nor a branch
            # around this loop: the others run it zero times)
            for r0 in range(start, tl.where(tile_k == 0, end, start), BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                d = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_dyt
                            + cols[None, :].to(tl.int64) * stride_dyn,
                            mask=(rows < end)[:, None] & col_ok[None, :], other=0.0)
                db_acc += tl.sum(d.to(tl.float32), 0)
    # --- masked pointer loads: every tile without TMA, the last partial tile with shared
    # descriptors. (Written out: through _dw_rows, Triton 3.6 orders the machine code of two
    # configs measured on the H200 differently; as it is, the one-program-per-tile pointer
    # configs compile as measured.)
    # Gathered rows: each step's row numbers are loaded one step ahead. Loaded in the step that
    # uses them, they would put a load on the data loads' addresses, and Triton's pipeliner
    # leaves such a loop synchronous (bench/sass_report.py: cp_async_depth 0).
    if not (TMA and TMA_OK and MAKE_DESCRIPTORS and BOUNDED):  # (bounded ones read all rows)
        if GATHER:
            rows = r_tail + tl.arange(0, BLOCK_M)
            rows_x = tl.load(perm_ptr + rows, mask=rows < end, other=0).to(tl.int64)
        for r0 in range(r_tail, end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            if not GATHER:
                rows_x = rows.to(tl.int64)
            a = tl.load(x_ptr + rows_x[:, None] * stride_xt
                        + ks[None, :].to(tl.int64) * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            d = tl.load(dy_ptr + rows_x[:, None] * stride_dyt
                        + cols[None, :].to(tl.int64) * stride_dyn,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            if GATHER:
                rows = rows + BLOCK_M
                rows_x = tl.load(perm_ptr + rows, mask=rows < end, other=0).to(tl.int64)
            acc = tl.dot(tl.trans(a), d, acc, input_precision=INPUT_PRECISION)
            if HAS_BIAS:
                db_acc += tl.sum(d.to(tl.float32), 0)

    if TMA_STORE:
        if MAKE_DESCRIPTORS:
            dw_desc = tl.make_tensor_descriptor(dw_ptr, shape=[G, K, N],
                                                strides=[stride_dwg, stride_dwk, 1],
                                                block_shape=[1, BLOCK_K, BLOCK_N // 2])
        _dw_store_tma(acc, db_acc, g, tile_k, tile_n, cols, col_ok, dw_desc, db_ptr,
                      stride_dbg, stride_dbn, HAS_BIAS, BLOCK_N, BLOCK_K)
    else:
        _dw_store(acc, db_acc, g, tile_k, ks, k_ok, cols, col_ok, dw_ptr, db_ptr,
                  stride_dwg, stride_dwk, stride_dwn, stride_dbg, stride_dbn, HAS_BIAS)


@triton.jit
def _dw_flattened(x_ptr, dy_ptr, offsets_ptr, perm_ptr, dw_ptr, db_ptr,
                  T, K, N, G,
                  stride_xt, stride_xk, stride_dyt, stride_dyn,
                  stride_dwg, stride_dwk, stride_dwn, stride_dbg, stride_dbn,
                  HAS_BIAS: tl.constexpr, GATHER: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
                  TMA: tl.constexpr, BALANCED: tl.constexpr, TMA_STORE: tl.constexpr):
    """A persistent program's dW tiles (in _dw_order's order, at the positions of _position)
    as one loop over their row steps, one software pipeline across the tiles. Rows are summed
    in _dw_tile's order, so the results are the same bits as its build of the same loads.
    Pointer loads (TMA False): a tile's steps are its group's row tiles, at least one (an
    empty group's tile runs one fully masked step and stores its exact zeros).
    Descriptors (TMA): the steps are the group's full row tiles; a tile without any runs one
    step at row T, past the descriptor's rows, which reads zeros. The last partial row tile,
    whose rows run into the next group, takes masked pointer loads in the tile's epilogue
    (outside the pipeline, after the full ones, as in _dw_tile). With TMA_STORE a finished
    tile leaves through dw's descriptor (_dw_store_tma), its store running on behind the next
    tile's steps."""
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    num_n = tl.cdiv(N, BLOCK_N)
    per_g = tl.cdiv(K, BLOCK_K) * num_n
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, K], strides=[stride_xt, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[T, N], strides=[stride_dyt, 1],
                                            block_shape=[BLOCK_M, BLOCK_N])
    if TMA_STORE:
        dw_desc = tl.make_tensor_descriptor(dw_ptr, shape=[G, K, N],
                                            strides=[stride_dwg, stride_dwk, 1],
                                            block_shape=[1, BLOCK_K, BLOCK_N // 2])

    # --- the loop's length: per rank, this program's tiles among the rank's group's tiles
    # (positions [r * per_g, (r + 1) * per_g)) times the group's row steps
    idx_G, start_G, end_G, key_R = _dw_order(offsets_ptr, G, T, BLOCK_G, BALANCED)
    steps_R = _row_steps((key_R // BLOCK_G).to(tl.int32), BLOCK_M, TMA)
    first_R = idx_G * per_g
    mine_R = tl.where(idx_G < G, _positions_below(first_R + per_g, pid, progs, BALANCED)
                      - _positions_below(first_R, pid, progs, BALANCED), 0)
    num_steps = tl.sum(mine_R * steps_R, 0)

    # --- one row step per iteration; a tile starts when the last one's steps are done.
    # The state advances first thing in the iteration, from values of the last one only, and
    # the next tile's rows come from the vectors above, not from memory: otherwise Triton's
    # pipeliner cannot run the next steps' loads ahead (it leaves the loop synchronous).
    # Gathered rows: each step's row numbers are loaded one step ahead (a load on the data
    # loads' addresses would leave the loop synchronous too), so the rows of a program's next
    # tile are known one tile ahead.
    tl.static_assert(not (TMA and GATHER), "gathered rows take pointer loads")
    i = -1  # the program's tile
    g = 0
    within = 0  # the tile among its group's per_g
    step = 0
    steps = 0
    start = 0
    end = 0
    if GATHER:
        next_g, next_start, next_end = _ranked_group(pid // per_g, idx_G, start_G, end_G,
                                                     key_R, BLOCK_G, BALANCED)
        rows = next_start + tl.arange(0, BLOCK_M)
        rows_x = tl.load(perm_ptr + rows, mask=rows < next_end, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for _ in range(0, num_steps):
        step += 1
        if step >= steps:
            i += 1
            step = 0
            pos = _position(i, pid, progs, BALANCED)
            within = pos % per_g
            if GATHER:  # this tile's group and rows were looked up one tile ahead
                g = next_g
                start = next_start
                end = next_end
                next_g, next_start, next_end = _ranked_group(
                    _position(i + 1, pid, progs, BALANCED) // per_g, idx_G, start_G, end_G,
                    key_R, BLOCK_G, BALANCED)
            else:
                g, start, end = _ranked_group(pos // per_g, idx_G, start_G, end_G, key_R,
                                              BLOCK_G, BALANCED)
            steps = _row_steps(end - start, BLOCK_M, TMA)
        tile_k = within // num_n
        tile_n = within % num_n
        ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        r0 = start + step * BLOCK_M
        if TMA:
            r0 = tl.where(r0 + BLOCK_M <= end, r0, T)  # no full row tile: zeros, past T
            a = x_desc.load([r0, tile_k * BLOCK_K])
            d = dy_desc.load([r0, tile_n * BLOCK_N])
        elif GATHER:
            a, d = _dw_loads(x_ptr, dy_ptr, rows_x, r0 + tl.arange(0, BLOCK_M) < end, ks, k_ok,
                             cols, col_ok, stride_xt, stride_xk, stride_dyt, stride_dyn)
            # the next step's row numbers: this tile's next rows, or the next tile's first
            last = step + 1 >= steps
            rows = tl.where(last, next_start, r0 + BLOCK_M) + tl.arange(0, BLOCK_M)
            rows_x = tl.load(perm_ptr + rows, mask=rows < tl.where(last, next_end, end),
                             other=0).to(tl.int64)
        else:
            a, d = _dw_rows(x_ptr, dy_ptr, perm_ptr, r0, end, ks, k_ok, cols, col_ok,
                            stride_xt, stride_xk, stride_dyt, stride_dyn, GATHER, BLOCK_M)
        acc = tl.dot(tl.trans(a), d, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            db_acc += tl.sum(d.to(tl.float32), 0)

        # --- epilogue of a finished tile (with TMA, its partial row tile first)
        if step == steps - 1:
            if TMA:
                r_tail = start + (end - start) // BLOCK_M * BLOCK_M
                if r_tail < end:
                    a, d = _dw_rows(x_ptr, dy_ptr, perm_ptr, r_tail, end, ks, k_ok, cols,
                                    col_ok, stride_xt, stride_xk, stride_dyt, stride_dyn,
                                    GATHER, BLOCK_M)
                    acc = tl.dot(tl.trans(a), d, acc, input_precision=INPUT_PRECISION)
                    if HAS_BIAS:
                        db_acc += tl.sum(d.to(tl.float32), 0)
            if TMA_STORE:
                _dw_store_tma(acc, db_acc, g, tile_k, tile_n, cols, col_ok, dw_desc, db_ptr,
                              stride_dbg, stride_dbn, HAS_BIAS, BLOCK_N, BLOCK_K)
            else:
                _dw_store(acc, db_acc, g, tile_k, ks, k_ok, cols, col_ok, dw_ptr, db_ptr,
                          stride_dwg, stride_dwk, stride_dwn, stride_dbg, stride_dbn,
                          HAS_BIAS)
            acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)


@triton.jit
def _grouped_mm_dw_kernel(
    # pointers
    x_ptr, dy_ptr, offsets_ptr, perm_ptr, dw_ptr, db_ptr,
    # sizes (M_BUCKET only keys the autotuner: log2 of the mean group size)
    T, K, N, G, M_BUCKET,
    # strides
    stride_xt, stride_xk,
    stride_dyt, stride_dyn,
    stride_dwg, stride_dwk, stride_dwn,
    stride_dbg, stride_dbn,
    # meta
    HAS_BIAS: tl.constexpr, GATHER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr, TMA_OK: tl.constexpr, PROGS_PER_SM: tl.constexpr = 0,
    FLATTEN: tl.constexpr = False, BLOCK_G: tl.constexpr = 64, BALANCED: tl.constexpr = False,
    BOUNDED: tl.constexpr = True, DW_TMA_OK: tl.constexpr = False,
    TMA_STORE: tl.constexpr = False, WS: tl.constexpr = False,
):
    """dW[g] = x_g^T dy_g over the group's rows in a fixed order (deterministic, no atomics);
    dBias[g] = column sums of dy_g, stored by the K-tile-0 programs.
    One program per (group, K-tile, N-tile) tile (PROGS_PER_SM = 0), or persistent programs
    that walk the tiles in steps of the grid (PROGS_PER_SM only sizes the grid): these build
    their tensor descriptors once, not once per tile (each build is two round trips to global
    memory before the first load), at the price of the loop's registers.
    With TMA (Hopper and later; never with GATHER), the group's row tiles arrive through
    tensor descriptors: a program per tile bounds its own at the group's end row (BOUNDED;
    the rows past it read as zeros); persistent ones share descriptors over all rows, and
    there (and without BOUNDED) the last partial row tile, whose rows run into the next
    group, takes masked pointer loads. The rows are summed in the same order either way.
    TMA_OK as in the forward kernel.
    With FLATTEN (persistent), each program runs all its tiles' row steps as one loop, so
    that one software pipeline spans the tiles: the next tile's first loads are in flight
    during this tile's last MMAs and its epilogue (BLOCK_G: the schedule vectors' width, as
    in the forward kernel).
    Persistent programs take the tiles in steps of the grid, in group order; with BALANCED,
    the groups with the most rows first and the programs in a snake (_dw_order, _position).
    A tile's work is its group's rows, so in group order a program can get several of the
    longest groups' tiles while others idle at the end (on 32 log-normal groups, in a model,
    the SMs idle 14-23% of the time in group order, 1-3.5% balanced: docs/grouped_gemm.md).
    The order decides which program computes a tile, never how: the results are the same bits.
    With TMA_STORE (where DW_TMA_OK: dw's rows descriptor-ready), finished tiles leave through a
    descriptor on dw [G, K, N].
    With WS (a program per tile), the row loop is warp specialized as in the forward kernel:
    a producer warp group issues the descriptor loads, two consumer warp groups each take half
    the tile's dW rows (num_warps=4 becomes 12); the K-tile-0 tiles sum dBias in a loop of
    their own. It takes effect with bounded descriptors and pointer stores (Triton 3.6 fails
    to partition the others); elsewhere
    the config runs unspecialized, so a config tuned with it stays correct on every call of
    its key."""
    tl.static_assert(not (WS and (FLATTEN or PROGS_PER_SM > 0)), "WS is for a program per tile")
    SPECIALIZE: tl.constexpr = (WS and TMA and TMA_OK and BOUNDED
                                and not (TMA_STORE and DW_TMA_OK))
    if FLATTEN:
        tl.static_assert(PROGS_PER_SM > 0, "FLATTEN configs are persistent")
        _dw_flattened(x_ptr, dy_ptr, offsets_ptr, perm_ptr, dw_ptr, db_ptr, T, K, N, G,
                      stride_xt, stride_xk, stride_dyt, stride_dyn,
                      stride_dwg, stride_dwk, stride_dwn, stride_dbg, stride_dbn,
                      HAS_BIAS, GATHER, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_G,
                      TMA and TMA_OK, BALANCED, TMA_STORE and DW_TMA_OK)
    elif PROGS_PER_SM == 0:  # the tile builds its descriptors
        _dw_tile(tl.program_id(0), x_ptr, dy_ptr, x_ptr, dy_ptr, offsets_ptr, perm_ptr,
                 dw_ptr, db_ptr, T, K, N, stride_xt, stride_xk, stride_dyt, stride_dyn,
                 stride_dwg, stride_dwk, stride_dwn, stride_dbg, stride_dbn,
                 HAS_BIAS, GATHER, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, TMA, TMA_OK,
                 True, BOUNDED, dw_ptr, G, TMA_STORE and DW_TMA_OK, SPECIALIZE)
    else:
        if TMA and TMA_OK:
            x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, K], strides=[stride_xt, 1],
                                               block_shape=[BLOCK_M, BLOCK_K])
            dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[T, N], strides=[stride_dyt, 1],
                                                block_shape=[BLOCK_M, BLOCK_N])
        else:  # never read: the tiles take the pointer loads
            x_desc = x_ptr
            dy_desc = dy_ptr
        if TMA_STORE and DW_TMA_OK:
            dw_desc = tl.make_tensor_descriptor(dw_ptr, shape=[G, K, N],
                                                strides=[stride_dwg, stride_dwk, 1],
                                                block_shape=[1, BLOCK_K, BLOCK_N // 2])
        else:  # never read: the tiles take the pointer stores
            dw_desc = dw_ptr
        per_g = tl.cdiv(K, BLOCK_K) * tl.cdiv(N, BLOCK_N)
        if BALANCED:
            pid = tl.program_id(0)
            progs = tl.num_programs(0)
            idx_G, _, _, key_R = _dw_order(offsets_ptr, G, T, BLOCK_G, True)
            for i in tl.range(0, _positions_below(G * per_g, pid, progs, True)):
                pos = _position(i, pid, progs, True)
                g, key = _group_at(pos // per_g, idx_G, key_R, BLOCK_G, True)
                _dw_tile(g * per_g + pos % per_g, x_desc, dy_desc, x_ptr, dy_ptr, offsets_ptr,
                         perm_ptr, dw_ptr, db_ptr, T, K, N,
                         stride_xt, stride_xk, stride_dyt, stride_dyn,
                         stride_dwg, stride_dwk, stride_dwn, stride_dbg, stride_dbn,
                         HAS_BIAS, GATHER, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, TMA,
                         TMA_OK, False, False, dw_desc, G,
                         TMA_STORE and DW_TMA_OK)
        else:  # (as measured on the H200)
            for tile in tl.range(tl.program_id(0), G * per_g, tl.num_programs(0)):
                _dw_tile(tile, x_desc, dy_desc, x_ptr, dy_ptr, offsets_ptr, perm_ptr,
                         dw_ptr, db_ptr, T, K, N, stride_xt, stride_xk, stride_dyt, stride_dyn,
                         stride_dwg, stride_dwk, stride_dwn, stride_dbg, stride_dbn,
                         HAS_BIAS, GATHER, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, TMA,
                         TMA_OK, False, False, dw_desc, G,
                         TMA_STORE and DW_TMA_OK)


# --- autotuning -----------------------------------------------------------------------------


def _mm_configs(interpreter: bool) -> list[triton.Config]:
    if interpreter:  # one small config: the interpreter's time goes into every tile op
        return [triton.Config(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, PROGS_PER_SM=1,
                                   TMA=False, FLATTEN=False), num_warps=4, num_stages=1)]
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs per SM
        (128, 256, 64, 8, 3, 1),
        (128, 128, 64, 4, 4, 1),
        (64, 128, 64, 4, 4, 2),
        (64, 256, 64, 8, 3, 1),
    ]
    # TMA variants first: where x and w allow descriptors, the untuned path takes them. The
    # flattened pipeline (FLATTEN) is offered with descriptors, the tuner keeps it where it wins.
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, PROGS_PER_SM=p,
                                  TMA=tma, FLATTEN=flatten), num_warps=w, num_stages=s)
               for tma, flatten in ((True, False), (True, True), (False, False))
               for m, n, k, w, s, p in shapes]
    # Last (the untuned path never takes it): the large tile with whole tiles stored through
    # y's descriptor, a candidate for the large-group cases (not timed on a GPU yet).
    m, n, k, w, s, p = shapes[0]
    configs.append(triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8,
                                      PROGS_PER_SM=p, TMA=True, FLATTEN=False, TMA_STORE=True),
                                 num_warps=w, num_stages=s))
    # Last: a 128x128 tile warp specialized (WS; not timed on a GPU yet): a producer warp
    # group loads ahead across tiles while two consumer warp groups of 64 rows each run the
    # MMAs and the epilogues (num_warps=4 compiles to 12 warps), the schedule of CUTLASS's
    # Hopper GEMMs. The equal groups' forward was 0.94-0.99x torch._grouped_mm's in run 5.
    # (The 128x256 tile's consumers spill in Triton 3.9's build: the sweep times that one.)
    configs.append(triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8,
                                      PROGS_PER_SM=1, TMA=True, FLATTEN=False, WS=True),
                                 num_warps=4, num_stages=4))
    return configs


def _dw_configs(interpreter: bool) -> list[triton.Config]:
    if interpreter:
        return [triton.Config(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, TMA=False), num_warps=4,
                              num_stages=1)]
    shapes = [  # BLOCK_K (rows of dW), BLOCK_N, BLOCK_M (reduction over group rows), warps, stages
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
    ]
    # TMA variants first, as in the forward kernel
    configs = [triton.Config(dict(BLOCK_K=k, BLOCK_N=n, BLOCK_M=m, TMA=tma), num_warps=w,
                             num_stages=s)
               for tma in (True, False) for k, n, m, w, s in shapes]
    # The wide tile through descriptors, the fastest dW of the H200 sweep on every
    # large-group case (0.89-0.91x torch._grouped_mm's, against 0.84-0.88x for the autotuner's
    # pick among the others); its pointer twin was among the slowest there.
    wide = dict(BLOCK_K=128, BLOCK_N=256, BLOCK_M=64, TMA=True)
    configs.append(triton.Config(wide, num_warps=8, num_stages=3))
    # Last: the descriptor configs persistent (not timed on a GPU yet). One program per tile
    # builds its two descriptors per tile, each two round trips to global memory before its
    # first load (bench/results/sass); a persistent program builds them once.
    # The persistent programs take the tiles longest group first, in a snake (BALANCED).
    for c in [c for c in configs if c.kwargs["TMA"]]:
        configs.append(triton.Config({**c.kwargs, "PROGS_PER_SM": 1 if c.num_warps == 8 else 2,
                                      "BALANCED": True},
                                     num_warps=c.num_warps, num_stages=c.num_stages))
    # The wide descriptor tile storing through dw's descriptor, one program per tile and
    # persistent (not timed on a GPU yet): on the large-group cases the wide tile's dW stays
    # at 0.89-0.91x CUTLASS's, and the forward of the same sizes took its TMA-store build in
    # run 5.
    configs.append(triton.Config({**wide, "TMA_STORE": True}, num_warps=8, num_stages=3))
    configs.append(triton.Config({**wide, "TMA_STORE": True, "PROGS_PER_SM": 1,
                                  "BALANCED": True}, num_warps=8, num_stages=3))
    # Last: the flattened builds (not timed on a GPU yet), one pipeline across a program's
    # tiles. With pointer loads, for small groups, whose tiles have few row steps each: there
    # a tile's pipeline fill and epilogue cost about as much as its MMAs unless the next
    # tile's loads overlap them (the first shape is the H200 sweep's fastest dW on 32 small
    # groups, one program per tile). With descriptors, the wide tile and the 128x128 one, for
    # large groups (the equal groups' dW was 0.91x CUTLASS's in run 5).
    for k, n, m, w, s, tma in ((128, 128, 32, 4, 4, False), (128, 128, 64, 8, 3, False),
                               (128, 256, 32, 8, 4, False), (128, 256, 64, 8, 3, True),
                               (128, 128, 64, 8, 3, True)):
        configs.append(triton.Config(dict(BLOCK_K=k, BLOCK_N=n, BLOCK_M=m, TMA=tma,
                                          PROGS_PER_SM=1 if w == 8 else 2, FLATTEN=True,
                                          BALANCED=True),
                                     num_warps=w, num_stages=s))
    # ... and flattened with those stores: the next tile's loads in flight during this tile's
    # epilogue, and its store running on behind them (the wide tile's staging leaves 2 KB of
    # shared memory)
    for n in (256, 128):
        configs.append(triton.Config({**wide, "BLOCK_N": n, "TMA_STORE": True, "PROGS_PER_SM": 1,
                                      "FLATTEN": True, "BALANCED": True},
                                     num_warps=8, num_stages=3))
    # Last: the wide tile and the 128x128 one warp specialized, a program per tile (WS; not
    # timed on a GPU yet): a producer warp group loads while two consumer warp groups each
    # take 64 of the tile's dW rows (num_warps=4 compiles to 12 warps). For large groups (the
    # equal groups' dW was 0.91x CUTLASS's in run 5).
    configs.append(triton.Config({**wide, "WS": True}, num_warps=4, num_stages=3))
    configs.append(triton.Config({**wide, "BLOCK_N": 128, "WS": True}, num_warps=4,
                                 num_stages=4))
    return configs


def _prune_mm(configs, named_args, **kwargs):
    """Tile height from the mean group size (M_BUCKET = log2 of it); fp32 halves BLOCK_K to fit
    shared memory; descriptor configs only where the operands allow them; warp-specialized
    ones (WS) as _ws_ok says, with at most 63 groups (BLOCK_G = 64). The autotuner
    passes positional kernel arguments as ``named_args`` and keyword ones as ``kwargs``: the
    launchers use keywords."""
    named_args = {**named_args, **kwargs}
    if not (named_args["TMA_OK"] or named_args["W_TMA_OK"]):
        configs = [c for c in configs if not c.kwargs["TMA"]]
    if not named_args.get("Y_TMA_OK"):  # it would compile to its TMA twin: time it once
        configs = [c for c in configs if not c.kwargs.get("TMA_STORE")]
    if not _ws_ok(named_args) or named_args["BLOCK_G"] > 64:  # (unspecialized there)
        configs = [c for c in configs if not c.kwargs.get("WS")]
    bucket = named_args["M_BUCKET"]
    keep = [c for c in configs if (bucket >= 7 or c.kwargs["BLOCK_M"] <= 64)
            and (bucket < 11 or c.kwargs["BLOCK_M"] >= 128)] or list(configs)
    if named_args["x_ptr"].dtype == torch.float32:
        keep = [triton.Config({**c.kwargs, "BLOCK_K": min(c.kwargs["BLOCK_K"], 32)},
                              num_warps=c.num_warps, num_stages=c.num_stages) for c in keep]
    return keep


def _prune_dw(configs, named_args, **kwargs):
    """TMA configs only where the operands allow descriptors, TMA-store ones only where dw
    does (DW_TMA_OK) while DW_TMA_STORE holds; warp-specialized ones (WS) as _ws_ok says, with
    bounded descriptors, for groups of 2**_WS_MIN_DW_BUCKET rows or more on average (with
    fewer, a tile's row loop is too short to gain; and the tuning time stays bounded); the
    flattened ones only while DW_FLATTEN holds,
    the balanced tile order only while DW_BALANCED does, bounded descriptors only while
    DW_BOUNDED does; fp32 halves the reduction tile to fit shared memory."""
    named_args = {**named_args, **kwargs}
    if not named_args["TMA_OK"]:
        configs = [c for c in configs if not c.kwargs["TMA"]]
    if not (named_args.get("DW_TMA_OK") and DW_TMA_STORE) \
            or named_args["x_ptr"].dtype == torch.float32:
        # (without dw's descriptor a config compiles to its pointer-store twin: time it once;
        # fp32's staging tile would not fit beside its pipeline)
        configs = [c for c in configs if not c.kwargs.get("TMA_STORE")]
    if not DW_FLATTEN:
        configs = [c for c in configs if not c.kwargs.get("FLATTEN")]
    if not (_ws_ok(named_args) and DW_BOUNDED) or named_args["M_BUCKET"] < _WS_MIN_DW_BUCKET:
        configs = [c for c in configs if not c.kwargs.get("WS")]
    if not DW_BALANCED:
        configs = [triton.Config({**c.kwargs, "BALANCED": False}, num_warps=c.num_warps,
                                 num_stages=c.num_stages) for c in configs]
    if not DW_BOUNDED:
        configs = [triton.Config({**c.kwargs, "BOUNDED": False}, num_warps=c.num_warps,
                                 num_stages=c.num_stages) for c in configs]
    if named_args["x_ptr"].dtype != torch.float32:
        return configs
    return [triton.Config({**c.kwargs, "BLOCK_M": min(c.kwargs["BLOCK_M"], 32)},
                          num_warps=c.num_warps, num_stages=min(c.num_stages, 3)) for c in configs]


# x and w are read through TMA descriptors where the device and the layouts allow it;
# MTMM_TMA=0 (or TMA = False) keeps the pointer loads everywhere. TMA_ON_CPU lets the tests
# run the descriptor path under the interpreter.
TMA = os.environ.get("MTMM_TMA", "1") != "0"
TMA_ON_CPU = False
# The flattened dW configs are offered to the autotuner unless MTMM_DW_FLATTEN=0 (or
# DW_FLATTEN = False before a size is first tuned): added without a GPU, they have a switch
# of their own until a device has run them (bench/device_check.sh sets it where their GPU
# test fails, so that a broken build cannot take the benchmarks down with it).
DW_FLATTEN = os.environ.get("MTMM_DW_FLATTEN", "1") != "0"
# Likewise the persistent dW configs' balanced tile order (BALANCED): MTMM_DW_BALANCED=0 (or
# DW_BALANCED = False before a size is first tuned) has them take the tiles in group order.
DW_BALANCED = os.environ.get("MTMM_DW_BALANCED", "1") != "0"
# Likewise the one-program-per-tile descriptor dW's descriptors bounded at the group's end
# row (BOUNDED): MTMM_DW_BOUNDED=0 has them span all rows, with the masked pointer loads for a
# group's last partial row tile that run 5 measured.
DW_BOUNDED = os.environ.get("MTMM_DW_BOUNDED", "1") != "0"
# Likewise the dW configs that store finished tiles through dw's descriptor (TMA_STORE):
# MTMM_DW_TMA_STORE=0 leaves them out.
DW_TMA_STORE = os.environ.get("MTMM_DW_TMA_STORE", "1") != "0"
# Likewise the warp-specialized forward and dW configs (WS): MTMM_WS=0 (or WARP_SPECIALIZE =
# False before a size is first tuned) leaves them out.
WARP_SPECIALIZE = os.environ.get("MTMM_WS", "1") != "0"
# Their sm_90 code was read with Triton 3.6 and 3.9 (bench/sass_report.py); earlier Triton
# releases partition loops for Blackwell only.
_WS_TRITON = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 6)
_WS_MIN_DW_BUCKET = 9


def _ws_ok(args: dict) -> bool:
    """Whether the autotuner may try warp-specialized configs for these kernel arguments:
    the switch is on, the Triton release is one their code was read with, x and w (or dy)
    arrive through descriptors, and the inputs are 16-bit (fp32's are not a speed target)."""
    return (WARP_SPECIALIZE and _WS_TRITON and bool(args.get("TMA_OK"))
            and args["x_ptr"].dtype != torch.float32)


def _tma_device_ok(t: torch.Tensor) -> bool:
    """TMA is on and t's device has it: a Hopper or later GPU, or the interpreter when the
    tests ask for it."""
    if not TMA:
        return False
    if t.device.type == "cuda":
        return _capability_major(t.device) >= 9
    return TMA_ON_CPU and is_interpreter()


@functools.cache
def _capability_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def _tma_rows_ok(t: torch.Tensor) -> bool:
    """A [rows, cols] operand a descriptor can read: columns of unit stride, a 16-byte aligned
    base and row stride (what TMA requires)."""
    return (t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0
            and t.data_ptr() % 16 == 0)


def _tma_ok(args: dict) -> bool:
    """Whether the forward kernel may read x and w through tensor descriptors: a device with
    TMA, no gather, K and N > 0, and layouts TMA can read."""
    x = args.get("x_ptr")
    if args.get("GATHER", True) or x is None or not _tma_rows_ok(x):
        return False
    return _w_tma_ok(args)


def _w_tma_ok(args: dict) -> bool:
    """Whether the forward kernel may read w through a tensor descriptor (x aside): a device
    with TMA, K and N > 0, and a layout TMA can read."""
    x, w = args.get("x_ptr"), args.get("w_ptr")
    if x is None or w is None or not _tma_device_ok(x):
        return False
    if x.shape[1] == 0 or w.shape[2] == 0:
        return False
    es = x.element_size()
    k_unit = _w_k_contiguous(w)
    w_outer = [w.stride(0), w.stride(2) if k_unit else w.stride(1)]
    w_inner = w.stride(1) if k_unit else w.stride(2)
    return w_inner == 1 and all(st * es % 16 == 0 for st in w_outer) and w.data_ptr() % 16 == 0


def _tma_dw_ok(args: dict) -> bool:
    """Whether the dW kernel may read x and dy through tensor descriptors (as _tma_ok). Not
    without rows: the flattened build reads a step of zeros past the last row through the
    descriptors, and a descriptor needs every dimension non-empty."""
    x, dy = args.get("x_ptr"), args.get("dy_ptr")
    if args.get("GATHER", True) or x is None or dy is None or not _tma_device_ok(x):
        return False
    return (x.shape[0] > 0 and x.shape[1] > 0 and dy.shape[1] > 0 and _tma_rows_ok(x)
            and _tma_rows_ok(dy))


def _w_k_contiguous(w: torch.Tensor) -> bool:
    """w [G, K, N] is a [G, N, K] tensor transposed (K has the unit stride)."""
    return w.stride(1) == 1 and w.stride(2) != 1


def _torch_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Descriptors made inside a kernel need a scratch allocator. Set torch's only where the
    caller has set none; the setting is per thread (autograd runs backward on its own)."""
    try:
        from triton.runtime import _allocation
        unset = _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
    except AttributeError:  # another Triton layout: set it (what the tutorials do)
        unset = True
    if unset:
        triton.set_allocator(_torch_alloc)


# Autotuning (the first call per key benchmarks every surviving config) is on by default on a
# GPU; MTMM_AUTOTUNE=0, or setting AUTOTUNE = False, uses the first surviving config instead
# (the interpreter always does: a single config).
AUTOTUNE = os.environ.get("MTMM_AUTOTUNE", "1") != "0" and not is_interpreter()


def _short_bench(kernel_call, quantiles):
    """The autotuner's timing of one config. A config Triton's compiler fails on (an MLIR pass
    failing, as Triton 3.6's warp specialization does on kernels it cannot partition) loses
    the tuning with a warning, as configs that run out of resources do, instead of ending the
    call: the other configs of the key still run it."""
    try:
        return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)
    except RuntimeError as e:
        if "PassManager::run failed" not in str(e):
            raise
        warnings.warn(f"grouped_mm autotuning: a config failed to compile and is skipped ({e})",
                      RuntimeWarning, stacklevel=2)
        return [math.inf] * len(quantiles) if quantiles else math.inf


# Tuned once per K, N and bucket of the mean group size (the autotuner also keys on the
# dtypes), so new batch sizes never retune. A config tuned with descriptors may then meet
# operands that do not allow them: the kernels take the pointer loads there (TMA_OK).
_MM_KEY = _DW_KEY = ["K", "N", "M_BUCKET"]


def _autotune(configs, prune, key, heuristics=None):
    def wrap(kernel):
        inner = triton.heuristics(heuristics)(kernel) if heuristics else kernel
        options = {"do_bench": _short_bench}
        if "do_bench" not in inspect.signature(triton.autotune).parameters:  # older Triton
            options = {}
        return triton.autotune(configs=configs, key=key,
                               prune_configs_by={"early_config_prune": prune}, **options)(inner)
    return wrap


_MM_CONFIGS, _DW_CONFIGS = _mm_configs(is_interpreter()), _dw_configs(is_interpreter())
_EVEN_K = {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0}
_grouped_mm_tuned = _autotune(_MM_CONFIGS, _prune_mm, _MM_KEY, _EVEN_K)(_grouped_mm_kernel)
_grouped_mm_dw_tuned = _autotune(_DW_CONFIGS, _prune_dw, _DW_KEY)(_grouped_mm_dw_kernel)
# grouped_mm_by_ids tunes its own: its gathered rows take pointer loads (no descriptors), so a
# config tuned for grouped_mm's descriptor build says little about them. Same keys.
_grouped_mm_gather_tuned = _autotune(_MM_CONFIGS, _prune_mm, _MM_KEY, _EVEN_K)(
    _grouped_mm_kernel)
_grouped_mm_dw_gather_tuned = _autotune(_DW_CONFIGS, _prune_dw, _DW_KEY)(_grouped_mm_dw_kernel)


# (tuner, x's dtype, the values of its key) -> the config it chose. Once a key is tuned,
# launches skip triton.autotune and triton.heuristics (the small-group cases are bound by host
# time). x's dtype is the only dtype the choice depends on: the others follow from it or only
# select a compiled variant of the chosen config.
_TUNED_CONFIGS: dict[tuple, triton.Config] = {}


def _launch(kernel, tuned, configs, prune, grid, args: dict, n_head: int,
            even_k: bool = False):
    """Launch with the config the autotuner chose for these arguments (tuning on the first
    call of each key), or, without autotuning, the first config that survives pruning.
    Returns what a later call with the same launch plan key may reuse, (meta, tail, options),
    or None when this call tuned. The first ``n_head`` kernel parameters change per call; the
    rest (``tail``) follow from the plan key."""
    if AUTOTUNE:
        key = (tuned, args["x_ptr"].dtype, *[args[k] for k in tuned.keys])
        config = _TUNED_CONFIGS.get(key)
        if config is None:
            tuned[grid](**args)
            _TUNED_CONFIGS[key] = tuned.best_config
            return None
    else:
        config = prune(configs, args)[0]
    meta = dict(config.kwargs)
    if even_k:
        meta["EVEN_K"] = args["K"] % meta["BLOCK_K"] == 0
    named = {**_defaults(kernel), **args, **meta}
    values = [named[name] for name in kernel.arg_names]
    assert len(values) == len(named), "an argument the kernel does not take"
    head, tail = tuple(values[:n_head]), tuple(values[n_head:])
    options = (("num_warps", config.num_warps), ("num_stages", config.num_stages))
    direct_launch.launch(kernel, grid(meta), head, tail, options)
    return meta, tail, options


@functools.cache
def _defaults(kernel) -> dict:
    """The kernel's parameters that have defaults (switches a config may leave out)."""
    return {name: p.default for name, p in inspect.signature(kernel.fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


class _Plan(NamedTuple):
    """What a launch derives from its plan key: reused by later calls with the same key."""
    meta: dict          # the config's constexprs
    tail: tuple         # the kernel's parameters after the per-call ones, in order
    options: tuple      # num_warps, num_stages
    descriptors: bool   # TMA_OK or W_TMA_OK: descriptors need the scratch allocator
    configs: list       # the config table it came from
    tuned: dict         # the tuned-config table it came from


# Launch plans: (which kernel, what the launch derives its config, constexprs and fixed
# arguments from) -> _Plan. A repeated call skips the argument dictionary, the pruning and
# the tuner lookup. The key holds the module switches a user may flip; a plan counts only
# while the config tables it was made from are still the module's (tests and
# bench/sass_report.py swap them); tests that patch other internals clear the plans.
_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 4096


def _switches() -> tuple:
    return (TMA, TMA_ON_CPU, AUTOTUNE)


def _launch_planned(kernel, key: tuple, configs: list, grid, head: tuple):
    """Launch with the plan stored under ``key``, if there is one (head: the per-call
    arguments, the plan holds the rest). Returns the plan, or None if there was none."""
    plan = _PLANS.get(key) if direct_launch.ENABLED else None
    if plan is None or plan.configs is not configs or plan.tuned is not _TUNED_CONFIGS:
        return None
    if plan.descriptors and head[0].is_cuda:
        _ensure_allocator()
    direct_launch.launch(kernel, grid(plan.meta), head, plan.tail, plan.options)
    return plan


def _store_plan(key: tuple, launched, descriptors: bool, configs: list) -> None:
    """Keep what ``_launch`` returned (meta, tail, options) under ``key``; nothing if it
    tuned."""
    if launched is None:
        return
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = _Plan(*launched, descriptors, configs, _TUNED_CONFIGS)


# --- launchers ------------------------------------------------------------------------------


def _block_g(num_groups: int) -> int:
    # Width of the in-kernel schedule vectors (groups + the tail pseudo-group). At least 64, so
    # that every G up to 63 shares one compiled kernel.
    return max(64, next_power_of_2(num_groups + 1))


def _m_bucket(num_rows: int, num_groups: int) -> int:
    return int(math.log2(max(num_rows / max(num_groups, 1), 1.0)))


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own switch: exact fp32 unless the user allowed TF32.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch_grouped_mm(x_TK, w_GKN, offsets_G, bias_GN, perm_T) -> torch.Tensor:
    T, K = x_TK.shape
    G, N = w_GKN.shape[0], w_GKN.shape[2]
    y_TN = torch.empty((T, N), dtype=x_TK.dtype, device=x_TK.device)
    if T == 0 or N == 0:
        return y_TN
    if G == 0:
        return y_TN.zero_()
    max_progs = _num_sms(x_TK.device)

    def grid(meta):
        # Upper bound of the M-tiles: every group and the tail add at most one partial tile.
        m_tiles = cdiv(T, meta["BLOCK_M"]) + G + 1
        tiles = m_tiles * cdiv(N, meta["BLOCK_N"])
        return (min(tiles, max_progs * meta["PROGS_PER_SM"]),)

    bias = bias_GN if bias_GN is not None else y_TN  # never read: HAS_BIAS=False
    perm = perm_T if perm_T is not None else offsets_G  # never read: GATHER=False
    head = (x_TK, w_GKN, bias, y_TN, offsets_G, perm, T)
    m_bucket = _m_bucket(T, G)
    plan_key = (
        "mm", x_TK.device, x_TK.dtype, K, N, G, m_bucket,
        x_TK.stride(), w_GKN.stride(), None if bias_GN is None else bias_GN.stride(),
        perm_T is None, x_TK.data_ptr() % 16, w_GKN.data_ptr() % 16, _switches(),
        x_TK.dtype == torch.float32 and _input_precision(x_TK.dtype),
    )
    plan = _launch_planned(_grouped_mm_kernel, plan_key, _MM_CONFIGS, grid, head)
    if plan is not None:
        if cpp_launch.takes(x_TK):  # the C++ launch path takes later calls like this one
            cpp_launch.offer_mm(plan_key, _grouped_mm_kernel, head, plan,
                                max_progs * plan.meta["PROGS_PER_SM"], x_TK, w_GKN, bias_GN,
                                offsets_G, perm_T)
        return y_TN

    args = dict(
        x_ptr=x_TK, w_ptr=w_GKN, bias_ptr=bias, y_ptr=y_TN, offsets_ptr=offsets_G, perm_ptr=perm,
        T=T, K=K, N=N, G=G, M_BUCKET=m_bucket,
        stride_xt=x_TK.stride(0), stride_xk=x_TK.stride(1),
        stride_wg=w_GKN.stride(0), stride_wk=w_GKN.stride(1), stride_wn=w_GKN.stride(2),
        stride_bg=bias.stride(0), stride_bn=bias.stride(1),
        stride_yt=y_TN.stride(0), stride_yn=y_TN.stride(1),
        HAS_BIAS=bias_GN is not None, GATHER=perm_T is not None,
        INPUT_PRECISION=_input_precision(x_TK.dtype), BLOCK_G=_block_g(G),
        W_K_CONTIGUOUS=_w_k_contiguous(w_GKN),
    )
    args["TMA_OK"] = _tma_ok(args)
    args["W_TMA_OK"] = perm_T is not None and _w_tma_ok(args)
    args["Y_TMA_OK"] = args["TMA_OK"] and _tma_rows_ok(y_TN)
    if x_TK.is_cuda and (args["TMA_OK"] or args["W_TMA_OK"]):
        _ensure_allocator()
    tuned = _grouped_mm_gather_tuned if perm_T is not None else _grouped_mm_tuned
    plan = _launch(_grouped_mm_kernel, tuned, _MM_CONFIGS, _prune_mm, grid, args, len(head),
                   even_k=True)
    _store_plan(plan_key, plan, args["TMA_OK"] or args["W_TMA_OK"], _MM_CONFIGS)
    return y_TN


def _launch_grouped_mm_dw(x_TK, dy_TN, offsets_G, perm_T, need_bias: bool):
    T, K = x_TK.shape
    N, G = dy_TN.shape[1], offsets_G.shape[0]
    dw_GKN = torch.empty((G, K, N), dtype=x_TK.dtype, device=x_TK.device)
    db_GN = torch.empty((G, N) if need_bias else (0,), dtype=dy_TN.dtype, device=x_TK.device)
    if G == 0 or N == 0:
        return dw_GKN, db_GN
    if K == 0:  # dW is empty, dBias still needs its sums: use K = 1 of zeros for the launch
        _, db = _launch_grouped_mm_dw(x_TK.new_zeros((T, 1)), dy_TN, offsets_G, perm_T, need_bias)
        return dw_GKN, db

    max_progs = _num_sms(x_TK.device)

    def grid(meta):
        tiles = G * cdiv(K, meta["BLOCK_K"]) * cdiv(N, meta["BLOCK_N"])
        progs_per_sm = meta.get("PROGS_PER_SM", 0)  # 0: one program per tile
        return (min(tiles, max_progs * progs_per_sm) if progs_per_sm else tiles,)

    perm = perm_T if perm_T is not None else offsets_G  # never read: GATHER=False
    db = db_GN if need_bias else dw_GKN.view(G, K * N)  # never written: HAS_BIAS=False
    head = (x_TK, dy_TN, offsets_G, perm, dw_GKN, db, T)
    m_bucket = _m_bucket(T, G)
    plan_key = (
        "dw", x_TK.device, x_TK.dtype, dy_TN.dtype, K, N, G, m_bucket,
        x_TK.stride(), dy_TN.stride(), need_bias, perm_T is None, x_TK.data_ptr() % 16,
        dy_TN.data_ptr() % 16, _switches(),
        x_TK.dtype == torch.float32 and _input_precision(x_TK.dtype),
    )
    plan = _launch_planned(_grouped_mm_dw_kernel, plan_key, _DW_CONFIGS, grid, head)
    if plan is not None:
        if cpp_launch.takes(x_TK):
            cpp_launch.offer_dw(plan_key, _grouped_mm_dw_kernel, head, plan,
                                grid(plan.meta)[0], x_TK, dy_TN, offsets_G, perm_T, need_bias)
        return dw_GKN, db_GN

    args = dict(
        x_ptr=x_TK, dy_ptr=dy_TN, offsets_ptr=offsets_G, perm_ptr=perm, dw_ptr=dw_GKN, db_ptr=db,
        T=T, K=K, N=N, G=G, M_BUCKET=m_bucket,
        stride_xt=x_TK.stride(0), stride_xk=x_TK.stride(1),
        stride_dyt=dy_TN.stride(0), stride_dyn=dy_TN.stride(1),
        stride_dwg=dw_GKN.stride(0), stride_dwk=dw_GKN.stride(1), stride_dwn=dw_GKN.stride(2),
        stride_dbg=db.stride(0), stride_dbn=db.stride(1),
        HAS_BIAS=need_bias, GATHER=perm_T is not None,
        INPUT_PRECISION=_input_precision(x_TK.dtype), BLOCK_G=_block_g(G),
    )
    args["TMA_OK"] = _tma_dw_ok(args)
    # dw is ours, contiguous and aligned (torch's allocators): a descriptor takes it where
    # the device has TMA and its rows are 16-byte multiples, which the plan key's N and dtype
    # decide (K and N > 0 here)
    assert dw_GKN.data_ptr() % 16 == 0
    args["DW_TMA_OK"] = _tma_device_ok(dw_GKN) and N * dw_GKN.element_size() % 16 == 0
    if x_TK.is_cuda and (args["TMA_OK"] or args["DW_TMA_OK"]):
        _ensure_allocator()
    tuned = _grouped_mm_dw_gather_tuned if perm_T is not None else _grouped_mm_dw_tuned
    plan = _launch(_grouped_mm_dw_kernel, tuned, _DW_CONFIGS, _prune_dw, grid, args, len(head))
    _store_plan(plan_key, plan, args["TMA_OK"] or args["DW_TMA_OK"], _DW_CONFIGS)
    return dw_GKN, db_GN


def _fallback_grouped_mm(x_TK, w_GKN, offsets_G, bias_GN, perm_T):
    if perm_T is None:
        return reference.grouped_mm_reference(x_TK, w_GKN, offsets_G, bias_GN)
    perm_T = perm_T.long()  # index_copy_ takes int64 only; the group sort gives int32
    y_sorted = reference.grouped_mm_reference(x_TK[perm_T], w_GKN, offsets_G, bias_GN)
    return torch.empty_like(y_sorted).index_copy_(0, perm_T, y_sorted)


def _fallback_grouped_mm_dw(x_TK, dy_TN, offsets_G, perm_T, need_bias):
    if perm_T is not None:
        perm_T = perm_T.long()  # the group sort gives int32
        x_TK, dy_TN = x_TK[perm_T], dy_TN[perm_T]
    dw_GKN, db_GN = reference.grouped_mm_dw_reference(x_TK, dy_TN, offsets_G, need_bias)
    return dw_GKN, (db_GN if need_bias else dy_TN.new_empty((0,)))


# --- torch.library ops and autograd ---------------------------------------------------------


def _grouped_mm_impl(x, w, offsets, bias, perm):
    """y without autograd: the C++ launch path where it has the plan (torch.compile's graphs
    and the Python backward call this too), else the Python launcher, else the reference
    (float64 always: a loop of torch matmuls, for gradcheck and references, not for speed)."""
    if cpp_launch.ENABLED:  # it checks the devices itself
        y = cpp_launch.grouped_mm(x, w, offsets, bias, perm, autograd=False)
        if y is not None:
            return y
    tensors = [t for t in (x, w, offsets, bias, perm) if t is not None]
    if x.dtype != torch.float64 and triton_runs_on(*tensors):
        return _launch_grouped_mm(x, w, offsets, bias, perm)
    return _fallback_grouped_mm(x, w, offsets, bias, perm)


def _grouped_mm_dw_impl(x, dy, offsets, perm, need_bias):
    if cpp_launch.ENABLED:
        grads = cpp_launch.grouped_mm_dw(x, dy, offsets, perm, need_bias)
        if grads is not None:
            return grads
    tensors = [t for t in (x, dy, offsets, perm) if t is not None]
    if x.dtype != torch.float64 and triton_runs_on(*tensors):
        return _launch_grouped_mm_dw(x, dy, offsets, perm, need_bias)
    return _fallback_grouped_mm_dw(x, dy, offsets, perm, need_bias)


@torch.library.custom_op("mtmm::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   bias: Optional[torch.Tensor], perm: Optional[torch.Tensor]) -> torch.Tensor:
    return _grouped_mm_impl(x, w, offsets, bias, perm)


@_grouped_mm_op.register_fake
def _(x, w, offsets, bias, perm):
    return x.new_empty((x.shape[0], w.shape[2]))


@torch.library.custom_op("mtmm::grouped_mm_dw", mutates_args=())
def _grouped_mm_dw_op(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor,
                      perm: Optional[torch.Tensor], need_bias: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return _grouped_mm_dw_impl(x, dy, offsets, perm, need_bias)


@_grouped_mm_dw_op.register_fake
def _(x, dy, offsets, perm, need_bias):
    G = offsets.shape[0]
    db_shape = (G, dy.shape[1]) if need_bias else (0,)
    return x.new_empty((G, x.shape[1], dy.shape[1])), dy.new_empty(db_shape)


def _setup_context(ctx, inputs, output):
    x, w, offsets, bias, perm = inputs
    ctx.save_for_backward(x, w, offsets, perm)
    ctx.has_bias = bias is not None


def _gradients(x_TK, w_GKN, offsets_G, perm_T, dy_TN, need_x, need_w, need_b, mm, mm_dw):
    """(dx, dw, dbias) of grouped_mm, None where not needed: dX is the same grouped GEMM against
    w transposed, dW and dBias the ragged-reduction kernel. ``mm``/``mm_dw`` are the custom ops
    (traced by torch.compile), their eager implementations, or, for second derivatives, the
    differentiable eager calls."""
    dx_TK = dw_GKN = db_GN = None
    if need_x:
        dx_TK = mm(dy_TN, w_GKN.transpose(1, 2), offsets_G, None, perm_T)
    if need_w or need_b:
        dw, db = mm_dw(x_TK, dy_TN, offsets_G, perm_T, need_b)
        dw_GKN = dw if need_w else None
        db_GN = db if need_b else None
    return dx_TK, dw_GKN, db_GN


def _recording() -> bool:
    """Whether a backward must compute by differentiable calls: grad mode is on in a backward
    only under create_graph=True; a torch.func transform differentiates the backward too."""
    return torch.is_grad_enabled() or under_functorch()


def _eager_calls() -> tuple:
    """(mm, mm_dw) for a backward on the eager paths: the differentiable calls where the
    backward is recorded (``_recording``), so that second derivatives (gradient penalties,
    Hessian-vector products) exist; otherwise the kernels alone, recording nothing."""
    if _recording():
        return _grouped_mm_call, _grouped_mm_dw_call
    return _grouped_mm_impl, _grouped_mm_dw_impl


def _eager_gradients(x_TK, w_GKN, offsets_G, perm_T, dy_TN, need_x, need_w, need_b):
    """_gradients for the C++ autograd node's Python backward."""
    return _gradients(x_TK, w_GKN, offsets_G, perm_T, dy_TN, need_x, need_w, need_b,
                      *_eager_calls())


def _backward_by(ctx, dy_TN, mm, mm_dw):
    """grouped_mm's backward from its autograd context: (dx, dw, None, dbias, None)."""
    need_x, need_w, _, need_b, _ = ctx.needs_input_grad
    dx, dw, db = _gradients(*ctx.saved_tensors, dy_TN, need_x, need_w,
                            bool(need_b and ctx.has_bias), mm, mm_dw)
    return dx, dw, None, db, None


def _backward(ctx, dy_TN):
    return _backward_by(ctx, dy_TN, torch.ops.mtmm.grouped_mm, torch.ops.mtmm.grouped_mm_dw)


torch.library.register_autograd("mtmm::grouped_mm", _backward, setup_context=_setup_context)


# dW[g] = x_g^T dy_g and dBias[g] = the sum of dy_g's rows are bilinear in (x, dy), so their
# gradients are grouped GEMMs of the forward kernel: given (gdw, gdb), grad_x's rows of group g
# are dy_g @ gdw[g]^T and grad_dy's are x_g @ gdw[g] + gdb[g] (gdb as the bias). Rows outside
# every group get zeros, as they gave dW nothing. Those calls are differentiable in turn, so
# derivatives of any order exist.


def _dw_setup_context(ctx, inputs, output):
    x, dy, offsets, perm, _ = inputs
    ctx.save_for_backward(x, dy, offsets, perm)


def _dw_backward_by(ctx, gdw_GKN, gdb_GN, mm):
    """grouped_mm_dw's backward from its autograd context: (grad_x, grad_dy, None, None,
    None), None where not needed; gdw/gdb are None (or gdb empty) where that output has no
    gradient."""
    x_TK, dy_TN, offsets_G, perm_T = ctx.saved_tensors
    need_x, need_dy = ctx.needs_input_grad[:2]
    if gdb_GN is not None and gdb_GN.numel() == 0:  # no bias asked for: db is empty
        gdb_GN = None
    grad_x = grad_dy = None
    if need_x and gdw_GKN is not None:
        grad_x = mm(dy_TN, gdw_GKN.transpose(1, 2), offsets_G, None, perm_T)
    if need_dy and (gdw_GKN is not None or gdb_GN is not None):
        if gdw_GKN is None:  # only db is used: its gradient rides as the bias of zero weights
            gdw_GKN = x_TK.new_zeros((offsets_G.shape[0], x_TK.shape[1], dy_TN.shape[1]))
        grad_dy = mm(x_TK, gdw_GKN, offsets_G, gdb_GN, perm_T)
    return grad_x, grad_dy, None, None, None


def _dw_backward(ctx, gdw_GKN, gdb_GN):
    return _dw_backward_by(ctx, gdw_GKN, gdb_GN, torch.ops.mtmm.grouped_mm)


torch.library.register_autograd("mtmm::grouped_mm_dw", _dw_backward,
                                setup_context=_dw_setup_context)


# FlopCounterMode sees the ops (eager calls take them under any dispatch mode) and counts, like
# torch's mm, two FLOPs per multiply-add of the rows that some group owns.


def _rows_owned(x_TK: torch.Tensor, offsets_G: torch.Tensor) -> int:
    """offsets[-1] clamped to [0, T], read from the tensor (on a GPU a synchronisation, as in
    torch's own variable-length attention formulas); T, an upper bound, where the values do not
    exist (meta and fake tensors)."""
    T = x_TK.shape[0]
    if offsets_G.shape[0] == 0:
        return 0
    if not has_values(offsets_G):
        return T
    return min(max(int(offsets_G[-1]), 0), T)


@register_flop_formula(torch.ops.mtmm.grouped_mm, get_raw=True)
def _grouped_mm_flops(x, w, offsets, bias, perm, out_val=None) -> int:
    """y = x_g @ w[g] over the owned rows (the bias add is not counted, as for addmm)."""
    return 2 * _rows_owned(x, offsets) * x.shape[1] * w.shape[2]


@register_flop_formula(torch.ops.mtmm.grouped_mm_dw, get_raw=True)
def _grouped_mm_dw_flops(x, dy, offsets, perm, need_bias, out_val=None) -> int:
    """dw[g] = x_g^T @ dy_g over the owned rows (dBias's sums are not counted)."""
    return 2 * _rows_owned(x, offsets) * x.shape[1] * dy.shape[1]


def _vmap_by_loop(call, info, in_dims, args):
    """torch.vmap's rule for the ops (jacrev, per-sample gradients, ensembles): one call per
    batch element, results stacked along dim 0. Correct, not batched into one launch."""
    def element(a, d, i):
        if d is None:
            return a
        if info.batch_size == 0:  # an element of an empty batch, for the output's shape
            return a.new_zeros(a.shape[:d] + a.shape[d + 1:])
        return a.select(d, i)

    outs = [call(*(element(a, d, i) for a, d in zip(args, in_dims)))
            for i in range(max(info.batch_size, 1))]
    if isinstance(outs[0], tuple):
        stacked = tuple(torch.stack(parts) for parts in zip(*outs))
        return tuple(t[:info.batch_size] for t in stacked)
    return torch.stack(outs)[:info.batch_size]


class _GroupedMmFunction(torch.autograd.Function):
    """The eager path: the same kernels and backward as the custom op, without the custom op's
    dispatch. On an H200 a small-group forward went from 0.269 to 0.256 ms between two runs
    that also differed in TMA: most of the host time was elsewhere (Triton's launch path,
    which the direct launch now skips: docs/host_path.md). torch.compile traces the custom op
    instead."""

    @staticmethod
    def forward(x, w, offsets, bias, perm):
        return _grouped_mm_impl(x, w, offsets, bias, perm)

    setup_context = staticmethod(_setup_context)  # a separate one: torch.func takes it

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_by_loop(_grouped_mm_call, info, in_dims, args), 0

    @staticmethod
    def backward(ctx, dy_TN):
        if cpp_launch.wants_fresh_gradient(dy_TN):  # the layout the C++ path plans for
            dy_TN = dy_TN.clone(memory_format=torch.contiguous_format)
        return _backward_by(ctx, dy_TN, *_eager_calls())


class _GroupedMmDwFunction(torch.autograd.Function):
    """dW and dBias as a differentiable eager call: what a backward under create_graph=True
    records, so that the gradients of grouped_mm can be differentiated again."""

    @staticmethod
    def forward(x, dy, offsets, perm, need_bias):
        return _grouped_mm_dw_impl(x, dy, offsets, perm, need_bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _dw_setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # an unused dw or db costs no GEMM of zeros

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_by_loop(_grouped_mm_dw_call, info, in_dims, args), (0, 0)

    @staticmethod
    def backward(ctx, gdw_GKN, gdb_GN):
        return _dw_backward_by(ctx, gdw_GKN, gdb_GN, _eager_calls()[0])


def _grouped_mm_call(x, w, offsets, bias, perm):
    if through_dispatcher(x, w):  # tracing, dispatch modes, meta tensors, subclasses
        return torch.ops.mtmm.grouped_mm(x, w, offsets, bias, perm)
    if under_functorch():  # torch.func's wrapped tensors: the autograd.Function unwraps them
        return _GroupedMmFunction.apply(x, w, offsets, bias, perm)
    if cpp_launch.ENABLED:  # with its C++ autograd node where inputs need gradients
        y = cpp_launch.grouped_mm(x, w, offsets, bias, perm, autograd=True)
        if y is not None:
            return y
    if wants_grad(x, w, bias):
        return _GroupedMmFunction.apply(x, w, offsets, bias, perm)
    return _grouped_mm_impl(x, w, offsets, bias, perm)  # no graph to record: skip autograd


def _grouped_mm_dw_call(x, dy, offsets, perm, need_bias):
    if through_dispatcher(x, dy):
        return torch.ops.mtmm.grouped_mm_dw(x, dy, offsets, perm, need_bias)
    if wants_grad(x, dy) or under_functorch():
        return _GroupedMmDwFunction.apply(x, dy, offsets, perm, need_bias)
    return _grouped_mm_dw_impl(x, dy, offsets, perm, need_bias)


# --- public functions -----------------------------------------------------------------------


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_operands(x, w, bias, index_name: str, index) -> None:
    """Ranks, sizes, dtypes and devices of the operands (no values: those need the data)."""
    _check_tensor("x", x, 2)
    _check_tensor("w", w, 3)
    _check_tensor(index_name, index, 1)
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if w.dtype != x.dtype:
        raise TypeError(f"w must have x's dtype {x.dtype}, got {w.dtype}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{index_name} must be int32 or int64, got {index.dtype}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w must be [G, K={x.shape[1]}, N] to match x [T, K], "
                         f"got shape {tuple(w.shape)}")
    if x.shape[0] >= 2**31:
        raise ValueError(f"x must have fewer than 2**31 rows, got {x.shape[0]}")
    if bias is not None:
        _check_tensor("bias", bias, 2)
        if bias.shape != (w.shape[0], w.shape[2]):
            raise ValueError(f"bias must be [G, N] = {[w.shape[0], w.shape[2]]}, "
                             f"got {list(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    for name, t in (("w", w), (index_name, index), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _values_checkable(t: torch.Tensor) -> bool:
    """Values are checked where reading them costs no device synchronisation."""
    return holds_values(t)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped GEMM over contiguous row groups: one launch for every group.

    Args:
        x: [T, K] float16, bfloat16 or float32 (float64 too: a loop of torch matmuls, for
            ``torch.autograd.gradcheck`` and references, not for speed); the rows of group g
            are ``x[offsets[g-1]:offsets[g]]`` (``offsets[-1]`` counts as 0 for g = 0).
        w: [G, K, N], x's dtype, any strides (``w_GNK.transpose(1, 2)`` needs no copy).
        offsets: [G] int32 or int64, any stride, cumulative END row of each group,
            non-decreasing, at most T (``torch.nn.functional.grouped_mm``'s ``offs``).
            Checked on the CPU only: on a GPU a check would be a host synchronisation; there
            bad values are clamped into [0, T] (never an out-of-bounds access) and give
            unspecified results.
        bias: optional [G, N], x's dtype.

    Returns:
        [T, N] in x's dtype, accumulated in fp32 (fp64 for float64):
        ``x[rows_g] @ w[g] + bias[g]``; rows at or past ``offsets[-1]`` are zero.
        Differentiable in x, w and bias, to any order (deterministic dW and dBias; an empty
        group gets exact zeros).

    Inside ``torch.autocast``, x, w and bias are first cast as for ``nn.Linear`` (float16,
    bfloat16 and float32 ones on the autocast device to its dtype), so the result has that
    dtype.
    """
    if autocast.any_enabled():
        x, w, bias = autocast.cast_like_linear(x, w, bias)
    if cpp_launch.ENABLED and not torch.compiler.is_compiling():  # C++ refuses modes too
        y = cpp_launch.public_call("grouped_mm_public", x, w, offsets, bias)
        if y is not None:  # the plain call, checked and launched in C++ (docs/host_path.md)
            return y
    offsets = index_on_mesh(offsets, x, w, bias)
    _check_operands(x, w, bias, "offsets", offsets)
    if offsets.shape[0] != w.shape[0]:
        raise ValueError(f"offsets must have one entry per group of w (G={w.shape[0]}), "
                         f"got {offsets.shape[0]}")
    if _values_checkable(offsets) and offsets.numel() > 0:
        if int(offsets.min()) < 0 or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets must be non-negative and non-decreasing, "
                             f"got {offsets.tolist()}")
        if int(offsets[-1]) > x.shape[0]:
            raise ValueError(f"offsets[-1] must be at most T={x.shape[0]} (rows of x), "
                             f"got {int(offsets[-1])}")
    if not offsets.is_contiguous():  # the kernels read offsets[g] at offsets_ptr + g
        offsets = offsets.contiguous()
    return _grouped_mm_call(x, w, offsets, bias, None)


def grouped_mm_by_ids(x: torch.Tensor, w: torch.Tensor, group_ids: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped GEMM with tokens in any order: ``y[t] = x[t] @ w[group_ids[t]] + bias[...]``.

    The ids are sorted once, stably, on the device (a counting sort in two launches,
    ``mtmm_kernels/group_sort.py``; ``torch.sort`` beyond 255 groups); the kernels gather x
    rows and scatter y rows through the permutation inside their loads and stores, so no
    permuted copy of x or y is ever materialised.

    Args:
        x: [T, K] float16, bfloat16 or float32 (or float64, as in ``grouped_mm``).
        w: [G, K, N], x's dtype, any strides.
        group_ids: [T] int32 or int64, each in [0, G). Checked on the CPU only; on a GPU, ids
            outside [0, G) give zero rows (and no gradient) instead of an error, since checking
            would synchronise with the host.
        bias: optional [G, N], x's dtype.

    Returns:
        [T, N] in x's dtype, rows in x's order. Differentiable in x, w and bias, to any
        order. Inside ``torch.autocast``, the operands are cast as in ``grouped_mm``.
    """
    if autocast.any_enabled():
        x, w, bias = autocast.cast_like_linear(x, w, bias)
    if cpp_launch.ENABLED and not torch.compiler.is_compiling():  # C++ refuses modes too
        y = cpp_launch.public_call("grouped_mm_by_ids_public", x, w, group_ids, bias)
        if y is not None:  # the plain call, sort included, checked and launched in C++
            return y
    group_ids = index_on_mesh(group_ids, x, w, bias)
    _check_operands(x, w, bias, "group_ids", group_ids)
    G = w.shape[0]
    if group_ids.shape[0] != x.shape[0]:
        raise ValueError(f"group_ids must have one entry per row of x (T={x.shape[0]}), "
                         f"got {group_ids.shape[0]}")
    if _values_checkable(group_ids) and group_ids.numel() > 0:
        low, high = int(group_ids.min()), int(group_ids.max())
        if low < 0 or high >= G:
            raise ValueError(f"group_ids must lie in [0, G={G}), got values in [{low}, {high}]")
    perm_T, offsets_G = sort_by_group(group_ids, G)
    return _grouped_mm_call(x, w, offsets_G, bias, perm_T)
