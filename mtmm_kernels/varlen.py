"""Variable-length multi-modal packing: ragged batches in one buffer of rows, no padding.

A packed batch is a [T, H] buffer of the real rows of B sequences plus int32 ``cu_seqlens``
(length B + 1, leading 0: FlashAttention's varlen convention) and per-token ``position_ids``
that restart at 0 in each sequence (HuggingFace's flattening collator). A sequence may be the
concatenation of several modality streams (image tokens, then audio, then text), and sequences
may be ordered by task (``group_offsets`` then feeds the grouped GEMM directly).

Every pack is at most two launches whatever B and the number of streams: a one-program *plan*
kernel (lengths -> clamped int32 lengths, cu_seqlens, order, group_offsets, totals and error
counts) and a copy kernel that also writes the per-token metadata. When the lengths (and
group ids) are on the CPU the plan is a few numpy operations on the host instead, and its
outputs reach the device in one copy: one launch in all. The pack kernel walks the packed
rows (no program is spent on padding; each row finds its sequence in cu_seqlens, comparing it
with every start at once or by binary search, and its stream by the per-stream lengths); the
unpack kernel walks the padded rows and writes zeros into the padding, so its output needs no
memset. Pack and unpack are adjoint: the backward of each is the other, computed by the same
kernels. Rows are copied as [BLOCK_R, BLOCK_H] tiles with 64-bit offsets; when every row
stride and base address is a multiple of 16 bytes the offsets carry ``tl.multiple_of`` hints
so loads and stores are 16-byte vectors, whatever H (bench/sass_report.py shows the machine
code, tests/test_sass.py holds it). (A pack that first labels the rows sequence by sequence in
an extra launch, so that the copy needs no search, passed the GPU tests but measured slower
on 2 of the 3 benchmark cases on an H200, 2026-11-27: see bench/results/h200/README.md.)

Synchronisation: the host must know T (to allocate) and ``max_seqlen`` (a Python int).
- lengths on the CPU: both come from the CPU copy; the plan (lengths, cu_seqlens, order,
  group_offsets) reaches the device by one non-blocking copy from pinned memory. Nothing syncs.
- lengths on the GPU, ``total`` not given: one device-to-host read of four numbers after the
  plan kernel (T, max_seqlen and the error counts that validation needs).
- lengths on the GPU, ``total=T`` given: no sync (CUDA-graph capturable, torch.compile
  friendly). ``max_seqlen`` is then the caller's, else the padded bound sum_s L_s. Values on
  the device are not checked in this mode; the kernels clamp lengths to [0, L_s] and group ids
  to [0, G) and never touch memory outside their buffers, but the result of bad values is
  unspecified.
``unpack``/``unpack_multimodal`` read their metadata to validate it (free on the CPU, one sync
on the GPU); pass ``validate=False`` to skip that. While torch.compile traces, checks that
would read values are skipped (they would be graph breaks): give the packs ``total=`` there.

Inputs whose last dimension is not contiguous are copied once with ``.contiguous()``; other
strides (a slice along L, a transposed batch) are read in place.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from mtmm_kernels import _autocast as autocast
from mtmm_kernels import _direct_launch as direct_launch
from mtmm_kernels import reference
from mtmm_kernels._triton_utils import (cdiv, dtensor_mesh, has_triton, has_values,
                                       holds_values, index_on_mesh, next_power_of_2,
                                       through_dispatcher, triton_runs_on, wants_grad)

if has_triton():
    import triton
    import triton.language as tl
else:  # pragma: no cover - the CPU fallback needs no Triton
    triton = tl = None

__all__ = ["PackedBatch", "pack", "pack_padded", "pack_multimodal", "unpack", "unpack_multimodal"]

_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                 torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_INDEX_DTYPES = (torch.int32, torch.int64)

# Tests flip this to run the device-side plan path (stats read back, no host-side checks) on
# CPU tensors under the interpreter.
_FORCE_DEVICE_PLAN = False


# ============================================================================================
# Triton kernels
# ============================================================================================
if triton is not None:

    @triton.jit
    def _last_start_at_or_before(starts, at_or_before, N: tl.constexpr):
        """(index, start) of the last of N sorted starts that is <= each row (at_or_before
        [rows, N]: start <= row; masked starts hold INT32_MAX), from one reduction over
        start * N + index. Two reductions made Triton 3.6 compute the compares twice, once in
        the copy tile's layout (123 registers instead of 48 on sm_90)."""
        key = starts.to(tl.int64) * N + tl.arange(0, N)
        key = tl.max(tl.where(at_or_before, key[None, :], 0), axis=1)
        return (key % N).to(tl.int32), (key // N).to(tl.int32)  # (0, 0) if none qualifies

    @triton.jit
    def _find_sequence(cu_seqlens_ptr, rows, B, search_steps, ALL_STARTS: tl.constexpr = 0,
                       START_FROM_SEARCH: tl.constexpr = 0):
        """(p, start): the largest p in [0, B) with cu_seqlens[p] <= row (the packed sequence
        holding the row) and cu_seqlens[p]. Empty sequences repeat a start; the last of equal
        starts is the non-empty one.

        With ALL_STARTS >= B (a power of two), every start is loaded at once: one round trip
        to memory, for ALL_STARTS compares per row, instead of the binary search's log2(B)
        dependent loads. p is then the count of starts <= row, minus one; with
        START_FROM_SEARCH the start comes out of the same compares (a second round trip saved
        where nothing else is loaded before the data), else it is loaded."""
        if ALL_STARTS > 0:
            idx = tl.arange(0, ALL_STARTS)
            starts = tl.load(cu_seqlens_ptr + idx, mask=idx < B, other=2147483647)
            at_or_before = starts[None, :] <= rows[:, None]
            if START_FROM_SEARCH:  # p < B: a masked start never qualifies
                p, start = _last_start_at_or_before(starts, at_or_before, ALL_STARTS)
            else:
                p = tl.sum(at_or_before.to(tl.int32), axis=1) - 1
                p = tl.minimum(tl.maximum(p, 0), B - 1)  # unsorted (unchecked) starts: in range
                start = tl.load(cu_seqlens_ptr + p)
        else:
            p = tl.zeros_like(rows)
            for i in range(search_steps):
                cand = p + (1 << (search_steps - 1 - i))
                in_range = cand < B
                start = tl.load(cu_seqlens_ptr + cand, mask=in_range, other=0)
                p = tl.where(in_range & (start <= rows), cand, p)
            start = tl.load(cu_seqlens_ptr + p)
        return p, start

    @triton.jit
    def _find_segment(cu_seqlens_ptr, lens_ptr, rows, B, S: tl.constexpr,
                      ALL_STARTS: tl.constexpr, SEGMENTS: tl.constexpr):
        """(p, s, r): the packed sequence p, the stream s within it and the row r within that
        stream's segment, for sequences in sample order (lens_ptr [S, B]). Every segment
        start, cu_seqlens[p] plus the lengths of p's earlier streams, is built from one load of
        the starts and the lengths (all B at once, ALL_STARTS >= B, SEGMENTS >= S, powers of
        two); the largest start <= row, the last index among equal ones, is the row's
        segment (an empty segment, or a padding lane s >= S whose start is the next
        sequence's, is always followed by one with the same start). One round trip to memory
        before the data load, where the search by sequence needs a second for the lengths."""
        p_idx = tl.arange(0, ALL_STARTS)
        s_idx = tl.arange(0, SEGMENTS)
        seq_ok = p_idx < B
        starts = tl.load(cu_seqlens_ptr + p_idx, mask=seq_ok, other=2147483647)
        n_PS = tl.load(lens_ptr + s_idx[None, :] * B + p_idx[:, None],
                       mask=seq_ok[:, None] & (s_idx[None, :] < S), other=0)
        seg = tl.reshape(starts[:, None] + tl.cumsum(n_PS, axis=1) - n_PS,
                         [ALL_STARTS * SEGMENTS])
        q, seg_start = _last_start_at_or_before(seg, seg[None, :] <= rows[:, None],
                                                ALL_STARTS * SEGMENTS)
        return q // SEGMENTS, q % SEGMENTS, rows - seg_start  # a masked lane never qualifies

    @triton.jit
    def _vector_bound(H, ROW_ALIGN: tl.constexpr):
        """H, written so that Triton sees it is a multiple of ROW_ALIGN (which divides every
        row stride, H included). Triton only knows divisibility by 16 of an int argument, so
        ``cols < H`` with H = 1000 would split every 16-byte vector into single-element
        loads; ``cols < (H // 8) * 8`` keeps the 8-element vectors of a bf16 row."""
        if ROW_ALIGN > 1:
            return (H // ROW_ALIGN) * ROW_ALIGN
        return H

    # Sizes that change every batch are not specialised on (no recompiles per batch).
    @triton.jit(do_not_specialize=["B", "G"])
    def _varlen_plan_kernel(
        # --- pointers
        lens_ptrs,          # S pointers, each [B] int32/int64: raw lengths of stream s
        group_ids_ptr,      # [B] int32/int64 task of each sample (unused unless GROUPED)
        lens_out_ptr,       # [S, B] int32: lengths clamped to [0, L_s]
        seqlen_ptr,         # [B] int32 scratch: length of sample b's whole sequence
        cu_seqlens_ptr,     # [B + 1] int32
        order_ptr,          # [B] int64: sample of each packed sequence
        group_offsets_ptr,  # [G] int32: cumulative END token offset of each group
        stats_ptr,          # [4] int64: T, max_seqlen, #lengths out of range, #group ids out
        # --- sizes
        max_lens,           # S ints: L_s
        B, G,
        # --- meta
        S: tl.constexpr, GROUPED: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        # One program: B is at most a few thousand, and a single program needs no
        # inter-program scan.
        offs = tl.arange(0, BLOCK_B)
        running = tl.zeros([], dtype=tl.int32)
        max_seq = tl.zeros([], dtype=tl.int32)
        bad_len = tl.zeros([], dtype=tl.int32)
        bad_gid = tl.zeros([], dtype=tl.int32)
        total = tl.zeros([], dtype=tl.int64)  # int32 sums wrap past 2**31: the host checks this
        # --- pass 1: clamp and sum lengths; the ungrouped prefix sum
        for b0 in range(0, B, BLOCK_B):
            b = b0 + offs
            in_b = b < B
            seq = tl.zeros([BLOCK_B], dtype=tl.int32)
            for s in tl.static_range(S):
                raw = tl.load(lens_ptrs[s] + b, mask=in_b, other=0).to(tl.int64)
                bad_len += tl.sum(((raw < 0) | (raw > max_lens[s])).to(tl.int32), axis=0)
                n = tl.minimum(tl.maximum(raw, 0), max_lens[s]).to(tl.int32)
                tl.store(lens_out_ptr + s * B + b, n, mask=in_b)
                seq += n
            max_seq = tl.maximum(max_seq, tl.max(seq, axis=0))
            total += tl.sum(seq.to(tl.int64), axis=0)
            if GROUPED:
                gid = tl.load(group_ids_ptr + b, mask=in_b, other=0)
                bad_gid += tl.sum((in_b & ((gid < 0) | (gid >= G))).to(tl.int32), axis=0)
                tl.store(seqlen_ptr + b, seq, mask=in_b)
            else:
                tl.store(cu_seqlens_ptr + 1 + b, running + tl.cumsum(seq, axis=0), mask=in_b)
                tl.store(order_ptr + b, b.to(tl.int64), mask=in_b)
                running += tl.sum(seq, axis=0)
        # --- pass 2 (grouped): stable counting sort by group; group g's sequences follow
        # those of groups < g, so one running count and one running token offset suffice.
        if GROUPED:
            tl.debug_barrier()  # pass 1's seqlen stores are read back by other threads
            count = tl.zeros([], dtype=tl.int32)
            for g in range(G):
                for b0 in range(0, B, BLOCK_B):
                    b = b0 + offs
                    in_b = b < B
                    gid = tl.load(group_ids_ptr + b, mask=in_b, other=0)
                    gid = tl.minimum(tl.maximum(gid, 0), G - 1)
                    seq = tl.load(seqlen_ptr + b, mask=in_b, other=0)
                    mine = in_b & (gid == g)
                    n_mine = tl.where(mine, seq, 0)
                    p = count + tl.cumsum(mine.to(tl.int32), axis=0) - 1
                    start = running + tl.cumsum(n_mine, axis=0) - n_mine
                    tl.store(order_ptr + p, b.to(tl.int64), mask=mine)
                    tl.store(cu_seqlens_ptr + p, start, mask=mine)
                    count += tl.sum(mine.to(tl.int32), axis=0)
                    running += tl.sum(n_mine, axis=0)
                tl.store(group_offsets_ptr + g, running)
        else:
            tl.store(cu_seqlens_ptr, 0)
        tl.store(cu_seqlens_ptr + B, running)
        tl.store(stats_ptr + 0, total)
        tl.store(stats_ptr + 1, max_seq.to(tl.int64))
        tl.store(stats_ptr + 2, bad_len.to(tl.int64))
        tl.store(stats_ptr + 3, bad_gid.to(tl.int64))

    @triton.jit(do_not_specialize=["T", "B", "search_steps"])
    def _varlen_pack_kernel(
        # --- pointers
        src_ptrs,           # S padded streams x_s [B, L_s, H], last stride 1
        lens_ptr,           # [S, B] int32 clamped lengths (unused when S == 1)
        cu_seqlens_ptr,     # [B + 1] int32
        order_ptr,          # [B] int64 sample of each packed sequence (unused unless HAS_ORDER)
        dst_ptr,            # [T, H] packed rows, row stride stride_t
        position_ids_ptr,   # [T] int64
        seq_ids_ptr,        # [T] int32
        modality_ids_ptr,   # [T] int32
        # --- sizes
        T, H, B, search_steps,
        max_lens,           # S ints: L_s
        # --- strides (elements)
        stride_b, stride_l,  # S ints each: batch and row stride of stream s
        stride_t,
        # --- meta
        S: tl.constexpr, HAS_ORDER: tl.constexpr,
        WRITE_META: tl.constexpr, ROW_ALIGN: tl.constexpr, ALL_STARTS: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, SEGMENTS: tl.constexpr = 0,
    ):
        pid_r = tl.program_id(0)
        pid_h = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # T < 2**31 (int32 cu_seqlens)
        cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        col_ok = cols < _vector_bound(H, ROW_ALIGN)
        # --- the packed sequence of each row, its sample and the row's position in it
        row_ok = (rows < T) & (rows < tl.load(cu_seqlens_ptr + B))
        if SEGMENTS > 0:  # several streams in sample order: a search by (sequence, stream)
            p, stream, r_seg = _find_segment(cu_seqlens_ptr, lens_ptr, rows, B, S, ALL_STARTS,
                                             SEGMENTS)
            seq_start = tl.load(cu_seqlens_ptr + p)  # position_ids only: off the data's path
        else:
            # one stream loads nothing else before the data (below), so its search also gives
            # the start; several streams load their lengths, and the start beside them
            p, seq_start = _find_sequence(cu_seqlens_ptr, rows, B, search_steps, ALL_STARTS,
                                          S == 1)
        pos = rows - seq_start
        if HAS_ORDER:  # clamped: a caller's unchecked order must not move the reads
            b = tl.load(order_ptr + p, mask=row_ok, other=0)
            b = tl.minimum(tl.maximum(b, 0), B - 1)
        else:
            b = p.to(tl.int64)
        # --- the stream that holds each row and the row's address there; then one gather of
        # the tile through per-row pointers (S masked loads of the whole tile held S tiles in
        # registers: 104 per thread at S = 3 on sm_90, bench/sass_report.py)
        modality = tl.zeros([BLOCK_R], dtype=tl.int32)
        stream_start = tl.zeros([BLOCK_R], dtype=tl.int32)
        in_stream = rows < 0  # all False
        for s in tl.static_range(S):
            if SEGMENTS > 0:  # the search found the stream and the row in it
                r = r_seg
                sel = row_ok & (stream == s) & (r >= 0) & (r < max_lens[s])
            elif S == 1:  # every row_ok row of sequence p is in its one stream (r < its length,
                # cu_seqlens being its lengths' sums): no load between the search and the data
                r = pos
                sel = row_ok & (r >= 0) & (r < max_lens[s])
            else:  # the stream by the lengths of those before it
                r = pos - stream_start
                n = tl.load(lens_ptr + s * B + b, mask=row_ok, other=0)
                sel = row_ok & (r >= 0) & (r < n) & (r < max_lens[s])
                stream_start += n
            src_off = b * stride_b[s] + r.to(tl.int64) * stride_l[s]
            if ROW_ALIGN > 1:
                src_off = tl.multiple_of(src_off, ROW_ALIGN)
            if s == 0:
                src_row = src_ptrs[0] + src_off
            else:
                src_row = tl.where(sel, src_ptrs[s] + src_off, src_row)
                if ROW_ALIGN > 1:  # Triton 3.9 forgets the alignment of a pointer select
                    src_row = tl.multiple_of(
                        src_row, ROW_ALIGN * (dst_ptr.dtype.element_ty.primitive_bitwidth // 8))
            in_stream = in_stream | sel
            modality = tl.where(sel, s, modality)
        acc = tl.load(src_row[:, None] + cols[None, :], mask=in_stream[:, None] & col_ok[None, :],
                      other=0)
        # --- store every row below T: rows past cu_seqlens[B] (a wrong `total`) get zeros
        dst_off = rows.to(tl.int64) * stride_t
        if ROW_ALIGN > 1:
            dst_off = tl.multiple_of(dst_off, ROW_ALIGN)
        in_t = rows < T
        tl.store(dst_ptr + dst_off[:, None] + cols[None, :], acc,
                 mask=in_t[:, None] & col_ok[None, :])
        if WRITE_META:
            if pid_h == 0:
                tl.store(position_ids_ptr + rows, tl.where(row_ok, pos, 0).to(tl.int64), mask=in_t)
                tl.store(seq_ids_ptr + rows, tl.where(row_ok, p, 0), mask=in_t)
                tl.store(modality_ids_ptr + rows, modality, mask=in_t)

    @triton.jit(do_not_specialize=["T", "B"])
    def _varlen_unpack_kernel(
        # --- pointers
        src_ptr,            # [T, H] packed rows, row stride stride_t
        lens_ptr,           # [S, B] int32 clamped lengths (unused when LENS_FROM_CU)
        cu_seqlens_ptr,     # [B + 1] int32
        order_ptr,          # [B] int64 (unused unless HAS_ORDER)
        dst_ptrs,           # S padded outputs [B, L_s, H], contiguous
        # --- sizes
        T, H, B,
        max_lens,           # S ints: L_s
        # --- strides (elements)
        stride_t,
        # --- meta
        S: tl.constexpr, LENS_FROM_CU: tl.constexpr, HAS_ORDER: tl.constexpr,
        ROW_ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # Row blocks are laid out stream after stream; inside stream s, flat row i of the
        # block range is (packed sequence p, row r) = divmod(i, L_s), so every padded row is
        # written exactly once (zeros in the padding) when order is a permutation.
        pid_r = tl.program_id(0)
        pid_h = tl.program_id(1)
        cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        col_ok = cols < _vector_bound(H, ROW_ALIGN)
        first_block = tl.zeros([], dtype=tl.int64)
        for s in tl.static_range(S):
            L = max_lens[s]
            n_rows = (tl.zeros([], dtype=tl.int64) + B) * L  # B, L may be constexpr 1
            n_blocks = tl.cdiv(n_rows, BLOCK_R)
            if (pid_r >= first_block) & (pid_r < first_block + n_blocks):
                # One 64-bit divmod per program, not per row (per row it was most of the
                # instructions: 8 rows per thread at BLOCK_R = 8); the rows then wrap into
                # the next sequences, at most once each when L >= BLOCK_R.
                flat0 = (pid_r - first_block) * BLOCK_R
                p0 = flat0 // L
                r = (flat0 - p0 * L).to(tl.int32) + tl.arange(0, BLOCK_R)
                if L >= BLOCK_R:
                    wraps = (r >= L).to(tl.int32)
                else:
                    wraps = r // L
                r -= wraps * L
                in_rows = flat0 + tl.arange(0, BLOCK_R) < n_rows
                p = tl.where(in_rows, p0.to(tl.int32) + wraps, 0)
                if HAS_ORDER:  # clamped: a caller's unchecked order must not move the stores
                    b = tl.load(order_ptr + p, mask=in_rows, other=0)
                    b = tl.minimum(tl.maximum(b, 0), B - 1)
                else:
                    b = p.to(tl.int64)
                seq_start = tl.load(cu_seqlens_ptr + p, mask=in_rows, other=0)
                if LENS_FROM_CU:
                    n = tl.load(cu_seqlens_ptr + p + 1, mask=in_rows, other=0) - seq_start
                    prefix = tl.zeros_like(n)
                else:
                    n = tl.load(lens_ptr + s * B + b, mask=in_rows, other=0)
                    prefix = tl.zeros_like(n)
                    for s_before in tl.static_range(s):
                        prefix += tl.load(lens_ptr + s_before * B + b, mask=in_rows, other=0)
                src_row = seq_start + prefix + r
                valid = in_rows & (r < n) & (src_row >= 0) & (src_row < T)
                src_off = src_row.to(tl.int64) * stride_t
                dst_off = (b * L + r.to(tl.int64)) * H
                if ROW_ALIGN > 1:
                    src_off = tl.multiple_of(src_off, ROW_ALIGN)
                    dst_off = tl.multiple_of(dst_off, ROW_ALIGN)
                x = tl.load(src_ptr + src_off[:, None] + cols[None, :],
                            mask=valid[:, None] & col_ok[None, :], other=0)
                tl.store(dst_ptrs[s] + dst_off[:, None] + cols[None, :], x,
                         mask=in_rows[:, None] & col_ok[None, :])
            first_block += n_blocks

    @triton.jit(do_not_specialize=["T", "B", "search_steps"])
    def _varlen_token_meta_kernel(
        # --- pointers
        cu_seqlens_ptr,     # [B + 1] int32
        position_ids_ptr,   # [T] int64
        seq_ids_ptr,        # [T] int32
        # --- sizes
        T, B, search_steps,
        # --- meta
        BLOCK: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_t = rows < T
        p, start = _find_sequence(cu_seqlens_ptr, rows, B, search_steps)
        pos = rows - start
        tl.store(position_ids_ptr + rows, pos.to(tl.int64), mask=in_t)
        tl.store(seq_ids_ptr + rows, p, mask=in_t)


# ============================================================================================
# Launchers: check, allocate, launch
# ============================================================================================
def _column_block(H: int, max_block: int) -> int:
    """BLOCK_H for rows of H elements, at most max_block (a power of two). For an H that is no
    power of two the block shrinks until at most 1/8 of its lanes fall past H (H = 1152: 256,
    not 2048 with 44% idle)."""
    block_h = min(next_power_of_2(H), max_block)
    while block_h > 64 and (-(-H // block_h) * block_h - H) * 8 > H:
        block_h //= 2
    return block_h


@functools.lru_cache(maxsize=256)
def _tile_config(H: int, element_size: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps) of the pack kernel: up to 4 KiB of a row per program
    column and about 16 KiB per program, enough bytes in flight per SM to reach copy
    bandwidth without a register-heavy tile. bench_varlen.py sweeps alternatives."""
    block_h = _column_block(H, max(1, 4096 // element_size))
    block_r = max(1, min(64, 16384 // (block_h * element_size)))
    return block_r, block_h, 4


@functools.lru_cache(maxsize=256)
def _unpack_tile_config(H: int, element_size: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps) of the unpack kernel: whole rows up to 8 KiB, and two
    rows per thread. Every thread computes the metadata of every row it holds (the row
    vectors are replicated across a row's threads), and most of an unpack's bytes are zeros
    stored into the padding, so instructions per row, not bytes in flight, set its speed. On
    an H200 (bench_varlen.py's sweep) the 1024-wide bf16 unpack ran at 94.8% of copy
    bandwidth with two rows per thread and 91.6% with eight (80% while each row still had its
    own 64-bit division)."""
    vector = max(1, 16 // element_size)
    block_h = _column_block(H, max(vector, 8192 // element_size))
    num_warps = 8 if block_h * element_size >= 8192 else 4
    rows_per_pass = max(1, 32 * num_warps * vector // block_h)  # rows one pass of threads holds
    return 2 * rows_per_pass, block_h, num_warps


def _row_align(element_size: int, tensors: list[torch.Tensor], *strides: int) -> int:
    """Largest power of two (elements, at most one 16-byte vector) dividing every row stride
    and the base address of every tensor: what the kernels may promise Triton with
    tl.multiple_of (the pack promises it of whole row addresses)."""
    align = max(1, 16 // element_size)
    for value in [*strides, *(t.data_ptr() // element_size for t in tensors)]:
        while align > 1 and value % align:
            align //= 2
    return align


def _search_steps(B: int) -> int:
    return max(B - 1, 0).bit_length()


# The pack kernel finds each row's sequence by comparing it with every start at once when B is
# at most this (one load round trip; B compares per row), by binary search beyond (log2(B)
# dependent loads). 0 always searches. On an H200 (bench_varlen.py's search sweep) comparing
# was faster at B = 64 (text64: 94.0% of copy bandwidth against 93.3%) and B = 128 (mm3:
# 94.6% against 93.6%), slower at B = 256 (mixed256: 79.9% against 90.9%).
ALL_STARTS_MAX_B = 128
# ... and when a program's compares (BLOCK_R x B's bucket) stay within this: 64 per thread at
# 4 warps. Beyond it the compare tile costs registers (64 rows of H = 128 against B = 512
# spilled on sm_90).
_ALL_STARTS_BUDGET = 8192


def _all_starts(B: int, block_r: int) -> int:
    """The pack kernel's ALL_STARTS: B's power-of-two bucket (a few compiled variants), or 0
    for the binary search."""
    bucket = max(16, next_power_of_2(B))
    if 0 < B <= ALL_STARTS_MAX_B and bucket * block_r <= _ALL_STARTS_BUDGET:
        return bucket
    return 0


def _segments(S: int, B: int, block_r: int, in_sample_order: bool) -> int:
    """The pack kernel's SEGMENTS: S's power of two when several streams in sample order are
    searched by (sequence, stream) start, within the budget of compares; else 0."""
    if S < 2 or not in_sample_order:
        return 0
    segments = next_power_of_2(S)
    return segments if _all_starts(B, block_r * segments) else 0  # S x the compares


def _use_triton(*tensors: torch.Tensor) -> bool:
    return triton is not None and triton_runs_on(*tensors)


def _launch_plan(lengths: list[torch.Tensor], group_ids: Optional[torch.Tensor],
                 num_groups: int, max_lens: list[int]):
    S, B = len(lengths), lengths[0].shape[0]
    device = lengths[0].device
    lens_SB = torch.empty(S, B, dtype=torch.int32, device=device)
    seqlen_B = torch.empty(B, dtype=torch.int32, device=device)
    cu_seqlens = torch.empty(B + 1, dtype=torch.int32, device=device)
    order = torch.empty(B, dtype=torch.int64, device=device)
    group_offsets = torch.empty(num_groups, dtype=torch.int32, device=device)
    stats = torch.empty(4, dtype=torch.int64, device=device)
    grouped = num_groups > 0
    direct_launch.launch(
        _varlen_plan_kernel, (1,),
        (tuple(lengths), group_ids if grouped else cu_seqlens,
         lens_SB, seqlen_B, cu_seqlens, order, group_offsets, stats,
         tuple(max_lens), B, num_groups),
        direct_launch.named_tail(_varlen_plan_kernel, S=S, GROUPED=grouped,
                                 BLOCK_B=min(max(next_power_of_2(B), 16), 1024)),
        (("num_warps", 4),),
    )
    return lens_SB, cu_seqlens, order, group_offsets, stats


def _launch_pack(streams: list[torch.Tensor], lens_SB: Optional[torch.Tensor],
                 cu_seqlens: torch.Tensor, order: Optional[torch.Tensor], total: int):
    x0 = streams[0]
    B, H = x0.shape[0], x0.shape[2]
    device = x0.device
    values = torch.empty(total, H, dtype=x0.dtype, device=device)
    position_ids = torch.empty(total, dtype=torch.int64, device=device)
    seq_ids = torch.empty(total, dtype=torch.int32, device=device)
    modality_ids = torch.empty(total, dtype=torch.int32, device=device)
    if total == 0:
        return values, position_ids, seq_ids, modality_ids
    es = x0.element_size()
    block_r, block_h, num_warps = _tile_config(H, es)
    stride_b = tuple([x.stride(0) for x in streams])
    stride_l = tuple([x.stride(1) for x in streams])
    # H == 0 still needs one column of programs: the metadata is owed
    grid = (cdiv(total, block_r), max(1, cdiv(H, block_h)))
    # one stream reads no lengths (cu_seqlens holds them); several need lens_SB
    assert lens_SB is not None or len(streams) == 1
    segments = _segments(len(streams), B, block_r, lens_SB is not None and order is None)
    direct_launch.launch(
        _varlen_pack_kernel, grid,
        (tuple(streams), lens_SB if lens_SB is not None else cu_seqlens, cu_seqlens,
         order if order is not None else cu_seqlens,
         values, position_ids, seq_ids, modality_ids,
         total, H, B, _search_steps(B), tuple([x.shape[1] for x in streams]),
         stride_b, stride_l, H),
        direct_launch.named_tail(
            _varlen_pack_kernel, S=len(streams), HAS_ORDER=order is not None, WRITE_META=True,
            ROW_ALIGN=_row_align(es, [*streams, values], *stride_b, *stride_l, H),
            ALL_STARTS=_all_starts(B, block_r),  # B's bucket wherever SEGMENTS is set
            BLOCK_R=block_r, BLOCK_H=block_h, SEGMENTS=segments),
        (("num_warps", num_warps),),
    )
    return values, position_ids, seq_ids, modality_ids


def _launch_unpack(values: torch.Tensor, lens_SB: Optional[torch.Tensor],
                   cu_seqlens: torch.Tensor, order: Optional[torch.Tensor],
                   max_lens: list[int]) -> list[torch.Tensor]:
    T, H = values.shape
    B = cu_seqlens.shape[0] - 1
    outs = [values.new_empty(B, L, H) for L in max_lens]
    block_r, block_h, num_warps = _unpack_tile_config(H, values.element_size())
    n_blocks = sum(cdiv(B * L, block_r) for L in max_lens)
    if n_blocks == 0 or H == 0:
        return outs
    direct_launch.launch(
        _varlen_unpack_kernel, (n_blocks, cdiv(H, block_h)),
        (values, lens_SB if lens_SB is not None else cu_seqlens, cu_seqlens,
         order if order is not None else cu_seqlens, tuple(outs),
         T, H, B, tuple(max_lens), values.stride(0)),
        direct_launch.named_tail(
            _varlen_unpack_kernel, S=len(max_lens), LENS_FROM_CU=lens_SB is None,
            HAS_ORDER=order is not None,
            ROW_ALIGN=_row_align(values.element_size(), [values, *outs], values.stride(0), H),
            BLOCK_R=block_r, BLOCK_H=block_h),
        (("num_warps", num_warps),),
    )
    return outs


def _launch_token_meta(cu_seqlens: torch.Tensor, total: int):
    B = cu_seqlens.shape[0] - 1
    position_ids = torch.empty(total, dtype=torch.int64, device=cu_seqlens.device)
    seq_ids = torch.empty(total, dtype=torch.int32, device=cu_seqlens.device)
    if total > 0:
        block = 1024
        direct_launch.launch(
            _varlen_token_meta_kernel, (cdiv(total, block),),
            (cu_seqlens, position_ids, seq_ids, total, B, _search_steps(B)),
            direct_launch.named_tail(_varlen_token_meta_kernel, BLOCK=block),
            (("num_warps", 4),),
        )
    return position_ids, seq_ids


# ============================================================================================
# Dispatch (Triton or the pure-torch fallback), autograd, torch.library ops
# ============================================================================================
# The kernels index the small metadata tensors with unit stride: .contiguous() is a no-op on
# everything this module builds and one small copy on a caller's strided view.
def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _plan_impl(lengths, group_ids, num_groups, max_lens):
    lengths, group_ids = [length.contiguous() for length in lengths], _contiguous(group_ids)
    tensors = lengths + ([group_ids] if group_ids is not None else [])
    if _use_triton(*tensors):
        return _launch_plan(list(lengths), group_ids, num_groups, list(max_lens))
    return reference.varlen_plan_fallback(list(lengths), group_ids, num_groups, list(max_lens))


def _pack_impl(streams, lens_SB, cu_seqlens, order, total):
    streams = [x if x.stride(-1) == 1 else x.contiguous() for x in streams]
    lens_SB, cu_seqlens, order = _contiguous(lens_SB), cu_seqlens.contiguous(), _contiguous(order)
    if _use_triton(*streams, cu_seqlens):
        return _launch_pack(streams, lens_SB, cu_seqlens, order, total)
    return reference.varlen_pack_fallback(streams, lens_SB, cu_seqlens, order, total)


def _unpack_impl(values, lens_SB, cu_seqlens, order, max_lens):
    if values.stride(-1) != 1:
        values = values.contiguous()
    lens_SB, cu_seqlens, order = _contiguous(lens_SB), cu_seqlens.contiguous(), _contiguous(order)
    if _use_triton(values, cu_seqlens):
        return _launch_unpack(values, lens_SB, cu_seqlens, order, list(max_lens))
    return reference.varlen_unpack_fallback(values, lens_SB, cu_seqlens, order, list(max_lens))


def _token_meta_impl(cu_seqlens, total):
    cu_seqlens = cu_seqlens.contiguous()
    if _use_triton(cu_seqlens):
        return _launch_token_meta(cu_seqlens, total)
    return reference.varlen_token_meta_fallback(cu_seqlens, total)


class _PackFunction(torch.autograd.Function):
    """Eager autograd of the pack (cheaper to dispatch than the custom op below): the
    backward is an unpack of the gradient."""

    @staticmethod
    def forward(ctx, lens_SB, cu_seqlens, order, total, *streams):
        ctx.save_for_backward(lens_SB, cu_seqlens, order)
        ctx.max_lens = [x.shape[1] for x in streams]
        outs = _pack_impl(list(streams), lens_SB, cu_seqlens, order, total)
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad_values, *_grad_metadata):
        lens_SB, cu_seqlens, order = ctx.saved_tensors
        grads = _unpack(grad_values, lens_SB, cu_seqlens, order, ctx.max_lens)
        return (None, None, None, None, *grads)


class _UnpackFunction(torch.autograd.Function):
    """Eager autograd of the unpack: the backward is a pack of the gradients."""

    @staticmethod
    def forward(ctx, values, lens_SB, cu_seqlens, order, max_lens):
        ctx.save_for_backward(lens_SB, cu_seqlens, order)
        ctx.total = values.shape[0]
        return tuple(_unpack_impl(values, lens_SB, cu_seqlens, order, max_lens))

    @staticmethod
    def backward(ctx, *grads):
        lens_SB, cu_seqlens, order = ctx.saved_tensors
        grad_values = _pack(list(grads), lens_SB, cu_seqlens, order, ctx.total)[0]
        return grad_values, None, None, None, None


@torch.library.custom_op("mtmm::varlen_plan", mutates_args=())
def _plan_op(lengths: list[torch.Tensor], group_ids: Optional[torch.Tensor], num_groups: int,
             max_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor, torch.Tensor]:
    """(lens_SB int32 [S, B], cu_seqlens int32 [B+1], order int64 [B], group_offsets int32 [G],
    stats int64 [4] = T, max_seqlen, #lengths out of [0, L_s], #group ids out of [0, G))."""
    return _plan_impl(lengths, group_ids, num_groups, max_lens)


@_plan_op.register_fake
def _(lengths, group_ids, num_groups, max_lens):
    S, B = len(lengths), lengths[0].shape[0]
    new = lengths[0].new_empty
    return (new(S, B, dtype=torch.int32), new(B + 1, dtype=torch.int32),
            new(B, dtype=torch.int64), new(num_groups, dtype=torch.int32),
            new(4, dtype=torch.int64))


@torch.library.custom_op("mtmm::varlen_pack", mutates_args=())
def _pack_op(streams: list[torch.Tensor], lens_SB: Optional[torch.Tensor],
             cu_seqlens: torch.Tensor, order: Optional[torch.Tensor],
             total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the valid rows of the padded streams into [total, H]: (values, position_ids,
    seq_ids, modality_ids). lens_SB None means one stream whose lengths are cu_seqlens'
    differences."""
    return _pack_impl(streams, lens_SB, cu_seqlens, order, total)


@_pack_op.register_fake
def _(streams, lens_SB, cu_seqlens, order, total):
    x0 = streams[0]
    return (x0.new_empty(total, x0.shape[2]), x0.new_empty(total, dtype=torch.int64),
            x0.new_empty(total, dtype=torch.int32), x0.new_empty(total, dtype=torch.int32))


@torch.library.custom_op("mtmm::varlen_unpack", mutates_args=())
def _unpack_op(values: torch.Tensor, lens_SB: Optional[torch.Tensor], cu_seqlens: torch.Tensor,
               order: Optional[torch.Tensor], max_lens: list[int]) -> list[torch.Tensor]:
    """Scatter packed rows into S zero-padded streams [B, L_s, H] (the adjoint of _pack_op)."""
    return _unpack_impl(values, lens_SB, cu_seqlens, order, max_lens)


@_unpack_op.register_fake
def _(values, lens_SB, cu_seqlens, order, max_lens):
    B = cu_seqlens.shape[0] - 1
    return [values.new_empty(B, L, values.shape[1]) for L in max_lens]


@torch.library.custom_op("mtmm::varlen_token_meta", mutates_args=())
def _token_meta_op(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids int64 [total], seq_ids int32 [total]) of a packed buffer."""
    return _token_meta_impl(cu_seqlens, total)


@_token_meta_op.register_fake
def _(cu_seqlens, total):
    return (cu_seqlens.new_empty(total, dtype=torch.int64),
            cu_seqlens.new_empty(total, dtype=torch.int32))


def _pack_setup_context(ctx, inputs, output):
    streams, lens_SB, cu_seqlens, order, _total = inputs
    ctx.save_for_backward(lens_SB, cu_seqlens, order)
    ctx.max_lens = [x.shape[1] for x in streams]


def _pack_backward(ctx, grad_values, *_grad_metadata):
    lens_SB, cu_seqlens, order = ctx.saved_tensors
    grads = _unpack_op(grad_values, lens_SB, cu_seqlens, order, ctx.max_lens)
    return list(grads), None, None, None, None


def _unpack_setup_context(ctx, inputs, output):
    values, lens_SB, cu_seqlens, order, _max_lens = inputs
    ctx.save_for_backward(lens_SB, cu_seqlens, order)
    ctx.total = values.shape[0]


def _unpack_backward(ctx, grads):
    lens_SB, cu_seqlens, order = ctx.saved_tensors
    grad_values = _pack_op(list(grads), lens_SB, cu_seqlens, order, ctx.total)[0]
    return grad_values, None, None, None, None


_pack_op.register_autograd(_pack_backward, setup_context=_pack_setup_context)
_unpack_op.register_autograd(_unpack_backward, setup_context=_unpack_setup_context)


# Eager calls take the autograd.Functions (a few microseconds to dispatch) where a gradient is
# wanted, else the kernels directly; torch.compile traces the custom ops, whose fake
# implementations give it the output shapes, and so do dispatch modes and meta tensors.
def _plan(lengths, group_ids, num_groups, max_lens):
    if through_dispatcher(lengths[0]):
        return _plan_op(lengths, group_ids, num_groups, max_lens)
    return _plan_impl(lengths, group_ids, num_groups, max_lens)


def _pack(streams, lens_SB, cu_seqlens, order, total):
    if through_dispatcher(streams[0]):
        return _pack_op(streams, lens_SB, cu_seqlens, order, total)
    if wants_grad(*streams):
        return _PackFunction.apply(lens_SB, cu_seqlens, order, total, *streams)
    return _pack_impl(streams, lens_SB, cu_seqlens, order, total)


def _unpack(values, lens_SB, cu_seqlens, order, max_lens):
    if through_dispatcher(values):
        return _unpack_op(values, lens_SB, cu_seqlens, order, max_lens)
    if wants_grad(values):
        return _UnpackFunction.apply(values, lens_SB, cu_seqlens, order, list(max_lens))
    return _unpack_impl(values, lens_SB, cu_seqlens, order, list(max_lens))


def _token_meta(cu_seqlens, total):
    if through_dispatcher(cu_seqlens):
        return _token_meta_op(cu_seqlens, total)
    return _token_meta_impl(cu_seqlens, total)


# ============================================================================================
# Public API
# ============================================================================================
@dataclasses.dataclass
class PackedBatch:
    """A packed ragged batch.

    values:        [T, H] the real rows of every sequence, back to back.
    cu_seqlens:    int32 [B + 1], leading 0: sequence p is values[cu_seqlens[p]:cu_seqlens[p+1]]
                   (FlashAttention's varlen convention).
    max_seqlen:    Python int, the longest sequence (an upper bound when the caller gave
                   ``total`` without ``max_seqlen``).
    position_ids:  int64 [T], restarting at 0 in each sequence (HuggingFace's convention).
    seq_ids:       int32 [T], the packed sequence each token belongs to.
    modality_ids:  int32 [T], the stream each token came from (pack_multimodal only).
    group_offsets: int32 [G], cumulative END token offset of each group (calls with group_ids),
                   the ``offs`` of a grouped GEMM over the packed rows.
    order:         int64 [B], the input sample of each packed sequence (calls with group_ids).
    """

    values: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    position_ids: torch.Tensor
    seq_ids: torch.Tensor
    modality_ids: Optional[torch.Tensor] = None
    group_offsets: Optional[torch.Tensor] = None
    order: Optional[torch.Tensor] = None


def _as_index_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be an int32 or int64 tensor, got {value.dtype}")
        return value
    if isinstance(value, Sequence) and all(isinstance(v, int) for v in value):
        return torch.tensor(list(value), dtype=torch.int64)
    raise TypeError(f"{name} must be an int32/int64 tensor or a list of ints, "
                    f"got {type(value).__name__}")


def _check_values(x, name: str, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in _VALUE_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {x.dtype}")


def _check_alike(xs, name: str, h_dim: int) -> None:
    """Every tensor of the list has the first one's H (dimension ``h_dim``), dtype and device."""
    H, dtype, device = xs[0].shape[h_dim], xs[0].dtype, xs[0].device
    distributed = dtensor_mesh(xs[0]) is not None
    for i, x in enumerate(xs[1:], 1):
        if (dtensor_mesh(x) is not None) != distributed:
            raise ValueError(f"{name}[{i}] is {'not ' if distributed else ''}a DTensor, "
                             f"{name}[0] is {'' if distributed else 'not '}one")
        if x.shape[h_dim] != H:
            raise ValueError(f"{name}[{i}] has H={x.shape[h_dim]}, {name}[0] has H={H}")
        if x.dtype != dtype or x.device != device:
            raise ValueError(f"{name}[{i}] is {x.dtype} on {x.device}, "
                             f"{name}[0] is {dtype} on {device}")


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor to the device without a sync: staged through pinned memory."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _host_plan(lens_SB: np.ndarray, seq: np.ndarray, group_ids: Optional[np.ndarray],
               num_groups: int, device: torch.device):
    """The plan kernel's outputs from validated host lengths and group ids, reaching the device
    in one copy: (lens_SB int32 [S, B], cu_seqlens int32 [B + 1], order int64 [B],
    group_offsets int32 [G]), views of one int32 buffer (order first, as pairs of words, so
    that its int64 view is aligned). Only what the kernels read is built: one stream takes its
    lengths from cu_seqlens (lens_SB None), and an ungrouped pack has no order or offsets
    (None). ``seq`` [B] is each sample's total length (the caller's sum over the streams)."""
    S, B = lens_SB.shape
    grouped = group_ids is not None
    n_order, n_lens, G = (2 * B if grouped else 0), (S * B if S > 1 else 0), num_groups
    buf = np.empty(n_order + n_lens + B + 1 + (G if grouped else 0), dtype=np.int32)
    cu = buf[n_order + n_lens:n_order + n_lens + B + 1]
    cu[0] = 0
    if grouped:
        order = np.argsort(group_ids, kind="stable")
        buf[:n_order].view(np.int64)[:] = order
        np.cumsum(seq[order], out=cu[1:])
        np.cumsum(np.bincount(group_ids, weights=seq, minlength=G), out=buf[-G:])
    else:
        np.cumsum(seq, out=cu[1:])
    if n_lens:
        buf[n_order:n_order + n_lens] = lens_SB.ravel()
    dev = _to_device(torch.from_numpy(buf), device)
    lens = dev[n_order:n_order + n_lens].view(S, B) if n_lens else None
    cu_t = dev[n_order + n_lens:n_order + n_lens + B + 1]
    if not grouped:
        return lens, cu_t, None, None
    return lens, cu_t, dev[:n_order].view(torch.int64), dev[n_order + n_lens + B + 1:]


def _check_int(value, name: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def pack_multimodal(streams: Sequence[torch.Tensor], lengths: Sequence, group_ids=None,
                    num_groups: Optional[int] = None, *, total: Optional[int] = None,
                    max_seqlen: Optional[int] = None) -> PackedBatch:
    """Pack S padded modality streams into one ragged batch.

    Packed sequence b is x_0[b, :len_0[b]], x_1[b, :len_1[b]], ... in stream order (with
    group_ids: sequences stably sorted by group). Differentiable in the streams; the backward
    is an unpack of the gradient by the same kernels.

    Args:
        streams: S tensors x_s [B, L_s, H], same B, H, dtype (fp16/bf16/fp32/fp64 or integer)
            and device. Inside ``torch.autocast`` floating streams of mixed dtypes are packed
            in the widest of them, as ``torch.cat`` promotes there.
        lengths: S int32/int64 tensors [B] (or lists of ints), 0 <= len_s[b] <= L_s; on the
            CPU (no sync) or on the streams' device.
        group_ids: optional int32/int64 [B], the task of each sample, in [0, num_groups).
        num_groups: G; when None it is max(group_ids) + 1 (a sync if group_ids is on the GPU).
        total: T when the caller knows it: with lengths on the GPU this removes the only sync
            (and the device-side value checks, see the module docstring).
        max_seqlen: the longest sequence when the caller knows it (used with ``total``).

    Returns:
        PackedBatch with values [T, H], cu_seqlens, max_seqlen, position_ids, seq_ids,
        modality_ids and, with group_ids, group_offsets and order.
    """
    return _pack_streams(streams, lengths, group_ids, num_groups, total, max_seqlen,
                         names=("streams", "lengths"), multimodal=True)


def pack_padded(x: torch.Tensor, lengths, group_ids=None, num_groups: Optional[int] = None, *,
                total: Optional[int] = None, max_seqlen: Optional[int] = None) -> PackedBatch:
    """Pack a padded batch x [B, L, H] with lengths [B] (int32/int64 tensor or list of ints,
    CPU or device) into a PackedBatch; rows past each length are dropped.

    With group_ids (int32/int64 [B], values in [0, num_groups)) the sequences are stably sorted
    by group and group_offsets and order are filled. ``total`` and ``max_seqlen`` as in
    pack_multimodal. Differentiable in x.
    """
    _check_values(x, "x", 3)
    batch = _pack_streams([x], [lengths], group_ids, num_groups, total, max_seqlen,
                          names=("x", "lengths"), multimodal=False)
    return batch


def _pack_streams(streams, lengths, group_ids, num_groups, total, max_seqlen, *, names,
                  multimodal: bool) -> PackedBatch:
    x_name, len_name = names
    if not isinstance(streams, Sequence) or len(streams) == 0:
        raise ValueError(f"{x_name} must be a non-empty list of [B, L, H] tensors")
    if not isinstance(lengths, Sequence) or len(lengths) != len(streams):
        raise ValueError(f"{len_name} must be a list of {len(streams)} tensors (one per stream), "
                         f"got {type(lengths).__name__} of length "
                         f"{len(lengths) if isinstance(lengths, Sequence) else '?'}")
    streams = list(streams)
    for s, x in enumerate(streams):
        _check_values(x, f"{x_name}[{s}]" if multimodal else x_name, 3)
    B, device = streams[0].shape[0], streams[0].device
    for s, x in enumerate(streams[1:], 1):
        if x.shape[0] != B:
            raise ValueError(f"{x_name}[{s}] has batch size {x.shape[0]}, {x_name}[0] has {B}")
    if multimodal:  # inside autocast, as torch.cat: mixed floating dtypes in the widest
        streams = autocast.promote_like_cat(streams)
    _check_alike(streams, x_name, 2)
    max_lens = [x.shape[1] for x in streams]
    lens = []
    for s, length in enumerate(lengths):
        name = f"{len_name}[{s}]" if multimodal else len_name
        length = _as_index_tensor(length, name)
        if length.shape != (B,):
            raise ValueError(f"{name} must have shape ({B},), got {tuple(length.shape)}")
        if length.device.type != "cpu" and length.device != device:
            raise ValueError(f"{name} is on {length.device}, the values on {device}")
        lens.append(length)
    grouped = group_ids is not None
    if grouped:
        group_ids = _as_index_tensor(group_ids, "group_ids")
        if group_ids.shape != (B,):
            raise ValueError(f"group_ids must have shape ({B},), got {tuple(group_ids.shape)}")
        if group_ids.device.type != "cpu" and group_ids.device != device:
            raise ValueError(f"group_ids is on {group_ids.device}, the values on {device}")
        if num_groups is None:
            if not has_values(group_ids):
                raise ValueError("num_groups must be given where group_ids have no values "
                                 "(meta or fake tensors)")
            num_groups = int(group_ids.max()) + 1 if B else 1  # a sync on the GPU
        _check_int(num_groups, "num_groups", 1)
    elif num_groups is not None:
        raise ValueError("num_groups is given without group_ids")
    if total is not None:
        _check_int(total, "total")
    if max_seqlen is not None:
        _check_int(max_seqlen, "max_seqlen")

    # --- host-side checks and sizes when the lengths are on the CPU: no sync
    # Under torch.compile the value checks would be graph breaks: tracing takes the device path,
    # as do lengths without values (meta, fake).
    host = all(holds_values(length) for length in lens) and not _FORCE_DEVICE_PLAN
    if host:
        # numpy: a few microseconds for what torch CPU ops take tens
        if len(lens) == 1:
            a = lens[0].numpy().astype(np.int64, copy=False)[None]
        else:
            a = np.stack([length.numpy() for length in lens]).astype(np.int64, copy=False)
        if B and (a.min() < 0 or (a.max(axis=1) > max_lens).any()):
            bad = (a < 0) | (a > np.asarray(max_lens)[:, None])
            s, b = (int(i[0]) for i in np.nonzero(bad))
            name = f"{len_name}[{s}]" if multimodal else len_name
            raise ValueError(f"{name}[{b}] = {int(a[s, b])} is outside [0, {max_lens[s]}]")
        seq = a.sum(0)
        host_total = int(seq.sum())
        if total is not None and total != host_total:
            raise ValueError(f"total={total} but the lengths sum to {host_total}")
        total = host_total
        if max_seqlen is None:
            max_seqlen = int(seq.max()) if B else 0
    host_groups = grouped and holds_values(group_ids) and not _FORCE_DEVICE_PLAN
    if host_groups:
        gids = group_ids.numpy()
        bad = (gids < 0) | (gids >= num_groups)
        if bad.any():
            b = int(np.flatnonzero(bad)[0])
            raise ValueError(f"group_ids[{b}] = {int(gids[b])} is outside "
                             f"[0, num_groups={num_groups})")
    if total is not None and total >= 2**31:
        raise ValueError(f"total={total} rows do not fit int32 cu_seqlens")

    if host and (host_groups or not grouped):
        # Everything the plan kernel would compute is a few numpy ops on B numbers here: no
        # plan launch, and one host-to-device copy for all of it.
        lens_SB, cu_seqlens, order, group_offsets = _host_plan(
            a, seq, gids if grouped else None, num_groups or 0, device)
    else:
        if host:
            lens = list(_to_device(torch.from_numpy(a), device).unbind(0))  # one copy for all
        if grouped:
            group_ids = _to_device(group_ids, device)
        lens_SB, cu_seqlens, order, group_offsets, stats = _plan(
            [_to_device(length, device) for length in lens], group_ids if grouped else None,
            num_groups if grouped else 0, max_lens)
    if total is None:  # lengths on the device: the one sync, which also validates
        if not all(has_values(length) for length in lens):
            raise ValueError(f"total must be given where {len_name} have no values (meta or "
                             "fake tensors): the packed row count depends on them")
        T, longest, bad_len, bad_gid = stats.tolist()
        if bad_len:
            raise ValueError(f"{len_name}: {bad_len} length(s) outside [0, L_s] "
                             f"(L_s = {max_lens})")
        if bad_gid:
            raise ValueError(f"group_ids: {bad_gid} id(s) outside [0, num_groups={num_groups})")
        if T >= 2**31:
            raise ValueError(f"total={T} rows do not fit int32 cu_seqlens")
        total = T
        if max_seqlen is None:
            max_seqlen = longest
    if max_seqlen is None:
        max_seqlen = sum(max_lens)
    index = (lens_SB, cu_seqlens, order if grouped else None)
    distributed = dtensor_mesh(streams[0]) is not None  # all streams are DTensors, or none
    if distributed:  # tensor parallelism: the plan, the same on every rank, replicated
        index = tuple(index_on_mesh(t, streams[0]) for t in index)
    values, position_ids, seq_ids, modality_ids = _pack(streams, *index, total)
    if distributed:  # the token metadata stays plain, as cu_seqlens is
        position_ids, seq_ids, modality_ids = (
            t.to_local() for t in (position_ids, seq_ids, modality_ids))
    return PackedBatch(
        values=values, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_ids=position_ids,
        seq_ids=seq_ids, modality_ids=modality_ids if multimodal else None,
        group_offsets=group_offsets if grouped else None, order=order if grouped else None,
    )


def pack(seqs: Sequence[torch.Tensor]) -> PackedBatch:
    """Pack a list of sequences [L_i, H] (L_i may be 0; same H, dtype, device) into a
    PackedBatch.

    The values are ``torch.cat(seqs)``: with separate source tensors a concatenation is the
    pack, and its backward (slices of the gradient) moves no data. cu_seqlens comes from the
    host-known shapes (no sync); position_ids and seq_ids are written by one kernel.
    """
    if not isinstance(seqs, Sequence) or len(seqs) == 0:
        raise ValueError("seqs must be a non-empty list of [L_i, H] tensors")
    for i, x in enumerate(seqs):
        _check_values(x, f"seqs[{i}]", 2)
    _check_alike(seqs, "seqs", 1)
    device = seqs[0].device
    sizes = [x.shape[0] for x in seqs]
    cu = [0]
    for n in sizes:
        cu.append(cu[-1] + n)
    if cu[-1] >= 2**31:
        raise ValueError(f"seqs hold {cu[-1]} rows, more than int32 cu_seqlens can index")
    cu_seqlens = _to_device(torch.tensor(cu, dtype=torch.int32), device)
    values = torch.cat(list(seqs))
    position_ids, seq_ids = _token_meta(cu_seqlens, cu[-1])
    return PackedBatch(values=values, cu_seqlens=cu_seqlens, max_seqlen=max(sizes),
                       position_ids=position_ids, seq_ids=seq_ids)


def _check_cu_seqlens(cu_seqlens, T: int, name: str = "cu_seqlens") -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (FlashAttention's convention), "
                        f"got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of length B + 1 >= 1, got shape "
                         f"{tuple(cu_seqlens.shape)}")


def _check_cu_values(cu_seqlens: torch.Tensor, T: int, max_seqlen: Optional[int]) -> None:
    """Reads the values (one sync on the GPU)."""
    cu = cu_seqlens.to(torch.int64).cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    diffs = cu[1:] - cu[:-1]
    if bool((diffs < 0).any()):
        p = int((diffs < 0).nonzero()[0, 0])
        raise ValueError(f"cu_seqlens must be non-decreasing: cu_seqlens[{p + 1}] = "
                         f"{int(cu[p + 1])} < cu_seqlens[{p}] = {int(cu[p])}")
    if int(cu[-1]) != T:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but values has {T} rows")
    if max_seqlen is not None and diffs.numel() and int(diffs.max()) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence "
                         f"({int(diffs.max())})")


def unpack(values: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
           validate: bool = True) -> torch.Tensor:
    """Scatter packed rows back to a padded batch.

    Args:
        values: [T, H] packed rows (fp16/bf16/fp32/fp64 or integer).
        cu_seqlens: int32 [B + 1], 0 = cu_seqlens[0] <= ... <= cu_seqlens[B] = T, on values'
            device.
        max_seqlen: L of the output, at least the longest sequence.
        validate: check the cu_seqlens values (one sync on the GPU); with False, bad values give
            an unspecified (but memory-safe) result.

    Returns:
        [B, max_seqlen, H]: sequence b in row b, zeros after its end. Differentiable in values;
        the backward is a pack of the gradient.
    """
    _check_values(values, "values", 2)
    _check_cu_seqlens(cu_seqlens, values.shape[0])
    _check_int(max_seqlen, "max_seqlen")
    if cu_seqlens.device != values.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, values on {values.device}")
    if validate and not torch.compiler.is_compiling() and has_values(cu_seqlens):
        _check_cu_values(cu_seqlens, values.shape[0], max_seqlen)
    return _unpack(values, None, index_on_mesh(cu_seqlens, values), None, [max_seqlen])[0]


def unpack_multimodal(packed: PackedBatch, lengths: Sequence, max_lens: Sequence[int], *,
                      validate: bool = True) -> list[torch.Tensor]:
    """The inverse of pack_multimodal: S padded streams from a packed batch.

    Args:
        packed: a PackedBatch (its values [T, H], cu_seqlens and, if grouped, order are used).
        lengths: S int32/int64 tensors [B] (or lists of ints), the per-stream lengths it was
            packed with; CPU or values' device.
        max_lens: S ints, L_s of each output, len_s[b] <= L_s.
        validate: check the lengths against max_lens and cu_seqlens and that order is a
            permutation (one sync on the GPU); with False, bad values give an unspecified (but
            memory-safe) result.

    Returns:
        S tensors [B, L_s, H] indexed by input sample, zeros in the padding. Differentiable in
        packed.values; the backward is a pack of the gradients.
    """
    if not isinstance(packed, PackedBatch):
        raise TypeError(f"packed must be a PackedBatch, got {type(packed).__name__}")
    values, cu_seqlens, order = packed.values, packed.cu_seqlens, packed.order
    _check_values(values, "packed.values", 2)
    _check_cu_seqlens(cu_seqlens, values.shape[0], "packed.cu_seqlens")
    B = cu_seqlens.shape[0] - 1
    if not isinstance(max_lens, Sequence) or len(max_lens) == 0:
        raise ValueError("max_lens must be a non-empty list of ints")
    max_lens = [_check_int(L, f"max_lens[{s}]") for s, L in enumerate(max_lens)]
    if not isinstance(lengths, Sequence) or len(lengths) != len(max_lens):
        raise ValueError(f"lengths must be a list of {len(max_lens)} tensors (one per max_lens)")
    lens = []
    for s, length in enumerate(lengths):
        length = _as_index_tensor(length, f"lengths[{s}]")
        if length.shape != (B,):
            raise ValueError(f"lengths[{s}] must have shape ({B},) (B from packed.cu_seqlens), "
                             f"got {tuple(length.shape)}")
        lens.append(length)
    if order is not None and (order.dtype != torch.int64 or order.shape != (B,)):
        raise ValueError(f"packed.order must be int64 [{B}], got {order.dtype} "
                         f"{tuple(order.shape)}")
    device = values.device
    host = None  # the lengths as given, int64 on the CPU, when that costs no sync
    if all(n.device.type == "cpu" and has_values(n) for n in lens):  # one copy for all
        a = np.stack([length.numpy() for length in lens])
        host = torch.from_numpy(a.astype(np.int64, copy=False))
        lens_SB = _to_device(torch.from_numpy(a.astype(np.int32)), device)
    else:
        lens_SB = torch.stack([_to_device(length, device).to(torch.int32) for length in lens])
    if (validate and not torch.compiler.is_compiling() and has_values(cu_seqlens)
            and all(has_values(length) for length in lens)):
        _check_cu_values(cu_seqlens, values.shape[0], None)
        if host is None:
            host = lens_SB.to(torch.int64).cpu()
        for s, L in enumerate(max_lens):
            bad = (host[s] < 0) | (host[s] > L)
            if bool(bad.any()):
                b = int(bad.nonzero()[0, 0])
                raise ValueError(f"lengths[{s}][{b}] = {int(host[s, b])} is outside [0, {L}]")
        perm = torch.arange(B) if order is None else order.cpu()
        if order is not None and not torch.equal(torch.sort(perm).values, torch.arange(B)):
            raise ValueError("packed.order is not a permutation of range(B)")
        cu = cu_seqlens.to(torch.int64).cpu()
        if not torch.equal(host.sum(0)[perm], cu[1:] - cu[:-1]):
            raise ValueError("lengths do not add up to the sequence lengths in "
                             "packed.cu_seqlens")
    index = (lens_SB, cu_seqlens, order)
    if dtensor_mesh(values) is not None:  # tensor parallelism: the plan replicated, as in a pack
        index = tuple(index_on_mesh(t, values) for t in index)
    return list(_unpack(values, *index, max_lens))
