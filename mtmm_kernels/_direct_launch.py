"""Launch a compiled Triton kernel without Triton's per-call binding, once it has been compiled.

``kernel[grid](**kwargs)`` binds every keyword, specialises every argument, hashes the result
and looks the compiled kernel up on each call: about 20 us of host time for a kernel with 30
arguments on the development CPU (bench/host_path.py), a third of what a small grouped GEMM
takes on an H200. Here the first call of each specialisation goes through that path unchanged (it
compiles if needed and returns the CompiledKernel); later calls with an equal key go straight
to the compiled kernel's launcher with the arguments, launch metadata and hooks Triton would
pass (profilers keep seeing the launches).

The caller splits the kernel's parameters, in signature order, into a ``head`` that changes
from call to call (tensors, sizes) and a ``tail`` that rarely does (strides of weights,
constexprs). The key holds the tail and the launch options by value and, for the head, what
Triton's specialisation of each argument looks at: a tensor's dtype and 16-byte alignment, an
int's equality to 1, divisibility by 16 and integer width, tuples element by element. Equal
keys therefore mean equal specialisations, whatever the split.
tests/test_direct_launch.py checks that property against Triton's own specialisation function,
and checks, with the real kernels compiled for sm_90 on a CPU, that the direct path hands the
launcher exactly what Triton's path hands it.

Under the interpreter (TRITON_INTERPRET=1) a launch returns no CompiledKernel: every call takes
Triton's path. ``MTMM_DIRECT_LAUNCH=0`` (or ``ENABLED = False``) does so everywhere. A Triton
knob that changes compilation (debug, instrumentation), changed after the first launch, is not
seen here: call ``clear()``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any

import torch

__all__ = ["launch", "compiled_for", "named_tail", "disabled", "clear", "spec", "ENABLED",
           "stats"]

ENABLED = os.environ.get("MTMM_DIRECT_LAUNCH", "1") != "0"
_MAX_ENTRIES = 4096  # distinct keys; the table is cleared wholesale past it

# key -> CompiledKernel
_COMPILED: dict[tuple, Any] = {}
# launches through each path (tests and benchmarks read it)
stats = {"direct": 0, "triton": 0}

_UNKEYABLE = object()  # an argument kind the key does not cover: that call takes Triton's path


generation = 0  # counts clear(): the C++ launch path drops its plans when it changes


def clear() -> None:
    global generation
    _COMPILED.clear()
    generation += 1


@contextlib.contextmanager
def disabled():
    """Every launch inside takes Triton's own path (and the grouped GEMM no launch plans):
    for side-by-side timings and checks against that path."""
    global ENABLED
    saved, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = saved


def spec(value) -> Any:
    """What Triton's specialisation of one launch argument depends on: equal specs give equal
    specialisations. ``_UNKEYABLE`` for kinds this does not cover."""
    kind = type(value)
    if kind is int:
        return (value == 1, value % 16 == 0, -2**31 <= value < 2**31, value < 2**63)
    if kind is torch.Tensor or isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if kind is tuple:
        specs = tuple([spec(v) for v in value])
        return _UNKEYABLE if _UNKEYABLE in specs else specs
    if kind is bool or value is None:
        return (kind, value)
    if kind is float:
        return float  # never specialised
    return _UNKEYABLE


def named_tail(kernel, **named) -> tuple:
    """The kernel's last ``len(named)`` parameters, in signature order, from keywords: a tail
    for ``launch`` that no reordering of the signature can silently shuffle."""
    names = _TAIL_NAMES.get((id(kernel), len(named)))
    if names is None:
        names = _TAIL_NAMES[id(kernel), len(named)] = tuple(kernel.arg_names[-len(named):])
    try:
        return tuple([named[name] for name in names])
    except KeyError:
        raise TypeError(f"{kernel.__name__} ends with parameters {list(names)}, "
                        f"got {sorted(named)}") from None


_TAIL_NAMES: dict[tuple, tuple] = {}  # (id(kernel), length) -> its last parameter names


def _head_key(head: tuple) -> tuple:
    out = []
    for a in head:  # spec() inlined for the common kinds: this loop runs on every launch
        kind = type(a)
        if kind is int:
            out.append((a == 1, a % 16 == 0, -2**31 <= a < 2**31, a < 2**63))
        elif kind is torch.Tensor:
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            out.append(spec(a))
    return tuple(out)


def launch(kernel, grid: tuple, head: tuple, tail: tuple = (), options: tuple = ()) -> None:
    """``kernel[grid](*head, *tail, **dict(options))``, straight through the compiled kernel
    once this specialisation has been launched.

    Args:
        kernel: a ``@triton.jit`` function.
        grid: the launch grid, 1 to 3 ints.
        head: the first parameters of the kernel, in signature order, that change between
            calls (tensors, sizes).
        tail: every remaining parameter, in order; keyed by value, so no tensors here.
        options: (name, value) pairs such as ("num_warps", 4).
    """
    if not ENABLED or not _compiles(kernel):
        stats["triton"] += 1
        kernel[grid](*head, *tail, **dict(options))
        return
    device = _driver().active.get_current_device()  # compiled kernels are per device
    head_key = _head_key(head)
    key = (id(kernel), device, tail, options, head_key)
    compiled = _COMPILED.get(key)
    if compiled is None:
        stats["triton"] += 1
        compiled = kernel[grid](*head, *tail, **dict(options))
        if compiled is None or not hasattr(compiled, "packed_metadata"):
            return  # the interpreter, or a Triton that does not return its kernel
        assert not any(isinstance(t, torch.Tensor) for t in tail), "tensors go in the head"
        if _UNKEYABLE in head_key:
            return
        if len(_COMPILED) >= _MAX_ENTRIES:
            _COMPILED.clear()
        _COMPILED[key] = compiled
        return
    stats["direct"] += 1
    # What JITFunction.run does once it holds the compiled kernel (Triton 3.4 to 3.9).
    args = head + tail
    stream = _driver().active.get_current_stream(device)
    n = len(grid)
    grid_0, grid_1, grid_2 = grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1
    runtime = _knobs().runtime
    metadata = compiled.launch_metadata(grid, stream, *args)
    try:
        compiled.run(grid_0, grid_1, grid_2, stream, compiled.function, compiled.packed_metadata,
                     metadata, runtime.launch_enter_hook, runtime.launch_exit_hook, *args)
    except TypeError as error:  # a Triton whose launcher takes other arguments: stop here
        _turn_off()
        warnings.warn(f"mtmm: direct kernel launch turned off ({error}); launches take "
                      "Triton's path", RuntimeWarning, stacklevel=2)
        stats["triton"] += 1
        kernel[grid](*head, *tail, **dict(options))


def compiled_for(kernel, head: tuple, tail: tuple = (), options: tuple = ()):
    """The CompiledKernel a direct launch with these arguments uses, or None if there is none
    yet (mtmm_kernels/_cpp_launch.py hands it to the C++ launch path)."""
    if not ENABLED or not _compiles(kernel):
        return None
    device = _driver().active.get_current_device()
    return _COMPILED.get((id(kernel), device, tail, options, _head_key(head)))


_COMPILES: dict[int, bool] = {}  # id(kernel) -> whether launching it compiles (no interpreter)


def _compiles(kernel) -> bool:
    compiles = _COMPILES.get(id(kernel))
    if compiles is None:  # the interpreter's functions have no per-device compile caches
        compiles = _COMPILES[id(kernel)] = hasattr(kernel, "device_caches")
    return compiles


def _turn_off() -> None:
    global ENABLED
    ENABLED = False


@functools.cache
def _driver():
    from triton.runtime import driver
    return driver


@functools.cache
def _knobs():
    from triton import knobs
    return knobs
