"""Grouped GEMM, bf16, TFLOP/s of useful work (2 * rows * K * N per GEMM; x3 with backward).

Per case, side by side in one session: this kernel, ``torch._grouped_mm`` (where present), a
Python loop of per-group matmuls, a padded ``bmm`` (pad, bmm, unpad) and one dense GEMM of the
same FLOPs (the ceiling). Targets (issue 4): >= 1.0x ``torch._grouped_mm`` everywhere and
>= 1.3x on the 32-small-groups case, >= 90% of the dense GEMM on the large-group cases, and
by ids >= 1.3x faster than sort + ``torch._grouped_mm`` + unsort.

    python -m pytest bench/bench_grouped_gemm.py --benchmark-json=out.json
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from device_timing import interleaved_latency_ms, interleaved_ms
from mtmm_kernels import _cpp_launch as cpp_launch
from mtmm_kernels import grouped_gemm, grouped_mm, grouped_mm_by_ids

DTYPE = torch.bfloat16


def _lognormal_sizes(count: int, mean: float, sigma: float = 1.0, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    draws = rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, size=count)
    return [int(round(v)) for v in draws]


CASES = {  # name: (group sizes, K, N)
    "skewed8_k4096": ([8192, 512, 4096, 128, 16384, 2048, 64, 1024], 4096, 4096),
    "equal8_k4096": ([4096] * 8, 4096, 4096),
    "lognormal32_k1024": (_lognormal_sizes(32, 500), 1024, 1024),
    "empty2of8_k2048": ([3000, 0, 700, 5000, 0, 64, 1500, 9000], 2048, 2048),
}
BY_IDS_CASE = HOST_BOUND_CASE = "lognormal32_k1024"
MODES = ["fwd", "fwd+bwd"]
METHODS = ["mtmm", "torch_grouped_mm", "loop", "padded_bmm", "dense"]
BY_IDS_METHODS = ["mtmm_by_ids", "sort_torch_grouped_mm_unsort", "dense"]


@functools.lru_cache(maxsize=1)  # one case's tensors alive at a time; tests run case by case
def _problem(case: str):
    sizes, K, N = CASES[case]
    G, T = len(sizes), sum(sizes)
    device = torch.device("cuda")
    x = torch.randn(T, K, device=device, dtype=DTYPE)
    # [G, N, K] storage seen as [G, K, N]: the layout torch._grouped_mm prefers; ours takes any.
    w = torch.randn(G, N, K, device=device, dtype=DTYPE).transpose(1, 2).mul_(K**-0.5)
    offsets = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
    dy = torch.randn(T, N, device=device, dtype=DTYPE)
    counts = torch.tensor(sizes, device=device)
    ids = torch.repeat_interleave(torch.arange(G, device=device), counts)
    ids = ids[torch.randperm(T, device=device)]
    return sizes, x, w, offsets, dy, ids


def _forward_fn(method: str, sizes, x, w, offsets, ids):
    """A callable x, w -> y for each method; host-side bookkeeping is done here, once."""
    G, K, N = w.shape
    if method == "mtmm":
        return lambda x, w: grouped_mm(x, w, offsets)
    if method in ("mtmm_python", "mtmm_by_ids_python"):  # without the C++ launch path: its
        # host time, side by side
        def python_path(x, w):
            saved, cpp_launch.ENABLED = cpp_launch.ENABLED, False
            try:
                if method == "mtmm_python":
                    return grouped_mm(x, w, offsets)
                return grouped_mm_by_ids(x, w, ids)
            finally:
                cpp_launch.ENABLED = saved
        return python_path
    if method == "torch_grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            pytest.skip("torch._grouped_mm is not in this torch")
        return lambda x, w: torch._grouped_mm(x, w, offs=offsets)
    if method == "loop":
        bounds = list(zip([0] + list(np.cumsum(sizes)[:-1]), np.cumsum(sizes)))
        return lambda x, w: torch.cat([x[int(s):int(e)] @ w[g] for g, (s, e) in enumerate(bounds)])
    if method == "padded_bmm":
        m_max = max(max(sizes), 1)
        slot = torch.cat([g * m_max + torch.arange(n) for g, n in enumerate(sizes)]).to(x.device)

        def padded(x, w):
            x_pad = x.new_zeros((G * m_max, K)).index_copy(0, slot, x).view(G, m_max, K)
            return torch.bmm(x_pad, w).view(G * m_max, N).index_select(0, slot)
        return padded
    if method == "dense":  # same FLOPs, one GEMM: the ceiling (w is one [K, N] matrix here)
        return lambda x, w: x @ w
    if method == "mtmm_by_ids":
        return lambda x, w: grouped_mm_by_ids(x, w, ids)
    if method == "sort_torch_grouped_mm_unsort":
        if not hasattr(torch, "_grouped_mm"):
            pytest.skip("torch._grouped_mm is not in this torch")
        groups = torch.arange(G, device=x.device)

        def sort_then_grouped(x, w):
            sorted_ids, perm = torch.sort(ids, stable=True)
            offs = torch.searchsorted(sorted_ids, groups, right=True, out_int32=True)
            y_sorted = torch._grouped_mm(x.index_select(0, perm), w, offs=offs)
            return y_sorted.new_empty(y_sorted.shape).index_copy(0, perm, y_sorted)
        return sort_then_grouped
    raise AssertionError(method)


def _timed_fn(case: str, mode: str, method: str):
    """The call a benchmark times: the method's forward under no_grad, or its forward and the
    gradients of x and w."""
    sizes, x, w, offsets, dy, ids = _problem(case)
    fwd = _forward_fn(method, sizes, x, w, offsets, ids)
    if method == "dense":
        w = w[0]
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return fwd(x, w)
    else:
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()

        def fn():
            return torch.autograd.grad(fwd(xg, wg), (xg, wg), dy)
    return fn


def _run(measure, benchmark, case: str, mode: str, method: str, label: str):
    sizes, x, w, offsets, dy, ids = _problem(case)
    _, K, N = w.shape
    fn = _timed_fn(case, mode, method)
    if method.startswith("mtmm") and mode == "fwd":  # the timed kernel is right (untimed check)
        fwd = _forward_fn(method, sizes, x, w, offsets, ids)
        by_ids = method.startswith("mtmm_by_ids")
        sorted_x = x.index_select(0, torch.sort(ids, stable=True)[1]) if by_ids else x
        want = _forward_fn("loop", sizes, sorted_x, w, offsets, ids)(sorted_x, w).float()
        got = fwd(x, w).float()
        if by_ids:
            got = got.index_select(0, torch.sort(ids, stable=True)[1])
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-2, f"{method} {case}: relative error {err:.2e} against the per-group loop"
    flops = 2.0 * sum(sizes) * K * N * (1 if mode == "fwd" else 3)
    measure(fn, dtype=DTYPE, shape=f"G={len(sizes)} T={sum(sizes)} K={K} N={N}", flops=flops,
            method=method, case=f"{label} {mode}")
    if method.startswith("mtmm"):
        benchmark.extra_info["tuned_configs"] = _tuned_configs(K, N)


def _tuned_configs(K: int, N: int) -> list[dict]:
    """The configs the autotuner chose for these sizes (forward and dX share a kernel; dX
    swaps K and N), so a run says which tile, load build and pipeline won."""
    kernels = {id(grouped_gemm._grouped_mm_tuned): "fwd/dx",
               id(grouped_gemm._grouped_mm_dw_tuned): "dw",
               id(grouped_gemm._grouped_mm_gather_tuned): "by_ids fwd/dx",
               id(grouped_gemm._grouped_mm_dw_gather_tuned): "by_ids dw"}
    out = []
    for (tuner, dtype, *key), config in grouped_gemm._TUNED_CONFIGS.items():
        if tuple(key[:2]) in ((K, N), (N, K)):
            out.append({"kernel": kernels.get(id(tuner), "?"), "dtype": str(dtype),
                        "K_N_M_BUCKET": key, **config.kwargs, "num_warps": config.num_warps,
                        "num_stages": config.num_stages})
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("case,mode,method",
                         [(c, m, f) for c in CASES for m in MODES for f in METHODS])
def test_grouped_gemm(measure, benchmark, case, mode, method):
    _run(measure, benchmark, case, mode, method, case)


@pytest.mark.gpu
@pytest.mark.parametrize("mode,method", [(m, f) for m in MODES
                                         for f in ("mtmm_python", "mtmm_by_ids_python")])
def test_grouped_gemm_python_path(measure, benchmark, mode, method):
    """The host-bound cases without the C++ launch path (plans and the direct launch only)."""
    if method == "mtmm_python":
        _run(measure, benchmark, HOST_BOUND_CASE, mode, method, HOST_BOUND_CASE)
    else:
        _run(measure, benchmark, BY_IDS_CASE, mode, method, f"{BY_IDS_CASE} by_ids")


@pytest.mark.gpu
@pytest.mark.parametrize("mode,method", [(m, f) for m in MODES for f in BY_IDS_METHODS])
def test_grouped_gemm_by_ids(measure, benchmark, mode, method):
    """Tokens in random order (the ids are a shuffled grouping of the case's rows)."""
    _run(measure, benchmark, BY_IDS_CASE, mode, method, f"{BY_IDS_CASE} by_ids")


INTERLEAVED = [(c, m, ("mtmm", "torch_grouped_mm", "dense")) for c in CASES for m in MODES] + [
    (BY_IDS_CASE, m, tuple(BY_IDS_METHODS)) for m in MODES]


@pytest.mark.gpu
@pytest.mark.parametrize("case,mode,methods", INTERLEAVED,
                         ids=[f"{c}-{m}-{'by_ids' if 'mtmm_by_ids' in ms else 'offsets'}"
                              for c, m, ms in INTERLEAVED])
def test_grouped_gemm_interleaved(benchmark, case, mode, methods):
    """mtmm, its peer and the dense ceiling timed in alternation (pipelined calls, rotated
    order, bench/device_timing.interleaved_ms; and lone synchronised calls, the latency basis,
    interleaved_latency_ms): their ratios with the GPU's clock and power drift shared, which
    the method-by-method rows above do not give on the large cases."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not in this torch")
    by_ids = "mtmm_by_ids" in methods
    fns = {m: _timed_fn(case, mode, m) for m in methods}
    times = interleaved_ms(fns)
    latencies = interleaved_latency_ms(fns)
    benchmark.pedantic(fns[methods[0]], rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(case=f"{case}{' by_ids' if by_ids else ''} {mode}",
                                method="interleaved", interleaved_ms=times,
                                interleaved_latency_ms=latencies,
                                device=torch.cuda.get_device_name(), torch=torch.__version__)
