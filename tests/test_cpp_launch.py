"""The grouped GEMM's C++ launch path (mtmm_kernels/_cpp_launch.py, mtmm_kernels/csrc).

On a CPU the extension runs in dry-run mode: launches are logged, not sent. Plans made by hand
test its own logic (keys, grid rule, parameter packing, autograd, the fallback); the real
kernels, compiled for sm_90 on the CPU, test that it hands the driver what Triton's launcher
receives on the Python path (bench/cpp_launch_check.py, in a process without the
interpreter). On a GPU its results must equal the Python path's bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from mtmm_kernels import _cpp_launch as cpp_launch  # noqa: E402
from mtmm_kernels import _direct_launch as direct_launch  # noqa: E402
from mtmm_kernels import grouped_gemm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_BUILDS = shutil.which("ninja") is not None and shutil.which(os.environ.get("CXX", "c++"))
needs_build = pytest.mark.skipif(not _BUILDS, reason="needs ninja and a C++ compiler")

G, K, N = 5, 24, 40
FUNCTION = 0xF00D  # a stand-in CUfunction: dry runs only log it


@pytest.fixture
def ext():
    """The extension in dry-run mode with an empty plan table, restored afterwards."""
    module = cpp_launch.extension()
    assert module is not None, "the C++ launch path did not build"
    module.clear()
    module.set_dry_run(True)
    module.take_launch_log()
    yield module
    module.set_dry_run(False)
    module.clear()
    module.set_backward_fallback(cpp_launch._python_backward)


def _operands(T=1000, dtype=torch.float16, bias=False):
    x = torch.randn(T, K).to(dtype)
    w = torch.randn(G, N, K).to(dtype).transpose(1, 2)
    offsets = torch.tensor([T // 5, T // 3, T // 2, T // 2, T], dtype=torch.int32)
    b = torch.randn(G, N).to(dtype) if bias else None
    return x, w, offsets, b


# Parameter slots of the hand-made plans: (source, bytes, value); sources 0-6 are the per-call
# values (tensor addresses, then T), -1 a fixed value.
MM_SLOTS = [(0, 8, 0), (1, 8, 0), (2, 8, 0), (3, 8, 0), (4, 8, 0), (5, 8, 0), (6, 4, 0),
            (-1, 4, 77), (-1, 8, -5)]
DW_SLOTS = [(0, 8, 0), (1, 8, 0), (2, 8, 0), (3, 8, 0), (4, 8, 0), (5, 8, 0), (6, 4, 0),
            (-1, 2, 9)]


def _register_mm(ext, x, w, b, offsets, perm=None, block_m=64, block_n=32, cap=7, scratch=0):
    ext.register_mm(x, w, b, offsets, perm, (FUNCTION, 128, 4096, scratch, MM_SLOTS), block_m,
                    block_n, cap)


def _register_backward(ext, x, w, b, offsets, need_bias, perm=None):
    """Plans for a fresh contiguous dy: dX (the forward kernel, K and N exchanged) and dW."""
    dy = torch.empty(x.shape[0], N, dtype=x.dtype)
    _register_mm(ext, dy, w.transpose(1, 2), None, offsets, perm)
    ext.register_dw(x, dy, offsets, perm, need_bias, (FUNCTION + 1, 256, 0, 64, DW_SLOTS), 11)


def _planned_training_call(ext):
    """x and w that need gradients, every plan of their forward and backward, and the output
    of one C++ call."""
    x, w, offsets, _ = _operands()
    x.requires_grad_(), w.requires_grad_()
    _register_mm(ext, x, w, None, offsets)
    _register_backward(ext, x, w, None, offsets, need_bias=False)
    return x, w, offsets, ext.grouped_mm(x, w, offsets, None)


def _params(record):
    """The logged parameters as ints (addresses and values)."""
    return [int.from_bytes(p, "little", signed=True) for p in record[5]]


@needs_build
def test_missing_plan_returns_nothing_and_launches_nothing(ext):
    x, w, offsets, _ = _operands()
    assert ext.grouped_mm(x, w, offsets, None) is None
    assert ext.take_launch_log() == []


@needs_build
@pytest.mark.parametrize("T", [1000, 1001, 17, 1])
def test_forward_launch_packs_the_plan(ext, T):
    x, w, offsets, _ = _operands(T)
    offsets.clamp_(max=T)
    _register_mm(ext, x, w, None, offsets, scratch=256)
    y = ext.grouped_mm(x, w, offsets, None)
    assert y.shape == (T, N) and y.dtype == x.dtype and y.is_contiguous()
    [record] = ext.take_launch_log()
    function, grid, block, shared, stream, raw, scratch = record
    tiles = (-(-T // 64) + G + 1) * -(-N // 32)
    assert (function, grid, block, shared, stream) == (FUNCTION, min(tiles, 7), 128, 4096, 0)
    assert scratch == grid * 256
    assert [len(p) for p in raw] == [8, 8, 8, 8, 8, 8, 4, 4, 8, 8, 8]
    params = _params(record)
    # bias absent: y stands in for it; no permutation: offsets stand in for it
    assert params[:9] == [x.data_ptr(), w.data_ptr(), y.data_ptr(), y.data_ptr(),
                          offsets.data_ptr(), offsets.data_ptr(), T, 77, -5]
    assert params[9] != 0 and params[10] == 0  # global scratch, profile scratch


@needs_build
def test_keys_tell_apart_what_the_python_plans_and_triton_do(ext):
    x, w, offsets, b = _operands(1000, bias=True)
    _register_mm(ext, x, w, b, offsets)
    assert ext.grouped_mm(x, w, offsets, b) is not None
    for name, args in {
        "no bias": (x, w, offsets, None),
        "dtype": (x.half().bfloat16(), w.bfloat16(), offsets, b.bfloat16()),
        "w strides": (x, w.contiguous(), offsets, b),
        "x misaligned": (torch.empty(1000 * K + 1, dtype=x.dtype)[1:].view(1000, K), w,
                         offsets, b),
        "int64 offsets": (x, w, offsets.long(), b),
        "offsets misaligned": (x, w, torch.cat([offsets[:1], offsets])[1:], b),
        "T == 1": (x[:1], w, offsets.clamp(max=1), b),
        "T % 16 == 0": (x[:992], w, offsets.clamp(max=992), b),
    }.items():
        assert ext.grouped_mm(*args) is None, name


@needs_build
def test_rows_in_any_order_launch_through_the_permutation(ext):
    x, w, offsets, _ = _operands()
    x.requires_grad_(), w.requires_grad_()
    perm = torch.randperm(1000).to(torch.int32)
    _register_mm(ext, x, w, None, offsets, perm)
    _register_backward(ext, x, w, None, offsets, need_bias=False, perm=perm)
    assert ext.grouped_mm(x, w, offsets, None) is None  # planned with a permutation only
    assert ext.grouped_mm(x, w, offsets, None, perm.long()) is None  # its dtype is keyed
    y = ext.grouped_mm(x, w, offsets, None, perm)
    dy = torch.randn(y.shape).to(y.dtype)
    torch.autograd.grad(y, [x, w], dy)
    for record, source in zip(ext.take_launch_log(), (5, 5, 3)):  # forward, dX, dW
        assert _params(record)[source] == perm.data_ptr()


@needs_build
def test_operands_on_another_device_are_left_to_python(ext):
    x, w, offsets, _ = _operands()
    _register_mm(ext, x, w, None, offsets)
    meta = torch.empty(1000, dtype=torch.int32, device="meta")
    assert ext.grouped_mm(x, w, offsets, None, meta) is None
    assert ext.grouped_mm(x, w.to("meta"), offsets, None) is None
    assert ext.grouped_mm_dw(x, torch.empty(1000, N, dtype=x.dtype, device="meta"), offsets,
                             None, False) is None
    assert ext.take_launch_log() == []


@needs_build
def test_tile_height_bucket_matches_pythons(ext):
    x, w, offsets, _ = _operands(3000)
    _register_mm(ext, x[:1000], w, None, offsets.clamp(max=1000))
    bucket = grouped_gemm._m_bucket(1000, G)
    for T in range(2, 3000, 37):
        found = ext.grouped_mm(x[:T], w, offsets.clamp(max=T), None) is not None
        same = grouped_gemm._m_bucket(T, G) == bucket and (T % 16 == 0) == (1000 % 16 == 0)
        assert found == same, T


@needs_build
@pytest.mark.parametrize("bias", [False, True])
def test_training_call_launches_forward_dx_and_dw(ext, bias):
    x, w, offsets, b = _operands(bias=bias)
    x.requires_grad_(), w.requires_grad_()
    if bias:
        b.requires_grad_()
    _register_mm(ext, x, w, b, offsets)
    assert ext.grouped_mm(x, w, offsets, b) is None  # the backward is not planned yet
    _register_backward(ext, x, w, b, offsets, need_bias=bias)
    y = ext.grouped_mm(x, w, offsets, b)
    assert y.requires_grad and y.grad_fn is not None
    dy = torch.randn(y.shape).to(y.dtype)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
    fwd, dx_launch, dw_launch = ext.take_launch_log()
    assert (fwd[0], dx_launch[0], dw_launch[0]) == (FUNCTION, FUNCTION, FUNCTION + 1)
    assert grads[0].shape == x.shape and grads[1].shape == (G, K, N)
    # dX: dy @ w^T, no bias (dx stands in), T rows
    assert _params(dx_launch)[:7] == [dy.data_ptr(), w.data_ptr(), grads[0].data_ptr(),
                                      grads[0].data_ptr(), offsets.data_ptr(),
                                      offsets.data_ptr(), 1000]
    # dW: x, dy, offsets (and again for the permutation), dw, dbias (or dw standing in for
    # it), T; then the fixed value
    db_ptr = grads[2].data_ptr() if bias else grads[1].data_ptr()
    assert _params(dw_launch)[:8] == [x.data_ptr(), dy.data_ptr(), offsets.data_ptr(),
                                      offsets.data_ptr(), grads[1].data_ptr(), db_ptr, 1000, 9]
    assert dw_launch[1] == 11 and dw_launch[6] == 11 * 64  # fixed grid, scratch per program
    if bias:
        assert grads[2].shape == (G, N)


@needs_build
def test_only_the_needed_gradients_are_launched(ext):
    x, w, offsets, _ = _operands()
    w.requires_grad_()  # x needs no gradient: no dX plan needed, no dX launch
    _register_mm(ext, x, w, None, offsets)
    dy = torch.empty(1000, N, dtype=x.dtype)
    ext.register_dw(x, dy, offsets, None, False, (FUNCTION + 1, 256, 0, 0, DW_SLOTS), 11)
    y = ext.grouped_mm(x, w, offsets, None)
    torch.autograd.grad(y, [w], torch.randn(y.shape).to(y.dtype))
    assert [r[0] for r in ext.take_launch_log()] == [FUNCTION, FUNCTION + 1]


@needs_build
def test_without_autograd_it_only_launches(ext):
    x, w, offsets, _ = _planned_training_call(ext)
    ext.take_launch_log()
    y = ext.grouped_mm(x, w, offsets, None, None, False)  # inputs need gradients: no node
    assert y.grad_fn is None and not y.requires_grad
    assert len(ext.take_launch_log()) == 1


@needs_build
def test_an_unplanned_gradient_layout_is_copied(ext):
    x, w, offsets, y = _planned_training_call(ext)
    dy = torch.ones(1, dtype=y.dtype).expand_as(y)  # y.sum()'s gradient: strides (0, 0)
    torch.autograd.grad(y, [x, w], dy)
    _, dx_launch, dw_launch = ext.take_launch_log()
    copy = _params(dx_launch)[0]
    assert copy not in (dy.data_ptr(), 0) and _params(dw_launch)[1] == copy


@needs_build
def test_a_missing_backward_plan_falls_back_to_python(ext):
    x, w, offsets, y = _planned_training_call(ext)
    ext.clear()  # e.g. a switch changed between forward and backward
    seen = []

    def fallback(x_, w_, offsets_, perm_, dy_, need_x, need_w, need_b):
        seen.append((perm_, need_x, need_w, need_b))
        return torch.full_like(x_, 3.0), torch.full((G, K, N), 4.0, dtype=x_.dtype), None
    ext.set_backward_fallback(fallback)
    dx, dw = torch.autograd.grad(y, [x, w], torch.randn(y.shape).to(y.dtype))
    assert seen == [(None, True, True, False)]
    assert bool((dx == 3).all()) and bool((dw == 4).all())


@needs_build
def test_second_derivatives_take_the_python_backward(ext):
    """Under create_graph=True the node's launches would record no graph: it hands the backward
    to the Python one, with grad mode on, and the graph that one records reaches x and w."""
    x, w, offsets, y = _planned_training_call(ext)
    seen = []

    def fallback(x_, w_, offsets_, perm_, dy_, need_x, need_w, need_b):
        seen.append((torch.is_grad_enabled(), need_x, need_w, need_b))
        return x_ * 3.0, w_ * w_, None
    ext.set_backward_fallback(fallback)
    dx, dw = torch.autograd.grad(y, [x, w], torch.randn(y.shape).to(y.dtype), create_graph=True)
    assert seen == [(True, True, True, False)]
    assert len(ext.take_launch_log()) == 1  # the forward's: the backward launched nothing
    gx, gw = torch.autograd.grad(dx.sum() + dw.sum(), [x, w])
    assert bool((gx == 3).all()) and torch.equal(gw, 2 * w.detach())


@needs_build
def test_bad_plans_are_refused(ext):
    x, w, offsets, _ = _operands()
    with pytest.raises(RuntimeError, match="^bad slot source 9$"):
        ext.register_mm(x, w, None, offsets, None, (FUNCTION, 128, 0, 0, [(9, 8, 0)]), 64, 32, 7)
    with pytest.raises(RuntimeError, match="^bad slot size 3$"):
        ext.register_mm(x, w, None, offsets, None, (FUNCTION, 128, 0, 0, [(0, 3, 0)]), 64, 32, 7)
    with pytest.raises(RuntimeError, match="grid"):
        ext.register_mm(x, w, None, offsets, None, (FUNCTION, 128, 0, 0, MM_SLOTS), 0, 32, 7)


@needs_build
def test_switches_clear_the_table(ext, monkeypatch):
    x, w, offsets, _ = _operands()
    monkeypatch.setattr(cpp_launch, "dry_run_on_cpu", True)
    assert cpp_launch._usable(x)  # records the current switches
    _register_mm(ext, x, w, None, offsets)
    assert cpp_launch.grouped_mm(x, w, offsets, None, None, True) is not None
    monkeypatch.setattr(grouped_gemm, "TMA", not grouped_gemm.TMA)
    assert cpp_launch.grouped_mm(x, w, offsets, None, None, True) is None
    assert ext.size() == 0
    _register_mm(ext, x, w, None, offsets)
    direct_launch.clear()  # e.g. a Triton knob changed: kernels compile afresh
    assert cpp_launch.grouped_mm(x, w, offsets, None, None, True) is None


# The group sort's plans: per-call values are the kernels' heads (group_sort.py).
COUNTS_SLOTS = [(0, 8, 0), (1, 8, 0), (2, 4, 0), (3, 4, 0), (4, 4, 0)]
SCATTER_SLOTS = [(0, 8, 0), (1, 8, 0), (2, 8, 0), (3, 8, 0), (4, 4, 0), (5, 4, 0), (6, 4, 0),
                 (7, 4, 0)]
SORT_RULE = dict(max_programs=4, row_step=256, block_g=16, block_p_cap=512)


def _split(T, max_programs=4, row_step=256, block_p_cap=512, **_):
    """group_sort._launch_group_sort's split of T rows, written out again."""
    rows = -(-(-(-T // max_programs)) // row_step) * row_step
    programs = -(-T // rows)
    return rows, programs, max(16, min(1 << (programs - 1).bit_length(), block_p_cap))


def _register_sort(ext, ids, num_groups=G, rule=SORT_RULE, split=None):
    ext.register_sort(ids, num_groups, (FUNCTION + 2, 128, 0, 0, COUNTS_SLOTS),
                      (FUNCTION + 3, 128, 512, 0, SCATTER_SLOTS), *rule.values(),
                      split or _split(ids.shape[0], **rule))


@needs_build
@pytest.mark.parametrize("T", [1000, 3001, 16, 1])
def test_group_sort_launches_its_two_kernels_over_the_split(ext, T):
    ids = torch.randint(0, G, (T,))
    _register_sort(ext, ids)
    perm, offsets = ext.sort_by_group(ids, G)
    assert perm.shape == (T,) and offsets.shape == (G,)
    assert perm.dtype == offsets.dtype == torch.int32
    counts_launch, scatter_launch = ext.take_launch_log()
    rows, programs, _ = _split(T)
    assert counts_launch[:5] == (FUNCTION + 2, programs, 128, 0, 0)
    assert scatter_launch[:5] == (FUNCTION + 3, programs, 128, 512, 0)
    counts = _params(counts_launch)[1]  # the same [P, BLOCK_G] scratch for both
    assert _params(counts_launch)[:5] == [ids.data_ptr(), counts, T, G, rows]
    assert _params(scatter_launch)[:8] == [ids.data_ptr(), counts, perm.data_ptr(),
                                           offsets.data_ptr(), T, G, rows, programs]


@needs_build
def test_group_sort_keys_tell_apart_what_triton_specialises(ext):
    ids = torch.randint(0, G, (1000,))
    _register_sort(ext, ids)
    assert ext.sort_by_group(ids, G) is not None
    assert ext.sort_by_group(torch.stack([ids, ids], 1)[:, 0], G) is not None  # made contiguous
    for name, args in {
        "int32 ids": (ids.to(torch.int32), G),
        "misaligned ids": (torch.cat([ids[:1], ids])[1:], G),
        "G": (ids, G + 1),
        "T == 1": (ids[:1], G),
        "T % 16 == 0": (ids[:992], G),
        "one program": (ids[:250], G),  # against 4 of 256 rows
        "no rows": (ids[:0], G),
        "no groups": (ids, 0),
    }.items():
        assert ext.sort_by_group(*args) is None, name
    assert ext.take_launch_log()[4:] == []  # the two planned calls' launches only
    assert _split(250)[1] == 1 and _split(700)[1] == 3
    assert ext.sort_by_group(ids[:700], G) is not None  # 3 programs: specialised as 4 are


@needs_build
def test_a_group_sort_split_unlike_pythons_is_refused(ext):
    ids = torch.randint(0, G, (1000,))
    rows, programs, block_p = _split(1000)
    with pytest.raises(RuntimeError, match=re.escape(
            f"row split ({rows}, {programs}, {block_p}) differs from the Python one "
            f"({rows}, {programs + 1}, {block_p})")):
        _register_sort(ext, ids, split=(rows, programs + 1, block_p))
    with pytest.raises(RuntimeError, match="row split"):
        _register_sort(ext, ids, split=(rows, programs, block_p * 2))
    assert ext.size() == 0


def test_errors_are_raised_without_torch_check_or_iostreams():
    """On the H200 machine (torch 2.11.0+cu130, g++ 13.3) an error message formatted through
    std::ostringstream in the extension, TORCH_CHECK's and c10::str's included, crashed the
    process instead of raising; csrc/checks.hpp formats without streams."""
    csrc = Path(cpp_launch.__file__).parent / "csrc"
    banned = re.compile(r"TORCH_CHECK|TORCH_INTERNAL_ASSERT|AT_ERROR|c10::str\b|stringstream")
    found = [f"{path.name}:{number}" for path in sorted(csrc.iterdir())
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if banned.search(line) and not line.lstrip().startswith("//")]
    assert found == []


@needs_build
@pytest.mark.parametrize("bias", [False, True])
def test_public_grouped_mm_takes_the_plain_call_only(ext, bias):
    """grouped_mm's plain call is checked and launched in one C++ call; every other call
    (of another kind, or invalid) returns None and launches nothing, so that the Python
    function checks it and names the bad argument."""
    x, w, offsets, b = _operands(bias=bias)
    _register_mm(ext, x, w, b, offsets)
    y = ext.grouped_mm_public(x, w, offsets, b)
    assert y is not None and y.shape == (1000, N)
    [launch] = ext.take_launch_log()
    assert _params(launch)[:5] == [x.data_ptr(), w.data_ptr(), (b if bias else y).data_ptr(),
                                   y.data_ptr(), offsets.data_ptr()]
    other = torch.randn(G, N).to(x.dtype)
    for name, args in {
        "x not a tensor": (x.tolist(), w, offsets, b),
        "offsets not a tensor": (x, w, offsets.tolist(), b),
        "bias not a tensor": (x, w, offsets, 1.0),
        "x of rank 3": (x[None], w, offsets, b),
        "w of rank 2": (x, w[0], offsets, b),
        "offsets of rank 2": (x, w, offsets[None], b),
        "fp32": (x.float(), w.float(), offsets, b if b is None else b.float()),
        "w of another dtype": (x, w.bfloat16(), offsets, b),
        "offsets of floats": (x, w, offsets.float(), b),
        "int16 offsets": (x, w, offsets.short(), b),
        "G mismatch": (x, w, offsets[:-1], b),
        "K mismatch": (x[:, :-1], w, offsets, b),
        "strided offsets": (x, w, torch.stack([offsets, offsets], 1)[:, 0], b),
        "bias of another shape": (x, w, offsets, other[:, :-1]),
        "bias of another dtype": (x, w, offsets, other.float()),
        "bias where none was planned" if not bias else "no bias": (
            x, w, offsets, None if bias else other),
        "operands on another device": (x, w, offsets.to("meta"), b),
    }.items():
        assert ext.grouped_mm_public(*args) is None, name
    assert ext.take_launch_log() == []


@needs_build
def test_public_calls_leave_dispatch_modes_and_wrapped_tensors_to_python(ext):
    """Under a Python dispatch mode (it must see the op), and for fake tensors or torch.func's
    wrapped ones (no storage to launch on), the public calls return None, launching nothing,
    so that the Python function takes them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    x, w, offsets, _ = _operands()
    _register_mm(ext, x, w, None, offsets)
    assert ext.grouped_mm_public(x, w, offsets, None) is not None  # planned: taken
    ext.take_launch_log()
    with FlopCounterMode(display=False):
        assert ext.grouped_mm_public(x, w, offsets, None) is None
    with FakeTensorMode() as mode:
        fake_x = mode.from_tensor(x)
    assert ext.grouped_mm_public(fake_x, w, offsets, None) is None
    seen = []

    def record(x_):
        seen.append(ext.grouped_mm_public(x_, w, offsets, None))
        return x_.float().sum()
    torch.func.grad(record)(x)
    torch.func.vmap(record)(x[None])
    assert seen == [None, None] and ext.take_launch_log() == []


@needs_build
def test_public_by_ids_decides_before_it_launches(ext):
    """grouped_mm_by_ids's plain call: the group sort and the GEMM from one C++ call, taken
    only where both are planned; a call that lacks either plan launches nothing (not even the
    sort), and ids unlike the plain case return None."""
    x, w, _, _ = _operands()
    ids = torch.randint(0, G, (1000,))
    assert ext.grouped_mm_by_ids_public(x, w, ids, None) is None  # no plans at all
    _register_sort(ext, ids)
    assert ext.grouped_mm_by_ids_public(x, w, ids, None) is None  # the GEMM's missing
    assert ext.take_launch_log() == []
    sorted_index = (torch.empty(G, dtype=torch.int32), torch.empty(1000, dtype=torch.int32))
    _register_mm(ext, x, w, None, *sorted_index)
    y = ext.grouped_mm_by_ids_public(x, w, ids, None)
    counts, scatter, gemm = ext.take_launch_log()
    assert [r[0] for r in (counts, scatter, gemm)] == [FUNCTION + 2, FUNCTION + 3, FUNCTION]
    perm, offsets = _params(scatter)[2:4]  # the GEMM reads the sort's results
    assert _params(gemm)[:6] == [x.data_ptr(), w.data_ptr(), y.data_ptr(), y.data_ptr(),
                                 offsets, perm]
    strided = torch.stack([ids, ids], 1)[:, 0]  # keyed as the contiguous copy it gets
    assert ext.grouped_mm_by_ids_public(x, w, strided, None) is not None
    assert len(ext.take_launch_log()) == 3
    for name, args in {
        "ids of another length": (x, w, ids[:-1], None),
        "ids of floats": (x, w, ids.float(), None),
        "ids of rank 2": (x, w, ids[None], None),
        "ids not a tensor": (x, w, ids.tolist(), None),
        "ids on another device": (x, w, ids.to("meta"), None),
    }.items():
        assert ext.grouped_mm_by_ids_public(*args) is None, name
    assert ext.take_launch_log() == []


@needs_build
def test_public_functions_still_name_bad_arguments(ext, monkeypatch):
    """With the C++ path on and the plain call planned, bad arguments still meet the Python
    function's checks."""
    monkeypatch.setattr(cpp_launch, "dry_run_on_cpu", True)
    monkeypatch.setattr(grouped_gemm, "_values_checkable", lambda t: False)  # as on a GPU
    x, w, offsets, _ = _operands()
    assert cpp_launch._usable(x)  # records the current switches (a change clears the table)
    _register_mm(ext, x, w, None, offsets)
    assert grouped_gemm.grouped_mm(x, w, offsets) is not None
    assert len(ext.take_launch_log()) == 1  # the C++ call took it
    with pytest.raises(ValueError, match="offsets must have one entry per group"):
        grouped_gemm.grouped_mm(x, w, offsets[:-1])
    with pytest.raises(TypeError, match="w must have x's dtype"):
        grouped_gemm.grouped_mm(x, w.bfloat16(), offsets)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        grouped_gemm.grouped_mm(x.tolist(), w, offsets)
    with pytest.raises(ValueError, match="group_ids must have one entry per row"):
        grouped_gemm.grouped_mm_by_ids(x, w, torch.zeros(999, dtype=torch.int64))
    assert ext.take_launch_log() == []


@needs_build
def test_stream_handles_from_python_are_asked_once_per_stream(ext):
    asked = []

    def resolver(device_index, stream_id):
        asked.append((device_index, stream_id))
        return 1000 * device_index + stream_id
    ext.set_stream_resolver(resolver)
    try:  # device numbers no GPU has, so that no real stream is cached under them
        got = [ext.stream_handle_from_resolver(d, s) for d, s in [(97, 3), (97, 3), (98, 3)]]
    finally:
        ext.set_stream_resolver(cpp_launch._stream_handle)
    assert got == [97003, 97003, 98003] and asked == [(97, 3), (98, 3)]


def _planned_call_whose_cpp_entry_raises(ext, monkeypatch, error):
    """A planned forward call, on a path whose C++ entry raises error."""
    x, w, offsets, _ = _operands()
    monkeypatch.setattr(cpp_launch, "dry_run_on_cpu", True)
    monkeypatch.setattr(cpp_launch, "ENABLED", True)
    _register_mm(ext, x, w, None, offsets)

    def raise_error(*args):
        raise error
    monkeypatch.setattr(ext, "grouped_mm", raise_error)
    return lambda: cpp_launch.grouped_mm(x, w, offsets, None, None, True)


@needs_build
def test_an_error_in_the_cpp_path_turns_it_off(ext, monkeypatch):
    call = _planned_call_whose_cpp_entry_raises(
        ext, monkeypatch, RuntimeError("cuLaunchKernel failed with error 400"))
    with pytest.warns(RuntimeWarning, match="turned off .*error 400"):
        assert call() is None
    assert cpp_launch.ENABLED is False


@needs_build
def test_running_out_of_memory_leaves_the_cpp_path_on(ext, monkeypatch):
    call = _planned_call_whose_cpp_entry_raises(
        ext, monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    with pytest.raises(torch.OutOfMemoryError):
        call()
    assert cpp_launch.ENABLED is True


_FAKE_DRIVER = r"""
#include <stdint.h>
#include <string.h>
/* cuLaunchKernel and cuGetErrorString as libcuda declares them, recording their arguments */
static uint64_t last[9];
static unsigned char params_seen[64][8];
static int params_to_read = 0, fail = 0;
void fake_set(int num_params, int fail_with) { params_to_read = num_params; fail = fail_with; }
void fake_last(uint64_t* out, unsigned char* params_out) {
  memcpy(out, last, sizeof last);
  memcpy(params_out, params_seen, 8 * (size_t)params_to_read);
}
int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                   unsigned bz, unsigned shared, void* stream, void** params, void** extra) {
  uint64_t now[9] = {(uint64_t)(uintptr_t)f, gx, gy, gz, bx, by, bz, shared,
                     (uint64_t)(uintptr_t)stream};
  memcpy(last, now, sizeof now);
  for (int i = 0; i < params_to_read; ++i) memcpy(params_seen[i], params[i], 8);
  return extra == 0 ? fail : -1;
}
int cuGetErrorString(int error, const char** text) { *text = "fake driver error"; return 0; }
/* the current context, per thread as in libcuda; the primary contexts retained */
static __thread void* current = 0;
static int retains = 0, ordinal_asked = -1;
int cuCtxGetCurrent(void** ctx) { *ctx = current; return 0; }
int cuCtxSetCurrent(void* ctx) { current = ctx; return 0; }
int cuDeviceGet(int* device, int ordinal) {
  ordinal_asked = ordinal;
  *device = 100 + ordinal;
  return 0;
}
int cuDevicePrimaryCtxRetain(void** ctx, int device) {
  ++retains;
  *ctx = (void*)(uintptr_t)(0xC0DE00 + device);
  return 0;
}
void fake_context(uint64_t* out) {
  out[0] = (uint64_t)retains;
  out[1] = (uint64_t)ordinal_asked;
  out[2] = (uint64_t)(uintptr_t)current;
}
"""

_DRIVE_FAKE = r"""
import ctypes, torch
from mtmm_kernels import _cpp_launch as cpp_launch
ext = cpp_launch.extension()
lib = ctypes.CDLL("libcuda.so.1")  # the fake: the one the extension loads too
x = torch.randn(100, 8).half()
w = torch.randn(3, 8, 16).half()
offsets = torch.tensor([10, 50, 90], dtype=torch.int32)
slots = [(0, 8, 0), (1, 8, 0), (3, 8, 0), (6, 4, 0), (-1, 8, 123456789)]
ext.register_mm(x, w, None, offsets, None, (0xBEEF, 256, 1000, 0, slots), 64, 16, 5)
lib.fake_set(len(slots) + 2, 0)
y = ext.grouped_mm(x, w, offsets, None, None, False)
last, seen = (ctypes.c_uint64 * 9)(), (ctypes.c_ubyte * (8 * 7))()
lib.fake_last(last, seen)
params = [int.from_bytes(bytes(seen[8 * i:8 * i + 8]), "little") for i in range(7)]
assert list(last) == [0xBEEF, 5, 1, 1, 256, 1, 1, 1000, 0], list(last)
assert params[:3] == [x.data_ptr(), w.data_ptr(), y.data_ptr()], params
assert params[3] & 0xFFFFFFFF == 100 and params[4] == 123456789 and params[5:] == [0, 0]
context = (ctypes.c_uint64 * 3)()
lib.fake_context(context)  # no context in this thread: device 0's primary one made current
assert list(context) == [1, 0, 0xC0DE00 + 100], list(context)
ext.grouped_mm(x, w, offsets, None, None, False)
lib.fake_context(context)
assert context[0] == 1  # current now: nothing retained again
import threading
thread = threading.Thread(target=ext.grouped_mm, args=(x, w, offsets, None, None, False))
thread.start(), thread.join()
lib.fake_context(context)
assert context[0] == 2 and context[2] == 0xC0DE00 + 100, list(context)  # the new thread's own
lib.fake_set(len(slots) + 2, 700)
try:
    ext.grouped_mm(x, w, offsets, None, None, False)
except RuntimeError as error:
    assert "700" in str(error) and "fake driver error" in str(error), error
else:
    raise AssertionError("a failed launch must raise")

# A training call whose backward launches fail: the Python path computes the gradients, and
# the C++ path is turned off with a warning.
import warnings
from mtmm_kernels import reference
xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
fresh_dy = torch.empty(100, 16).half()
ext.register_mm(fresh_dy, wg.transpose(1, 2), None, offsets, None,
                (0xBEEF, 256, 1000, 0, slots), 64, 16, 5)
ext.register_dw(xg, fresh_dy, offsets, None, False, (0xBEEF, 256, 0, 0, slots), 7)
lib.fake_set(len(slots) + 2, 0)
y = ext.grouped_mm(xg, wg, offsets, None, None, True)
assert "GroupedMmFunction" in y.grad_fn.name(), y.grad_fn.name()
lib.fake_set(len(slots) + 2, 700)
dy = torch.randn(100, 16).half()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    dx, dw = torch.autograd.grad(y, [xg, wg], dy)
assert cpp_launch.ENABLED is False
assert any("turned off" in str(c.message) and "700" in str(c.message) for c in caught), caught
x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
reference.grouped_mm_reference(x64, w64, offsets, None).backward(dy.double())
assert (dx.double() - x64.grad).abs().max() < 0.05 and (dw.double() - w64.grad).abs().max() < 0.05
print("driven")
"""


@needs_build
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests drive the real driver")
def test_launches_reach_the_driver_as_declared(tmp_path):
    """The real launch branch (not the dry run), against a stand-in libcuda.so.1: the
    extension finds cuLaunchKernel by name and hands it grid, block, shared memory, stream
    and the parameters; a thread without a current context (an autograd engine thread) gets
    the device's primary context first, once; a failed launch raises with the driver's
    message, and one in the C++ backward leaves the gradients to the Python path and turns
    the C++ path off with a warning."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler")
    (tmp_path / "fake.c").write_text(_FAKE_DRIVER)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "libcuda.so.1"),
                    str(tmp_path / "fake.c")], check=True)
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _DRIVE_FAKE], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0 and "driven" in done.stdout, done.stderr[-3000:]


@needs_build
# about 45 s (every kernel compiled for sm_90 in a fresh process): slow on a CPU-only machine,
# still in a GPU run's shards
@(pytest.mark.slow if not torch.cuda.is_available() else lambda f: f)
@pytest.mark.skipif(not (_BIN / "ptxas").exists(), reason="this Triton bundles no ptxas")
def test_cpp_launch_hands_the_driver_what_tritons_launcher_receives(tmp_path):
    out = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile afresh, leave no trace
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "cpp_launch_check.py"),
                           "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 90
    for row in rows:
        assert row["same"] and row["launches"] >= 1, row
        assert row["cpp_launches"] == row["launches"] and row["python_launches_left"] == 0, row


@pytest.mark.gpu
@needs_build
@pytest.mark.parametrize("bias,by_ids", [(False, False), (True, False), (True, True)])
def test_gpu_cpp_launch_computes_what_the_python_path_computes(monkeypatch, bias, by_ids):
    """Same kernels, same inputs: bitwise the Python path's output and gradients, on the
    current stream, and inside a CUDA graph."""
    monkeypatch.setattr(grouped_gemm, "AUTOTUNE", False)  # one config each: a short GPU run
    dev = torch.device("cuda")
    x = torch.randn(1000, 96, device=dev, dtype=torch.bfloat16)
    w = torch.randn(5, 80, 96, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    offsets = torch.tensor([100, 300, 300, 700, 990], device=dev, dtype=torch.int32)
    b = torch.randn(5, 80, device=dev, dtype=torch.bfloat16) if bias else None
    dy = torch.randn(1000, 80, device=dev, dtype=torch.bfloat16)

    ids = torch.repeat_interleave(torch.arange(5, device=dev), torch.tensor(
        [100, 200, 0, 400, 290], device=dev), output_size=990)
    ids = torch.cat([ids, torch.full((10,), 7, device=dev)])  # 10 ids out of range: zero rows
    ids = ids[torch.randperm(1000, device=dev)] if by_ids else ids  # in order: as offsets

    def forward(x_, w_, b_):
        if by_ids:
            return grouped_gemm.grouped_mm_by_ids(x_, w_, ids, b_)
        return grouped_gemm.grouped_mm(x_, w_, offsets, b_)

    def call():
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        bg = b.detach().requires_grad_() if bias else None
        y = forward(xg, wg, bg)
        return (y, *torch.autograd.grad(y, [t for t in (xg, wg, bg) if t is not None], dy))

    monkeypatch.setattr(cpp_launch, "ENABLED", False)
    want = call()
    monkeypatch.setattr(cpp_launch, "ENABLED", True)
    call(), call()  # plans, then the planned path that fills the C++ table
    ext = cpp_launch.extension()
    before = ext.launch_count()
    got = call()
    # forward, dX, dW all from C++, by ids after the group sort's two launches
    assert ext.launch_count() == before + (5 if by_ids else 3)
    for g, v in zip(got, want):
        assert torch.equal(g, v)
    ref = torch.zeros(1000, 80, dtype=torch.float64, device=dev)
    for g in range(5):
        rows = ids == g
        ref[rows] = x[rows].double() @ w[g].double() + (b[g].double() if bias else 0)
    assert ((got[0].double() - ref).norm() / ref.norm()).item() < 1e-2
    assert bool((got[0][ids == 7] == 0).all())  # rows of no group

    side = torch.cuda.Stream()
    for stream in (torch.cuda.current_stream(), side):  # both ways to a stream's handle
        with torch.cuda.stream(stream):
            assert ext.current_stream_handle(dev) == stream.cuda_stream
            assert ext.current_stream_handle(dev, through_resolver=True) == stream.cuda_stream
        assert cpp_launch._stream_handle(dev.index or 0, stream.stream_id) == stream.cuda_stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        y_side = forward(x, w, b)
        y_side = forward(x, w, b)  # planned: the C++ path now
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y_side, want[0])

    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = forward(x, w, b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, want[0])
