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


def kernel_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10) -> Optional[float]:
    """Device time per call of everything ``fn`` runs on the GPU, host gaps excluded."""
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
    total_us = sum(us for _, us in device_events(prof))
    return total_us / 1e3 / reps
