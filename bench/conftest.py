"""Benchmark harness: device-synchronised timing and derived figures in ``extra_info``.

pytest-benchmark's own timer is replaced by one that synchronises the GPU, so its statistics
are device time. Each benchmark also times itself three ways (bench/device_timing.py): one
call at a time (``device_ms``, latency, host time included), calls back to back
(``pipelined_ms``) and the device's own kernel time (``kernel_ms``, CUPTI). TFLOP/s and GB/s
are derived from the latency (``tflops``/``gbps``, as in the first runs) and from the kernel
time (``kernel_tflops``/``kernel_gbps``), each next to the same basis's ceiling measured once per
session on the same device (a dense matmul, a device-to-device copy). Ratios between methods
are only ever taken inside one session.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pytest  # noqa: E402

from device_timing import kernel_ms, kernel_times, latency_ms, pipelined_ms  # noqa: E402
from mtmm_kernels import _direct_launch as direct_launch  # noqa: E402
from mtmm_kernels._triton_utils import device_name  # noqa: E402


def synced_perf_counter() -> float:
    """perf_counter after the GPU has finished everything queued: device time, not launch time."""
    if HAS_CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        item.add_marker(pytest.mark.benchmark(timer=synced_perf_counter, disable_gc=True))


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def ceilings(bench_device) -> dict[str, float]:
    """The device's measured copy bandwidth (GB/s, bytes read + written) and dense matmul rate
    (TFLOP/s: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU)."""
    if HAS_CUDA:
        n_bytes, mm_n, mm_dtype = 1 << 30, 8192, torch.bfloat16
    else:
        n_bytes, mm_n, mm_dtype = 1 << 26, 1024, torch.float32
    src = torch.empty(n_bytes, dtype=torch.uint8, device=bench_device)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    a = torch.randn(mm_n, mm_n, device=bench_device, dtype=mm_dtype)
    b = torch.randn(mm_n, mm_n, device=bench_device, dtype=mm_dtype)
    matmul = lambda: a @ b  # noqa: E731
    copy_ms, mm_ms = latency_ms(copy), latency_ms(matmul)
    copy_kernel_ms, mm_kernel_ms = kernel_ms(copy), kernel_ms(matmul)
    out = {
        "copy_gbps": 2 * n_bytes / copy_ms / 1e6,
        "matmul_tflops": 2 * mm_n**3 / mm_ms / 1e9,
        "matmul_dtype": str(mm_dtype).removeprefix("torch."),
    }
    if copy_kernel_ms is not None:
        out["kernel_copy_gbps"] = 2 * n_bytes / copy_kernel_ms / 1e6
        out["kernel_matmul_tflops"] = 2 * mm_n**3 / mm_kernel_ms / 1e9
    return out


@pytest.fixture
def measure(benchmark, ceilings, bench_device):
    """``measure(fn, dtype=..., shape=..., flops=..., bytes=..., method=..., case=...)`` runs
    ``fn`` under pytest-benchmark and records the derived figures in ``extra_info``."""

    def run(fn: Callable[[], object], *, dtype=None, shape=None, flops: float | None = None,
            bytes: float | None = None, method: str = "", case: str = "", rounds: int = 10):
        launches = dict(direct_launch.stats)
        ms = latency_ms(fn)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        info = benchmark.extra_info
        # how this method's Triton launches went (mtmm methods): straight to the compiled
        # kernel, or through Triton's binding (first calls, the interpreter, or turned off)
        info["launches"] = {path: direct_launch.stats[path] - launches[path] for path in launches}
        info.update(
            device=device_name(bench_device),
            torch=torch.__version__,
            dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
            shape=shape,
            method=method,
            case=case,
            device_ms=ms,
            # about 10 ms of calls per round: enough to fill the queue, short for slow peers
            pipelined_ms=pipelined_ms(fn, reps=max(5, min(50, int(10 / max(ms, 1e-3))))),
        )
        kernels = kernel_times(fn)  # by kernel: where a forward + backward spends its time
        info["kernel_ms"] = None if kernels is None else sum(kernels.values())
        info["kernels_ms"] = kernels
        k_ms = info["kernel_ms"]
        if flops is not None:
            info["tflops"] = flops / ms / 1e9
            info["fraction_of_ceiling"] = info["tflops"] / ceilings["matmul_tflops"]
            info["ceiling_tflops"] = ceilings["matmul_tflops"]
            if k_ms:
                info["kernel_tflops"] = flops / k_ms / 1e9
                info["kernel_fraction_of_ceiling"] = (info["kernel_tflops"]
                                                      / ceilings["kernel_matmul_tflops"])
        if bytes is not None:
            info["gbps"] = bytes / ms / 1e6
            info["fraction_of_ceiling"] = info["gbps"] / ceilings["copy_gbps"]
            info["ceiling_gbps"] = ceilings["copy_gbps"]
            if k_ms:
                info["kernel_gbps"] = bytes / k_ms / 1e6
                info["kernel_fraction_of_ceiling"] = (info["kernel_gbps"]
                                                      / ceilings["kernel_copy_gbps"])
        return ms

    return run
