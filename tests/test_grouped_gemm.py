"""grouped_mm and grouped_mm_by_ids against a float64 loop reference (forward, dX, dW, dBias).

On the CPU the Triton kernels run under the interpreter (tests/conftest.py sets it), in fp32 and
fp16; bf16, torch.compile and CUDA-graph replay need a GPU. float64 takes the torch path (for
gradcheck) on every device.
"""

from __future__ import annotations

import pytest
import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from mtmm_kernels import grouped_gemm, grouped_mm, grouped_mm_by_ids
from mtmm_kernels import reference as ref
from mtmm_kernels._triton_utils import num_sms


@pytest.fixture(autouse=True)
def _single_config(monkeypatch):
    """One config per kernel instead of autotuning: the GPU test run must stay short (each
    config is a compilation). test_autotuned_path covers the autotuner. Launch plans start
    empty, so that a test patching the launchers' helpers sees them called."""
    monkeypatch.setattr(grouped_gemm, "AUTOTUNE", False)
    monkeypatch.setattr(grouped_gemm, "_PLANS", {})


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
CPU_DTYPES = [torch.float32, torch.float16]
# Cases that take 15-50 s each in the interpreter are slow there only (a GPU run keeps them).
_SLOW_ON_CPU = () if torch.cuda.is_available() else pytest.mark.slow


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error; an all-zero expectation demands an all-zero result."""
    out, expected = out.double(), expected.double()
    scale = expected.norm().item()
    diff = (out - expected).norm().item()
    return diff / scale if scale > 0 else diff


def make_problem(sizes, K, N, dtype, device, *, tail=0, bias=True, w_transposed=False,
                 offsets_dtype=torch.int32):
    G = len(sizes)
    T = sum(sizes) + tail
    x = torch.randn(T, K, dtype=dtype, device=device)
    if w_transposed:  # [G, N, K] storage seen as [G, K, N]: the layout torch._grouped_mm likes
        w = torch.randn(G, N, K, dtype=dtype, device=device).transpose(1, 2)
    else:
        w = torch.randn(G, K, N, dtype=dtype, device=device)
    b = torch.randn(G, N, dtype=dtype, device=device) if bias else None
    offsets = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(offsets_dtype).to(device)
    return x, w, b, offsets


def leaf(t):
    """A fresh autograd leaf sharing t's storage and strides (a clone would densify views)."""
    return None if t is None else t.detach().requires_grad_()


def check_against_reference(x, w, b, offsets, *, tail=0):
    """Forward and every gradient against autograd through the float64 loop reference."""
    tol = TOL[x.dtype]
    x, w, b = leaf(x), leaf(w), leaf(b)
    y = grouped_mm(x, w, offsets, b)
    x64, w64, b64 = (None if t is None else t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = ref.grouped_mm_reference(x64, w64, offsets.cpu(), b64)
    assert y.shape == y64.shape and y.dtype == x.dtype
    assert rel_err(y, y64) < tol
    if tail:
        assert torch.equal(y[-tail:], torch.zeros_like(y[-tail:]))

    dy = torch.randn_like(y)
    y.backward(dy)
    if y64.requires_grad:
        y64.backward(dy.double())
    else:  # no group and no bias: the loop reference never touched its inputs
        for t in (x64, w64, b64):
            if t is not None:
                t.grad = torch.zeros_like(t)
    assert rel_err(x.grad, x64.grad) < tol
    assert rel_err(w.grad, w64.grad) < tol
    if b is not None:
        assert rel_err(b.grad, b64.grad) < tol
    sizes = torch.diff(offsets.cpu().long(), prepend=torch.zeros(1, dtype=torch.long))
    for g in torch.nonzero(sizes == 0).flatten().tolist():  # empty groups: exact zeros
        assert torch.equal(w.grad[g], torch.zeros_like(w.grad[g]))
        if b is not None:
            assert torch.equal(b.grad[g], torch.zeros_like(b.grad[g]))
    if tail:
        assert torch.equal(x.grad[-tail:], torch.zeros_like(x.grad[-tail:]))


# --- forward, dX, dW, dBias ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_skewed_groups_with_empty_ones(device, dtype, bias):
    x, w, b, offsets = make_problem([5, 0, 40, 1, 0, 17], 19, 23, dtype, device, tail=7,
                                    bias=bias, w_transposed=True)
    check_against_reference(x, w, b, offsets, tail=7)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_one_group(device, dtype):
    x, w, b, offsets = make_problem([45], 16, 9, dtype, device)
    check_against_reference(x, w, b, offsets)


def test_many_groups(device):
    sizes = torch.randint(0, 4, (120,)).tolist()
    sizes[7] = 0
    x, w, b, offsets = make_problem(sizes, 5, 7, torch.float32, device, tail=3)
    check_against_reference(x, w, b, offsets, tail=3)


@pytest.mark.parametrize("G", [63, pytest.param(1030, marks=_SLOW_ON_CPU)])
def test_tile_lookup_at_its_bounds(device, G):
    """Groups of one row: every group's M-tile runs BLOCK_M - 1 rows past it, so the entry of
    the rows past offsets[-1] has the largest lag valid offsets allow. G = 63 puts the one-sum
    lookup at its bound (schedule width 64); G = 1030 is past it (width 2048) and takes three
    sums."""
    sizes = [1] * G
    sizes[5] = 0
    sizes[-1] = 101  # and one group of several M-tiles
    x, w, b, offsets = make_problem(sizes, 3, 5, torch.float32, device, tail=2)
    check_against_reference(x, w, b, offsets, tail=2)


@pytest.mark.parametrize("K,N", [(64, 32), (33, 70), (1, 1)])
def test_tile_edges(device, K, N):
    """Groups exactly one tile tall, more than one tile tall, K a multiple of the K tile (the
    unmasked loop) and not, N spanning several column tiles."""
    x, w, b, offsets = make_problem([32, 3, 65], K, N, torch.float32, device, tail=1)
    check_against_reference(x, w, b, offsets, tail=1)


def _use_tma(device, monkeypatch):
    """Turn the descriptor (TMA) builds on whatever the device: on the CPU the interpreter runs
    them with small configs (TMA first); on a GPU they need compute capability 9+."""
    if device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper or later GPU")
    monkeypatch.setattr(grouped_gemm, "TMA", True)
    if device.type == "cpu":
        monkeypatch.setattr(grouped_gemm, "TMA_ON_CPU", True)
        monkeypatch.setattr(grouped_gemm, "_MM_CONFIGS", [triton.Config(
            dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, PROGS_PER_SM=1, TMA=tma,
                 FLATTEN=False), num_warps=4, num_stages=1) for tma in (True, False)])
        monkeypatch.setattr(grouped_gemm, "_DW_CONFIGS", [triton.Config(
            dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, TMA=tma), num_warps=4, num_stages=1)
            for tma in (True, False)])


@pytest.fixture
def tma_path(device, monkeypatch):
    """The descriptor builds on (see _use_tma); records, per kernel ("mm": forward and dX,
    "dw"), whether each launch took the descriptor build."""
    _use_tma(device, monkeypatch)
    seen = {"mm": [], "dw": []}

    def spy(kind, real):
        def prune(configs, named_args, **kwargs):
            kept = real(configs, named_args, **kwargs)
            seen[kind].append(kept[0].kwargs["TMA"])
            return kept
        return prune
    monkeypatch.setattr(grouped_gemm, "_prune_mm", spy("mm", grouped_gemm._prune_mm))
    monkeypatch.setattr(grouped_gemm, "_prune_dw", spy("dw", grouped_gemm._prune_dw))
    return seen


@pytest.mark.parametrize("w_transposed", [False, True])
@pytest.mark.parametrize("K,N", [(24, 40), (40, 24)])
def test_tma_path(device, tma_path, w_transposed, K, N):
    """x and w tiles through tensor descriptors: tiles that run into the next group's rows,
    K and N that are not multiples of the tiles (the descriptor's zero fill), both layouts of
    w (dX reads w transposed, so both layouts occur in every backward). dW: groups with full
    row tiles (descriptors) and a partial last tile (pointer loads), empty groups, rows past
    offsets[-1] that must not leak into the last group's dW."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    x, w, b, offsets = make_problem([5, 0, 23, 9, 1, 32], K, N, dtype, device, tail=3,
                                    w_transposed=w_transposed)
    check_against_reference(x, w, b, offsets, tail=3)
    for kind in ("mm", "dw"):
        assert tma_path[kind] and all(tma_path[kind]), f"the {kind} descriptor build never ran"


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("build", ["tma", "pointer", "flattened tma", "flattened pointer"])
def test_persistent_dw(device, monkeypatch, build, balanced):
    """dW with fewer programs than tiles (PROGS_PER_SM > 0): each program walks several
    (group, K-tile, N-tile) tiles, with descriptors built once (tma) or pointer loads, as a
    loop per tile or all its tiles' row steps as one loop (flattened), in group order or
    longest group first (balanced), over empty groups, partial row tiles, dBias and rows in
    any order."""
    tma = build.endswith("tma")
    if tma:
        _use_tma(device, monkeypatch)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    # with tma, the pointer config stays for what has no descriptors (gathered rows)
    monkeypatch.setattr(grouped_gemm, "_DW_CONFIGS", [triton.Config(
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, TMA=t, PROGS_PER_SM=1,
             FLATTEN=build.startswith("flattened"), BALANCED=balanced), num_warps=4,
        num_stages=1 if device.type == "cpu" else 3) for t in sorted({tma, False}, reverse=True)])
    grids = []
    real_launch = grouped_gemm.direct_launch.launch

    def spy(kernel, grid, head, tail, options):
        if kernel is grouped_gemm._grouped_mm_dw_kernel:
            grids.append(grid[0])
        return real_launch(kernel, grid, head, tail, options)
    monkeypatch.setattr(grouped_gemm.direct_launch, "launch", spy)
    # more tiles than programs: 5 groups x 3 x 2 tiles against 4 programs on a CPU, 5 x 13 x
    # 12 against one program per SM on a GPU
    sizes, K, N = [5, 0, 33, 9, 16], *((40, 24) if device.type == "cpu" else (200, 184))
    tiles = 5 * triton.cdiv(K, 16) * triton.cdiv(N, 16)
    x, w, b, offsets = make_problem(sizes, K, N, dtype, device, tail=3)
    check_against_reference(x, w, b, offsets, tail=3)
    assert grids and all(g == num_sms(device) < tiles for g in grids), (grids, tiles)
    ids = torch.repeat_interleave(torch.arange(5, device=device),
                                  torch.tensor(sizes, device=device))
    ids = ids[torch.randperm(ids.shape[0], device=device)]
    xl, wl, bl = leaf(x[:63]), leaf(w), leaf(b)
    y = grouped_mm_by_ids(xl, wl, ids, bl)
    dy = torch.randn_like(y)
    y.backward(dy)
    order = torch.sort(ids, stable=True).indices
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x[:63], w, b))
    y64 = ref.grouped_mm_reference(x64[order], w64, offsets.cpu(), b64)
    y64.backward(dy[order].double())
    for got, want in ((wl.grad, w64.grad), (bl.grad, b64.grad)):
        assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("N", [40, 20])
def test_tma_store_of_whole_tiles(device, tma_path, monkeypatch, N):
    """TMA_STORE (a sweep candidate): tiles wholly inside their group's rows are stored
    through y's descriptor in two column halves, the others by masked pointer stores; y is
    poisoned first, so a tile neither store wrote would show. N = 20 in fp16 gives 40-byte
    rows, which no descriptor takes: every tile takes the pointer stores."""
    monkeypatch.setattr(grouped_gemm, "_MM_CONFIGS", [triton.Config(
        {**c.kwargs, "TMA_STORE": c.kwargs["TMA"]}, num_warps=c.num_warps,
        num_stages=c.num_stages) for c in grouped_gemm._MM_CONFIGS])
    stores = []
    real_launch = grouped_gemm.direct_launch.launch

    def spy(kernel, grid, head, tail, options):
        named = dict(zip(kernel.arg_names, head + tail))
        if "Y_TMA_OK" in named:
            stores.append(named["TMA_STORE"] and named["Y_TMA_OK"])
        return real_launch(kernel, grid, head, tail, options)
    monkeypatch.setattr(grouped_gemm.direct_launch, "launch", spy)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan"))
                        if k.get("dtype", None) in (torch.float16, torch.bfloat16) else
                        real_empty(*a, **k))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    # tiles of 16 rows on the CPU: whole and partial ones, and groups one row short of whole
    # tiles (a descriptor store of those would overwrite the next group's first row)
    x, w, b, offsets = make_problem([31, 15, 0, 47, 19], 24, N, dtype, device, tail=3)
    check_against_reference(x, w, b, offsets, tail=3)
    assert stores and all(stores) == (N == 40) and any(stores) == (N == 40)


@pytest.mark.parametrize("w_transposed", [False, True])
@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's matmul
def test_tma_w_descriptor_with_gathered_rows(device, tma_path, monkeypatch, w_transposed,
                                             flatten):
    """By ids, x rows are gathered by pointer and w may still come through its descriptor:
    forward and dX (w in both layouts), ragged K and N, an empty group, and (flattened) the
    tail rows of out-of-range ids, which must stay exactly zero whatever they hold."""
    if flatten:
        monkeypatch.setattr(grouped_gemm, "_MM_CONFIGS", [
            triton.Config({**c.kwargs, "FLATTEN": c.kwargs["TMA"]}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in grouped_gemm._MM_CONFIGS])
        monkeypatch.setattr(grouped_gemm, "_values_checkable", lambda t: False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    G, T, K, N = 4, 45, 24, 40
    ids = torch.randint(0, G, (T,), device=device)
    ids[ids == 1] = 2  # an empty group
    x = torch.randn(T, K, dtype=dtype, device=device)
    w = torch.randn(G, K, N, dtype=dtype, device=device)
    if w_transposed:
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    if flatten:
        ids[:3] = torch.tensor([-1, G, 7])  # past the groups: zero rows
        x[:3] = torch.tensor([float("inf"), float("nan"), 1e4], dtype=dtype)[:, None]
    xl, wl = leaf(x), leaf(w)
    y = grouped_mm_by_ids(xl, wl, ids)
    dy = torch.randn_like(y)
    y.backward(dy)
    good = (ids >= 0) & (ids < G)
    x64, w64 = leaf(x.double()[good]), leaf(w.double())
    y64 = ref.grouped_mm_by_ids_reference(x64, w64, ids[good])
    y64.backward(dy.double()[good])
    assert torch.equal(y[~good], torch.zeros_like(y[~good]))
    assert rel_err(y[good], y64) < TOL[dtype]
    assert rel_err(xl.grad[good], x64.grad) < TOL[dtype]
    assert rel_err(wl.grad, w64.grad) < TOL[dtype]
    assert tma_path["mm"] and all(tma_path["mm"]), "w's descriptor was never taken"


def test_tma_dw_matches_the_pointer_loads_bitwise(device, monkeypatch):
    """The dW kernel sums the rows in the same order with and without descriptors."""
    _use_tma(device, monkeypatch)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    x, _, _, offsets = make_problem([40, 0, 17, 64], 24, 40, dtype, device, tail=5)
    dy = torch.randn(x.shape[0], 40, dtype=dtype, device=device)
    with_tma = grouped_gemm._launch_grouped_mm_dw(x, dy, offsets, None, True)
    monkeypatch.setattr(grouped_gemm, "TMA", False)
    without = grouped_gemm._launch_grouped_mm_dw(x, dy, offsets, None, True)
    for a, b in zip(with_tma, without):
        assert torch.equal(a, b)


@pytest.mark.parametrize("N", [40, pytest.param(36, marks=_SLOW_ON_CPU)])
def test_tma_store_dw_matches_the_pointer_stores_bitwise(device, monkeypatch, N):
    """dW tiles stored through dw's [G, K, N] descriptor (TMA_STORE), one program per tile,
    persistent and flattened, with descriptor or pointer loads: the same bits as the pointer
    stores, for K
    and N not multiples of the tile (the hardware clips the store at each group's K rows and
    at N) and empty groups. N = 36 in fp16 (72-byte rows) has no descriptor on dy or dw:
    those configs are pruned and the pointer build takes the call."""
    _use_tma(device, monkeypatch)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    x, _, _, offsets = make_problem([40, 0, 17, 33, 0], 24, N, dtype, device, tail=5)
    dy = torch.randn(x.shape[0], N, dtype=dtype, device=device)
    stages = 1 if device.type == "cpu" else 3
    took = []
    real_prune = grouped_gemm._prune_dw

    def prune(configs, named_args, **kwargs):
        kept = real_prune(configs, named_args, **kwargs)
        took.append(bool(kept[0].kwargs.get("TMA_STORE")))
        return kept
    monkeypatch.setattr(grouped_gemm, "_prune_dw", prune)
    results = []
    builds = [dict(TMA=tma, TMA_STORE=store, **persistent)
              for persistent in ({}, dict(PROGS_PER_SM=1, BALANCED=True),
                                 dict(PROGS_PER_SM=1, BALANCED=True, FLATTEN=True))
              for tma in (True, False) for store in (True, False)]
    for build in builds:
        monkeypatch.setattr(grouped_gemm, "_DW_CONFIGS", [triton.Config(
            dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, **kwargs), num_warps=4,
            num_stages=stages) for kwargs in (build, dict(build, TMA=False, TMA_STORE=False))])
        monkeypatch.setattr(grouped_gemm, "_PLANS", {})
        results.append(grouped_gemm._launch_grouped_mm_dw(x, dy, offsets, None, True))
    assert took == [b["TMA_STORE"] and N == 40 for b in builds]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    dw, db = results[0]
    dw64 = torch.stack([x[s:e].double().T @ dy[s:e].double() for s, e in
                        zip([0, *offsets[:-1].tolist()], offsets.tolist())])
    assert rel_err(dw, dw64) < TOL[dtype]
    assert torch.equal(dw[1], torch.zeros_like(dw[1]))
    assert torch.equal(db[4], torch.zeros_like(db[4]))


@pytest.mark.parametrize("G", [5, pytest.param(40, marks=_SLOW_ON_CPU),
                               pytest.param(70, marks=_SLOW_ON_CPU)])
def test_warp_specialized_configs_match_their_twins_bitwise(device, monkeypatch, G):
    """The warp-specialized configs (WS): the forward kernel's tile schedule comes from a
    doubling scan instead of a cumsum (the same integers: the same bits as the twin without
    WS in the interpreter, groups of every size, empty ones, tail rows), and the dW kernel
    sums dBias in a loop of its own (the same row tiles in the same order). G = 70 has
    schedule vectors too wide for the specialized forward: a WS config tuned on fewer groups
    runs unspecialized there. On a GPU this also compiles and runs the warp-specialized code
    (Triton 3.6+ on Hopper), against float64 and close to the twin."""
    _use_tma(device, monkeypatch)
    if device.type == "cuda" and not grouped_gemm._WS_TRITON:
        pytest.skip("warp-specialized configs need Triton 3.6+")
    monkeypatch.setattr(grouped_gemm, "_WS_MIN_DW_BUCKET", 0)  # small groups here
    # the forward config as a tuned config meets it on any call of its key, G = 70 included
    monkeypatch.setattr(grouped_gemm, "_prune_mm", lambda configs, named_args, **kw: configs)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    gen = torch.Generator().manual_seed(G)
    sizes = torch.randint(0, 40, (G,), generator=gen).tolist()
    sizes[0] = 21  # (the scan's first entry: an empty first group would hide a shift off by one)
    sizes[1] = sizes[G // 2] = 0
    K, N = (24, 40) if device.type == "cpu" else (200, 328)
    x, w, b, offsets = make_problem(sizes, K, N, dtype, device, tail=3)
    dy = torch.randn(x.shape[0], N, dtype=dtype, device=device)
    if device.type == "cpu":
        tile, warps, stages = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), 4, 1
    else:
        tile, warps, stages = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), 4, 3
    mm_tile = dict(tile, GROUP_M=2, PROGS_PER_SM=1, TMA=True, FLATTEN=False)
    dw_tile = dict(BLOCK_K=tile["BLOCK_M"], BLOCK_N=tile["BLOCK_N"], BLOCK_M=tile["BLOCK_K"],
                   TMA=True)
    specialized = []
    real_launch = grouped_gemm.direct_launch.launch

    def spy(kernel, grid, head, tail, options):
        named = dict(zip(kernel.arg_names, head + tail))
        specialized.append(named.get("WS", False))
        return real_launch(kernel, grid, head, tail, options)
    monkeypatch.setattr(grouped_gemm.direct_launch, "launch", spy)
    results = []
    for ws in (True, False):
        monkeypatch.setattr(grouped_gemm, "_MM_CONFIGS", [triton.Config(
            dict(mm_tile, WS=ws), num_warps=warps, num_stages=stages)])
        monkeypatch.setattr(grouped_gemm, "_DW_CONFIGS", [triton.Config(
            dict(dw_tile, WS=ws), num_warps=warps, num_stages=stages)])
        monkeypatch.setattr(grouped_gemm, "_PLANS", {})
        y = grouped_gemm._launch_grouped_mm(x, w, offsets, b, None)
        results.append([y, *grouped_gemm._launch_grouped_mm_dw(x, dy, offsets, None, True)])
    assert specialized == [True, True, False, False]
    y, dw, db = results[0]
    for got, want in zip(results[0], results[1]):
        if device.type == "cpu":
            assert torch.equal(got, want)
        else:  # the compiled reductions (dBias' in other layouts) may round apart
            assert rel_err(got, want) < 2e-3
    y64 = ref.grouped_mm_reference(x.double(), w.double(), offsets.cpu(), b.double())
    assert rel_err(y, y64) < TOL[dtype]
    assert torch.equal(y[-3:], torch.zeros_like(y[-3:]))
    starts = [0, *offsets[:-1].tolist()]
    dw64 = torch.stack([x[s:e].double().T @ dy[s:e].double()
                        for s, e in zip(starts, offsets.tolist())])
    db64 = torch.stack([dy[s:e].double().sum(0) for s, e in zip(starts, offsets.tolist())])
    assert rel_err(dw, dw64) < TOL[dtype] and rel_err(db, db64) < TOL[dtype]
    assert torch.equal(dw[1], torch.zeros_like(dw[1]))
    assert torch.equal(db[1], torch.zeros_like(db[1]))


def test_warp_specialized_configs_are_offered_where_they_compile(monkeypatch):
    """The autotuner sees WS configs only with descriptors, 16-bit inputs, the switch on and
    a Triton whose code for them was read; the forward's only with at most 63 groups, dW's
    only for groups of 2**_WS_MIN_DW_BUCKET rows or more on average."""
    mm = [c for c in grouped_gemm._mm_configs(False) if c.kwargs.get("WS")]
    dw = [c for c in grouped_gemm._dw_configs(False) if c.kwargs.get("WS")]
    assert mm and dw
    assert all(c.num_warps == 4 and not c.kwargs.get("PROGS_PER_SM") for c in dw)
    monkeypatch.setattr(grouped_gemm, "_WS_TRITON", True)
    monkeypatch.setattr(grouped_gemm, "WARP_SPECIALIZE", True)
    x16, x32 = torch.empty(8, 8, dtype=torch.bfloat16), torch.empty(8, 8)

    def offered(prune, configs, **args):
        named = dict(x_ptr=x16, TMA_OK=True, W_TMA_OK=False, Y_TMA_OK=True, M_BUCKET=12,
                     BLOCK_G=64, HAS_BIAS=False, DW_TMA_OK=True)
        return any(c.kwargs.get("WS") for c in prune(configs, {**named, **args}))

    for prune, configs in ((grouped_gemm._prune_mm, mm), (grouped_gemm._prune_dw, dw)):
        assert offered(prune, configs)
        assert offered(prune, configs, HAS_BIAS=True)
        assert not offered(prune, configs, TMA_OK=False)
        assert not offered(prune, configs, x_ptr=x32)
    assert not offered(grouped_gemm._prune_mm, mm, BLOCK_G=128)
    assert offered(grouped_gemm._prune_dw, dw, BLOCK_G=128)
    assert offered(grouped_gemm._prune_mm, mm, M_BUCKET=8)
    assert not offered(grouped_gemm._prune_dw, dw, M_BUCKET=grouped_gemm._WS_MIN_DW_BUCKET - 1)
    monkeypatch.setattr(grouped_gemm, "WARP_SPECIALIZE", False)
    assert not offered(grouped_gemm._prune_mm, mm) and not offered(grouped_gemm._prune_dw, dw)
    monkeypatch.setattr(grouped_gemm, "WARP_SPECIALIZE", True)
    monkeypatch.setattr(grouped_gemm, "_WS_TRITON", False)
    assert not offered(grouped_gemm._prune_mm, mm) and not offered(grouped_gemm._prune_dw, dw)


def test_a_config_the_compiler_fails_on_loses_the_tuning(monkeypatch):
    """An MLIR pass failure while the autotuner times a config (Triton 3.6's warp
    specialization on a kernel it cannot partition) makes that config's time infinite, with
    a warning; any other error still ends the call."""
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: fn())

    def failing(message):
        def call():
            raise RuntimeError(message)
        return call
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        times = grouped_gemm._short_bench(failing("PassManager::run failed"), (0.5, 0.2, 0.8))
    assert times == [float("inf")] * 3
    with pytest.raises(RuntimeError, match="illegal memory access"):
        grouped_gemm._short_bench(failing("CUDA error: an illegal memory access"), (0.5,))


@pytest.mark.parametrize("G, tma", [(6, False), pytest.param(70, False, marks=_SLOW_ON_CPU),
                                    (6, True), pytest.param(70, True, marks=_SLOW_ON_CPU)])
def test_flattened_dw_matches_the_tile_per_program_build_bitwise(device, monkeypatch, G, tma):
    """The flattened dW loop sums each tile's rows in the order the one-program-per-tile
    build of the same loads does (with tma: every row tile through descriptors that end at the
    group's last row, or, with BOUNDED=False and in the persistent builds, the full row tiles
    through descriptors over all rows, then the partial one by pointer loads), and so do the
    persistent loops, whichever order they take the tiles in (BALANCED or not): the same bits,
    for empty groups (first, inside and last), groups without a full row tile, partial row
    tiles, rows in any order (pointer loads only), and more groups than the schedule vectors'
    minimum width (70: BLOCK_G = 128)."""
    if tma:
        _use_tma(device, monkeypatch)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    sizes = ([0, 5, 0, 33, 9, 0] if G == 6 else
             torch.randint(0, 12, (G,), generator=torch.Generator().manual_seed(G)).tolist())
    sizes[-1] = 0
    # at G = 70 one K tile and two N tiles (interpreter time: a program per tile), both partial;
    # rows of 16-byte multiples, as descriptors need
    K, N = (24, 40) if G < 64 else (8, 24)
    x, _, _, offsets = make_problem(sizes, K, N, dtype, device, tail=5)
    dy = torch.randn(x.shape[0], N, dtype=dtype, device=device)
    ids = torch.repeat_interleave(torch.arange(G, device=device),
                                  torch.tensor(sizes, device=device))
    perm = torch.randperm(x.shape[0], device=device)[:ids.shape[0]].to(torch.int32)
    stages = 1 if device.type == "cpu" else 3
    results = []
    took = []
    real_prune = grouped_gemm._prune_dw

    def prune(configs, named_args, **kwargs):
        kept = real_prune(configs, named_args, **kwargs)
        took.append(kept[0].kwargs["TMA"])
        return kept
    monkeypatch.setattr(grouped_gemm, "_prune_dw", prune)
    builds = [{}, *(dict(PROGS_PER_SM=1, FLATTEN=flat, BALANCED=balanced)
                    for flat in ((True, False) if G < 64 else (True,))  # (interpreter time)
                    for balanced in (False, True))]
    if tma:  # the tile's own descriptors over all rows (masked loads for the partial tile)
        builds.append(dict(BOUNDED=False))
    for extra in builds:
        # with tma, the pointer config stays for the gathered rows
        monkeypatch.setattr(grouped_gemm, "_DW_CONFIGS", [triton.Config(
            dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, TMA=t, **extra), num_warps=4,
            num_stages=stages) for t in sorted({tma, False}, reverse=True)])
        monkeypatch.setattr(grouped_gemm, "_PLANS", {})
        results.append([*grouped_gemm._launch_grouped_mm_dw(x, dy, offsets, None, True),
                        *grouped_gemm._launch_grouped_mm_dw(x, dy, offsets, perm, True)])
    assert took == [tma, False] * len(builds)  # descriptors where asked, never gathered
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    dw, db = results[1][:2]
    sizes_t = torch.tensor(sizes)
    assert torch.equal(dw[sizes_t == 0], torch.zeros_like(dw[sizes_t == 0]))
    assert torch.equal(db[sizes_t == 0], torch.zeros_like(db[sizes_t == 0]))
    dw64 = torch.stack([x[s:e].double().T @ dy[s:e].double() for s, e in
                        zip([0, *offsets[:-1].tolist()], offsets.tolist())])
    assert rel_err(dw, dw64) < TOL[dtype]


def test_tma_needs_aligned_unit_stride_operands(device, tma_path):
    """Layouts TMA cannot read (an odd row stride, a strided K) take the pointer loads."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    x, w, b, offsets = make_problem([6, 11], 12, 16, dtype, device)
    x_odd = torch.randn(x.shape[0], 13, dtype=dtype, device=device)[:, :12]  # 26-byte rows
    check_against_reference(x_odd, w, b, offsets)
    assert tma_path["mm"][0] is False and tma_path["dw"] == [False]
    assert not grouped_gemm._tma_ok(dict(x_ptr=x, w_ptr=w, GATHER=True))
    assert not grouped_gemm._tma_dw_ok(dict(x_ptr=x, dy_ptr=x, GATHER=True))


def test_dw_without_rows_takes_no_descriptors(device, monkeypatch):
    """No rows at all (every group empty): a descriptor needs every dimension non-empty,
    and the flattened descriptor build would read through it (a step of zeros per tile), so
    the dW kernel takes the pointer loads; every dW and dBias is exactly zero."""
    _use_tma(device, monkeypatch)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    x = torch.empty(0, 24, dtype=dtype, device=device)
    dy = torch.empty(0, 40, dtype=dtype, device=device)
    offsets = torch.zeros(3, dtype=torch.int32, device=device)
    assert grouped_gemm._tma_dw_ok(dict(x_ptr=x[:0].new_zeros(1, 24), dy_ptr=dy.new_zeros(1, 40),
                                        GATHER=False))
    assert not grouped_gemm._tma_dw_ok(dict(x_ptr=x, dy_ptr=dy, GATHER=False))
    monkeypatch.setattr(grouped_gemm, "_DW_CONFIGS", [triton.Config(
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, TMA=t, PROGS_PER_SM=1, FLATTEN=True),
        num_warps=4, num_stages=1 if device.type == "cpu" else 3) for t in (True, False)])
    dw, db = grouped_gemm._launch_grouped_mm_dw(x, dy, offsets, None, True)
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


def test_tuned_descriptor_config_is_safe_for_unaligned_operands(device, monkeypatch):
    """Configs are tuned per K, N and mean-group bucket, whatever the layouts: a config tuned
    with the descriptor build is reused for operands of the same sizes that descriptors cannot
    read (an odd row stride), and there the kernels must take the pointer loads."""
    _use_tma(device, monkeypatch)
    monkeypatch.setattr(grouped_gemm, "AUTOTUNE", True)
    monkeypatch.setattr(grouped_gemm, "_TUNED_CONFIGS", {})
    if device.type == "cpu":  # tuners over the interpreter's TMA-first configs
        monkeypatch.setattr(grouped_gemm, "_grouped_mm_tuned", grouped_gemm._autotune(
            grouped_gemm._MM_CONFIGS, grouped_gemm._prune_mm, grouped_gemm._MM_KEY,
            grouped_gemm._EVEN_K)(grouped_gemm._grouped_mm_kernel))
        monkeypatch.setattr(grouped_gemm, "_grouped_mm_dw_tuned", grouped_gemm._autotune(
            grouped_gemm._DW_CONFIGS, grouped_gemm._prune_dw, grouped_gemm._DW_KEY)(
                grouped_gemm._grouped_mm_dw_kernel))
        for tuner in (grouped_gemm._grouped_mm_tuned, grouped_gemm._grouped_mm_dw_tuned):
            # every config "measures" the same: the first (the descriptor build) wins
            monkeypatch.setattr(tuner, "do_bench", lambda fn, quantiles=None: [1.0, 1.0, 1.0])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    x, w, b, offsets = make_problem([9, 20], 16, 16, dtype, device)
    check_against_reference(x, w, b, offsets)
    tuned = dict(grouped_gemm._TUNED_CONFIGS)
    if device.type == "cpu":
        assert all(c.kwargs["TMA"] for c in tuned.values())
    # The same sizes, an odd row stride: forward and dW alone (dX reads dy, which is aligned).
    x_odd = torch.randn(x.shape[0], 17, dtype=dtype, device=device)[:, :16]  # 34-byte rows
    with torch.no_grad():
        y = grouped_mm(x_odd, w, offsets, b)
    y64 = ref.grouped_mm_reference(x_odd.double(), w.double(), offsets.cpu(), b.double())
    assert rel_err(y, y64) < TOL[dtype]
    dy = torch.randn_like(y)
    dw, db = grouped_gemm._launch_grouped_mm_dw(x_odd, dy, offsets, None, True)
    dw64, db64 = ref.grouped_mm_dw_reference(x_odd.double(), dy.double(), offsets.cpu(), True)
    assert rel_err(dw, dw64) < TOL[dtype] and rel_err(db, db64) < TOL[dtype]
    assert grouped_gemm._TUNED_CONFIGS == tuned  # reused, not retuned


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's matmul
@pytest.mark.parametrize("tma,flatten", [(False, False), (False, True), (True, True)])
def test_rows_past_the_last_offset_are_zero_whatever_x_holds(device, monkeypatch, tma, flatten):
    """Rows past offsets[-1] hold inf and NaN: their outputs are exact zeros and the real rows'
    gradients are untouched. With FLATTEN those tiles run the same K loop as every other tile
    (so that the tile loop can be one pipeline) against zeros in place of a weight, masked or
    outside the descriptor; without it they skip the loop. The interpreter runs the code of
    each (not the fused pipeline itself, which is the compiler's: a GPU test covers that)."""
    if tma:
        _use_tma(device, monkeypatch)
    if device.type == "cpu" or flatten:
        configs = grouped_gemm._mm_configs(device.type == "cpu")  # the interpreter has one
        base = next((c for c in configs if c.kwargs["TMA"] == tma), configs[0])
        monkeypatch.setattr(grouped_gemm, "_MM_CONFIGS", [triton.Config(
            {**base.kwargs, "FLATTEN": flatten, "TMA": tma},
            num_warps=base.num_warps, num_stages=base.num_stages)])
    x, w, b, offsets = make_problem([9, 0, 20], 32, 16, torch.float32, device, tail=7)
    x[-7:-3] = float("nan")
    x[-3:] = float("inf")
    x, w, b = leaf(x), leaf(w), leaf(b)
    y = grouped_mm(x, w, offsets, b)
    assert torch.equal(y[-7:], torch.zeros_like(y[-7:]))
    x64, w64, b64 = (t.detach()[:-7 if t is x else None].double().requires_grad_()
                     for t in (x, w, b))
    y64 = ref.grouped_mm_reference(x64, w64, offsets.cpu(), b64)
    assert rel_err(y[:-7], y64) < TOL[torch.float32]
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy[:-7].double())
    assert torch.equal(x.grad[-7:], torch.zeros_like(x.grad[-7:]))
    for got, want in ((x.grad[:-7], x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert rel_err(got, want) < TOL[torch.float32]


def test_int64_offsets_and_strided_x(device):
    x, w, b, offsets = make_problem([9, 0, 14], 12, 10, torch.float32, device,
                                    offsets_dtype=torch.int64)
    x_strided = torch.randn(x.shape[0], 2 * x.shape[1], device=device)[:, ::2]
    assert x_strided.stride() == (24, 2)
    check_against_reference(x_strided, w, b, offsets)


@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
def test_strided_offsets(device, offsets_dtype):
    """offsets as a strided view (every other entry of a longer tensor): the kernels read
    them as contiguous, so the public function must hand them a contiguous copy."""
    x, w, b, offsets = make_problem([9, 0, 14, 5], 12, 10, torch.float32, device, tail=2,
                                    offsets_dtype=offsets_dtype)
    spread = torch.full((2 * offsets.shape[0],), 10**6, dtype=offsets_dtype, device=device)
    spread[::2] = offsets
    assert not spread[::2].is_contiguous()
    check_against_reference(x, w, b, spread[::2], tail=2)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_poisoned_outputs_are_fully_written(device, dtype, monkeypatch):
    """Every output the kernels allocate is NaN-filled before they run, as a reused buffer
    might be: rows past offsets[-1], empty groups' dW and dBias must still come out exact."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    x, w, b, offsets = make_problem([3, 0, 11, 0], 10, 6, dtype, device, tail=5)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    check_against_reference(x, w, b, offsets, tail=5)
    ids = torch.randint(0, 4, (x.shape[0],), device=device)
    y = grouped_mm_by_ids(x, w, ids, b)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert not y.isnan().any()
    expected = ref.grouped_mm_by_ids_reference(x.double(), w.double(), ids, b.double())
    assert rel_err(y, expected) < TOL[dtype]


def test_dw_bitwise_identical_on_two_runs(device):
    x, w, b, offsets = make_problem([70, 0, 5, 41], 24, 20, torch.float32, device)
    grads = []
    for _ in range(2):
        wl, bl = leaf(w), leaf(b)
        grouped_mm(x, wl, offsets, bl).square().sum().backward()
        grads.append((wl.grad, bl.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


def test_random_problems_property(device):
    """Random group counts and sizes (empty groups, tails, odd K and N) against the float64
    reference, in both routings."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
    @hypothesis.given(sizes=st.lists(st.integers(0, 40), max_size=10), tail=st.integers(0, 5),
                      K=st.integers(1, 40), N=st.integers(1, 40), bias=st.booleans())
    def run(sizes, tail, K, N, bias):
        x, w, b, offsets = make_problem(sizes, K, N, torch.float32, device, tail=tail, bias=bias)
        check_against_reference(x, w, b, offsets, tail=tail)
        if sizes:
            ids = torch.randint(0, len(sizes), (x.shape[0],), device=device)
            y = grouped_mm_by_ids(x, w, ids, b)
            expected = ref.grouped_mm_by_ids_reference(
                x.double(), w.double(), ids, None if b is None else b.double())
            assert rel_err(y, expected) < TOL[torch.float32]

    run()


# --- by ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_by_ids_matches_sort_then_grouped_mm(device, dtype):
    G, T, K, N = 5, 53, 13, 11
    ids = torch.randint(0, G, (T,), device=device)
    ids[ids == 3] = 2  # an empty group
    x, w, b = (torch.randn(*s, dtype=dtype, device=device) for s in ((T, K), (G, K, N), (G, N)))

    xl, wl, bl = leaf(x), leaf(w), leaf(b)
    y = grouped_mm_by_ids(xl, wl, ids, bl)
    dy = torch.randn_like(y)
    y.backward(dy)

    order = torch.argsort(ids, stable=True)
    offsets = torch.bincount(ids, minlength=G).cumsum(0).to(torch.int32)
    xs, ws, bs = leaf(x[order]), leaf(w), leaf(b)
    ys = grouped_mm(xs, ws, offsets, bs)
    ys.backward(dy[order])
    tol = TOL[dtype]
    assert rel_err(y[order], ys) < tol
    assert rel_err(xl.grad[order], xs.grad) < tol
    assert rel_err(wl.grad, ws.grad) < tol
    assert rel_err(bl.grad, bs.grad) < tol

    x64, w64, b64 = (leaf(t.double()) for t in (x, w, b))
    y64 = ref.grouped_mm_by_ids_reference(x64, w64, ids, b64)
    y64.backward(dy.double())
    assert rel_err(y, y64) < tol
    assert rel_err(xl.grad, x64.grad) < tol
    assert rel_err(wl.grad, w64.grad) < tol
    assert torch.equal(wl.grad[3], torch.zeros_like(wl.grad[3]))
    assert torch.equal(bl.grad[3], torch.zeros_like(bl.grad[3]))


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_by_ids_unchecked_ids_outside_the_groups_give_zero_rows(device, monkeypatch, ids_dtype):
    """Where ids are not checked (a GPU: checking would sync), an id outside [0, G) gives a
    zero row, a zero input gradient and no share of any dW or dBias."""
    monkeypatch.setattr(grouped_gemm, "_values_checkable", lambda t: False)
    G, T, K, N = 4, 29, 9, 7
    ids = torch.randint(0, G, (T,), dtype=ids_dtype)
    bad = torch.tensor([0, 5, 11, 28])
    ids[bad] = torch.tensor([-1, G, -7, G + 9], dtype=ids_dtype)
    ids = ids.to(device)
    x, w, b = (torch.randn(*s, device=device) for s in ((T, K), (G, K, N), (G, N)))
    xl, wl, bl = leaf(x), leaf(w), leaf(b)
    y = grouped_mm_by_ids(xl, wl, ids, bl)
    dy = torch.randn_like(y)
    y.backward(dy)
    good = torch.ones(T, dtype=torch.bool)
    good[bad] = False
    good = good.to(device)
    x64, w64, b64 = (leaf(t.double()) for t in (x, w, b))
    y64 = ref.grouped_mm_by_ids_reference(x64[good], w64, ids[good], b64)
    y64.backward(dy[good].double())
    assert torch.equal(y[~good], torch.zeros_like(y[~good]))
    assert rel_err(y[good], y64) < TOL[torch.float32]
    assert torch.equal(xl.grad[~good], torch.zeros_like(xl.grad[~good]))
    assert rel_err(xl.grad[good], x64.grad[good]) < TOL[torch.float32]
    assert rel_err(wl.grad, w64.grad) < TOL[torch.float32]
    assert rel_err(bl.grad, b64.grad) < TOL[torch.float32]


# --- degenerate sizes -----------------------------------------------------------------------


@pytest.mark.parametrize("sizes,tail,K,N", [
    ([], 6, 4, 5),          # zero groups: every row is past the (absent) last group
    ([0, 0, 0], 4, 4, 5),   # all groups empty
    ([0, 0], 0, 4, 5),      # zero rows
    ([3, 0, 2], 1, 0, 5),   # K = 0: y is the bias, dW is empty
    ([3, 2], 0, 4, 0),      # N = 0
])
def test_degenerate_sizes(device, sizes, tail, K, N):
    x, w, b, offsets = make_problem(sizes, K, N, torch.float32, device, tail=tail)
    x, w, b = leaf(x), leaf(w), leaf(b)
    y = grouped_mm(x, w, offsets, b)
    expected = ref.grouped_mm_reference(x.detach(), w.detach(), offsets, b.detach())
    assert y.shape == (x.shape[0], N)
    assert torch.equal(y, expected)
    y.sum().backward()
    counts = torch.tensor(sizes, dtype=torch.float32).reshape(-1, 1)
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, counts.expand(len(sizes), N).to(device))


@pytest.mark.parametrize("by_ids", [False, True])
def test_float64_passes_gradcheck_without_the_kernels(device, monkeypatch, by_ids):
    """float64 (what torch.autograd.gradcheck needs) takes the torch path on every device:
    checked against a per-row einsum and by finite differences, to second order."""
    def no_kernel(*args):
        raise AssertionError("a Triton kernel was launched on float64")

    monkeypatch.setattr(grouped_gemm, "_launch_grouped_mm", no_kernel)
    monkeypatch.setattr(grouped_gemm, "_launch_grouped_mm_dw", no_kernel)
    x, w, b, offsets = make_problem([2, 0, 3, 1], 3, 2, torch.float64, device, tail=2)
    if by_ids:  # rows in any order, none left out
        ids = torch.randint(0, 4, (x.shape[0],), device=device)
        call = lambda x, w, b: grouped_mm_by_ids(x, w, ids, b)  # noqa: E731
    else:  # rows past offsets[-1] get no group (id G: zero rows, no gradient)
        ids = torch.bucketize(torch.arange(x.shape[0], device=device), offsets, right=True)
        call = lambda x, w, b: grouped_mm(x, w, offsets, b)  # noqa: E731
    w_pad, b_pad = (torch.cat([t, torch.zeros_like(t[:1])]) for t in (w, b))
    expected = torch.einsum("tk,tkn->tn", x, w_pad[ids]) + b_pad[ids]
    y = call(x, w, b)
    assert y.dtype == torch.float64
    assert rel_err(y, expected) < 1e-14
    operands = tuple(leaf(t) for t in (x, w, b))
    assert torch.autograd.gradcheck(call, operands)
    assert torch.autograd.gradgradcheck(call, operands)


def test_by_ids_zero_rows_and_zero_groups(device):
    x = torch.randn(0, 3, device=device)
    assert grouped_mm_by_ids(x, torch.randn(2, 3, 4, device=device),
                             torch.zeros(0, dtype=torch.long, device=device)).shape == (0, 4)
    assert grouped_mm_by_ids(x, torch.randn(0, 3, 4, device=device),
                             torch.zeros(0, dtype=torch.long, device=device)).shape == (0, 4)


# --- second derivatives ---------------------------------------------------------------------


def _differentiate(values, wrt, directions, create_graph):
    """The gradient of sum_i <values[i], directions[i]> w.r.t. each of wrt (zeros where unused)."""
    inner = sum((v * d).sum() for v, d in zip(values, directions) if v is not None)
    grads = torch.autograd.grad(inner, wrt, allow_unused=True, create_graph=create_graph)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]


def _derivatives(call, operands, dy, directions, order):
    """First derivatives of call(x, w, b) in the direction dy taken with create_graph=True
    (what a gradient penalty does), then `order` - 1 further derivatives of their inner product
    with fixed directions, each w.r.t. x, w, b and dy: the last ones are returned."""
    wrt = [leaf(t) for t in (*operands, dy)]
    values = torch.autograd.grad(call(*wrt[:3]), wrt[:3], wrt[3], create_graph=True)
    for i in range(1, order):
        values = _differentiate(values, wrt, directions[i - 1], create_graph=i + 1 < order)
    return values


def _second_derivative_problem(dtype, device, by_ids, path, monkeypatch):
    """(call, its float64 loop reference, x, w, b, dy): groups [5, 0, 9, 3] and two rows outside
    every group (by ids: in the last group, rows shuffled). `path`: "eager" (the public
    function), "op" (the torch.library op and its registered autograd, what torch.compile
    traces) or "fallback" (pure torch, no Triton)."""
    x, w, b, offsets = make_problem([5, 0, 9, 3], 7, 6, dtype, device, tail=2)
    T, G = x.shape[0], w.shape[0]
    dy = torch.randn(T, 6, dtype=dtype, device=device)
    if path == "fallback":
        monkeypatch.setattr(grouped_gemm, "triton_runs_on", lambda *t: False)
    if by_ids:
        ids = torch.repeat_interleave(torch.arange(G), torch.tensor([5, 0, 9, 3 + 2]))
        ids = ids[torch.randperm(T)].to(device)
        perm, sorted_offsets = grouped_gemm.sort_by_group(ids, G)
        call_64 = lambda x, w, b: ref.grouped_mm_by_ids_reference(x, w, ids.cpu(), b)  # noqa: E731
        if path == "op":
            return (lambda x, w, b: torch.ops.mtmm.grouped_mm(x, w, sorted_offsets, b, perm),
                    call_64, x, w, b, dy)
        return lambda x, w, b: grouped_mm_by_ids(x, w, ids, b), call_64, x, w, b, dy
    call_64 = lambda x, w, b: ref.grouped_mm_reference(x, w, offsets.cpu(), b)  # noqa: E731
    if path == "op":
        return (lambda x, w, b: torch.ops.mtmm.grouped_mm(x, w, offsets, b, None),
                call_64, x, w, b, dy)
    return lambda x, w, b: grouped_mm(x, w, offsets, b), call_64, x, w, b, dy


@pytest.mark.parametrize("path", ["eager", "op", "fallback"])
@pytest.mark.parametrize("by_ids", [False, True])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_second_derivatives(device, dtype, by_ids, path, monkeypatch):
    """Gradients of grouped_mm's gradients (w.r.t. x, w, bias and the incoming dy: a gradient
    penalty's backward) against autograd through the float64 loop reference."""
    if path == "fallback" and device.type != "cpu":
        pytest.skip("the pure-torch path serves CPU tensors without the interpreter")
    call, call_64, x, w, b, dy = _second_derivative_problem(dtype, device, by_ids, path,
                                                            monkeypatch)
    directions = [[torch.randn_like(t) for t in (x, w, b)]]
    got = _derivatives(call, (x, w, b), dy, directions, order=2)
    expected = _derivatives(call_64, [t.cpu().double() for t in (x, w, b)], dy.cpu().double(),
                            [[t.cpu().double() for t in directions[0]]], order=2)
    for name, g, e in zip(["x", "w", "bias", "dy"], got, expected):
        assert g.dtype == dtype, name
        assert rel_err(g.cpu(), e) < TOL[dtype], name


@pytest.mark.parametrize("path", ["eager", "op"])
def test_third_derivatives(device, path, monkeypatch):
    """One order further: the second derivatives' own backward (grouped_mm_dw's gradients,
    differentiated again) against the float64 reference."""
    call, call_64, x, w, b, dy = _second_derivative_problem(torch.float32, device, False, path,
                                                            monkeypatch)
    directions = [[torch.randn_like(t) for t in (x, w, b)],
                  [torch.randn_like(t) for t in (x, w, b, dy)]]
    got = _derivatives(call, (x, w, b), dy, directions, order=3)
    expected = _derivatives(call_64, [t.cpu().double() for t in (x, w, b)], dy.cpu().double(),
                            [[t.cpu().double() for t in d] for d in directions], order=3)
    for name, g, e in zip(["x", "w", "bias", "dy"], got, expected):
        assert rel_err(g.cpu(), e) < TOL[torch.float32], name


def test_second_derivatives_of_a_weight_gradient_alone(device):
    """A penalty on dW only (dBias unused) and one on dBias only: each output's gradient alone
    reaches x and dy, and an unused one contributes nothing."""
    x, w, b, offsets = make_problem([4, 0, 6], 5, 3, torch.float32, device, tail=1)
    dy = torch.randn(x.shape[0], 3, device=device)
    for which in (1, 2):  # dw, db
        wrt = [leaf(t) for t in (x, w, b, dy)]
        firsts = torch.autograd.grad(grouped_mm(*wrt[:2], offsets, wrt[2]), wrt[:3], wrt[3],
                                     create_graph=True)
        wrt_64 = [t.detach().cpu().double().requires_grad_() for t in (x, w, b, dy)]
        y_64 = ref.grouped_mm_reference(*wrt_64[:2], offsets.cpu(), wrt_64[2])
        firsts_64 = torch.autograd.grad(y_64, wrt_64[:3], wrt_64[3], create_graph=True)
        got = _differentiate([firsts[which]], [wrt[0], wrt[3]], [firsts[which].detach()], False)
        expected = _differentiate([firsts_64[which]], [wrt_64[0], wrt_64[3]],
                                  [firsts[which].detach().cpu().double()], False)
        for g, e in zip(got, expected):
            assert rel_err(g.cpu(), e) < TOL[torch.float32], which


# --- dispatch modes and meta tensors ---------------------------------------------------------


@pytest.mark.parametrize("by_ids", [False, True])
def test_flop_counter_counts_like_the_loop_reference(device, by_ids):
    """FlopCounterMode sees the ops (eager calls take them under a dispatch mode) and counts,
    forward and backward, what it counts for the float64 loop of torch matmuls: 2 FLOPs per
    multiply-add of the rows some group owns (here not the two tail rows, or by ids all)."""
    x, w, b, offsets = make_problem([5, 0, 9, 3], 7, 6, torch.float32, device, tail=2)
    if by_ids:
        ids = torch.tensor([2, 0, 2, 3, 2, 0], device=device).repeat(4)[:x.shape[0]]
        call = lambda x, w, b: grouped_mm_by_ids(x, w, ids, b)  # noqa: E731
        call_64 = lambda x, w, b: ref.grouped_mm_by_ids_reference(x, w, ids.cpu(), b)  # noqa: E731
    else:
        call = lambda x, w, b: grouped_mm(x, w, offsets, b)  # noqa: E731
        call_64 = lambda x, w, b: ref.grouped_mm_reference(x, w, offsets.cpu(), b)  # noqa: E731
    counts = []
    for fn, operands in ((call, (x, w, b)), (call_64, [t.cpu().double() for t in (x, w, b)])):
        leaves = [leaf(t) for t in operands]
        with FlopCounterMode(display=False) as forward:
            y = fn(*leaves)
        with FlopCounterMode(display=False) as backward:
            y.backward(torch.ones_like(y))
        counts.append((forward.get_total_flops(), backward.get_total_flops()))
    rows = x.shape[0] if by_ids else x.shape[0] - 2
    assert counts[0] == counts[1] == (2 * rows * 7 * 6, 4 * rows * 7 * 6)


def test_value_checks_hold_under_a_dispatch_mode():
    x, w, _, offsets = make_problem([3, 4], 5, 6, torch.float32, "cpu")
    with FlopCounterMode(display=False), pytest.raises(ValueError, match="^offsets"):
        grouped_mm(x, w, offsets.flip(0))


class _Seeing(torch.Tensor):
    """A wrapper subclass (as DTensor is) that records the ops its dispatch receives."""
    seen: list = []

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype,
                                                   device=inner.device, strides=inner.stride())

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func.overloadpacket))
        unwrap = lambda t: t.inner if isinstance(t, _Seeing) else t  # noqa: E731
        return func(*torch.utils._pytree.tree_map(unwrap, args),
                    **torch.utils._pytree.tree_map(unwrap, kwargs or {}))


def test_tensor_subclasses_receive_the_op(device):
    """A tensor subclass with its own dispatch (DTensor, a fake tensor) gets mtmm.grouped_mm,
    not a launch on a wrapper without storage."""
    x, w, b, offsets = make_problem([3, 0, 4], 5, 6, torch.float32, device, tail=1)
    _Seeing.seen = []
    y = grouped_mm(_Seeing(x), w, offsets, b)
    assert "mtmm.grouped_mm" in _Seeing.seen
    assert torch.equal(y, grouped_mm(x, w, offsets, b))
    _Seeing.seen = []
    grouped_mm_by_ids(x, _Seeing(w), torch.tensor([2, 0, 2, 1, 0, 2, 2, 1], device=device), b)
    assert "mtmm.grouped_mm" in _Seeing.seen


def _shapes_without_data(x, w, b, offsets, ids):
    """Forward and backward of both functions on tensors without data: shapes and dtypes."""
    x, w, b = leaf(x), leaf(w), leaf(b)
    for y in (grouped_mm(x, w, offsets, b), grouped_mm_by_ids(x, w, ids, b)):
        assert y.shape == (x.shape[0], w.shape[2]) and y.dtype == x.dtype
        assert y.device == x.device
        y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape


def test_meta_tensors_give_shapes():
    """The ops' fake implementations: a model's shapes on the meta device, with no launch."""
    x, w, b, offsets = make_problem([5, 0, 9], 7, 6, torch.float16, "meta", tail=1)
    _shapes_without_data(x, w, b, offsets, torch.zeros(15, dtype=torch.int64, device="meta"))


def test_fake_tensor_mode_gives_shapes():
    """Under FakeTensorMode (what memory estimators and tracers run) nothing reads values."""
    with FakeTensorMode():
        x, w, b, offsets = make_problem([5, 0, 9], 7, 6, torch.float32, "cpu", tail=1)
        _shapes_without_data(x, w, b, offsets, torch.zeros(15, dtype=torch.int64))


# --- torch.func -------------------------------------------------------------------------------


def test_func_grad_and_grad_of_grad(device):
    """torch.func.grad, and grad of a gradient penalty, against the same transforms over the
    float64 loop reference."""
    x, w, b, offsets = make_problem([5, 0, 9, 3], 7, 6, torch.float32, device, tail=2)

    def loss(w, x, b, mm, offsets):
        return mm(x, w, offsets, b).tanh().sum()

    def penalty(w, x, b, mm, offsets):
        return torch.func.grad(loss, argnums=1)(w, x, b, mm, offsets).square().sum()

    for fn in (loss, penalty):
        got = torch.func.grad(fn)(w, x, b, grouped_mm, offsets)
        expected = torch.func.grad(fn)(*(t.cpu().double() for t in (w, x, b)),
                                       ref.grouped_mm_reference, offsets.cpu())
        assert rel_err(got.cpu(), expected) < 1e-5, fn.__name__


def test_func_vmap_and_jacrev(device):
    """torch.vmap (a loop of calls, one per element) over x, over stacked weights (an
    ensemble), per-sample gradients by offsets and by ids, and jacrev, against loops."""
    x, w, b, offsets = make_problem([5, 0, 9, 3], 7, 6, torch.float32, device, tail=2)
    xs = torch.randn(3, *x.shape, device=device)
    ws = torch.randn(4, *w.shape, device=device)
    got = torch.func.vmap(lambda x: grouped_mm(x, w, offsets, b))(xs)
    assert torch.equal(got, torch.stack([grouped_mm(x_, w, offsets, b) for x_ in xs]))
    got = torch.func.vmap(lambda w: grouped_mm(x, w, offsets, b))(ws)
    assert torch.equal(got, torch.stack([grouped_mm(x, w_, offsets, b) for w_ in ws]))
    y_shape = got.shape[1:]  # an empty batch: the shape of none
    assert torch.func.vmap(lambda w: grouped_mm(x, w, offsets, b))(ws[:0]).shape == (0, *y_shape)

    def row_loss(w, x_row, offsets_row):  # one sample: one row, its own group
        return grouped_mm(x_row[None], w, offsets_row, b).square().sum()

    def ids_loss(w, x_rows, ids_rows):
        return grouped_mm_by_ids(x_rows, w, ids_rows, b).square().sum()

    groups = torch.tensor([2, 0, 3, 3, 1], device=device)
    row_offsets = (torch.arange(4, device=device)[None, :] >= groups[:, None]).to(torch.int32)
    ids = torch.randint(0, 4, (5, 3), device=device)
    xs = torch.randn(5, 3, 7, device=device)
    for fn, data, index in ((row_loss, x[:5], row_offsets), (ids_loss, xs, ids)):
        got = torch.func.vmap(torch.func.grad(fn), in_dims=(None, 0, 0))(w, data, index)
        expected = torch.stack([torch.func.grad(fn)(w, d, i) for d, i in zip(data, index)])
        assert rel_err(got, expected) < 1e-6, fn.__name__

    x, w, b, offsets = make_problem([2, 0, 3], 5, 3, torch.float32, device, tail=1)
    jac = torch.func.jacrev(lambda x: grouped_mm(x, w, offsets, b))(x)  # a call per output
    jac_64 = torch.func.jacrev(lambda x: ref.grouped_mm_reference(
        x, w.cpu().double(), offsets.cpu(), b.cpu().double()))(x.cpu().double())
    assert jac.shape == (6, 3, 6, 5) and rel_err(jac.cpu(), jac_64) < 1e-5


# --- fallback and registration --------------------------------------------------------------


def test_reference_fallback_without_triton(device, monkeypatch):
    """CPU tensors without the interpreter take the pure-torch path, gradients included."""
    x, w, b, offsets = make_problem([4, 0, 9], 7, 5, torch.float32, "cpu", tail=2)
    monkeypatch.setattr(grouped_gemm, "triton_runs_on", lambda *t: False)
    check_against_reference(x, w, b, offsets, tail=2)
    ids = torch.tensor([2, 0, 2, 1, 0, 2])
    xi = leaf(x[:6])
    y = grouped_mm_by_ids(xi, w, ids, b)
    expected = ref.grouped_mm_by_ids_reference(x[:6].double(), w.double(), ids, b.double())
    assert rel_err(y, expected) < 1e-5
    y.sum().backward()
    assert xi.grad.shape == xi.shape


def test_autotuned_path(device, monkeypatch):
    """Through triton.autotune and triton.heuristics (one config under the interpreter, every
    surviving config on a GPU)."""
    tuned = grouped_gemm.is_interpreter() or device.type == "cuda"
    monkeypatch.setattr(grouped_gemm, "AUTOTUNE", tuned)
    monkeypatch.setattr(grouped_gemm, "_TUNED_CONFIGS", {})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, w, b, offsets = make_problem([30, 0, 97, 5], 64, 40, dtype, device, tail=2)
    check_against_reference(x, w, b, offsets, tail=2)
    if not tuned:
        return
    # Tuned once per key (forward, dX with w's other layout, dW); later calls launch the
    # chosen config directly, without the autotuner, and give the same results.
    chosen = grouped_gemm._TUNED_CONFIGS
    assert {k[0] for k in chosen} == {grouped_gemm._grouped_mm_tuned,
                                      grouped_gemm._grouped_mm_dw_tuned}
    assert len(chosen) == 3
    calls = []
    real_run = grouped_gemm._grouped_mm_tuned.run
    monkeypatch.setattr(grouped_gemm._grouped_mm_tuned, "run",
                        lambda *a, **k: calls.append(1) or real_run(*a, **k))
    first = grouped_mm(x, w, offsets, b)
    again = grouped_mm(x, w, offsets, b)
    assert calls == [] and len(chosen) == 3
    assert torch.equal(first, again)
    check_against_reference(x, w, b, offsets, tail=2)


def test_by_ids_tunes_apart_from_grouped_mm(device, monkeypatch):
    """grouped_mm_by_ids gathers its rows with pointer loads: its configs are tuned by their
    own tuners (same keys), not borrowed from grouped_mm's descriptor-build tuning."""
    tuned = grouped_gemm.is_interpreter() or device.type == "cuda"
    if not tuned:
        pytest.skip("no autotuning on this device")
    monkeypatch.setattr(grouped_gemm, "AUTOTUNE", True)
    monkeypatch.setattr(grouped_gemm, "_TUNED_CONFIGS", {})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, w, b, offsets = make_problem([30, 0, 97, 5], 64, 40, dtype, device)
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor([30, 0, 97, 5]))
    ids = ids[torch.randperm(ids.numel())].to(device)
    perm = torch.sort(ids, stable=True)[1]
    y_sorted = grouped_mm(x[perm], w, offsets, b)
    y = grouped_mm_by_ids(leaf(x), leaf(w), ids, b)
    y.sum().backward()  # dX through the gather tuner, dW through the gather dW tuner
    assert rel_err(y[perm], y_sorted) < TOL[dtype]
    tuners = {k[0] for k in grouped_gemm._TUNED_CONFIGS}
    assert tuners == {grouped_gemm._grouped_mm_tuned, grouped_gemm._grouped_mm_gather_tuned,
                      grouped_gemm._grouped_mm_dw_gather_tuned}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_config_pruning(dtype, monkeypatch):
    """The GPU autotuner's pruning, called the way triton.autotune calls it (every kernel
    argument by keyword): tile height follows the mean group size, fp32 shrinks BLOCK_K.
    Without the warp-specialized configs, whatever the Triton release: their pruning is
    test_warp_specialized_configs_are_offered_where_they_compile's."""
    monkeypatch.setattr(grouped_gemm, "WARP_SPECIALIZE", False)
    tuner = triton.autotune(configs=grouped_gemm._mm_configs(interpreter=False), key=["K"],
                            prune_configs_by={"early_config_prune": grouped_gemm._prune_mm})(
                                grouped_gemm._grouped_mm_kernel)
    x = torch.empty(1, 1, dtype=dtype)
    tuner.nargs = {}
    for tma_ok, w_tma_ok in ((False, False), (True, False), (False, True)):
        for bucket, heights in ((3, {64}), (9, {64, 128}), (13, {128})):
            kept = tuner.prune_configs({"M_BUCKET": bucket, "x_ptr": x, "TMA_OK": tma_ok,
                                        "W_TMA_OK": w_tma_ok, "BLOCK_G": 16})
            assert {c.kwargs["BLOCK_M"] for c in kept} == heights
            assert all(c.kwargs["BLOCK_K"] <= (32 if dtype == torch.float32 else 64) for c in kept)
            # descriptor builds only where the operands allow them (w alone for gathered
            # rows), and then first
            any_tma = tma_ok or w_tma_ok
            assert {c.kwargs["TMA"] for c in kept} == ({True, False} if any_tma else {False})
            assert kept[0].kwargs["TMA"] == any_tma
            assert not any(c.kwargs.get("TMA_STORE") for c in kept)  # y's descriptor: no
        # stores through y's descriptor only where y allows one, never flattened
        kept = tuner.prune_configs({"M_BUCKET": 12, "x_ptr": x, "TMA_OK": True,
                                    "W_TMA_OK": False, "Y_TMA_OK": True, "BLOCK_G": 16})
        stores = [c for c in kept if c.kwargs.get("TMA_STORE")]
        assert stores and all(c.kwargs["TMA"] and not c.kwargs["FLATTEN"] for c in stores)
    dw_configs = grouped_gemm._dw_configs(interpreter=False)
    dw_tuner = triton.autotune(configs=dw_configs, key=["K"],
                               prune_configs_by={"early_config_prune": grouped_gemm._prune_dw})(
                                   grouped_gemm._grouped_mm_dw_kernel)
    dw_tuner.nargs = {}
    # stores through dw's descriptor only where dw allows one (never in fp32), flattened too
    for dw_tma_ok in (False, True):
        kept = dw_tuner.prune_configs({"M_BUCKET": 9, "x_ptr": x, "TMA_OK": True,
                                       "DW_TMA_OK": dw_tma_ok})
        stores = [c for c in kept if c.kwargs.get("TMA_STORE")]
        assert bool(stores) == (dw_tma_ok and dtype != torch.float32)
        assert all(c.kwargs["TMA"] for c in stores)
        assert {bool(c.kwargs.get("FLATTEN")) for c in stores} == ({False, True} if stores
                                                                  else set())
    monkeypatch.setattr(grouped_gemm, "DW_TMA_STORE", False)
    assert not any(c.kwargs.get("TMA_STORE") for c in dw_tuner.prune_configs(
        {"M_BUCKET": 9, "x_ptr": x, "TMA_OK": True, "DW_TMA_OK": True}))
    monkeypatch.setattr(grouped_gemm, "DW_TMA_STORE", True)
    for tma_ok in (False, True):
        kept = dw_tuner.prune_configs({"M_BUCKET": 9, "x_ptr": x, "TMA_OK": tma_ok})
        assert len(kept) == sum((tma_ok or not c.kwargs["TMA"]) and not c.kwargs.get("TMA_STORE")
                                and not c.kwargs.get("WS") for c in dw_configs)
        assert all(c.kwargs["BLOCK_M"] <= (32 if dtype == torch.float32 else 64) for c in kept)
        assert kept[0].kwargs["TMA"] == tma_ok
        # the flattened builds, last, unless switched off
        flat = [c.kwargs.get("FLATTEN", False) for c in kept]
        assert flat == sorted(flat) and {c.kwargs["TMA"] for c in kept if c.kwargs.get(
            "FLATTEN")} == ({True, False} if tma_ok else {False})
        monkeypatch.setattr(grouped_gemm, "DW_FLATTEN", False)
        unflat = dw_tuner.prune_configs({"M_BUCKET": 9, "x_ptr": x, "TMA_OK": tma_ok})
        assert unflat == [c for c in kept if not c.kwargs.get("FLATTEN")]
        monkeypatch.setattr(grouped_gemm, "DW_FLATTEN", True)
        # the persistent ones in the balanced tile order, unless switched off
        assert [c.kwargs.get("BALANCED", False) for c in kept] == [
            bool(c.kwargs.get("PROGS_PER_SM")) for c in kept]
        monkeypatch.setattr(grouped_gemm, "DW_BALANCED", False)
        in_group_order = dw_tuner.prune_configs({"M_BUCKET": 9, "x_ptr": x, "TMA_OK": tma_ok})
        assert [({**c.kwargs, "BALANCED": False}, c.num_warps, c.num_stages) for c in kept] == [
            (c.kwargs, c.num_warps, c.num_stages) for c in in_group_order]
        monkeypatch.setattr(grouped_gemm, "DW_BALANCED", True)
        # descriptors bounded at the group's end row (the kernel's default), unless switched off
        assert not any("BOUNDED" in c.kwargs for c in kept)
        monkeypatch.setattr(grouped_gemm, "DW_BOUNDED", False)
        unbounded = dw_tuner.prune_configs({"M_BUCKET": 9, "x_ptr": x, "TMA_OK": tma_ok})
        assert [({**c.kwargs, "BOUNDED": False}, c.num_warps, c.num_stages) for c in kept] == [
            (c.kwargs, c.num_warps, c.num_stages) for c in unbounded]
        monkeypatch.setattr(grouped_gemm, "DW_BOUNDED", True)


def test_fake_implementations_trace(device):
    """The registered fake kernels give the right shapes under FakeTensorMode (what
    torch.compile sees)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(10, 4)
        w = torch.empty(3, 4, 6)
        offsets = torch.empty(3, dtype=torch.int32)
        y = torch.ops.mtmm.grouped_mm(x, w, offsets, None, None)
        dw, db = torch.ops.mtmm.grouped_mm_dw(x, y, offsets, None, True)
    assert y.shape == (10, 6)
    assert dw.shape == (3, 4, 6) and db.shape == (3, 6)


def test_opcheck(device):
    x, w, b, offsets = make_problem([3, 0, 4], 5, 6, torch.float32, device, tail=1)
    ops = torch.ops.mtmm
    torch.library.opcheck(ops.grouped_mm.default, (leaf(x), leaf(w), offsets, leaf(b), None))
    dy = torch.randn(8, 6, device=device)
    torch.library.opcheck(ops.grouped_mm_dw.default, (x, dy, offsets, None, True))


# --- bad input ------------------------------------------------------------------------------


def _bad_inputs():
    x, w, o = torch.randn(6, 4), torch.randn(2, 4, 5), torch.tensor([2, 6], dtype=torch.int32)
    ids = torch.tensor([0, 1, 1, 0, 1, 0])
    return [
        ("x rank", lambda: grouped_mm(x[0], w, o), ValueError, "x"),
        ("w rank", lambda: grouped_mm(x, w[0], o), ValueError, "w"),
        ("w K", lambda: grouped_mm(x, torch.randn(2, 3, 5), o), ValueError, "w"),
        ("x type", lambda: grouped_mm(x.numpy(), w, o), TypeError, "x"),
        ("x int", lambda: grouped_mm(x.long(), w.long(), o), TypeError, "x"),
        ("dtype mix", lambda: grouped_mm(x, w.half(), o), TypeError, "w"),
        ("offsets float", lambda: grouped_mm(x, w, o.float()), TypeError, "offsets"),
        ("offsets rank", lambda: grouped_mm(x, w, o[None]), ValueError, "offsets"),
        ("G mismatch", lambda: grouped_mm(x, w, o[:1]), ValueError, "offsets"),
        ("decreasing", lambda: grouped_mm(x, w, torch.tensor([4, 3])), ValueError, "offsets"),
        ("negative", lambda: grouped_mm(x, w, torch.tensor([-1, 3])), ValueError, "offsets"),
        ("past T", lambda: grouped_mm(x, w, torch.tensor([2, 7])), ValueError, "offsets"),
        ("bias shape", lambda: grouped_mm(x, w, o, torch.randn(2, 4)), ValueError, "bias"),
        ("bias dtype", lambda: grouped_mm(x, w, o, torch.randn(2, 5).double()), TypeError, "bias"),
        ("device", lambda: grouped_mm(x, w.to("meta"), o), ValueError, "w"),
        ("ids range", lambda: grouped_mm_by_ids(x, w, ids + 1), ValueError, "group_ids"),
        ("ids negative", lambda: grouped_mm_by_ids(x, w, ids - 1), ValueError, "group_ids"),
        ("ids length", lambda: grouped_mm_by_ids(x, w, ids[:5]), ValueError, "group_ids"),
        ("ids float", lambda: grouped_mm_by_ids(x, w, ids.float()), TypeError, "group_ids"),
        ("ids on no groups", lambda: grouped_mm_by_ids(x, w[:0], ids), ValueError, "group_ids"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, call, exc, name = case
    with pytest.raises(exc, match=rf"^{name}\b"):
        call()


# --- GPU only -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [True, False])
def test_bf16_skewed_groups(monkeypatch, tma):
    monkeypatch.setattr(grouped_gemm, "TMA", tma)
    sizes = [700, 0, 129, 1, 2048, 0, 63, 300]
    x, w, b, offsets = make_problem(sizes, 520, 392, torch.bfloat16, "cuda", tail=17,
                                    w_transposed=True)
    check_against_reference(x, w, b, offsets, tail=17)


@pytest.mark.gpu
def test_bf16_flattened_pipeline(monkeypatch):
    """The flattened tile loop (one software pipeline across tiles) is a compiler
    transformation the interpreter does not do: its configs are checked here, forced one by
    one, tail rows of NaN and inf included."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the flattened configs take descriptors (Hopper or later)")
    sizes = [700, 0, 129, 1, 2048, 0, 63, 300]
    x, w, b, offsets = make_problem(sizes, 512, 384, torch.bfloat16, "cuda", tail=17,
                                    w_transposed=True)
    x[-17:-8] = float("nan")
    x[-8:] = float("inf")
    flattened = [c for c in grouped_gemm._mm_configs(False) if c.kwargs["FLATTEN"]]
    assert flattened
    for config in flattened:  # forward and dX (the same kernel), dW, against float64
        monkeypatch.setattr(grouped_gemm, "_MM_CONFIGS", [config])
        check_against_reference(x, w, b, offsets, tail=17)


def _force_dw_config(monkeypatch, config, twin: dict, K: int = 512, N: int = 384) -> None:
    """Force a dW config on the device, then its twin (the same tile, warps and stages without
    what is under test): the same bits, by ids too for pointer loads (gathered rows take no
    descriptors); then forward and every gradient through the config against float64. Ragged
    groups: empty ones first, inside and last, a one-row group, partial row tiles, rows past
    the last group."""
    sizes = [0, 700, 129, 1, 2048, 0, 63, 300, 0]
    x, w, b, offsets = make_problem(sizes, K, N, torch.bfloat16, "cuda", tail=17)
    dy = torch.randn(x.shape[0], N, dtype=torch.bfloat16, device="cuda")
    perm = torch.randperm(x.shape[0], device="cuda")[:sum(sizes)].to(torch.int32)
    results = []
    for kwargs in (config.kwargs, twin):
        monkeypatch.setattr(grouped_gemm, "_DW_CONFIGS", [triton.Config(
            kwargs, num_warps=config.num_warps, num_stages=config.num_stages)])
        monkeypatch.setattr(grouped_gemm, "_PLANS", {})
        results.append([out for p in ([None] if config.kwargs["TMA"] else [None, perm])
                        for out in grouped_gemm._launch_grouped_mm_dw(x, dy, offsets, p, True)])
    for got, want in zip(*results):
        assert torch.equal(got, want)
    monkeypatch.setattr(grouped_gemm, "_DW_CONFIGS", [config])
    monkeypatch.setattr(grouped_gemm, "_PLANS", {})
    check_against_reference(x, w, b, offsets, tail=17)


_PERSISTENT_DW = [c for c in grouped_gemm._dw_configs(False) if c.kwargs.get("PROGS_PER_SM")]


@pytest.mark.gpu
@pytest.mark.parametrize("config", _PERSISTENT_DW, ids=lambda c: "{BLOCK_K}x{BLOCK_N}x{BLOCK_M}"
                         " tma={TMA}".format(**c.kwargs)
                         + (" store" if c.kwargs.get("TMA_STORE") else "")
                         + f" w{c.num_warps} s{c.num_stages}"
                         + (" flat" if c.kwargs.get("FLATTEN") else " loop"))
def test_bf16_persistent_dw_configs(monkeypatch, config):
    """The autotuner's persistent dW configs (flattened or a loop per tile, in the balanced
    tile order), forced one at a time on the device (the interpreter checks the loops'
    logic; this checks the compiled pipelines and the sort): against float64 and bit for bit
    against the one-program-per-tile build of the same loads, tile, warps and stages; the
    pointer builds by ids too (gathered rows take no descriptors). The grid is sized as for
    a 3-SM device, so that every program takes several tiles (a whole device would give the
    72 to 216 tiles here one program each)."""
    if config.kwargs["TMA"] and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper or later GPU")
    monkeypatch.setattr(grouped_gemm, "_num_sms", lambda device: 3)
    _force_dw_config(monkeypatch, config, {k: v for k, v in config.kwargs.items()
                                           if k not in ("FLATTEN", "PROGS_PER_SM", "BALANCED")})


_TILE_TMA_DW = [c for c in grouped_gemm._dw_configs(False)
                if c.kwargs["TMA"] and not c.kwargs.get("PROGS_PER_SM")]


@pytest.mark.gpu
@pytest.mark.parametrize("config", _TILE_TMA_DW, ids=lambda c: "{BLOCK_K}x{BLOCK_N}x{BLOCK_M}"
                         .format(**c.kwargs) + (" store" if c.kwargs.get("TMA_STORE") else "")
                         + f" w{c.num_warps} s{c.num_stages}")
def test_bf16_bounded_dw_descriptors(monkeypatch, config):
    """The one-program-per-tile descriptor dW configs, whose descriptors end at the group's
    last row, forced one at a time on the device (the interpreter checks the logic; this
    checks the hardware's zero fill past a descriptor's rows): groups whose last row tile is
    partial (the rows past the end must read as zeros, never as the next group's rows),
    empty groups first, inside and last, a one-row group, rows past the last group; against
    float64 and bit for bit against the same config with descriptors over all rows and
    masked loads for the partial tile (BOUNDED=False: the code run 5 measured)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper or later GPU")
    _force_dw_config(monkeypatch, config, {**config.kwargs, "BOUNDED": False})


_TMA_STORE_DW = [c for c in grouped_gemm._dw_configs(False) if c.kwargs.get("TMA_STORE")]


@pytest.mark.gpu
@pytest.mark.parametrize("config", _TMA_STORE_DW, ids=lambda c: "{BLOCK_K}x{BLOCK_N}x{BLOCK_M}"
                         .format(**c.kwargs) + f" w{c.num_warps} s{c.num_stages}"
                         + (" p{PROGS_PER_SM}".format(**c.kwargs) if c.kwargs.get("PROGS_PER_SM")
                            else "") + (" flat" if c.kwargs.get("FLATTEN") else ""))
def test_bf16_tma_store_dw_configs(monkeypatch, config):
    """The dW configs that store finished tiles through dw's descriptor, forced one at a time
    on the device (the interpreter checks the logic; this checks the compiled TMA stores and
    their overlap with the next tile): K and N not multiples of the tile (the stores clipped
    at each group's K rows and at N), empty groups, partial row tiles; against float64 and bit
    for bit against the same config's pointer stores. The grid is sized as for a 3-SM device,
    so that a persistent program stores several tiles."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA stores need Hopper or later")
    monkeypatch.setattr(grouped_gemm, "_num_sms", lambda device: 3)
    _force_dw_config(monkeypatch, config, {**config.kwargs, "TMA_STORE": False}, K=200, N=328)


_WS_CONFIGS = ([("mm", c) for c in grouped_gemm._mm_configs(False) if c.kwargs.get("WS")]
               + [("dw", c) for c in grouped_gemm._dw_configs(False) if c.kwargs.get("WS")])


@pytest.mark.gpu
@pytest.mark.parametrize("kind, config", _WS_CONFIGS, ids=[
    f"{kind} " + ("{BLOCK_M}x{BLOCK_N}x{BLOCK_K}" if kind == "mm" else
                  "{BLOCK_K}x{BLOCK_N}x{BLOCK_M}").format(**c.kwargs)
    + f" w{c.num_warps} s{c.num_stages}" for kind, c in _WS_CONFIGS])
def test_bf16_warp_specialized_configs(monkeypatch, kind, config):
    """The autotuner's warp-specialized configs, forced one at a time on the device (the
    interpreter checks the scan and the dBias loop; this checks what Triton's warp
    specialization compiles: the producer running ahead, the consumers' halves of the tile,
    their barriers): forward, dX and dW with dBias against float64 on ragged groups (empty
    ones first, inside and last, a one-row group, partial tiles, tail rows), the same bits on
    a second call; the forward also with 70 groups, where a config tuned on fewer runs
    unspecialized."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the warp-specialized configs take descriptors (Hopper or later)")
    if not grouped_gemm._WS_TRITON:
        pytest.skip("warp-specialized configs need Triton 3.6+")
    monkeypatch.setattr(grouped_gemm, "_WS_MIN_DW_BUCKET", 0)
    monkeypatch.setattr(grouped_gemm, "_MM_CONFIGS" if kind == "mm" else "_DW_CONFIGS", [config])
    launched = []
    real_launch = grouped_gemm.direct_launch.launch

    def spy(kernel, grid, head, tail, options):
        launched.append(dict(zip(kernel.arg_names, head + tail)).get("WS", False))
        return real_launch(kernel, grid, head, tail, options)
    monkeypatch.setattr(grouped_gemm.direct_launch, "launch", spy)
    sizes = [0, 700, 129, 1, 2048, 0, 63, 300, 0]
    x, w, b, offsets = make_problem(sizes, 512, 384, torch.bfloat16, "cuda", tail=17,
                                    w_transposed=True)
    check_against_reference(x, w, b, offsets, tail=17)
    assert any(launched), "no warp-specialized launch"
    dy = torch.randn(x.shape[0], 384, dtype=torch.bfloat16, device="cuda")
    if kind == "mm":
        first, second = (grouped_gemm._launch_grouped_mm(x, w, offsets, b, None)
                         for _ in range(2))
        assert torch.equal(first, second)
        monkeypatch.setattr(grouped_gemm, "_prune_mm", lambda configs, named_args, **kw: configs)
        many = torch.randint(0, 60, (70,)).tolist()
        x, w, b, offsets = make_problem(many, 256, 384, torch.bfloat16, "cuda", tail=5)
        check_against_reference(x, w, b, offsets, tail=5)
    else:
        first, second = (grouped_gemm._launch_grouped_mm_dw(x, dy, offsets, None, True)
                         for _ in range(2))
        for a, c in zip(first, second):
            assert torch.equal(a, c)


@pytest.mark.gpu
def test_bf16_tma_store_configs(monkeypatch):
    """The configs that store whole tiles through y's descriptor, forced one by one on the
    device (the interpreter checks the logic; this checks the compiled TMA stores): groups
    with whole tiles, partial ones, one row short of whole, and tail rows."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA stores need Hopper or later")
    stores = [c for c in grouped_gemm._mm_configs(False) if c.kwargs.get("TMA_STORE")]
    assert stores
    x, w, b, offsets = make_problem([1024, 127, 0, 255, 300], 512, 384, torch.bfloat16, "cuda",
                                    tail=9, w_transposed=True)
    for config in stores:
        monkeypatch.setattr(grouped_gemm, "_MM_CONFIGS", [config])
        check_against_reference(x, w, b, offsets, tail=9)


@pytest.mark.gpu
def test_gpu_many_groups_fp32():
    sizes = torch.randint(0, 200, (130,)).tolist()
    x, w, b, offsets = make_problem(sizes, 72, 136, torch.float32, "cuda", tail=5)
    check_against_reference(x, w, b, offsets, tail=5)


@pytest.mark.gpu
def test_gpu_by_ids_bf16():
    G, T, K, N = 9, 3000, 256, 384
    ids = torch.randint(0, G, (T,), device="cuda")
    x, w, b = (torch.randn(*s, dtype=torch.bfloat16, device="cuda")
               for s in ((T, K), (G, K, N), (G, N)))
    xl, wl, bl = leaf(x), leaf(w), leaf(b)
    y = grouped_mm_by_ids(xl, wl, ids, bl)
    y.float().square().sum().backward()
    x64, w64, b64 = (leaf(t.double()) for t in (x, w, b))
    y64 = ref.grouped_mm_by_ids_reference(x64, w64, ids, b64)
    y64.square().sum().backward()
    assert rel_err(y, y64) < 1e-2
    assert rel_err(xl.grad, x64.grad) < 1e-2 and rel_err(wl.grad, w64.grad) < 1e-2


@pytest.mark.gpu
def test_gpu_second_derivatives_bf16_repeated():
    """bf16 second derivatives, four times over the same shapes: from the third call of a shape
    the C++ launch path (docs/host_path.md) takes the forward, and its autograd node must hand
    create_graph=True to the differentiable Python backward."""
    x, w, b, offsets = make_problem([300, 0, 77, 1000], 128, 64, torch.bfloat16, "cuda", tail=3)
    dy = torch.randn(x.shape[0], 64, dtype=torch.bfloat16, device="cuda")
    directions = [[torch.randn_like(t) for t in (x, w, b)]]
    call = lambda x, w, b: grouped_mm(x, w, offsets, b)  # noqa: E731
    call_64 = lambda x, w, b: ref.grouped_mm_reference(x, w, offsets.cpu(), b)  # noqa: E731
    expected = _derivatives(call_64, [t.cpu().double() for t in (x, w, b)], dy.cpu().double(),
                            [[t.cpu().double() for t in directions[0]]], order=2)
    for _ in range(4):
        got = _derivatives(call, (x, w, b), dy, directions, order=2)
        for name, g, e in zip(["x", "w", "bias", "dy"], got, expected):
            assert rel_err(g.cpu(), e) < TOL[torch.bfloat16], name


@pytest.mark.gpu
def test_gpu_dw_bitwise_identical_on_two_runs():
    x, w, b, offsets = make_problem([4000, 0, 513, 9000], 256, 320, torch.bfloat16, "cuda")
    grads = []
    for _ in range(2):
        wl, bl = leaf(w), leaf(b)
        grouped_mm(x, wl, offsets, bl).float().square().sum().backward()
        grads.append((wl.grad, bl.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.gpu
def test_cuda_graph_replay_follows_new_offsets():
    """The tile schedule lives on the device: a captured graph replayed after the offsets
    (same G, same T) change in place computes the new grouping."""
    G, T, K, N = 6, 1000, 128, 96
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(G, K, N, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(G, N, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([100, 100, 400, 650, 900, 990], dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning and compilation happen outside capture
        for _ in range(2):
            grouped_mm(x, w, offsets, b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = grouped_mm(x, w, offsets, b)
    for new in ([10, 500, 500, 501, 700, 1000], [0, 0, 0, 0, 0, 3], [1000] * 6):
        offsets.copy_(torch.tensor(new, dtype=torch.int32))
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected = ref.grouped_mm_reference(x.double(), w.double(), offsets.cpu(), b.double())
        assert rel_err(y, expected) < 1e-2
        assert not y.isnan().any()


@pytest.mark.gpu
def test_compile_fullgraph_forward_backward():
    x, w, b, offsets = make_problem([300, 0, 77, 1000], 128, 64, torch.bfloat16, "cuda", tail=3)

    def step(x, w, b, offsets):
        return grouped_mm(x, w, offsets, b).float().square().mean()

    compiled = torch.compile(step, fullgraph=True)
    eager_args = [leaf(x), leaf(w), leaf(b)]
    compiled_args = [leaf(x), leaf(w), leaf(b)]
    step(*eager_args, offsets).backward()
    compiled(*compiled_args, offsets).backward()
    for e, c in zip(eager_args, compiled_args):
        assert rel_err(c.grad, e.grad) < 1e-2


@pytest.mark.gpu
@pytest.mark.slow
def test_64bit_addressing():
    """x has more than 2**31 elements: row offsets must be computed in 64 bits."""
    T, K, N = 70_000, 32_768, 16
    x = torch.empty(T, K, device="cuda", dtype=torch.bfloat16).normal_()
    w = torch.randn(2, K, N, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([5, T], dtype=torch.int32, device="cuda")
    y = grouped_mm(x, w, offsets)
    last = slice(T - 40, T)
    expected = x[last].double() @ w[1].double()
    assert rel_err(y[last], expected) < 1e-2
    assert rel_err(y[:5], x[:5].double() @ w[0].double()) < 1e-2
