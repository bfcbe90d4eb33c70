"""Where the GPU time goes: torch.profiler (CPU + CUDA) over a few iterations of each case,
after warm-up.

    python bench/profile_gpu.py OUT_DIR [--warmup 3] [--iters 5]

Writes OUT_DIR/<case>.txt (the profiler's key_averages table by self device time, 25 rows,
then the same by self CPU time: where the host time goes) and OUT_DIR/profile_summary.json
with, per case: wall ms per iteration (synchronised loop of ``iters`` iterations, no
profiler), device ms per iteration (every GPU activity: kernels, memcpy, memset), kernel ms per
iteration (kernels only), the fraction of the wall time the GPU is busy with kernels, the
host synchronisations per iteration (CUDA runtime calls that wait for the device) and the top
8 kernels by device time. A case that fails records its
error and the others still run. Cases:
  train_step_mtmm, train_step_usual   one training step of bench_train_step.py (bf16 autocast,
                                      fused AdamW), as benchmarked there;
  gemm_lognormal32_*                  bf16 grouped GEMM, 32 log-normal groups (mean ~500),
                                      K = N = 1024: mtmm grouped_mm and torch._grouped_mm
                                      forward and forward+backward, grouped_mm_by_ids
                                      (shuffled ids) forward+backward;
  pack_multimodal_mm3                 pack_multimodal end to end on bench_varlen.py's mm3 batch
                                      (B=128, H=4096 bf16, host lengths).
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # bench_* modules; mtmm_kernels without install
from device_timing import self_device_key, device_events  # noqa: E402

TABLE_ROWS, TOP_KERNELS, NAME_CHARS = 25, 8, 80


def _syncs(prof) -> dict[str, int]:
    """The runtime calls that block the host until the device catches up."""
    out: dict[str, int] = defaultdict(int)
    for evt in prof.events():
        if "Synchronize" in evt.name or evt.name in ("cudaMemcpy", "cudaMemset"):
            out[evt.name] += 1
    return out


@functools.cache
def _own_syncs() -> dict[str, int]:
    """The syncs of the profiling itself (the profiler's and the loop's final synchronize)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
    return dict(_syncs(prof))


def profile_case(name: str, fn: Callable[[], object], iters: int, out_dir: Path, warmup: int = 3) -> dict:
    """Warm up, time ``iters`` iterations (wall, synchronised), then profile ``iters`` more."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / iters

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    (out_dir / f"{name}.txt").write_text(
        f"# {name}: {iters} iterations, by self device time\n"
        + averages.table(sort_by=self_device_key(), row_limit=TABLE_ROWS)
        + f"\n\n# {name}: by self CPU time\n"
        + averages.table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS) + "\n")
    # host syncs inside fn (the profiling's own excluded): a sync-free step has none
    own = _own_syncs()
    syncs = {k: v - own.get(k, 0) for k, v in _syncs(prof).items()}

    per_name: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for evt_name, us in device_events(prof):
        per_name[evt_name] += us
        calls[evt_name] += 1
    device_us = sum(per_name.values())
    kernels = {k: v for k, v in per_name.items() if not k.startswith(("Memcpy", "Memset"))}
    kernel_ms = sum(kernels.values()) / 1e3 / iters
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return {
        "iters": iters,
        "wall_ms_per_iter": round(wall_ms, 4),
        "device_ms_per_iter": round(device_us / 1e3 / iters, 4),
        "kernel_ms_per_iter": round(kernel_ms, 4),
        "kernel_busy_fraction": round(kernel_ms / wall_ms, 3) if wall_ms > 0 else None,
        "kernel_launches_per_iter": sum(calls[k] for k in kernels) / iters,
        "host_syncs_per_iter": {k: v / iters for k, v in sorted(syncs.items()) if v},
        "top_kernels": [{"name": k[:NAME_CHARS], "ms_per_iter": round(v / 1e3 / iters, 4),
                         "calls_per_iter": calls[k] / iters} for k, v in top],
    }


# --- cases: name -> a function that builds the inputs and returns the callable --------------
def _train_step(method: str):
    import bench_train_step as B

    return B.make_train_step(method, torch.device("cuda"))[0]


def _gemm_problem():
    from bench_grouped_gemm import _lognormal_sizes

    sizes, K, N = _lognormal_sizes(32, 500), 1024, 1024
    G, T = len(sizes), sum(sizes)
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(T, K, device=dev, dtype=dt)
    w = torch.randn(G, N, K, device=dev, dtype=dt).transpose(1, 2).mul_(K**-0.5)  # [G, K, N] view
    offsets = torch.tensor(sizes, device=dev).cumsum(0).to(torch.int32)
    dy = torch.randn(T, N, device=dev, dtype=dt)
    ids = torch.repeat_interleave(torch.arange(G, device=dev), torch.tensor(sizes, device=dev))
    ids = ids[torch.randperm(T, device=dev)]
    return x, w, offsets, dy, ids


def _gemm(method: str, mode: str):
    from mtmm_kernels import grouped_mm, grouped_mm_by_ids

    x, w, offsets, dy, ids = _gemm_problem()
    if method == "mtmm":
        def fwd(x, w):
            return grouped_mm(x, w, offsets)
    elif method == "torch":
        if not hasattr(torch, "_grouped_mm"):
            raise RuntimeError("torch._grouped_mm is not in this torch")
        def fwd(x, w):
            return torch._grouped_mm(x, w, offs=offsets)
    else:
        def fwd(x, w):
            return grouped_mm_by_ids(x, w, ids)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fwd(x, w)
        return run
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    return lambda: torch.autograd.grad(fwd(xg, wg), (xg, wg), dy)


def _pack_mm3():
    """bench_varlen.py's mm3: B=128, H=4096 bf16; image 257 (10% of samples none), audio
    100..1500, text 5..77; lengths on the host."""
    from mtmm_kernels import pack_multimodal

    g = torch.Generator().manual_seed(1234)
    B, H = 128, 4096
    lens = [torch.where(torch.rand(B, generator=g) < 0.1, 0, 257),
            torch.randint(100, 1501, (B,), generator=g),
            torch.randint(5, 78, (B,), generator=g)]
    xs = [torch.randn(B, L, H, device="cuda", dtype=torch.bfloat16) for L in (257, 1500, 77)]
    return lambda: pack_multimodal(xs, lens)


CASES: dict[str, Callable[[], Callable[[], object]]] = {
    "train_step_mtmm": lambda: _train_step("mtmm"),
    "train_step_usual": lambda: _train_step("usual"),
    "gemm_lognormal32_mtmm_fwd": lambda: _gemm("mtmm", "fwd"),
    "gemm_lognormal32_mtmm_fwd_bwd": lambda: _gemm("mtmm", "fwd+bwd"),
    "gemm_lognormal32_torch_fwd": lambda: _gemm("torch", "fwd"),
    "gemm_lognormal32_torch_fwd_bwd": lambda: _gemm("torch", "fwd+bwd"),
    "gemm_lognormal32_mtmm_by_ids_fwd_bwd": lambda: _gemm("by_ids", "fwd+bwd"),
    "pack_multimodal_mm3": _pack_mm3,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_gpu: no CUDA device, nothing to profile")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "warmup": args.warmup, "iters": args.iters, "cases": {}}
    start = time.perf_counter()
    for name in args.cases:
        t0 = time.perf_counter()
        try:
            summary["cases"][name] = profile_case(name, CASES[name](), args.iters, args.out_dir, args.warmup)
        except Exception as e:  # noqa: BLE001 (one failing case must not lose the others)
            traceback.print_exc()
            summary["cases"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        r = summary["cases"][name]
        took = time.perf_counter() - t0
        if "error" in r:
            print(f"{name:40s} ERROR {r['error'][:200]}  ({took:.1f} s)")
        else:
            print(f"{name:40s} wall {r['wall_ms_per_iter']:9.3f} ms  kernels {r['kernel_ms_per_iter']:9.3f} ms"
                  f"  busy {r['kernel_busy_fraction']:.2f}  syncs/iter {r['host_syncs_per_iter']}  ({took:.1f} s)")
            for k in r["top_kernels"][:3]:
                print(f"{'':42s}{k['ms_per_iter']:8.3f} ms  {k['name']}")
        (args.out_dir / "profile_summary.json").write_text(json.dumps(summary, indent=1))  # as it goes
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (args.out_dir / "profile_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"profile_gpu: {len(args.cases)} cases in {summary['seconds']} s -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
