"""What this installation can do: versions, the device, whether the C++ core and the Triton
kernels are usable. Backs ``mtmm info``."""

from __future__ import annotations

import platform
from typing import Any


def _core_status() -> dict[str, Any]:
    try:
        from scheduler import _core

        # A real call, not just an import: a diamond has levels [0, 1, 1, 2].
        levels = _core.metalevels(4, [(0, 1), (0, 2), (1, 3), (2, 3)])
        ok = list(levels) == [0, 1, 1, 2]
        return {"usable": ok, "detail": "scheduler._core" if ok else f"wrong levels {levels}"}
    except Exception as exc:  # reported, not raised: info must always print
        return {"usable": False, "detail": f"{type(exc).__name__}: {exc}"}


def _kernels_status() -> dict[str, Any]:
    from mtmm_kernels import _triton_utils as tu

    if not tu.has_triton():
        return {"usable": False, "detail": "triton not installed: pure-torch reference fallback"}
    if tu.cuda_available():
        return {"usable": True, "detail": f"Triton on {tu.device_name()}"}
    if tu.is_interpreter():
        return {"usable": True, "detail": "Triton interpreter on CPU (TRITON_INTERPRET=1, slow)"}
    return {
        "usable": False,
        "detail": "no GPU: CPU tensors use the pure-torch reference "
        "(set TRITON_INTERPRET=1 to run the Triton kernels in the interpreter)",
    }


def collect() -> dict[str, Any]:
    import numpy
    import torch

    from mtmm_kernels import _triton_utils as tu

    import importlib.metadata as md

    try:
        version = md.version("mtmm")
    except md.PackageNotFoundError:
        version = "not installed"
    return {
        "mtmm": version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": tu.triton_version(),
        "numpy": numpy.__version__,
        "device": tu.device_name(),
        "device_count": torch.cuda.device_count() if tu.cuda_available() else 0,
        "cpp_core": _core_status(),
        "triton_kernels": _kernels_status(),
    }


def format_report(info: dict[str, Any]) -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            mark = "yes" if value["usable"] else "no"
            value = f"{mark} ({value['detail']})"
        lines.append(f"{key:>15}: {value}")
    return "\n".join(lines)
