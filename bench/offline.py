"""Compile and "launch" Triton kernels for an NVIDIA GPU on a machine without one.

``offline_target(arch)`` points Triton at a stand-in driver for one architecture: the real
launchers, called with CPU tensors, bind, specialise and compile exactly as for a launch, and
the compiled kernel's launcher is replaced by a recorder. bench/sass_report.py reads the
machine code of what was compiled; bench/host_path.py compares what Triton's launch path and
mtmm's direct launch hand the launcher, and times the host side of every call.
It must run without TRITON_INTERPRET (the interpreter replaces the compiler).
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def offline_target(arch: int, launches: list | None = None):
    """Triton compiles for cuda:<arch> and launches nothing. Every compiled kernel a launch
    reaches is appended to the yielded list, once per launch; with ``launches``, each launch's
    (compiled kernel, launcher arguments) is appended there too."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime import driver

    class StandIn:  # the parts of a driver that binding and compiling consult
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_capability(self, device=0):
            return divmod(arch, 10)

    compiled: list = []

    def record(kernel):
        compiled.append(kernel)
        if launches is None:
            return lambda *args, **kwargs: None
        return lambda *args: launches.append((kernel, args))

    # the active driver is the attribute ``_active`` from Triton 3.5, ``active`` before
    slot = "_active" if "_active" in vars(driver) else "active"
    saved_active = vars(driver)[slot]
    saved_run = CompiledKernel.__dict__.get("run")
    saved_init = CompiledKernel.__dict__.get("_init_handles")
    driver.set_active(StandIn())
    CompiledKernel.run = property(record)  # read once per launch: record, launch nothing
    CompiledKernel._init_handles = lambda self: None  # needs a device
    try:
        yield compiled
    finally:
        setattr(driver, slot, saved_active)
        for name, value in (("run", saved_run), ("_init_handles", saved_init)):
            if value is None:
                delattr(CompiledKernel, name)
            else:
                setattr(CompiledKernel, name, value)
