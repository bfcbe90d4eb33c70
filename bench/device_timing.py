"""Three timings of a GPU call, each the answer to its own question.

latency_ms    one call at a time, the device synchronised after each (CUDA events around the
              call). What a lone call costs end to end: host time before the launch leaves
              the GPU idle and counts.
pipelined_ms  calls back to back without synchronising (events around the whole loop, divided
              by the calls). What a call costs inside a training step, where the host queues
              work ahead of the GPU: host time is hidden while it is shorter than the device
              time and shows where it is longer. This is how triton.testing.do_bench times.
kernel_ms     the device's own duration of every kernel (and memcpy/memset) the call launches,
              summed, from CUPTI through torch.profiler. What the kernels cost with every
              host gap removed: the basis for bandwidth and FLOP-rate figures.

On a CPU (smoke runs of the benchmark files) the first two are perf_counter times and
kernel_ms is None.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

HAS_CUDA = torch.cuda.is_available()
# extra_info key of each timing -> its name in tables. ``device_ms`` is the latency (the name
# the first GPU runs' JSON used for it).
TIMINGS = {"device_ms": "latency", "pipelined_ms": "pipelined", "kernel_ms": "kernel"}


def latency_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 20) -> float:
    """Median of ``reps`` calls, each timed alone with the device idle before it."""
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


def pipelined_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 50,
                 rounds: int = 3) -> float:
    """Median over ``rounds`` of the mean time per call of ``reps`` calls queued back to back."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        if HAS_CUDA:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(times)


def interleaved_ms(fns: dict[str, Callable[[], object]], *, rounds: int = 7, warmup: int = 3,
                   block_ms: float = 10.0) -> dict[str, float]:
    """Pipelined time per call of several methods measured in alternation: every round times a
    block of back-to-back calls of each method (about ``block_ms`` of calls, at least 3), in an
    order rotated from round to round, and each method keeps its median over the rounds.

    Methods timed one after another each meet the GPU in another clock and power state; on an
    H200 two timings of one 1.5 ms GEMM taken minutes apart differed by up to 10%. Alternating
    lets every method share the drift, so their ratio is the figure to read."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    reps = {name: max(3, min(100, int(block_ms / max(latency_ms(fns[name], warmup=0, reps=3),
                                                      1e-3))))
            for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = fns[name], reps[name]
            if HAS_CUDA:
                torch.cuda.synchronize()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(n):
                    fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / n)
            else:
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                times[name].append((time.perf_counter() - t0) * 1e3 / n)
    return {name: statistics.median(t) for name, t in times.items()}


def interleaved_latency_ms(fns: dict[str, Callable[[], object]], *, rounds: int = 7,
                           warmup: int = 3, calls: int = 5) -> dict[str, float]:
    """Latency (each call timed alone, the device idle before it: latency_ms) of several
    methods measured in alternation: every round times ``calls`` lone calls of each method, in
    an order rotated from round to round; each method keeps the median of its round medians.
    The latency basis with the clock and power drift shared (interleaved_ms's, for calls the
    host leaves the GPU waiting on)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(latency_ms(fns[name], warmup=0, reps=calls))
    return {name: statistics.median(t) for name, t in times.items()}


def self_device_key() -> str:
    """FunctionEvent's self device time attribute (``self_cuda_time_total`` before torch 2.4)."""
    from torch.autograd.profiler_util import FunctionEvent

    return "self_device_time_total" if hasattr(FunctionEvent, "self_device_time_total") \
        else "self_cuda_time_total"


def device_events(prof):
    """(name, device microseconds) of each GPU-side event of a torch.profiler run: kernels,
    memcpy, memset."""
    from torch.autograd import DeviceType

    key = self_device_key()
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA:
            yield evt.name, getattr(evt, key)


def kernel_times(fn: Callable[[], object], *, warmup: int = 3,
                 reps: int = 10) -> Optional[dict[str, float]]:
    """Device milliseconds per call of each kernel (and memcpy/memset) ``fn`` runs on the GPU,
    by name, summed over its launches in one call; None without CUDA."""
    if not HAS_CUDA:
        return None
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per_name: dict[str, float] = {}
    for name, us in device_events(prof):
        per_name[name] = per_name.get(name, 0.0) + us / 1e3 / reps
    return per_name


def kernel_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10) -> Optional[float]:
    """Device time per call of everything ``fn`` runs on the GPU, host gaps excluded."""
    times = kernel_times(fn, warmup=warmup, reps=reps)
    return None if times is None else sum(times.values())
