"""Device and interpreter detection shared by every kernel module.

A Triton kernel can run on a tensor when the tensor is on a CUDA device (and Triton is
installed), or when the tensor is on the CPU and ``TRITON_INTERPRET=1`` was set before Triton
was imported (Triton's interpreter, slow but exact for fp32/fp16). Everything else falls back
to the pure-torch references in ``mtmm_kernels.reference``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch
from torch._subclasses.fake_tensor import is_fake

__all__ = [
    "has_triton",
    "triton_version",
    "is_interpreter",
    "cuda_available",
    "triton_runs_on",
    "device_name",
    "element_bytes",
    "next_power_of_2",
    "cdiv",
    "wants_grad",
    "through_dispatcher",
    "dtensor_mesh",
    "index_on_mesh",
    "under_functorch",
    "has_values",
    "holds_values",
    "num_sms",
]


@functools.cache
def has_triton() -> bool:
    """Whether the ``triton`` package can be imported at all."""
    return importlib.util.find_spec("triton") is not None


def triton_version() -> str | None:
    if not has_triton():
        return None
    import triton

    return triton.__version__


def is_interpreter() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def triton_runs_on(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel can take these tensors: all on CUDA, or all on CPU under the
    interpreter. Meta and other devices are not Triton's business."""
    if not has_triton() or not tensors:
        return False
    types = {t.device.type for t in tensors}
    if types == {"cuda"}:
        return True
    return types == {"cpu"} and is_interpreter()


def device_name(device: torch.device | str | None = None) -> str:
    """A human name for the device: the GPU's marketing name, or 'cpu'."""
    device = torch.device(device) if device is not None else None
    if device is None:
        device = torch.device("cuda" if cuda_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of Python ints for launch grids: ``triton.cdiv`` does the same through
    Triton's function machinery, about 2 us per call on the host."""
    return -(-a // b)


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd must record a call on these inputs (None entries are ignored): eager
    calls that need no gradient can skip an ``autograd.Function`` and its dispatch cost."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# One C call; torch builds without it take the dispatcher always (slower, never wrong).
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)


def through_dispatcher(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors must be called as its ``torch.library`` op, not by the
    eager fast path (which launches kernels with no op for the dispatcher to see): while
    torch.compile traces; under a Python dispatch mode (``FlopCounterMode`` counts the op's
    FLOPs, ``FakeTensorMode`` and memory trackers take its fake implementation, selective
    activation checkpointing sees it); on meta tensors (the fake implementation gives the
    shapes); and on tensor subclasses (a DTensor, a fake tensor: their own dispatch handles the
    op, or names it in its error). Anything but a tensor is for the caller's checks to refuse."""
    if torch.compiler.is_compiling() or _dispatch_modes() > 0:
        return True
    for t in tensors:
        kind = type(t)
        if kind is not torch.Tensor and kind is not torch.nn.Parameter:
            if isinstance(t, torch.Tensor):
                return True
        elif t.is_meta:
            return True
    return False


def dtensor_mesh(*tensors: torch.Tensor | None) -> object:
    """The device mesh of the first DTensor among tensors (None entries are ignored), or None;
    without importing DTensor where no program did (a DTensor needs it imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return None
    for t in tensors:
        if isinstance(t, module.DTensor):
            return t.device_mesh
    return None


def index_on_mesh(index: torch.Tensor | None, *operands: torch.Tensor | None):
    """``index`` (offsets, group ids, cu_seqlens: a plain tensor, the same on every rank) as a
    DTensor replicated on the mesh of the first DTensor among ``operands``, for the ops'
    sharding strategies (``mtmm_kernels.tensor_parallel``, imported here on first use, registers
    them); else ``index`` unchanged (None included)."""
    mesh = dtensor_mesh(*operands)
    if mesh is None or index is None:
        return index
    from . import tensor_parallel
    return tensor_parallel.replicated(index, mesh)


_interpreter_stack = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack",
                             lambda: None)


_is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor",
                      lambda t: False)


def under_functorch() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, ...) is active: its wrapped tensors
    have no storage to launch on; only an ``autograd.Function`` unwraps them (the
    ``torch.library`` ops' autograd does not)."""
    return _interpreter_stack() is not None


def has_values(t: torch.Tensor) -> bool:
    """Whether t's values exist to be read: not a meta tensor, a fake tensor's stand-in or
    torch.func's wrapper of a batch."""
    if t.is_meta or _is_wrapped(t):
        return False
    plain = type(t) is torch.Tensor or type(t) is torch.nn.Parameter  # is_fake costs ~2 us
    return plain or not is_fake(t)


def holds_values(t: torch.Tensor) -> bool:
    """Whether t's values can be read on the host without a device synchronisation: a CPU
    tensor whose values exist, outside torch.compile tracing."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and has_values(t)


@functools.cache
def num_sms(device: torch.device) -> int:
    """Programs a persistent kernel runs at once per unit of occupancy: the GPU's SM count, or
    4 in the interpreter (a few programs, so that loops over tiles and the sums across
    programs are exercised)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
