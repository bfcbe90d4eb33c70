"""Check, on a machine without a GPU, that the grouped GEMM's C++ launch path hands the CUDA
driver exactly what Triton's launcher receives on the Python path.

With a stand-in driver for sm_90 (bench/offline.py) the kernels compile for real; the Python
path's launches are recorded, and the C++ path runs in dry-run mode (its launches logged, with
the compiled kernel's identity in place of a CUfunction). For every case, forward and forward +
backward, eager and through the custom op (what torch.compile's graphs call), the two must
agree launch by launch on: the compiled kernel, the grid, the block, the dynamic shared
memory, the stream, the global scratch size and every kernel parameter (tensor addresses by
the role of the tensor: x, w, bias, offsets, perm, dy, y, dx, dw, db).

    python bench/cpp_launch_check.py [--json OUT.json]

tests/test_cpp_launch.py runs it. Needs Triton's NVIDIA backend, a C++ compiler and ninja,
and no TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # mtmm_kernels without install

from host_path import cpp_launch_dry_run, gpu_like_host_path, _misaligned  # noqa: E402
from offline import offline_target  # noqa: E402

from mtmm_kernels import _cpp_launch as cpp_launch  # noqa: E402
from mtmm_kernels import grouped_gemm as gg  # noqa: E402


def _cases():
    """Calls that differ from the first in one property a plan key must tell apart."""
    bf16, fp16 = torch.bfloat16, torch.float16
    G, K, N = 5, 96, 80

    def w_nk(dtype, g=G, k=K, n=N):  # [G, N, K] storage seen as [G, K, N]: TMA-readable
        return torch.randn(g, n, k).to(dtype).transpose(1, 2)

    def offsets(T, dtype=torch.int32):
        return torch.tensor([T // 5, T // 3, T // 2, T // 2, T], dtype=dtype)

    def misaligned_offsets(T):  # 4 bytes past a 16-byte boundary
        return torch.cat([torch.zeros(1, dtype=torch.int32), offsets(T)])[1:]

    x = torch.randn(1000, K).to(bf16)
    yield "T=1000 bf16", (x, w_nk(bf16), offsets(1000), None)
    yield "T=1024", (torch.randn(1024, K).to(bf16), w_nk(bf16), offsets(1024), None)
    yield "x misaligned", (_misaligned(1000, K, bf16).copy_(x), w_nk(bf16), offsets(1000), None)
    yield "int64 offsets", (x, w_nk(bf16), offsets(1000, torch.int64), None)
    yield "offsets misaligned", (x, w_nk(bf16), misaligned_offsets(1000), None)
    yield "w [G,K,N] contiguous", (x, torch.randn(G, K, N).to(bf16), offsets(1000), None)
    yield "bias", (x, w_nk(bf16), offsets(1000), torch.randn(G, N).to(bf16))
    yield "fp16", (x.to(fp16), w_nk(fp16), offsets(1000), None)
    yield "T=1", (x[:1], w_nk(bf16), torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32), None)
    yield "T=3000 G=37 K=72 N=40 fp16 bias", (
        torch.randn(3000, 72).to(fp16), w_nk(fp16, 37, 72, 40),
        torch.linspace(0, 2900, 37).to(torch.int32), torch.randn(37, 40).to(fp16))
    # rows in any order: grouped_mm_by_ids's GEMMs, with the group sort's results given
    ids = torch.randint(0, G, (1000,), generator=torch.Generator().manual_seed(0))
    perm = torch.sort(ids, stable=True)[1].to(torch.int32)
    by_ids_offsets = torch.bincount(ids, minlength=G).cumsum(0).to(torch.int32)
    yield "by ids", (x, w_nk(bf16), by_ids_offsets, None, perm)
    yield "by ids, int64 perm, bias", (x, w_nk(bf16), by_ids_offsets,
                                       torch.randn(G, N).to(bf16), perm.long())
    # the public call: the group sort's two launches, then the GEMMs through its results
    yield "by ids, sorted", (x, w_nk(bf16), None, None, None, ids)
    yield "by ids, sorted, int32 ids", (x, w_nk(bf16), None, None, None, ids.to(torch.int32))
    ids_3000 = torch.randint(0, 37, (3000,), generator=torch.Generator().manual_seed(1))
    yield "by ids, sorted, T=3000 G=37 fp16 bias", (
        torch.randn(3000, 72).to(fp16), w_nk(fp16, 37, 72, 40), None,
        torch.randn(37, 40).to(fp16), None, ids_3000)
    every_other = torch.randint(0, G, (2000,), generator=torch.Generator().manual_seed(2))
    yield "by ids, sorted, strided ids", (x, w_nk(bf16), None, None, None, every_other[::2])
    ids_32 = torch.cat([torch.zeros(2, dtype=torch.int32), ids.to(torch.int32)])
    yield "by ids, sorted, int32 ids 4 bytes off", (x, w_nk(bf16), None, None, None, ids_32[1:-1])
    yield "by ids, sorted, int32 ids 8 bytes off", (x, w_nk(bf16), None, None, None, ids_32[2:])


class _Roles:
    """Names of the addresses a call's launches receive: the named tensors' roles, and for
    the others (the group sort's counts, perm and offsets inside grouped_mm_by_ids) the order
    of their first appearance, so that the two paths' launches compare by data flow."""

    def __init__(self, named: dict):
        self.names = {t.data_ptr(): name for name, t in named.items()
                      if t is not None and t.numel()}
        self.internal = 0

    def __call__(self, address: int) -> str:
        if address not in self.names:
            self.names[address] = f"internal {self.internal}"
            self.internal += 1
        return self.names[address]


def _triton_launch(compiled, args, roles) -> dict:
    """What Triton's launcher receives, in the C launcher's terms."""
    grid, stream = args[:3], args[3]
    params = []
    for (name, kind), value in zip(compiled.src.signature.items(), args[9:]):
        if kind == "constexpr":
            continue
        if kind.startswith("*"):
            params.append(roles(value.data_ptr()))
        else:
            params.append(int(value))
    meta = compiled.metadata
    return {"function": id(compiled), "grid": tuple(grid), "block": 32 * meta.num_warps,
            "shared": meta.shared, "stream": stream,
            "scratch": meta.global_scratch_size * grid[0] * grid[1] * grid[2],
            "params": params}


def _cpp_launch(record, compiled_by_id, roles) -> dict:
    function, grid, block, shared, stream, raw, scratch = record
    compiled = compiled_by_id[function]
    kinds = [k for k in compiled.src.signature.values() if k != "constexpr"]
    assert len(raw) == len(kinds) + 2, "the global and profile scratch pointers come last"
    params = []
    for kind, b in zip(kinds, raw):
        value = int.from_bytes(b, "little", signed=True)
        params.append(roles(value) if kind.startswith("*") else value)
    scratch_ptr, profile_ptr = (int.from_bytes(b, "little") for b in raw[-2:])
    assert (scratch_ptr != 0) == (scratch > 0) and profile_ptr == 0
    return {"function": function, "grid": (grid, 1, 1), "block": block, "shared": shared,
            "stream": stream, "scratch": scratch, "params": params}


def _run(x, w, offsets, bias, perm, ids, train: bool, dy_kind: str, via_op: bool = False):
    """One call (with ids: grouped_mm_by_ids, or the ops a torch.compile graph of it calls);
    returns the tensors by role (inputs, outputs, gradients). An expanded dy (the gradient of
    y.sum()) is copied by both paths before their backward kernels: the reference gets that
    copy directly."""
    if train:
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        bias = bias.detach().requires_grad_() if bias is not None else None
    if ids is not None and via_op:
        perm, offsets = torch.ops.mtmm.sort_by_group(ids, w.shape[0])
    if via_op:  # what a torch.compile graph calls: the custom op and its registered autograd
        y = torch.ops.mtmm.grouped_mm(x, w, offsets, bias, perm)
        # one autograd node, the op's: its implementation must not add the C++ one
        assert not train or "GroupedMmFunction" not in y.grad_fn.name(), y.grad_fn.name()
    elif ids is not None:
        y = gg.grouped_mm_by_ids(x, w, ids, bias)
        perm = offsets = None  # the sort's, internal to the call
    elif perm is None:
        y = gg.grouped_mm(x, w, offsets, bias)
    else:  # what grouped_mm_by_ids calls after sorting
        y = gg._grouped_mm_call(x, w, offsets, bias, perm)
    named = {"x": x, "w": w, "bias": bias, "offsets": offsets, "perm": perm, "ids": ids, "y": y}
    if train:
        dy = torch.randn_like(y)
        if dy_kind == "expanded":
            dy = torch.ones(1, dtype=y.dtype).expand_as(y)
        elif dy_kind == "expanded, copied":
            dy = torch.ones(1, dtype=y.dtype).expand_as(y).contiguous()
        inputs = [t for t in (x, w, bias) if t is not None]
        grads = torch.autograd.grad(y, inputs, dy)
        named.update(dy=dy, dx=grads[0], dw=grads[1], db=grads[2] if bias is not None else None)
    return named


def check() -> list[dict]:
    modes = ((False, "-", False), (True, "fresh", False), (True, "expanded", False),
             (False, "-", True), (True, "fresh", True))
    with offline_target(90), gpu_like_host_path(), cpp_launch_dry_run(log=True) as ext:
        if ext is None:
            raise SystemExit("the C++ launch path did not build")
        cpp_launch.clear()
        # Every case's plans go into one table first: a key that failed to tell two cases
        # apart would then launch the other case's kernel or parameters.
        cases = [(name, (*args, None, None)[:6]) for name, args in _cases()]
        for _, args in cases:
            for mode in modes:
                for _ in range(2):  # plans, then the planned path that offers them
                    _run(*args, *mode)
        return [_check_case(ext, name, args, *mode) for name, args in cases for mode in modes]


def _check_case(ext, name, args, train, dy_kind, via_op) -> dict:
    with offline_target(90, reference := []):  # the Python path, as Triton's launcher sees it
        saved, cpp_launch.ENABLED = cpp_launch.ENABLED, False
        try:
            ref_named = _run(*args, train,
                             "expanded, copied" if dy_kind == "expanded" else dy_kind, via_op)
        finally:
            cpp_launch.ENABLED = saved
    if dy_kind == "expanded":  # both paths' copies of dy are internal: neither has a role
        ref_named["dy"] = None
    ext.take_launch_log()
    with offline_target(90, python_calls := []):
        cpp_named = _run(*args, train, dy_kind, via_op)
    log = ext.take_launch_log()
    compiled_by_id = {id(k): k for k, _ in reference}
    want_roles, got_roles = _Roles(ref_named), _Roles(cpp_named)
    want = [_triton_launch(k, args, want_roles) for k, args in reference]
    got = [_cpp_launch(r, compiled_by_id, got_roles) if r[0] in compiled_by_id
           else {"function": "another kernel"} for r in log]
    mode = f"forward+backward, {dy_kind} dy" if train else "forward"
    return {"case": f"{name}, {mode}{', custom op' if via_op else ''}",
            "launches": len(want), "cpp_launches": len(log),
            "python_launches_left": len(python_calls), "same": got == want,
            "difference": "" if got == want else _first_difference(got, want)}


def _first_difference(got, want) -> str:
    if len(got) != len(want):
        return f"{len(got)} launches against {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        for field in b:
            if a.get(field) != b[field]:
                return f"launch {i}, {field}: {a.get(field)!r} against {b[field]!r}"
    return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = check()
    for row in rows:
        print(f"{'ok ' if row['same'] and not row['python_launches_left'] else 'BAD'} "
              f"{row['case']}: {row['cpp_launches']} C++ launches, "
              f"{row['python_launches_left']} left in Python {row['difference']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if not r["same"] or r["python_launches_left"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
