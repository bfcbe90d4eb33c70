"""The host side of every kernel launch, measured and checked on a machine without a GPU.

With a stand-in driver for sm_90 (bench/offline.py), the public functions run their real
host path on CPU tensors: argument checks, launch plans, Triton's binding, specialisation and
compilation; only the launch itself is recorded instead of sent to a device. This script:

  --check   for every launcher and a spread of inputs (sizes that are and are not multiples
            of 16, misaligned views, biases, gathers, int32 and int64 offsets, one to three
            streams, grouped or not), calls the public function with the direct launch
            (mtmm_kernels/_direct_launch.py) and again through Triton's own path, and
            compares what each hands the compiled kernel's launcher: the same compiled
            kernel, grid, stream, metadata and arguments. It also says whether the direct
            path was taken.
  timing    host microseconds per call of the public functions, direct launch on and off,
            side by side in one process (a CPU's numbers: a GPU adds the driver's launch and
            the CUDA allocator; bench/host_overhead.py measures those on a GPU).

    python bench/host_path.py [--check] [--json OUT.json] [--calls 2000]

tests/test_direct_launch.py runs ``--check``. Needs Triton's NVIDIA backend (its bundled
ptxas) and no TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # mtmm_kernels without install

from offline import offline_target  # noqa: E402  (after the path is set)

from mtmm_kernels import _cpp_launch as cpp_launch  # noqa: E402
from mtmm_kernels import _direct_launch as direct_launch  # noqa: E402
from mtmm_kernels import group_sort  # noqa: E402
from mtmm_kernels import grouped_gemm as gg  # noqa: E402
from mtmm_kernels import varlen as V  # noqa: E402


@contextlib.contextmanager
def gpu_like_host_path():
    """The host path a CUDA tensor takes, on CPU tensors: kernels instead of the reference
    fallback, no value checks that would read device memory, a TMA-capable target, and the
    first surviving config instead of autotuning (which would time kernels)."""
    saved = {(gg, "triton_runs_on"): gg.triton_runs_on, (gg, "_values_checkable"):
             gg._values_checkable, (gg, "_tma_device_ok"): gg._tma_device_ok,
             (gg, "AUTOTUNE"): gg.AUTOTUNE, (V, "triton_runs_on"): V.triton_runs_on,
             (group_sort, "triton_runs_on"): group_sort.triton_runs_on}
    gg.triton_runs_on = V.triton_runs_on = group_sort.triton_runs_on = lambda *tensors: True
    gg._values_checkable = lambda t: False
    gg._tma_device_ok = lambda t: gg.TMA
    gg.AUTOTUNE = False
    gg._PLANS.clear()
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
        gg._PLANS.clear()


def _misaligned(rows: int, cols: int, dtype) -> torch.Tensor:
    """[rows, cols] whose base address is 2 bytes off a 16-byte boundary (no TMA, no
    16-byte pointer specialisation)."""
    return torch.zeros(rows * cols + 1, dtype=dtype)[1:].view(rows, cols)


def _grouped_gemm_cases():
    bf16, fp16 = torch.bfloat16, torch.float16
    G, K, N = 5, 96, 80

    def w_nk(dtype):  # [G, N, K] storage seen as [G, K, N]: TMA-readable
        return torch.zeros(G, N, K, dtype=dtype).transpose(1, 2)

    def offsets(T, dtype=torch.int32):
        return torch.tensor([T // 5, T // 3, T // 2, T // 2, T], dtype=dtype)

    def fwd_bwd(x, w, off, bias=None):
        x = x.detach().requires_grad_()
        w = w.detach().requires_grad_()
        b = bias.detach().requires_grad_() if bias is not None else None
        y = gg.grouped_mm(x, w, off, b)
        y.backward(torch.ones_like(y))

    ids = torch.arange(1000) % G
    yield "grouped_mm T=1000 bf16", lambda: gg.grouped_mm(
        torch.zeros(1000, K, dtype=bf16), w_nk(bf16), offsets(1000))
    yield "grouped_mm T=1024 bf16", lambda: gg.grouped_mm(
        torch.zeros(1024, K, dtype=bf16), w_nk(bf16), offsets(1024))
    yield "grouped_mm T=1000 fp16 w [G,K,N] int64 offsets + bias", lambda: gg.grouped_mm(
        torch.zeros(1000, K, dtype=fp16), torch.zeros(G, K, N, dtype=fp16),
        offsets(1000, torch.int64), torch.zeros(G, N, dtype=fp16))
    yield "grouped_mm T=999 bf16 x misaligned", lambda: gg.grouped_mm(
        _misaligned(999, K, bf16), w_nk(bf16), offsets(999))
    yield "grouped_mm_by_ids T=1000 bf16", lambda: gg.grouped_mm_by_ids(
        torch.zeros(1000, K, dtype=bf16), w_nk(bf16), ids)
    yield "grouped_mm fwd+bwd T=1000 bf16 + bias", lambda: fwd_bwd(
        torch.zeros(1000, K, dtype=bf16), w_nk(bf16), offsets(1000), torch.zeros(G, N, dtype=bf16))
    yield "grouped_mm_by_ids fwd+bwd T=1000 bf16", lambda: _by_ids_fwd_bwd(
        torch.zeros(1000, K, dtype=bf16), w_nk(bf16), ids)


def _by_ids_fwd_bwd(x, w, ids):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = gg.grouped_mm_by_ids(x, w, ids)
    y.backward(torch.ones_like(y))


def _varlen_cases():
    g = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16
    H = 72
    x = torch.zeros(9, 40, H, dtype=bf16)
    lens = torch.randint(0, 41, (9,), generator=g)
    gids = torch.randint(0, 3, (9,), generator=g)
    streams = [torch.zeros(9, L, H, dtype=bf16) for L in (17, 40, 5)]
    lengths = [torch.randint(0, L + 1, (9,), generator=g) for L in (17, 40, 5)]
    packed = V.pack_multimodal(streams, lengths, gids, 3)
    single = V.pack_padded(x, lens)

    total = int(sum(lengths).sum())

    def device_plan():  # the plan kernel; the given total spares reading its (unwritten) stats
        V._FORCE_DEVICE_PLAN = True
        try:
            V.pack_multimodal(streams, lengths, gids, 3, total=total)
        finally:
            V._FORCE_DEVICE_PLAN = False

    yield "pack_padded S=1", lambda: V.pack_padded(x, lens)
    yield "pack_padded S=1 grouped", lambda: V.pack_padded(x, lens, gids, 3)
    yield "pack_padded S=1 x misaligned", lambda: V.pack_padded(
        _misaligned(9 * 40, H, bf16).view(9, 40, H), lens)
    yield "pack_multimodal S=3 grouped", lambda: V.pack_multimodal(streams, lengths, gids, 3)
    yield "pack_multimodal S=3 plan kernel", device_plan
    yield "unpack", lambda: V.unpack(single.values, single.cu_seqlens, 40, validate=False)
    yield "unpack_multimodal S=3 grouped", lambda: V.unpack_multimodal(
        packed, lengths, [17, 40, 5], validate=False)
    yield "pack list", lambda: V.pack([x[0, :7], x[1, :0], x[2, :30]])


CASES = {"grouped_gemm": _grouped_gemm_cases, "varlen": _varlen_cases}


def _normal(value):
    """A launcher argument in a form two calls on the same inputs agree on: tensors by
    layout and alignment (outputs are fresh allocations), launch metadata by kind."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.stride(),
                value.data_ptr() % 16)
    if isinstance(value, tuple):
        return tuple(_normal(v) for v in value)
    if type(value).__name__ == "LazyDict":
        return "LazyDict"
    return value


def check() -> list[dict]:
    """Direct launch against Triton's path, case by case (see the module docstring)."""
    rows = []
    with offline_target(90), gpu_like_host_path():
        for group, cases in CASES.items():
            for name, call in cases():
                call()  # compiles, and fills the direct launch's table
                before = direct_launch.stats["direct"]
                with offline_target(90, launches := []):
                    call()
                direct = direct_launch.stats["direct"] - before
                with direct_launch.disabled(), offline_target(90, reference := []):
                    call()
                same_kernels = [a[0] is b[0] for a, b in zip(launches, reference)]
                got = [_normal(args) for _, args in launches]
                want = [_normal(args) for _, args in reference]
                rows.append({
                    "case": f"{group}: {name}", "launches": len(reference),
                    "direct_launches": direct, "same_kernels": all(same_kernels),
                    "same_arguments": got == want,
                    "difference": "" if got == want else _first_difference(got, want),
                })
    return rows


def _first_difference(got, want) -> str:
    if len(got) != len(want):
        return f"{len(got)} launches against {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        for j, (u, v) in enumerate(zip(a, b)):
            if u != v:
                return f"launch {i}, argument {j}: {u!r} against {v!r}"
    return "?"


def _time_calls(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _timed_calls():
    """The calls whose host time bench_grouped_gemm and bench_varlen's cases pay (shapes cut
    down: host time does not depend on them, except where noted)."""
    bf16 = torch.bfloat16
    sizes = [500] * 32
    T, G, K, N = sum(sizes), 32, 64, 64
    x = torch.zeros(T, K, dtype=bf16)
    w = torch.zeros(G, N, K, dtype=bf16).transpose(1, 2)
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    ids = torch.arange(T) % G
    xg, wg = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
    dy = torch.zeros(T, N, dtype=bf16)

    def fwd_bwd():
        torch.autograd.grad(gg.grouped_mm(xg, wg, offsets), (xg, wg), dy)

    def by_ids_fwd_bwd():
        torch.autograd.grad(gg.grouped_mm_by_ids(xg, wg, ids), (xg, wg), dy)

    g = torch.Generator().manual_seed(0)
    B, H = 256, 64
    xp = torch.zeros(B, 1500, H, dtype=bf16)
    lens = torch.randint(5, 1501, (B,), generator=g)
    streams = [torch.zeros(128, L, H, dtype=bf16) for L in (257, 1500, 77)]
    lengths = [torch.randint(0, L + 1, (128,), generator=g) for L in (257, 1500, 77)]
    gids = torch.randint(0, 4, (128,), generator=g)
    single = V.pack_padded(xp, lens)
    return {
        "grouped_mm, 32 groups, no grad": lambda: gg.grouped_mm(x, w, offsets),
        "grouped_mm, 32 groups, forward + backward": fwd_bwd,
        "grouped_mm_by_ids, 32 groups, no grad": lambda: gg.grouped_mm_by_ids(x, w, ids),
        "grouped_mm_by_ids, 32 groups, forward + backward": by_ids_fwd_bwd,
        "pack_padded, B=256, lengths on the CPU": lambda: V.pack_padded(xp, lens),
        "pack_multimodal, 3 streams, B=128, grouped": lambda: V.pack_multimodal(
            streams, lengths, gids, 4),
        "unpack, B=256, validate=False": lambda: V.unpack(
            single.values, single.cu_seqlens, 1500, validate=False),
    }


@contextlib.contextmanager
def cpp_launch_dry_run(log: bool = False):
    """The grouped GEMM's C++ launch path on CPU tensors, launches counted (and with ``log``,
    logged), not sent; None if the extension does not build."""
    ext = cpp_launch.extension()
    if ext is None:
        yield None
        return
    saved = cpp_launch.dry_run_on_cpu
    cpp_launch.dry_run_on_cpu = True
    ext.set_dry_run(True, log=log)
    try:
        yield ext
    finally:
        cpp_launch.dry_run_on_cpu = saved
        ext.set_dry_run(False)
        cpp_launch.clear()


def timing(calls: int) -> list[dict]:
    rows = []
    with offline_target(90), gpu_like_host_path():
        for name, fn in _timed_calls().items():
            times = {}
            with direct_launch.disabled():
                times["triton"] = _time_calls(fn, calls)
            times["direct"] = _time_calls(fn, calls)
            row = {"call": name, "triton_path_us": round(times["triton"], 1),
                   "direct_launch_us": round(times["direct"], 1),
                   "ratio": round(times["triton"] / times["direct"], 2)}
            if name.startswith("grouped_mm"):  # the calls the C++ path takes
                with cpp_launch_dry_run() as ext:
                    if ext is not None:
                        before = ext.launch_count()
                        cpp_us = _time_calls(fn, calls)
                        launches = ext.launch_count() - before
                        assert launches >= calls, f"{name}: the C++ path was not taken"
                        row["cpp_launch_us"] = round(cpp_us, 1)
            rows.append(row)
    return rows


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only the launch comparison")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    import triton
    out = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu_name(), "triton": triton.__version__,
           "torch": torch.__version__, "python": sys.version.split()[0], "check": check()}
    for row in out["check"]:
        ok = row["same_kernels"] and row["same_arguments"] and row["direct_launches"]
        print(f"{'ok ' if ok else 'BAD'} {row['case']}: {row['launches']} launches, "
              f"{row['direct_launches']} direct {row['difference']}")
    if not args.check:
        out["timing"] = timing(args.calls)
        print("\nhost us per call                    Triton's path   direct launch   C++ launch")
        for row in out["timing"]:
            cpp = f"{row['cpp_launch_us']:10.1f}" if "cpp_launch_us" in row else ""
            print(f"{row['call']:48s} {row['triton_path_us']:8.1f} {row['direct_launch_us']:10.1f}"
                  f"  ({row['ratio']}x) {cpp}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
