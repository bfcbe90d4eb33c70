"""Benchmark harness: device-synchronised timing and derived figures in ``extra_info``.

pytest-benchmark's own timer is replaced by one that synchronises the GPU, so its statistics
are device time; each benchmark also times itself with CUDA events (median of several runs),
derives TFLOP/s or GB/s, and records the fraction of the ceilings measured once per session
on the same device (a dense matmul, a device-to-device copy). Ratios between methods are only
ever taken inside one session.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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


def device_time_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if HAS_CUDA:
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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
    copy_ms = device_time_ms(lambda: dst.copy_(src))
    a = torch.randn(mm_n, mm_n, device=bench_device, dtype=mm_dtype)
    b = torch.randn(mm_n, mm_n, device=bench_device, dtype=mm_dtype)
    mm_ms = device_time_ms(lambda: a @ b)
    return {
        "copy_gbps": 2 * n_bytes / copy_ms / 1e6,
        "matmul_tflops": 2 * mm_n**3 / mm_ms / 1e9,
        "matmul_dtype": str(mm_dtype).removeprefix("torch."),
    }


@pytest.fixture
def measure(benchmark, ceilings, bench_device):
    """``measure(fn, dtype=..., shape=..., flops=..., bytes=..., method=..., case=...)`` runs
    ``fn`` under pytest-benchmark and records the derived figures in ``extra_info``."""

    def run(fn: Callable[[], object], *, dtype=None, shape=None, flops: float | None = None,
            bytes: float | None = None, method: str = "", case: str = "", rounds: int = 10):
        ms = device_time_ms(fn)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        info = benchmark.extra_info
        info.update(
            device=device_name(bench_device),
            torch=torch.__version__,
            dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
            shape=shape,
            method=method,
            case=case,
            device_ms=ms,
        )
        if flops is not None:
            info["tflops"] = flops / ms / 1e9
            info["fraction_of_ceiling"] = info["tflops"] / ceilings["matmul_tflops"]
            info["ceiling_tflops"] = ceilings["matmul_tflops"]
        if bytes is not None:
            info["gbps"] = bytes / ms / 1e6
            info["fraction_of_ceiling"] = info["gbps"] / ceilings["copy_gbps"]
            info["ceiling_gbps"] = ceilings["copy_gbps"]
        return ms

    return run
