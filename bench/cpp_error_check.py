"""Which ways of raising an error from a C++ extension reach Python, and which crash.

On the H200 machine (torch 2.11.0+cu130, g++ 13.3; 2026-11-27) a failing ``TORCH_CHECK`` with
a formatted message crashed the process, in mtmm's C++ launch path and in a minimal extension
alike, while a ``std::runtime_error`` with a plain message was raised as a ``RuntimeError``
(``bench/results/h200/run5_cpp_errors.md``). Each case here runs in its own process, so a crash
is recorded, not fatal:

    python bench/cpp_error_check.py OUT.json

Cases: mtmm's extension refusing a bad plan (``MTMM_CHECK``, ``csrc/checks.hpp``), and a
minimal extension that raises through ``TORCH_CHECK`` with a number or with one literal,
through ``std::runtime_error`` with a plain or a ``std::to_string`` message, or that only
formats a number through ``std::ostringstream`` and returns the string.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MINIMAL_SOURCE = r"""
#include <torch/extension.h>
#include <sstream>
#include <stdexcept>
#include <string>
void torch_check_number(int64_t v) { TORCH_CHECK(v < 0, "bad value ", v); }
void torch_check_literal(int64_t v) { TORCH_CHECK(v < 0, "bad value"); }
void std_plain(int64_t) { throw std::runtime_error("bad value"); }
void std_to_string(int64_t v) { throw std::runtime_error("bad value " + std::to_string(v)); }
std::string ostringstream_only(int64_t v) {
  std::ostringstream s;
  s << "value " << v;
  return s.str();
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("torch_check_number", &torch_check_number);
  m.def("torch_check_literal", &torch_check_literal);
  m.def("std_plain", &std_plain);
  m.def("std_to_string", &std_to_string);
  m.def("ostringstream_only", &ostringstream_only);
}
"""
MINIMAL_CASES = ("torch_check_number", "torch_check_literal", "std_plain", "std_to_string",
                 "ostringstream_only")


def _run_case(case: str) -> str:
    """In a child process: the case's outcome as one line (a crash never returns)."""
    import torch
    if case == "mtmm_bad_plan":
        from mtmm_kernels import _cpp_launch
        ext = _cpp_launch.extension()
        x, w = torch.randn(100, 16).half(), torch.randn(4, 16, 8).half()
        offsets = torch.tensor([10, 20, 30, 100])
        call = lambda: ext.register_mm(x, w, None, offsets, None,  # noqa: E731
                                       (0xF00D, 128, 0, 0, [(9, 8, 0)]), 64, 32, 7)
    else:
        from torch.utils import cpp_extension
        module = cpp_extension.load_inline("mtmm_cpp_error_check", cpp_sources=[MINIMAL_SOURCE],
                                           extra_cflags=["-O2"], verbose=False)
        call = lambda: getattr(module, case)(3)  # noqa: E731
    try:
        result = call()
    except Exception as error:  # the outcome we record
        return f"raised {type(error).__name__}: {str(error).splitlines()[0]}"
    return f"returned {result!r}"


def _child(case: str) -> str:
    """The case's outcome, run in a process of its own: its line, or how the process died."""
    run = subprocess.run([sys.executable, __file__, "--case", case], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    if run.returncode == 0 and run.stdout.strip():
        return run.stdout.strip().splitlines()[-1]
    return f"exit status {run.returncode}: {run.stderr.strip().splitlines()[:1]}"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print(_run_case(sys.argv[2]))
        return
    out = Path(sys.argv[1])
    _child("std_plain")  # builds the minimal extension, so that no case's timeout includes it
    results = {}
    for case in ("mtmm_bad_plan",) + MINIMAL_CASES:
        results[case] = _child(case)
        print(f"{case:22s} {results[case]}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")

if __name__ == "__main__":
    main()
