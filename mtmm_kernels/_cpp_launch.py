"""The grouped GEMM's C++ launch path: forward and backward, and the group sort, without
Python between the call and the GPU.

On an H200's host a small grouped GEMM's forward + backward spent 490 us in Python (checks,
launch plans, Triton's launcher, three CUDA allocations, a Python backward) against 174 us for
``torch._grouped_mm`` (docs/host_path.md); its kernels took 166 us. The C++ op
(``mtmm_kernels/csrc``) does the same launches from a table of launch plans: per plan the
compiled kernel (its CUfunction), block, shared memory, scratch size, grid rule and every
kernel parameter, either fixed or taken from the call (tensor addresses, the row count). Its
autograd node calls a C++ backward.

The table is filled from the Python path: the second call of a launch plan there (the first
one may tune) hands the compiled kernel Triton returned, with the arguments Triton's launcher
received, to ``offer_mm``/``offer_dw``. A call finds its plans in the table, or takes the
Python path, which fills it. The keys hold everything the Python plan and Triton's
specialisation depend on: device, dtypes, K, N, G, the tile-height bucket, strides, addresses
modulo 16, and T's specialisation (T == 1, T % 16). Switches the Python path reads (TMA,
AUTOTUNE, the config tables, the direct launch) clear the table when they change.

The group sort of ``grouped_mm_by_ids`` (``group_sort.py``, two launches) takes the path
too: its first call offers both kernels' plans (``offer_sort``; the sort never tunes), with
the rule by which a call splits its rows over programs, which C++ checks against the Python
split of that call before it takes the plans.

Used for fp16 and bf16 on CUDA, both routings (``grouped_mm``, and ``grouped_mm_by_ids`` with
its group sort of int32 or int64 ids), eager mode (``torch.compile`` traces the custom op),
launches without profiler hooks. ``MTMM_CPP_LAUNCH=0`` turns it off. It is built on first use
with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; about a minute, then cached); a
failed build warns once and leaves the Python path, and so does an error in a call (a forward's
call runs on the Python path; a backward's gradients come from the Python backward). A thread
without a current CUDA context (the autograd engine's) gets the device's primary context before
its first launch, as Triton's own launcher does.

tests/test_cpp_launch.py (bench/cpp_launch_check.py) checks, with the kernels compiled for
sm_90 on a CPU, that the C++ path hands the driver exactly what Triton's launcher receives on
the Python path: the same kernel, grid, block, shared memory, scratch and parameters.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from triton import knobs

from . import _direct_launch as direct_launch

__all__ = ["ENABLED", "extension", "public_call", "grouped_mm", "grouped_mm_dw", "sort_by_group",
           "takes", "takes_ids", "offer_mm", "offer_dw", "offer_sort", "clear",
           "wants_fresh_gradient", "dry_run_on_cpu"]

ENABLED = os.environ.get("MTMM_CPP_LAUNCH", "1") != "0"
_SOURCES = ("bindings.cpp", "public_calls.cpp", "grouped_mm_launch.cpp", "group_sort_launch.cpp",
            "plan_launch.cpp", "driver_api.cpp")
_DTYPES = frozenset((torch.float16, torch.bfloat16))

_ext = None           # the built module
_build_failed = False
_state = None         # what the table's plans were made under (see _current_state)
_offered: set = set()  # calls whose plans were handed to the table (_first_offer)
# Tests and bench/cpp_launch_check.py: CPU tensors take the path too, with launches logged.
dry_run_on_cpu = False

# Bytes of each non-constexpr kernel parameter type Triton's launcher passes (its C types).
_PARAM_BYTES = {"i1": 1, "i8": 1, "u8": 1, "i16": 2, "u16": 2, "i32": 4, "u32": 4,
                "i64": 8, "u64": 8}


def extension():
    """The C++ module, built on first use; None if it cannot be built."""
    global _ext, _build_failed
    if _ext is None and not _build_failed:
        try:
            from torch.utils import cpp_extension
            source_dir = Path(__file__).resolve().parent / "csrc"
            # One build per torch version: torch's cache tells builds apart by sources and
            # flags only, and a module built against another torch's headers must not load.
            version = re.sub(r"\W", "_", torch.__version__)
            _ext = cpp_extension.load(
                name=f"mtmm_cpp_launch_{version}",
                sources=[str(source_dir / s) for s in _SOURCES],
                extra_cflags=["-O2"], extra_ldflags=["-ldl"], verbose=False)
            _ext.set_backward_fallback(_python_backward)
            _ext.set_launch_error_handler(_backward_launch_error)
            _ext.set_stream_resolver(_stream_handle)
        except Exception as error:  # no compiler, no ninja, a torch without headers
            _build_failed = True
            warnings.warn(f"mtmm: the C++ launch path could not be built ({error}); "
                          "the grouped GEMM keeps its Python path", RuntimeWarning, stacklevel=2)
    return _ext


def clear() -> None:
    """Forget every plan (the Python side offers them again)."""
    _offered.clear()
    if _ext is not None:
        _ext.clear()


_gg_module = None


def _gg():
    global _gg_module
    if _gg_module is None:  # grouped_gemm imports this module: look it up on first use
        from . import grouped_gemm
        _gg_module = grouped_gemm
    return _gg_module


def _current_state() -> tuple:
    gg = _gg()
    return (gg.TMA, gg.TMA_ON_CPU, gg.AUTOTUNE, id(gg._MM_CONFIGS), id(gg._DW_CONFIGS),
            id(gg._TUNED_CONFIGS), id(gg._PLANS), direct_launch.ENABLED,
            direct_launch.generation)


def _hooks_idle() -> bool:
    """No launch hooks (profilers) installed: the C++ path would skip them."""
    runtime = knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _usable(t: torch.Tensor, dtypes: frozenset = _DTYPES) -> bool:
    """Whether calls on t may take the path: its dtype, its device, and _ready()."""
    if not ENABLED or t.dtype not in dtypes or _build_failed:
        return False
    if not (t.is_cuda or dry_run_on_cpu):
        return False
    return _ready()


def _ready() -> bool:
    """The table's plans hold under the switches as they are now (else it is cleared), and no
    launch hook waits for calls."""
    global _state
    state = _current_state()
    if state != _state:  # a switch changed: plans made under the old one are stale
        clear()
        _state = state
    return _hooks_idle()


def takes(x: torch.Tensor) -> bool:
    """Whether plans for calls on x go to the C++ table (the Python path offers them)."""
    return _ext is not None and _usable(x)


_ID_DTYPES = frozenset((torch.int32, torch.int64))


def takes_ids(ids: torch.Tensor) -> bool:
    """Whether the group sort's plans for these ids go to the C++ table."""
    return _ext is not None and _usable(ids, _ID_DTYPES)


def grouped_mm(x, w, offsets, bias, perm, autograd: bool):
    """y through the C++ path, or None where the Python path must run this call. Without
    ``autograd`` it only launches, whatever the inputs' requires_grad (callers with their own
    autograd: the custom op's, the Python Function's)."""
    return _call("grouped_mm", x, x, w, offsets, bias, perm, autograd)


def grouped_mm_dw(x, dy, offsets, perm, need_bias: bool):
    """(dW, dBias) through the C++ path, or None where the Python path must run this call."""
    return _call("grouped_mm_dw", x, x, dy, offsets, perm, need_bias)


def public_call(entry: str, x, w, index, bias):
    """The public function ``entry``'s plain call (``grouped_mm_public`` or
    ``grouped_mm_by_ids_public``), checked and launched in C++; None where the Python function
    must check and run this call (any argument unlike the plain case, a missing plan). The
    caller has made sure that torch.compile is not tracing."""
    # the C++ call checks the tensors (dtype, device) itself
    if not ENABLED or _ext is None or not _ready():
        return None
    return _invoke(entry, x, w, index, bias)


def sort_by_group(ids, num_groups: int):
    """(perm, offsets) of ``group_sort.sort_by_group`` through the C++ path, or None where
    the Python path must run this call."""
    return _call("sort_by_group", ids, ids, num_groups, dtypes=_ID_DTYPES)


def _call(entry: str, x: torch.Tensor, *args, dtypes: frozenset = _DTYPES):
    """The extension's ``entry`` on args where the C++ path may take calls on x, else None."""
    if not _usable(x, dtypes):
        return None
    if extension() is None:
        return None
    return _invoke(entry, *args)


def _invoke(entry: str, *args):
    """The extension's ``entry`` on args; None (and the path turned off) where it raises."""
    try:
        return getattr(_ext, entry)(*args)
    except torch.OutOfMemoryError:  # the caller's problem on any path: the path stays on
        raise
    except RuntimeError as error:  # a driver or torch that refuses what the path does
        _turn_off(error)
        return None


def _turn_off(error: Exception) -> None:
    global ENABLED
    ENABLED = False
    warnings.warn(f"mtmm: the C++ launch path is turned off ({error}); the grouped GEMM keeps "
                  "its Python path", RuntimeWarning, stacklevel=4)


def _backward_launch_error(message: str) -> None:
    """A launch of the C++ backward failed; it computes that backward in Python."""
    _turn_off(RuntimeError(message))


def wants_fresh_gradient(dy: torch.Tensor) -> bool:
    """The C++ backward plans for a fresh contiguous gradient: the Python path hands such a
    copy to its backward kernels, so that the plans it offers are the ones asked for."""
    return (ENABLED and _ext is not None and dy.dtype in _DTYPES
            and (dy.is_cuda or dry_run_on_cpu)
            and not (dy.is_contiguous() and dy.data_ptr() % 16 == 0))


def _stream_handle(device_index: int, stream_id: int) -> int:
    """The CUstream of a torch stream, by id: for torch without c10::Stream::native_handle."""
    return torch.cuda.Stream(stream_id=stream_id, device_index=device_index,
                             device_type=1).cuda_stream  # 1: DeviceType::CUDA


def _python_backward(x, w, offsets, perm, dy, need_x, need_w, need_b):
    """The C++ autograd node's backward where it has no plan, or under create_graph=True (grad
    mode on), where the gradients must record a graph of their own."""
    return _gg()._eager_gradients(x, w, offsets, perm, dy, need_x, need_w, need_b)


# --- filling the table ----------------------------------------------------------------------


def _plan_fields(compiled, kernel, head: tuple, tail: tuple):
    """(function, block, shared bytes, scratch bytes per program, parameter slots) of one
    compiled kernel, or None if its launch needs more than the C++ path does (clusters,
    cooperative or PDL launches, profiling scratch, parameter types it does not pack)."""
    meta = compiled.metadata
    if (getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "launch_cooperative_grid", False)
            or getattr(meta, "launch_pdl", False) or getattr(meta, "profile_scratch_size", 0)
            or meta.shared > 227 * 1024):
        return None
    function = compiled.function
    if function is None:  # no device: only the dry run, which logs the kernel's identity
        if not dry_run_on_cpu:
            return None
        function = id(compiled)
    signature = compiled.src.signature
    slots = []
    for i, (name, value) in enumerate(zip(kernel.arg_names, head + tail)):
        kind = signature[name]
        if kind == "constexpr":
            continue
        if kind.startswith("*"):
            if i >= len(head) or not isinstance(value, torch.Tensor):
                return None
            slots.append((i, 8, 0))
        elif kind in _PARAM_BYTES and type(value) in (int, bool):
            slots.append((i, _PARAM_BYTES[kind], 0) if i < len(head)
                         else (-1, _PARAM_BYTES[kind], int(value)))
        else:
            return None
    scratch = getattr(meta, "global_scratch_size", 0)
    return (int(function), 32 * meta.num_warps, meta.shared, scratch, slots)


def _first_offer(plan_key, head) -> bool:
    """Whether calls like this one were not offered yet. The Python plan key leaves out what
    only Triton specialises on (T, the offsets' dtype and alignment): the head adds it."""
    token = (plan_key, direct_launch._head_key(head),
             tuple([a.data_ptr() % 16 for a in head if isinstance(a, torch.Tensor)]))
    if token in _offered:
        return False
    _offered.add(token)
    return True


def _new_plan_fields(plan_key, kernel, head, plan):
    """_plan_fields of a call like this one (``plan``: the Python launch plan it took), or
    None if such calls were offered already or the C++ path cannot launch the kernel."""
    if not _first_offer(plan_key, head):
        return None
    compiled = direct_launch.compiled_for(kernel, head, plan.tail, plan.options)
    return None if compiled is None else _plan_fields(compiled, kernel, head, plan.tail)


def offer_mm(plan_key, kernel, head, plan, grid_cap, x, w, bias, offsets, perm):
    """Store the forward/dX kernel's plan for calls like this one (x [T, K], w [G, K, N],
    bias or None, offsets [G], perm [T] or None). The caller has asked ``takes(x)``."""
    fields = _new_plan_fields(plan_key, kernel, head, plan)
    if fields is not None:
        _ext.register_mm(x, w, bias, offsets, perm, fields, plan.meta["BLOCK_M"],
                         plan.meta["BLOCK_N"], grid_cap)


def offer_dw(plan_key, kernel, head, plan, grid, x, dy, offsets, perm, need_bias):
    """Store the dW kernel's plan for calls like this one (x [T, K], dy [T, N], offsets,
    perm or None). The caller has asked ``takes(x)``."""
    fields = _new_plan_fields(plan_key, kernel, head, plan)
    if fields is not None:
        _ext.register_dw(x, dy, offsets, perm, need_bias, fields, grid)


def offer_sort(launches, num_groups: int, split: dict) -> None:
    """Store the group sort's two plans for calls like this one. ``launches``: the counting
    and the scatter kernel's (kernel, head, tail, options) as launched, heads starting with
    the ids; ``split``: how the call split its rows (max_programs, row_step, block_g,
    block_p_cap, and its rows_per_program, programs, block_p), which the C++ side checks
    against its own rule. The caller has asked ``takes_ids(ids)``."""
    # as _first_offer: Triton's specialisation, and the addresses modulo 16 the keys hold
    token = ("sort", num_groups, *[(id(k), direct_launch._head_key(head), tail, options,
                                    tuple([a.data_ptr() % 16 for a in head
                                           if isinstance(a, torch.Tensor)]))
                                   for k, head, tail, options in launches])
    if token in _offered:
        return
    _offered.add(token)
    fields = []
    for kernel, head, tail, options in launches:
        compiled = direct_launch.compiled_for(kernel, head, tail, options)
        found = None if compiled is None else _plan_fields(compiled, kernel, head, tail)
        if found is None:
            return
        fields.append(found)
    try:
        _ext.register_sort(launches[0][1][0], num_groups, *fields, split["max_programs"],
                           split["row_step"], split["block_g"], split["block_p_cap"],
                           (split["rows_per_program"], split["programs"], split["block_p"]))
    except RuntimeError as error:  # the C++ rule splits otherwise: a bug, keep Python's path
        _turn_off(error)
