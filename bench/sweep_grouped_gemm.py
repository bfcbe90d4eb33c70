"""Configuration sweep of the grouped GEMM kernels: which tile shapes, pipeline depths and
persistence settings are fastest on this GPU, case by case.

Every candidate is launched directly (``kernel[grid](**args, **meta, num_warps=, num_stages=)``),
bypassing the autotuner, on the cases of ``bench_grouped_gemm.CASES``, next to reference points
measured in the same process: ``torch._grouped_mm`` (forward, dX and dW), one dense GEMM of the
same FLOPs, and this package's public ops (autotuned over their built-in config lists).

    python bench/sweep_grouped_gemm.py OUT.json [--max-seconds S] [--cases a,b] [--kernels dw]
    python bench/sweep_grouped_gemm.py OUT.json --cpu-smoke   # no GPU: interpreter, tiny shapes

Kernels (the ``kernel`` field of a row):
- ``fwd``: ``_grouped_mm_kernel`` on y = x @ w[g], w seen as [G, K, N] over [G, N, K] storage.
- ``dx``: the same kernel on dX = dy @ w[g]^T: the weight's contiguous dimension is the other
  one, so its best config may differ.
- ``dw``: ``_grouped_mm_dw_kernel``, dW[g] = x_g^T dy_g (ragged reduction over group rows).
- references: ``torch_grouped_mm``, ``torch_grouped_mm_dx``, ``torch_grouped_mm_dw``, ``dense``,
  ``dense_dw``, ``mtmm_api``, ``mtmm_api_dx``, ``mtmm_api_dw``.
- whole backwards (dX and dW, twice one GEMM's FLOPs): ``torch_grouped_mm_bwd``,
  ``mtmm_api_bwd`` (one stream, as the op runs them) and, on a GPU, ``mtmm_api_bwd_dw_side`` /
  ``mtmm_api_bwd_dx_side`` (that kernel on a second stream, launched first): what overlapping
  the two kernels would gain.

Timing columns of a row:
- ``ms``: ``triton.testing.do_bench`` median; it flushes L2 before every call, and that flush
  also queues enough GPU work to hide the host's launch cost, so ``ms`` is device time.
- ``loop_ms``: CUDA events around back-to-back calls with no flush (the way
  ``bench_grouped_gemm`` times): max(device time, host time) per call.
- ``host_ms``: host time to issue one call. Where it is near ``loop_ms`` the caller, not the
  kernel, is the bottleneck.

Every config is checked against an fp32 loop reference (``max_rel_err`` = max |error| / max
|reference|); a config that fails to compile or launch (``OutOfResources`` and the like) is
recorded with its error and skipped. The JSON ({"header": {...}, "rows": [...]}) is rewritten
after every case, and no new measurement starts once ``--max-seconds`` have passed since start.

Compiling is most of the cost (about 100 distinct kernels on Hopper, seconds each): before timing
anything, ``--compile-procs`` child processes (default: one per core, at most 16) compile all
of them into Triton's on-disk cache, for at most half the budget; the sweep then only loads.
"""

from __future__ import annotations

import os
import sys

# The interpreter must be chosen before triton is imported (here or by mtmm_kernels).
if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import datetime
import functools
import inspect
import json
import math
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

# runnable without an install: the repository root and bench/ (for bench_grouped_gemm)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_grouped_gemm import CASES

from mtmm_kernels import grouped_gemm as gg
from mtmm_kernels import reference

ROOT = Path(__file__).resolve().parent.parent
START = time.monotonic()
HAS_CUDA = torch.cuda.is_available()
# The forward kernel's parameters: the script follows grouped_gemm.py as it grows (TMA, ...).
MM_PARAMS = set(inspect.signature(gg._grouped_mm_kernel.fn).parameters)
DW_PARAMS = set(inspect.signature(gg._grouped_mm_dw_kernel.fn).parameters)
# PROGS_PER_SM is only read by the grid: with this many programs per SM the grid is one program
# per tile for every case here (the largest has ~34k tiles; 132 SMs x 1024 = 135k programs).
NON_PERSISTENT = 1024

# --- candidates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cand:
    """One launch configuration; ``meta`` holds the kernel's constexpr tile parameters."""

    meta: tuple  # sorted (name, value) pairs
    num_warps: int
    num_stages: int

    def as_dict(self) -> dict:
        return {**dict(self.meta), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def label(self) -> str:
        m = dict(self.meta)
        w, s = self.num_warps, self.num_stages
        if "GROUP_M" in m:  # forward / dX kernel
            p = m["PROGS_PER_SM"]
            persist = "np" if p >= NON_PERSISTENT else f"p{p}"
            load = " tma" if m.get("TMA") else ""
            flat = " flat" if m.get("FLATTEN") else ""
            flat += " tma-store" if m.get("TMA_STORE") else ""
            flat += " ws" if m.get("WS") else ""  # warp specialized
            return (f"{m['BLOCK_M']}x{m['BLOCK_N']}x{m['BLOCK_K']}{load}{flat} gm{m['GROUP_M']} "
                    f"{persist} w{w} s{s}")
        load = " tma" if m.get("TMA") else ""
        load += f" p{m['PROGS_PER_SM']}" if m.get("PROGS_PER_SM") else ""  # persistent
        load += " flat" if m.get("FLATTEN") else ""  # one loop over a program's tiles' steps
        load += " group-order" if m.get("PROGS_PER_SM") and not m.get("BALANCED") else ""
        load += " unbounded" if m.get("BOUNDED") is False else ""
        load += " tma-store" if m.get("TMA_STORE") else ""
        load += " ws" if m.get("WS") else ""
        return f"k{m['BLOCK_K']} n{m['BLOCK_N']} m{m['BLOCK_M']}{load} w{w} s{s}"  # dW kernel


def mm_cand(bm, bn, bk, group_m, progs, warps, stages, tma=False, flatten=False,
            tma_store=False, ws=False) -> Cand:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
            "PROGS_PER_SM": progs, "TMA": tma, "FLATTEN": flatten}
    if tma_store:  # only where asked: a kernel without the switch still takes the others
        meta["TMA_STORE"] = True
    if ws:  # warp specialized: warps is the consumers' and producer's base (x3 compiled)
        meta["WS"] = True
    return Cand(tuple(sorted(meta.items())), warps, stages)


def dw_cand(bk, bn, bm, warps, stages, tma=False, progs=0, flatten=False,
            balanced=True, bounded=True, tma_store=False, ws=False) -> Cand:
    meta = {"BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_M": bm, "TMA": tma}
    if ws:  # warp specialized (a program per tile)
        meta["WS"] = True
    if tma_store:  # finished tiles through dw's descriptor
        meta["TMA_STORE"] = True
    if not bounded:  # a program per tile: its descriptors over all rows (the kernel bounds them)
        meta["BOUNDED"] = False
    if progs:  # persistent: at most progs programs per SM walk the tiles
        meta["PROGS_PER_SM"] = progs
        if balanced:  # longest group first, the programs in a snake (as the autotuner's)
            meta["BALANCED"] = True
    if flatten:  # only where asked: a kernel without the switch still takes the others
        meta["FLATTEN"] = True
    return Cand(tuple(sorted(meta.items())), warps, stages)


NP = NON_PERSISTENT
TMA, PTR = True, False
# Ordered by priority: when the time budget runs out, the tail of the list is what is lost.
# TMA = x and w tiles through tensor descriptors (Hopper+, where _tma_ok allows; elsewhere
# those candidates are dropped); PTR = masked pointer loads.
TUNED_SHAPES = [  # the four shapes the autotuner tries today (_mm_configs)
    (128, 256, 64, 8, 1, 8, 3),
    (128, 128, 64, 8, 1, 4, 4),
    (64, 128, 64, 8, 2, 4, 4),
    (64, 256, 64, 8, 1, 8, 3),
]
FWD_CANDIDATES = [
    # the autotuner's shapes, with each kind of load
    *(mm_cand(*shape, tma=tma) for tma in (TMA, PTR) for shape in TUNED_SHAPES),
    # warp specialized (a producer warp group, two consumer ones), twins of the first two
    mm_cand(128, 256, 64, 8, 1, 4, 3, TMA, ws=True),
    mm_cand(128, 128, 64, 8, 1, 4, 4, TMA, ws=True),
    # the flattened pipeline: a program's next tile loads during this tile's epilogue
    *(mm_cand(*shape, tma=TMA, flatten=True)
      for shape in [*TUNED_SHAPES, (128, 128, 64, 8, 1, 8, 4)]),
    # whole tiles leave through y's descriptor (not with FLATTEN: Triton 3.6 cannot fuse the
    # loops around that branch); the ceiling cases' shapes
    *(mm_cand(*shape, tma=TMA, tma_store=True)
      for shape in [*TUNED_SHAPES[:2], (128, 128, 64, 8, 1, 8, 4)]),
    # shapes that are usually good for bf16 on Hopper (wgmma wants BLOCK_M a multiple of 64)
    mm_cand(128, 128, 64, 8, 1, 8, 4, TMA),
    mm_cand(128, 256, 64, 8, 1, 8, 4, TMA),
    mm_cand(64, 256, 64, 8, 1, 4, 4, TMA),
    mm_cand(128, 128, 128, 8, 1, 8, 3, TMA),
    mm_cand(128, 64, 64, 8, 1, 4, 4, TMA),
    mm_cand(64, 64, 64, 8, 2, 4, 4, TMA),  # many small tiles: fills the SMs on small groups
    # persistence: a persistent loop pays a pipeline fill and a drain per tile, and overlaps
    # nothing across tiles; one program per tile lets the hardware overlap CTAs instead
    mm_cand(128, 256, 64, 8, NP, 8, 3, TMA),
    mm_cand(128, 128, 64, 8, 2, 8, 4, TMA),
    mm_cand(128, 128, 64, 8, NP, 8, 4, TMA),
    mm_cand(64, 128, 64, 8, NP, 4, 4, TMA),
    mm_cand(64, 256, 64, 8, NP, 4, 4, TMA),
    mm_cand(128, 128, 128, 8, NP, 8, 3, TMA),
    # GROUP_M = 1: plain row-major tile order (the swizzle matters less when each group's
    # weight is re-read by only a few M-tiles)
    mm_cand(128, 128, 64, 1, 1, 8, 4, TMA),
    mm_cand(128, 256, 64, 1, 1, 8, 3, TMA),
    # the pointer loads on the classic shape, persistent and not
    mm_cand(128, 128, 64, 8, 1, 8, 4, PTR),
    mm_cand(128, 128, 64, 8, NP, 8, 4, PTR),
]
# dX runs the forward kernel with the weight's other dimension contiguous: the autotuner's
# configs, warp specialized and flattened, not the whole list.
DX_CANDIDATES = FWD_CANDIDATES[:15]
DW_CANDIDATES = [  # BLOCK_K (rows of dW), BLOCK_N, BLOCK_M (reduction over group rows)
    # the configs the autotuner tries today (_dw_configs): three shapes with each kind of
    # load, and the wide tile through descriptors
    *(dw_cand(*shape, tma=tma) for tma in (TMA, PTR) for shape in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
    ]),
    dw_cand(128, 256, 64, 8, 3, TMA),
    # warp specialized, a program per tile: twins of the wide tile and of the 128x128 one,
    # and the autotuner's 128x128 (one stage deeper)
    dw_cand(128, 256, 64, 4, 3, TMA, ws=True),
    dw_cand(128, 128, 64, 4, 3, TMA, ws=True),
    dw_cand(128, 128, 64, 4, 4, TMA, ws=True),
    # the flattened pointer build (the autotuner's three, then around them): one pipeline
    # across a program's tiles, for small groups' short row loops
    dw_cand(128, 128, 32, 4, 4, progs=2, flatten=True),
    dw_cand(128, 128, 64, 8, 3, progs=1, flatten=True),
    dw_cand(128, 256, 32, 8, 4, progs=1, flatten=True),
    dw_cand(128, 128, 32, 4, 4, progs=1, flatten=True),
    dw_cand(128, 128, 64, 4, 3, progs=2, flatten=True),
    dw_cand(128, 256, 64, 8, 3, progs=1, flatten=True),
    dw_cand(128, 128, 32, 8, 5, progs=1, flatten=True),
    # ... and with descriptors (full row tiles in the pipeline, the partial one by pointer
    # loads in the tile's epilogue): for large groups, whose tiles end in an exposed epilogue
    dw_cand(128, 256, 64, 8, 3, TMA, progs=1, flatten=True),
    dw_cand(128, 128, 64, 8, 3, TMA, progs=1, flatten=True),
    dw_cand(128, 128, 64, 8, 4, TMA, progs=1, flatten=True),
    dw_cand(128, 128, 32, 4, 4, TMA, progs=2, flatten=True),
    # the tile order of persistent programs: in group order (as run 5 had it), against the
    # balanced order above, side by side (in a model, on 32 log-normal groups the SMs idle
    # 14-23% of the time in group order, 1-3.5% balanced: bench/dw_order_model.py)
    dw_cand(128, 128, 32, 4, 4, progs=2, flatten=True, balanced=False),
    dw_cand(128, 128, 64, 8, 3, progs=1, flatten=True, balanced=False),
    dw_cand(128, 256, 64, 8, 3, TMA, progs=1, flatten=True, balanced=False),
    dw_cand(128, 256, 64, 8, 3, TMA, progs=1, balanced=False),
    # finished tiles through dw's descriptor (the store runs on while the program goes on),
    # for the large cases' wide tile, against the pointer stores above
    dw_cand(128, 256, 64, 8, 3, TMA, tma_store=True),
    dw_cand(128, 256, 64, 8, 3, TMA, progs=1, tma_store=True),
    dw_cand(128, 128, 64, 8, 3, TMA, tma_store=True),
    dw_cand(128, 256, 64, 8, 3, TMA, progs=1, flatten=True, tma_store=True),
    dw_cand(128, 128, 64, 8, 3, TMA, progs=1, flatten=True, tma_store=True),
    # a program per tile with descriptors over all rows and masked loads for a group's
    # partial row tile (as run 5 had it), against the descriptors bounded at the group's end
    # row above (every row tile in the pipeline)
    dw_cand(128, 128, 32, 4, 4, TMA, bounded=False),
    dw_cand(128, 256, 64, 8, 3, TMA, bounded=False),
    # the autotuner's persistent descriptor configs: descriptors built once per program
    dw_cand(128, 256, 64, 8, 3, TMA, progs=1),
    dw_cand(128, 128, 64, 8, 3, TMA, progs=1),
    dw_cand(128, 128, 32, 4, 4, TMA, progs=2),
    dw_cand(64, 128, 64, 4, 4, TMA, progs=2),
    dw_cand(128, 256, 64, 8, 4, TMA, progs=1),
    dw_cand(128, 128, 64, 8, 4, TMA),
    # around the wide descriptor tile, still 0.89-0.91x CUTLASS's dW on the large cases:
    # a deeper pipeline, the transposed shape, longer reduction steps
    dw_cand(128, 256, 64, 8, 4, TMA),
    dw_cand(256, 128, 64, 8, 3, TMA),
    dw_cand(128, 256, 128, 8, 2, TMA),
    dw_cand(128, 128, 128, 8, 3, TMA),
    # deeper pipelines and wider tiles
    dw_cand(128, 128, 64, 8, 4),
    dw_cand(128, 256, 64, 8, 3),
    dw_cand(256, 128, 64, 8, 3),
    dw_cand(128, 128, 128, 8, 3),
    dw_cand(64, 256, 64, 8, 4),
    dw_cand(128, 64, 64, 4, 4),
    dw_cand(128, 128, 32, 8, 5),
]

# The smoke run: tiny blocks so the interpreter finishes in seconds; K = 24 is not a multiple
# of 16 or 32, which exercises the masked-K (EVEN_K = False) path.
SMOKE_CASE = {"smoke_3groups_k24": ([5, 0, 9], 24, 24)}
SMOKE_FWD = [mm_cand(16, 16, 16, 1, 1, 4, 1), mm_cand(32, 32, 32, 4, NP, 4, 1),
             mm_cand(16, 16, 16, 2, 1, 4, 1, TMA), mm_cand(16, 16, 16, 2, 1, 4, 1, TMA, True),
             mm_cand(16, 16, 16, 2, 1, 4, 1, TMA, tma_store=True),
             mm_cand(16, 16, 16, 2, 1, 4, 1, TMA, ws=True)]
SMOKE_DX = [SMOKE_FWD[0], SMOKE_FWD[2]]
SMOKE_DW = [dw_cand(16, 16, 16, 4, 1), dw_cand(32, 16, 32, 4, 1), dw_cand(16, 16, 16, 4, 1, TMA),
            dw_cand(16, 16, 16, 4, 1, progs=1), dw_cand(16, 16, 16, 4, 1, TMA, progs=1),
            dw_cand(16, 16, 16, 4, 1, progs=1, flatten=True),
            dw_cand(16, 16, 16, 4, 1, TMA, progs=1, flatten=True),
            dw_cand(16, 16, 16, 4, 1, progs=1, flatten=True, balanced=False),
            dw_cand(16, 16, 16, 4, 1, TMA, bounded=False),
            dw_cand(16, 16, 16, 4, 1, TMA, tma_store=True),
            dw_cand(16, 16, 16, 4, 1, TMA, progs=1, tma_store=True),
            dw_cand(16, 16, 16, 4, 1, TMA, progs=1, flatten=True, tma_store=True),
            dw_cand(16, 16, 16, 4, 1, TMA, ws=True),
            dw_cand(16, 16, 24, 4, 1)]  # not a power of 2: must become an error row


# --- problems and launch arguments ----------------------------------------------------------


@dataclass
class Problem:
    name: str
    sizes: list
    x: torch.Tensor  # [T, K]
    w: torch.Tensor  # [G, K, N] over [G, N, K] storage
    offsets: torch.Tensor  # [G] int32 cumulative end rows
    dy: torch.Tensor  # [T, N]

    @property
    def flops(self) -> float:  # 2 T K N: the same for forward, dX and dW
        return 2.0 * self.x.shape[0] * self.x.shape[1] * self.w.shape[2]


def make_problem(name: str, sizes, K: int, N: int, dtype, device) -> Problem:
    """The tensors bench_grouped_gemm._problem builds (same layout, same scaling)."""
    G, T = len(sizes), sum(sizes)
    x = torch.randn(T, K, device=device, dtype=dtype)
    w = torch.randn(G, N, K, device=device, dtype=dtype).transpose(1, 2).mul_(K**-0.5)
    offsets = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
    dy = torch.randn(T, N, device=device, dtype=dtype)
    return Problem(name, list(sizes), x, w, offsets, dy)


def mm_args(x_TK, w_GKN, offsets_G, y_TN) -> dict:
    """_grouped_mm_kernel's arguments, built as _launch_grouped_mm builds them (no bias, no
    permutation: those pointers are never read, any tensor will do)."""
    T, K = x_TK.shape
    G = w_GKN.shape[0]
    args = dict(
        x_ptr=x_TK, w_ptr=w_GKN, bias_ptr=y_TN, y_ptr=y_TN, offsets_ptr=offsets_G,
        perm_ptr=offsets_G,
        T=T, K=K, N=w_GKN.shape[2], G=G, M_BUCKET=gg._m_bucket(T, G),
        stride_xt=x_TK.stride(0), stride_xk=x_TK.stride(1),
        stride_wg=w_GKN.stride(0), stride_wk=w_GKN.stride(1), stride_wn=w_GKN.stride(2),
        stride_bg=y_TN.stride(0), stride_bn=y_TN.stride(1),
        stride_yt=y_TN.stride(0), stride_yn=y_TN.stride(1),
        HAS_BIAS=False, GATHER=False,
        INPUT_PRECISION=gg._input_precision(x_TK.dtype), BLOCK_G=gg._block_g(G),
        **({"W_K_CONTIGUOUS": gg._w_k_contiguous(w_GKN)} if "W_K_CONTIGUOUS" in MM_PARAMS
           else {}),
    )
    if "TMA_OK" in MM_PARAMS:
        args["TMA_OK"] = gg._tma_ok(args)
    if "W_TMA_OK" in MM_PARAMS:  # w alone through its descriptor: gathered rows only
        args["W_TMA_OK"] = False
    if "Y_TMA_OK" in MM_PARAMS:  # y through its descriptor (TMA_STORE candidates)
        args["Y_TMA_OK"] = args["TMA_OK"] and gg._tma_rows_ok(y_TN)
    return args


def tma_usable(args: dict) -> bool:
    """Whether the kernel has a descriptor build and these operands allow it (_tma_ok, or
    _tma_dw_ok for the dW kernel's arguments)."""
    if "dy_ptr" in args:
        return "TMA" in DW_PARAMS and hasattr(gg, "_tma_dw_ok") and gg._tma_dw_ok(args)
    return "TMA" in MM_PARAMS and hasattr(gg, "_tma_ok") and gg._tma_ok(args)


def mm_grid(args: dict, meta: dict) -> int:
    """_launch_grouped_mm's grid: every group and the tail may add one partial M-tile."""
    m_tiles = triton.cdiv(args["T"], meta["BLOCK_M"]) + args["G"] + 1
    tiles = m_tiles * triton.cdiv(args["N"], meta["BLOCK_N"])
    return min(tiles, gg._num_sms(args["x_ptr"].device) * meta["PROGS_PER_SM"])


def dw_args(x_TK, dy_TN, offsets_G, dw_GKN) -> dict:
    """_grouped_mm_dw_kernel's arguments as _launch_grouped_mm_dw builds them (no dBias)."""
    T, K = x_TK.shape
    G, N = offsets_G.shape[0], dy_TN.shape[1]
    db = dw_GKN.view(G, K * N)  # never written: HAS_BIAS=False
    args = {
        "x_ptr": x_TK, "dy_ptr": dy_TN, "offsets_ptr": offsets_G, "perm_ptr": offsets_G,
        "dw_ptr": dw_GKN, "db_ptr": db,
        "T": T, "K": K, "N": N, "G": G, "M_BUCKET": gg._m_bucket(T, G),
        "stride_xt": x_TK.stride(0), "stride_xk": x_TK.stride(1),
        "stride_dyt": dy_TN.stride(0), "stride_dyn": dy_TN.stride(1),
        "stride_dwg": dw_GKN.stride(0), "stride_dwk": dw_GKN.stride(1),
        "stride_dwn": dw_GKN.stride(2),
        "stride_dbg": db.stride(0), "stride_dbn": db.stride(1),
        "HAS_BIAS": False, "GATHER": False, "INPUT_PRECISION": gg._input_precision(x_TK.dtype),
    }
    if "BLOCK_G" in DW_PARAMS:  # the flattened build's schedule vectors
        args["BLOCK_G"] = gg._block_g(G)
    if "TMA_OK" in DW_PARAMS:
        args["TMA_OK"] = gg._tma_dw_ok(args)
    if "DW_TMA_OK" in DW_PARAMS:  # dw's descriptor, for the TMA-store builds
        args["DW_TMA_OK"] = (gg._tma_device_ok(dw_GKN)
                             and N * dw_GKN.element_size() % 16 == 0)
    return args


def dw_grid(args: dict, meta: dict) -> int:
    tiles = args["G"] * triton.cdiv(args["K"], meta["BLOCK_K"]) * triton.cdiv(args["N"],
                                                                              meta["BLOCK_N"])
    progs = meta.get("PROGS_PER_SM", 0)  # as _launch_grouped_mm_dw's grid
    return min(tiles, gg._num_sms(args["x_ptr"].device) * progs) if progs else tiles


@dataclass
class KernelSpec:
    """One of our kernels on one problem: what to launch, how big a grid, and the answer."""

    kind: str  # "fwd" | "dx" | "dw"
    kernel: object  # the @triton.jit function
    args: dict
    out: torch.Tensor  # written by every launch
    grid: Callable[[dict, dict], int]
    reference: Callable[[], torch.Tensor]  # the fp32 answer, computed when first asked for
    even_k: bool  # whether the kernel takes EVEN_K

    @functools.cached_property
    def expected(self) -> torch.Tensor | None:
        """None where the reference itself fails (out of memory, say): rows go unchecked."""
        try:
            return self.reference()
        except Exception as e:  # noqa: BLE001
            print(f"  no {self.kind} reference ({type(e).__name__}: {e}): rows unchecked")
            return None

    def meta(self, cand: Cand) -> dict:
        meta = dict(cand.meta)
        params = DW_PARAMS if self.kind == "dw" else MM_PARAMS
        # flags an older kernel does not have
        for flag in ("TMA", "FLATTEN", "TMA_STORE", "PROGS_PER_SM", "BALANCED",
                     "BOUNDED"):
            if flag not in params:
                meta.pop(flag, None)
        if self.even_k:
            meta["EVEN_K"] = self.args["K"] % meta["BLOCK_K"] == 0
        return meta

    def usable(self, cand: Cand) -> bool:
        return not dict(cand.meta).get("TMA") or tma_usable(self.args)

    def launcher(self, cand: Cand) -> tuple[Callable[[], None], int]:
        meta = self.meta(cand)
        if meta.get("TMA") and HAS_CUDA and hasattr(gg, "_ensure_allocator"):
            gg._ensure_allocator()  # in-kernel descriptors need global scratch
        grid = (self.grid(self.args, meta),)
        kernel, args = self.kernel, self.args
        w, s = cand.num_warps, cand.num_stages

        def launch():
            kernel[grid](**args, **meta, num_warps=w, num_stages=s)
        return launch, grid[0]


def kernel_specs(p: Problem) -> dict[str, KernelSpec]:
    x, w, offsets, dy = p.x, p.w, p.offsets, p.dy
    T, K = x.shape
    G, N = w.shape[0], w.shape[2]
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    dx = torch.empty((T, K), dtype=x.dtype, device=x.device)
    dw = torch.empty((G, K, N), dtype=x.dtype, device=x.device)
    w_t = w.transpose(1, 2)  # [G, N, K], contiguous: dX's weight
    return {
        "fwd": KernelSpec("fwd", gg._grouped_mm_kernel, mm_args(x, w, offsets, y), y, mm_grid,
                          lambda: reference.grouped_mm_reference(x.float(), w.float(), offsets),
                          True),
        "dx": KernelSpec("dx", gg._grouped_mm_kernel, mm_args(dy, w_t, offsets, dx), dx, mm_grid,
                         lambda: reference.grouped_mm_reference(dy.float(), w_t.float(), offsets),
                         True),
        "dw": KernelSpec("dw", gg._grouped_mm_dw_kernel, dw_args(x, dy, offsets, dw), dw, dw_grid,
                         lambda: reference.grouped_mm_dw_reference(x.float(), dy.float(), offsets,
                                                                   False)[0], False),
    }


def usable_cands(specs: dict[str, KernelSpec], cands: dict) -> dict[str, list[Cand]]:
    """Drop the TMA candidates where the kernel, device or layout has no descriptor build."""
    return {kind: [c for c in cs if specs[kind].usable(c)] for kind, cs in cands.items()}


def reference_fns(p: Problem) -> list[tuple[str, Callable[[], torch.Tensor], str | None]]:
    """(kernel name, callable, which expected output to compare with) for the reference points.
    The dense GEMMs do the same FLOPs as one GEMM: a ceiling, with no answer to compare."""
    x, w, offsets, dy = p.x, p.w, p.offsets, p.dy
    w_t, w0 = w.transpose(1, 2), w[0]
    fns = []
    if hasattr(torch, "_grouped_mm"):
        fns += [
            ("torch_grouped_mm", lambda: torch._grouped_mm(x, w, offs=offsets), "fwd"),
            ("torch_grouped_mm_dx", lambda: torch._grouped_mm(dy, w_t, offs=offsets), "dx"),
            # 2D x 2D with offsets splits the shared dimension: one x_g^T dy_g per group (what
            # torch's own backward of _grouped_mm uses for the weight gradient)
            ("torch_grouped_mm_dw", lambda: torch._grouped_mm(x.t(), dy, offs=offsets), "dw"),
        ]
    fns += [
        ("dense", lambda: x @ w0, None),
        ("dense_dw", lambda: x.t() @ dy, None),
        # the public ops: autograd-free custom ops, autotuned over the built-in config lists
        ("mtmm_api", lambda: gg.grouped_mm(x, w, offsets), "fwd"),
        ("mtmm_api_dx", lambda: gg.grouped_mm(dy, w_t, offsets), "dx"),
        ("mtmm_api_dw", lambda: torch.ops.mtmm.grouped_mm_dw(x, dy, offsets, None, False)[0],
         "dw"),
    ]
    return fns + backward_fns(p)


def backward_fns(p: Problem) -> list[tuple[str, Callable[[], object], str | None]]:
    """A whole backward's dX and dW (twice the FLOPs of one GEMM), one after the other on one
    stream as the op runs them, and with dW on a second stream. How much the second stream
    gains is how much one launch doing both (or the two kernels overlapping) could: the tail of
    the first kernel, where its last tiles leave SMs idle, and the gap between the launches.
    The side stream waits for the main one before its launch and the main one for it after,
    as a backward that used it would."""
    x, w, offsets, dy = p.x, p.w, p.offsets, p.dy
    w_t = w.transpose(1, 2)

    def dx() -> torch.Tensor:
        return gg.grouped_mm(dy, w_t, offsets)

    def dw() -> torch.Tensor:
        return torch.ops.mtmm.grouped_mm_dw(x, dy, offsets, None, False)[0]

    fns = []
    if hasattr(torch, "_grouped_mm"):
        fns.append(("torch_grouped_mm_bwd", lambda: (torch._grouped_mm(dy, w_t, offs=offsets),
                                                     torch._grouped_mm(x.t(), dy, offs=offsets)),
                    None))
    fns.append(("mtmm_api_bwd", lambda: (dx(), dw()), None))
    if not HAS_CUDA:
        return fns
    side = torch.cuda.Stream()

    def two_streams(first_on_side, second_on_main):
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            a = first_on_side()
        b = second_on_main()
        main.wait_stream(side)
        return a, b

    fns.append(("mtmm_api_bwd_dw_side", lambda: two_streams(dw, dx), None))
    fns.append(("mtmm_api_bwd_dx_side", lambda: two_streams(dx, dw), None))
    return fns


# --- compiling and timing -------------------------------------------------------------------


def specialisation(v) -> object:
    """What Triton specialises a launch argument on (tensors: dtype and 16-byte alignment;
    integers: == 1, divisible by 16), so that identical compilations are not sharded twice.
    A miss here costs a duplicate compile at worst, never a wrong result."""
    if isinstance(v, torch.Tensor):
        return str(v.dtype), v.data_ptr() % 16 == 0
    if isinstance(v, int) and not isinstance(v, bool):
        return "one" if v == 1 else "div16" if v % 16 == 0 else "int"
    return v


def compile_jobs(cases: dict, cands: dict, dtype, device):
    """Every distinct compilation of the sweep as (spec, cand), in sweep order; one case's
    tensors are alive at a time (they fix the specialisation, nothing more)."""
    seen = set()
    for name, (sizes, K, N) in cases.items():
        specs = kernel_specs(make_problem(name, sizes, K, N, dtype, device))
        for kind, cs in usable_cands(specs, cands).items():
            spec = specs[kind]
            args_key = (spec.kernel.fn.__name__,
                        tuple((k, specialisation(v)) for k, v in spec.args.items()))
            for cand in cs:
                key = (args_key, tuple(sorted(spec.meta(cand).items())), cand.num_warps,
                       cand.num_stages)
                if key not in seen:
                    seen.add(key)
                    yield spec, cand


def precompile_shard(cases: dict, cands: dict, dtype, device, shard: int, shards: int) -> None:
    """Compile every shards-th job, starting at shard, without launching anything. Triton keeps
    the result in its on-disk cache, where the sweep's first launch finds it."""
    t0, done, failed = time.monotonic(), 0, 0
    for i, (spec, cand) in enumerate(compile_jobs(cases, cands, dtype, device)):
        if i % shards != shard:
            continue
        try:
            spec.kernel.warmup(**spec.args, **spec.meta(cand), num_warps=cand.num_warps,
                               num_stages=cand.num_stages, grid=(1,))
            done += 1
        except Exception:  # noqa: BLE001 - the sweep's launch hits it again and records it
            failed += 1
    print(f"  precompile shard {shard}/{shards}: {done} kernels ({failed} failed) in "
          f"{time.monotonic() - t0:.1f} s", flush=True)


def precompile_in_children(args, case_names: list[str], budget_s: float) -> None:
    """Compile all candidates first, in parallel processes (a GEMM takes seconds to compile,
    and compiling in threads would contend for the GIL). A child that crashes or runs out of
    time only costs the head start: the sweep's launches compile what is missing."""
    n = args.compile_procs
    if n <= 0:
        return
    t0 = time.monotonic()
    base = [sys.executable, str(Path(__file__).resolve()), str(args.out), "--cases",
            ",".join(case_names), "--kernels", args.kernels]
    procs = [subprocess.Popen([*base, "--precompile-shard", f"{i}/{n}"]) for i in range(n)]
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, t0 + budget_s - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append("killed")
    print(f"precompile: {n} processes in {time.monotonic() - t0:.1f} s, exit codes {codes}")


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def device_ms(fn: Callable[[], object]) -> float:
    """Device time: do_bench's median on a GPU (L2 flushed before each call); one wall-clock
    run on the CPU, where only the smoke run times anything (the interpreter's times say
    nothing about a GPU, and each call costs seconds there)."""
    if HAS_CUDA:
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def loop_ms(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(time per call of back-to-back calls, host time to issue one call). 'calls' launches
    stay well inside the launch queue, so issuing them never waits for the GPU."""
    sync()
    if HAS_CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / calls
    if not HAS_CUDA:
        return host, host
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls, host


def max_rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item()
    diff = (out.float() - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def empty_row(error: str | None = None) -> dict:
    return {"ms": None, "loop_ms": None, "host_ms": None, "tflops": None, "max_rel_err": None,
            "error": error}


def measure(fn: Callable[[], torch.Tensor | None], flops: float, out=None, expected=None,
            calls: int = 20) -> dict:
    """Run once (compile, check the answer), then time. Any exception becomes the row's error."""
    row = empty_row()
    try:
        result = fn()
        sync()
        if expected is not None:
            row["max_rel_err"] = max_rel_err(result if out is None else out, expected)
        row["ms"] = device_ms(fn)
        row["loop_ms"], row["host_ms"] = loop_ms(fn, calls if HAS_CUDA else 2)
        row["tflops"] = flops / row["ms"] / 1e9
    except Exception as e:  # noqa: BLE001 - OutOfResources, compile errors, launch errors
        row["error"] = f"{type(e).__name__}: {str(e).strip()[:400]}"
    return row


# --- the sweep ------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.exhausted = False

    def left(self) -> bool:
        if not self.exhausted and time.monotonic() - START > self.seconds:
            self.exhausted = True
            print(f"  --max-seconds {self.seconds:g} reached: no new measurements")
        return not self.exhausted


def sweep_case(name: str, sizes, K: int, N: int, dtype, device, cands: dict,
               budget: Budget) -> list[dict]:
    p = make_problem(name, sizes, K, N, dtype, device)
    G, T = len(sizes), sum(sizes)
    print(f"\n=== {name}: G={G} T={T} K={K} N={N} {str(dtype).removeprefix('torch.')} "
          f"({p.flops / 1e9:.1f} GFLOP per GEMM)")
    specs = kernel_specs(p)
    cands = usable_cands(specs, cands)
    if not tma_usable(specs["fwd"].args):
        print("  TMA candidates dropped: no descriptor build here (kernel, device or layout)")
    rows = []

    def add(kernel: str, config, result: dict, grid=None):
        rows.append(dict(case=name, kernel=kernel, config=config, grid=grid, **result))

    for kernel, fn, expect in reference_fns(p):
        if not budget.left():
            break
        expected = specs[expect].expected if expect else None
        flops = 2 * p.flops if FAMILY[kernel] == "bwd" else p.flops
        add(kernel, None, measure(fn, flops, expected=expected))
    for kind in [k for k in ("fwd", "dw", "dx") if k in cands]:
        spec = specs[kind]
        for cand in cands[kind]:
            if not budget.left():
                break
            try:
                launch, grid = spec.launcher(cand)
            except Exception as e:  # noqa: BLE001
                add(kind, cand.as_dict(), empty_row(repr(e)))
                continue
            spec.out.zero_()  # a launch that writes nothing must not pass the check
            add(kind, cand.as_dict(), measure(launch, p.flops, spec.out, spec.expected), grid)
    print_case(rows)
    del p, specs
    if HAS_CUDA:
        torch.cuda.empty_cache()
    return rows


# --- reporting ------------------------------------------------------------------------------


FAMILY = {"fwd": "fwd", "dx": "dx", "dw": "dw", "torch_grouped_mm": "fwd",
          "torch_grouped_mm_dx": "dx", "torch_grouped_mm_dw": "dw", "dense": "fwd",
          "dense_dw": "dw", "mtmm_api": "fwd", "mtmm_api_dx": "dx", "mtmm_api_dw": "dw",
          "torch_grouped_mm_bwd": "bwd", "mtmm_api_bwd": "bwd", "mtmm_api_bwd_dw_side": "bwd",
          "mtmm_api_bwd_dx_side": "bwd"}
TORCH_OF = {"fwd": "torch_grouped_mm", "dx": "torch_grouped_mm_dx", "dw": "torch_grouped_mm_dw",
            "bwd": "torch_grouped_mm_bwd"}


def config_label(row: dict) -> str:
    if row["config"] is None:
        return "-"
    c = dict(row["config"])
    return Cand(tuple(sorted((k, v) for k, v in c.items() if k not in ("num_warps", "num_stages"))),
                c["num_warps"], c["num_stages"]).label()


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_case(rows: list[dict]) -> None:
    """One table per kernel family, fastest first; 'x torch' > 1 means faster than torch."""
    for family in ("fwd", "dx", "dw", "bwd"):
        fam = [r for r in rows if FAMILY[r["kernel"]] == family]
        if not fam:
            continue
        torch_ms = next((r["ms"] for r in fam if r["kernel"] == TORCH_OF[family] and r["ms"]),
                        None)
        fam.sort(key=lambda r: (r["ms"] is None, r["ms"] or 0.0))
        print(f"  {family:<4}{'kernel':<22}{'config':<30}{'grid':>7}{'ms':>9}{'loop_ms':>9}"
              f"{'host_ms':>9}{'TFLOP/s':>9}{'x torch':>8}{'rel_err':>9}")
        for r in fam:
            speedup = torch_ms / r["ms"] if torch_ms and r["ms"] else None
            line = (f"      {r['kernel']:<22}{config_label(r):<30}{fmt(r['grid'], 'd'):>7}"
                    f"{fmt(r['ms'], '.4f'):>9}{fmt(r['loop_ms'], '.4f'):>9}"
                    f"{fmt(r['host_ms'], '.4f'):>9}{fmt(r['tflops'], '.1f'):>9}"
                    f"{fmt(speedup, '.2f'):>8}{fmt(r['max_rel_err'], '.1e'):>9}")
            if r["error"]:
                line += f"  ERROR {r['error'][:90]}"
            print(line)


API_OF = {"fwd": "mtmm_api", "dx": "mtmm_api_dx", "dw": "mtmm_api_dw"}


def print_best(rows: list[dict]) -> None:
    """The fastest config per case and kernel, next to torch and to what the public op gets
    today (autotuned over the built-in lists): 'x torch' > 1 is faster than torch."""
    print("\n=== best config per case and kernel")
    for case in dict.fromkeys(r["case"] for r in rows):
        for kind in ("fwd", "dx", "dw"):
            ok = [r for r in rows if r["case"] == case and r["kernel"] == kind and r["ms"]]
            if not ok:
                continue
            best = min(ok, key=lambda r: r["ms"])

            def ms_of(kernel: str, case=case) -> float | None:
                return next((r["ms"] for r in rows if r["case"] == case
                             and r["kernel"] == kernel and r["ms"]), None)
            torch_ms, api_ms = ms_of(TORCH_OF[kind]), ms_of(API_OF[kind])
            vs = f"  x torch {torch_ms / best['ms']:.2f}" if torch_ms else ""
            api = f"  (public op today {api_ms:.4f} ms)" if api_ms else ""
            print(f"  {case:<20} {kind:<4} {config_label(best):<32} {best['ms']:.4f} ms "
                  f"{best['tflops']:6.1f} TFLOP/s{vs}{api}")


def print_backwards(rows: list[dict]) -> None:
    """dX and dW one after the other against torch's and against the same with one of them on
    a second stream: 'x' > 1 means faster than the one-stream backward's time (what one launch
    doing both kernels could gain, about)."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        ms = {r["kernel"]: r["ms"] for r in rows if r["case"] == case and r["ms"]
              and FAMILY[r["kernel"]] == "bwd"}
        serial = ms.get("mtmm_api_bwd")
        if not serial:
            continue
        torch_ms = ms.get("torch_grouped_mm_bwd")
        vs = f" (x torch {torch_ms / serial:.2f})" if torch_ms else ""
        parts = [f"one stream {serial:.4f} ms{vs}"]
        for kernel, label in (("mtmm_api_bwd_dw_side", "dW on a 2nd stream"),
                              ("mtmm_api_bwd_dx_side", "dX on a 2nd stream")):
            if ms.get(kernel):
                parts.append(f"{label} {ms[kernel]:.4f} ms (x {serial / ms[kernel]:.2f})")
        lines.append(f"  {case:<20} " + ", ".join(parts))
    if lines:
        print("\n=== whole backward (dX + dW): one stream against the others")
        print("\n".join(lines))


def print_twins(rows: list[dict], title: str, lacks, twin_of, names: tuple[str, str],
                kernels: tuple[str, ...] = ("dw",)) -> None:
    """Each config (of ``kernels``) lacking a feature (``lacks(config)``) timed next to its twin
    that has it (``twin_of(config)``), where the sweep timed both: 'x' > 1 means the twin is
    faster."""
    pairs = []
    for r in rows:
        c = r["config"] or {}
        if r["kernel"] not in kernels or not r["ms"] or not lacks(c):
            continue
        twin = next((t for t in rows if t["case"] == r["case"] and t["kernel"] == r["kernel"]
                     and t["ms"] and t["config"] == twin_of(c)), None)
        if twin:
            pairs.append((r, twin))
    if pairs:
        print(f"\n=== {title}")
    for r, twin in pairs:
        print(f"  {r['case']:<20} {r['kernel']:<4} {config_label(twin):<36} "
              f"{names[0]} {r['ms']:.4f} ms, "
              f"{names[1]} {twin['ms']:.4f} ms: x {r['ms'] / twin['ms']:.2f}")


def print_feature_twins(rows: list[dict]) -> None:
    """The features added without a GPU (dW's; warp specialization, every kernel's), each
    against its twin without it."""
    print_twins(rows, "persistent dW: group order against the balanced order",
                lambda c: c.get("PROGS_PER_SM") and not c.get("BALANCED"),
                lambda c: {**c, "BALANCED": True}, ("group order", "balanced"))
    print_twins(rows, "one program per tile: descriptors over all rows against bounded ones",
                lambda c: c.get("BOUNDED") is False,
                lambda c: {k: v for k, v in c.items() if k != "BOUNDED"},
                ("all rows", "bounded"))
    print_twins(rows, "dW tiles stored by pointers against through dw's descriptor",
                lambda c: c.get("TMA") and not c.get("TMA_STORE"),
                lambda c: {**c, "TMA_STORE": True}, ("pointer stores", "TMA stores"))
    print_twins(rows, "one warp group per 64 rows against warp specialized (producer + 2 "
                "consumers)", lambda c: c.get("TMA") and not c.get("WS"),
                lambda c: {**c, "WS": True, "num_warps": 4}, ("plain", "specialized"),
                kernels=("fwd", "dx", "dw"))


def header(args, smoke: bool) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5, check=False).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the machine
        commit = None
    dev = torch.device("cuda" if HAS_CUDA else "cpu")
    return {
        "device": torch.cuda.get_device_name() if HAS_CUDA else "cpu (TRITON_INTERPRET=1)",
        "capability": list(torch.cuda.get_device_capability()) if HAS_CUDA else None,
        "num_sms": gg._num_sms(dev),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "max_seconds": None if math.isinf(args.max_seconds) else args.max_seconds,
        # file names only: the record names no machine's paths
        "argv": [Path(a).name if os.path.isabs(a) else a for a in sys.argv[1:]],
        "smoke": smoke,
        "timing": ("ms: do_bench median, L2 flushed, warmup 10 ms, rep 40 ms; loop_ms: "
                   "events around 20 back-to-back calls; host_ms: host time to issue one call"
                   if HAS_CUDA else "wall times of the interpreter: ms one call, loop_ms and "
                   "host_ms the mean of 2 back-to-back calls"),
    }


def write_json(path: Path, head: dict, rows: list[dict], done: bool) -> None:
    head = {**head, "elapsed_s": round(time.monotonic() - START, 1), "complete": done}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    os.replace(tmp, path)  # a reader never sees half a file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no new measurement after this many seconds (default 100; "
                             "with --cpu-smoke, no limit: it checks every candidate)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names (default: all, the small-group case "
                             "first: it has the largest gap to torch)")
    parser.add_argument("--compile-procs", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes compiling the candidates before the sweep starts "
                             "(0: compile at first launch)")
    parser.add_argument("--kernels", default="fwd,dw,dx",
                        help="comma-separated kernels to sweep: fwd, dw, dx (default: all)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU: run the interpreter on a tiny case, end to end")
    parser.add_argument("--precompile-shard", default=None, help=argparse.SUPPRESS)  # "i/n"
    args = parser.parse_args()

    if args.max_seconds is None:  # (a smoke run cut short by a busy machine checks less)
        args.max_seconds = math.inf if args.cpu_smoke else 100.0
    if not HAS_CUDA and not args.cpu_smoke:
        print("No CUDA device: nothing to sweep (use --cpu-smoke to check the script itself).")
        return 0
    if args.cpu_smoke:
        cases, dtype, device = SMOKE_CASE, torch.float32, torch.device("cpu")
        cands = {"fwd": SMOKE_FWD, "dx": SMOKE_DX, "dw": SMOKE_DW}
        gg.TMA_ON_CPU = True  # this process only: lets the interpreter run the TMA build
    else:
        names = args.cases.split(",") if args.cases else sorted(
            CASES, key=lambda c: c != "lognormal32_k1024")  # stable: the rest keep their order
        unknown = [c for c in names if c not in CASES]
        if unknown:
            parser.error(f"unknown cases {unknown}; known: {list(CASES)}")
        cases, dtype, device = {c: CASES[c] for c in names}, torch.bfloat16, torch.device("cuda")
        cands = {"fwd": FWD_CANDIDATES, "dx": DX_CANDIDATES, "dw": DW_CANDIDATES}

    kernels = args.kernels.split(",")
    if not kernels or any(k not in cands for k in kernels):
        parser.error(f"--kernels: expected some of {list(cands)}, got {args.kernels!r}")
    cands = {k: v for k, v in cands.items() if k in kernels}

    if args.precompile_shard:  # a child of precompile_in_children
        shard, shards = map(int, args.precompile_shard.split("/"))
        precompile_shard(cases, cands, dtype, device, shard, shards)
        return 0

    torch.manual_seed(0)
    head = header(args, args.cpu_smoke)
    print(f"{head['device']}  torch {head['torch']}  triton {head['triton']}  "
          f"SMs {head['num_sms']}  budget {args.max_seconds:g} s")
    budget = Budget(args.max_seconds)
    if not args.cpu_smoke:  # the interpreter compiles nothing
        precompile_in_children(args, list(cases), budget_s=0.5 * args.max_seconds)
    rows: list[dict] = []
    for name, (sizes, K, N) in cases.items():
        if not budget.left():
            break
        rows += sweep_case(name, sizes, K, N, dtype, device, cands, budget)
        write_json(args.out, head, rows, done=False)
    write_json(args.out, head, rows, done=not budget.exhausted)
    print_best(rows)
    print_backwards(rows)
    print_feature_twins(rows)
    failed = [r for r in rows if r["error"]]
    print(f"\n{len(rows)} rows ({len(failed)} with errors) in {time.monotonic() - START:.1f} s "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
