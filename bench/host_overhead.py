"""Where a small grouped GEMM's host time goes, layer by layer (GPU only).

The 32-small-groups forward is host-bound on an H200: about 0.26 ms per eager call for a
0.055 ms kernel (bench/results/h200). This script times the same call with one layer peeled
off at a time, so the next change aims at the layer that costs:

  torch_grouped_mm     torch._grouped_mm (C++ dispatch): the peer's host cost
  mtmm_public          grouped_mm(x, w, offsets) under no_grad: what users call (the C++
                       launch path, mtmm_kernels/_cpp_launch.py)
  mtmm_public_python_path  the same without the C++ launch path (Python plans, direct launch)
  mtmm_public_triton_path  the same through Triton's launch path (no direct launch)
  mtmm_launcher        _launch_grouped_mm: no argument checks, no autograd.Function
  triton_autotuned     the autotuned kernel with prebuilt arguments: triton.autotune +
                       triton.heuristics + the JIT launch path
  triton_jit           the plain @triton.jit kernel with the tuned config: the JIT launch path
  triton_empty         an empty one-argument kernel: Triton's floor
  mtmm_fwd_bwd         grouped_mm forward + backward (three launches); _python_path and
                       _triton_path likewise
  torch_grouped_mm_fwd_bwd  the peer's forward + backward
  torch_mul_fwd_bwd    one elementwise op forward + backward: the autograd engine's floor
  mtmm_by_ids          grouped_mm_by_ids under no_grad (group sort: two launches, then the
                       GEMM); _triton_path likewise; sort_torch_grouped_mm_unsort its peer
  varlen_pack_public   pack_padded on bench_varlen's mixed256 case, lengths on the CPU;
                       _triton_path likewise
  varlen_pack_launcher the pack kernel's launcher, plan precomputed
  torch_index_select   the pack's fastest torch peer (FlashAttention's unpad_input)

Each is the mean host time per call over ``--calls`` back-to-back calls (a sync every 64
calls keeps the queue short), next to the device time per call from CUDA events around the
whole loop. cProfiles (top 30 functions by own time) of the public grouped_mm, its forward +
backward and the public pack go to OUT_DIR/host_profile_*.txt; the numbers to
OUT_DIR/host_overhead.json.

    python bench/host_overhead.py OUT_DIR [--calls 2000]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import re
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # bench_* modules; mtmm_kernels without install

SYNC_EVERY = 64


def time_calls(fn, calls: int) -> dict:
    """Host microseconds per call (perf_counter around the loop, syncs excluded as far as
    possible: the queue is drained every SYNC_EVERY calls, outside the timed spans) and device
    microseconds per call (CUDA events around the whole loop)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    host = 0.0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    done = 0
    while done < calls:
        n = min(SYNC_EVERY, calls - done)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host += time.perf_counter() - t0
        torch.cuda.synchronize()
        done += n
    end.record()
    end.synchronize()
    return {"host_us": host / calls * 1e6, "wall_us": start.elapsed_time(end) / calls * 1e3}


def _profile(fn, path: Path, calls: int = 500) -> None:
    """cProfile of calls back to back, top 30 functions by own time, to path."""
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    # file names relative to the checkout or the packages: the record names no machine's paths
    out = text.getvalue().replace(str(BENCH.parent) + "/", "")
    path.write_text(re.sub(r"\S*/(site|dist)-packages/", "", out))


def _without_cpp_launch(fn):
    """fn, called through the Python launch path (plans and the direct launch, no C++)."""
    from mtmm_kernels import _cpp_launch as cpp_launch

    def call():
        saved, cpp_launch.ENABLED = cpp_launch.ENABLED, False
        try:
            return fn()
        finally:
            cpp_launch.ENABLED = saved
    return call


def _without_direct_launch(fn):
    """fn, called through Triton's own launch path."""
    from mtmm_kernels import _direct_launch as direct_launch

    def call():
        with direct_launch.disabled():
            return fn()
    return call


def _varlen_cases() -> dict:
    """The same layers for a pack (bench_varlen's mixed256 case, lengths on the CPU): the
    public call, the copy kernel's launcher with the plan precomputed, and the peer."""
    from bench_varlen import _padded_case

    from mtmm_kernels import pack_padded
    from mtmm_kernels import varlen as V

    x, lens = _padded_case("mixed256")
    T = int(lens.sum())
    plan = pack_padded(x, lens)
    idx = (torch.arange(x.shape[1])[None, :] < lens[:, None]).flatten().nonzero().flatten()
    idx = idx.to(x.device)
    return {
        "varlen_pack_public": lambda: pack_padded(x, lens),
        "varlen_pack_public_triton_path": _without_direct_launch(lambda: pack_padded(x, lens)),
        "varlen_pack_launcher": lambda: V._launch_pack([x], None, plan.cu_seqlens, None, T),
        "torch_index_select": lambda: x.flatten(0, 1).index_select(0, idx),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA device: nothing to measure.")
        return 0
    import triton

    from bench_grouped_gemm import _forward_fn, _problem
    from mtmm_kernels import grouped_gemm as gg
    from mtmm_kernels import grouped_mm, grouped_mm_by_ids

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    case = "lognormal32_k1024"
    _, x, w, offsets, dy, ids = _problem(case)
    T, K = x.shape
    G, N = w.shape[0], w.shape[2]

    # The launcher's arguments, captured once (the kernel call is the same either way).
    captured = {}
    real_launch = gg._launch

    def capture(kernel, tuned, configs, prune, grid, kargs, n_head, even_k=False):
        captured.update(grid=grid, args=dict(kargs))
        return real_launch(kernel, tuned, configs, prune, grid, kargs, n_head, even_k)
    gg._launch = capture
    gg._PLANS.clear()  # a planned call would not reach _launch
    try:
        with torch.no_grad():
            gg._launch_grouped_mm(x, w, offsets, None, None)
    finally:
        gg._launch = real_launch
    kargs, grid = captured["args"], captured["grid"]
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    kargs["y_ptr"] = y
    gg._grouped_mm_tuned[grid](**kargs)  # tunes once, so every timed call hits the cache
    best = gg._grouped_mm_tuned.best_config if gg.AUTOTUNE else gg._prune_mm(gg._MM_CONFIGS,
                                                                             kargs)[0]
    meta = dict(best.kwargs)
    meta["EVEN_K"] = K % meta["BLOCK_K"] == 0
    fixed_grid = grid(meta)

    @triton.jit
    def _empty_kernel(p):
        pass

    empty_arg = torch.empty(1, device=x.device)
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()

    def public():
        with torch.no_grad():
            return grouped_mm(x, w, offsets)

    has_peer = hasattr(torch, "_grouped_mm")
    cases = {
        "torch_grouped_mm": (lambda: torch._grouped_mm(x, w, offs=offsets)) if has_peer else None,
        "mtmm_public": public,
        "mtmm_public_python_path": _without_cpp_launch(public),
        "mtmm_public_triton_path": _without_direct_launch(public),
        "mtmm_launcher": lambda: gg._launch_grouped_mm(x, w, offsets, None, None),
        "triton_autotuned": lambda: gg._grouped_mm_tuned[grid](**kargs),
        "triton_jit": lambda: gg._grouped_mm_kernel[fixed_grid](
            **kargs, **meta, num_warps=best.num_warps, num_stages=best.num_stages),
        "triton_empty": lambda: _empty_kernel[(1,)](empty_arg),
        "mtmm_fwd_bwd": lambda: torch.autograd.grad(grouped_mm(xg, wg, offsets), (xg, wg), dy),
    }
    cases["mtmm_fwd_bwd_python_path"] = _without_cpp_launch(cases["mtmm_fwd_bwd"])
    cases["mtmm_fwd_bwd_triton_path"] = _without_direct_launch(cases["mtmm_fwd_bwd"])
    if has_peer:
        cases["torch_grouped_mm_fwd_bwd"] = lambda: torch.autograd.grad(
            torch._grouped_mm(xg, wg, offs=offsets), (xg, wg), dy)
    # the autograd engine's floor on this machine: one cheap op forward and backward
    cases["torch_mul_fwd_bwd"] = lambda: torch.autograd.grad(xg * 2.0, (xg,), x)

    def by_ids():
        with torch.no_grad():
            return grouped_mm_by_ids(x, w, ids)
    cases["mtmm_by_ids"] = by_ids
    cases["mtmm_by_ids_python_path"] = _without_cpp_launch(by_ids)
    cases["mtmm_by_ids_triton_path"] = _without_direct_launch(by_ids)
    cases["mtmm_by_ids_fwd_bwd"] = lambda: torch.autograd.grad(
        grouped_mm_by_ids(xg, wg, ids), (xg, wg), dy)
    cases["mtmm_by_ids_fwd_bwd_python_path"] = _without_cpp_launch(cases["mtmm_by_ids_fwd_bwd"])
    if has_peer:
        peer = _forward_fn("sort_torch_grouped_mm_unsort", None, x, w, offsets, ids)
        cases["sort_torch_grouped_mm_unsort"] = lambda: peer(x, w)
        cases["sort_torch_grouped_mm_unsort_fwd_bwd"] = lambda: torch.autograd.grad(
            peer(xg, wg), (xg, wg), dy)
    cases.update(_varlen_cases())
    results = {}
    for name, fn in cases.items():
        if fn is None:
            continue
        try:
            results[name] = time_calls(fn, args.calls)
        except Exception as e:  # noqa: BLE001 -- one failing layer must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name:18s} {results[name]}")

    from mtmm_kernels import _cpp_launch as cpp_launch
    ext = cpp_launch.extension()
    if ext is not None:  # that the C++ path ran: a forward, then a forward + backward
        # Once each first: the _triton_path cases turn the direct launch off, which empties
        # the C++ table, and the Python path offers again only the plans of calls made since.
        public(), cases["mtmm_fwd_bwd"](), by_ids()
        torch.cuda.synchronize()
        before = ext.launch_count()
        public()
        cases["mtmm_fwd_bwd"]()
        torch.cuda.synchronize()
        results["cpp_launches_of_forward_and_forward_backward"] = ext.launch_count() - before
        before = ext.launch_count()  # by ids: the group sort's two launches, then the GEMM
        by_ids()
        torch.cuda.synchronize()
        results["cpp_launches_of_by_ids_forward"] = ext.launch_count() - before

    for name, fn in (("grouped_mm", public), ("grouped_mm_fwd_bwd", cases["mtmm_fwd_bwd"]),
                     ("grouped_mm_fwd_bwd_python_path", cases["mtmm_fwd_bwd_python_path"]),
                     ("varlen_pack", cases["varlen_pack_public"])):
        _profile(fn, out / f"host_profile_{name}.txt")

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "python": sys.version.split()[0], "case": case,
            "shape": f"G={G} T={T} K={K} N={N}",
            "config": {**meta, "num_warps": best.num_warps, "num_stages": best.num_stages},
            "calls": args.calls, "results": results}
    (out / "host_overhead.json").write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
