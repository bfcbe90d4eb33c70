"""The direct launch (mtmm_kernels/_direct_launch.py) against Triton's own launch path.

Its key must tell apart every two argument lists Triton specialises differently (else a call
would run a kernel compiled for another alignment or constant); and, for the real kernels, a
direct launch must hand the compiled kernel's launcher exactly what Triton's path hands it.
The second check compiles for sm_90 on the CPU (bench/host_path.py --check, in a process
without the interpreter).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from mtmm_kernels import _cpp_launch as cpp_launch  # noqa: E402
from mtmm_kernels import _direct_launch as direct_launch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _samples() -> list:
    ints = [0, 1, 2, 3, 8, 15, 16, 17, 32, 48, 1000, 1024, 2**31 - 16, 2**31 - 1, 2**31,
            2**31 + 16, 2**32, 2**63 - 16, 2**63 - 1, 2**63, 2**64 - 16, -1, -16, -17,
            -2**31, -2**31 - 16, -2**31 - 1]
    base = {dtype: torch.zeros(64, dtype=dtype)
            for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.int32,
                          torch.int64)}
    tensors = [t[offset:] for t in base.values() for offset in range(0, 9)]
    others = [True, False, None, 0.5, 2.0]
    tuples = [(a, b) for a, b in itertools.product([1, 16, 17, 2**31], tensors[:3])]
    return ints + tensors + others + tuples


def test_equal_keys_mean_equal_triton_specialisations():
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl")

    def triton_spec(value):
        return native_specialize_impl(BaseBackend, value, False, True, True)

    by_key: dict = {}
    for value in _samples():
        by_key.setdefault(repr(direct_launch.spec(value)), []).append(value)
    assert len(by_key) > 20  # the sample spans many keys
    for key, values in by_key.items():
        specs = {repr(triton_spec(v)) for v in values}
        assert len(specs) == 1, f"key {key} covers {specs}"


def test_head_key_is_spec_of_each_argument():
    head = (torch.zeros(3)[1:], 7, 16, 1, (torch.zeros(2), 5), None, True)
    assert direct_launch._head_key(head) == tuple(direct_launch.spec(a) for a in head)


def test_named_tail_follows_the_signature():
    from mtmm_kernels import varlen

    kernel = varlen._varlen_unpack_kernel
    tail = direct_launch.named_tail(kernel, BLOCK_H=64, BLOCK_R=8, ROW_ALIGN=4, HAS_ORDER=True,
                                    LENS_FROM_CU=False, S=3)
    assert tail == (3, False, True, 4, 8, 64)  # S, LENS_FROM_CU, HAS_ORDER, ROW_ALIGN, R, H
    with pytest.raises(TypeError, match="BLOCK_H"):
        direct_launch.named_tail(kernel, BLOCK_W=64, BLOCK_R=8, ROW_ALIGN=4, HAS_ORDER=True,
                                 LENS_FROM_CU=False, S=3)


def test_disabled_restores_the_switch(monkeypatch):
    monkeypatch.setattr(direct_launch, "ENABLED", True)
    with pytest.raises(RuntimeError), direct_launch.disabled():
        assert not direct_launch.ENABLED
        raise RuntimeError
    assert direct_launch.ENABLED


def test_unkeyable_arguments_take_tritons_path():
    assert direct_launch.spec(object()) is direct_launch._UNKEYABLE
    assert direct_launch.spec((1, object())) is direct_launch._UNKEYABLE


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="the interpreter's path")
def test_interpreter_launches_take_tritons_path():
    from mtmm_kernels import grouped_mm
    from mtmm_kernels.reference import grouped_mm_reference

    x, w = torch.randn(37, 16), torch.randn(3, 16, 8)
    offsets = torch.tensor([5, 20, 37], dtype=torch.int32)
    before = dict(direct_launch.stats)
    for _ in range(2):
        y = grouped_mm(x, w, offsets)
    assert direct_launch.stats["direct"] == before["direct"]
    assert direct_launch.stats["triton"] == before["triton"] + 2
    torch.testing.assert_close(y, grouped_mm_reference(x, w, offsets))


@pytest.mark.skipif(not (_BIN / "ptxas").exists(), reason="this Triton bundles no ptxas")
def test_direct_launch_hands_the_launcher_what_triton_does(tmp_path):
    out = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile afresh, leave no trace
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "host_path.py"), "--check",
                           "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["check"]
    assert len(rows) >= 15
    for row in rows:
        assert row["launches"] >= 1, row
        assert row["direct_launches"] == row["launches"], row  # the fast path was taken
        assert row["same_kernels"] and row["same_arguments"], row


@pytest.mark.gpu
def test_gpu_direct_launches_compute_what_tritons_path_computes(monkeypatch):
    """On a GPU: repeated calls take the direct launch and give bitwise the results of
    Triton's own path (same compiled kernels, same inputs), also inside a CUDA graph."""
    from mtmm_kernels import grouped_gemm, grouped_mm, grouped_mm_by_ids, pack_padded

    monkeypatch.setattr(grouped_gemm, "AUTOTUNE", False)  # one config each: a short GPU run
    monkeypatch.setattr(cpp_launch, "ENABLED", False)  # its own test: tests/test_cpp_launch.py

    dev = torch.device("cuda")
    x = torch.randn(1000, 96, device=dev, dtype=torch.bfloat16)
    w = torch.randn(5, 80, 96, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    offsets = torch.tensor([100, 300, 300, 700, 1000], device=dev, dtype=torch.int32)
    ids = torch.randint(0, 5, (1000,), device=dev)
    xp, lens = torch.randn(9, 40, 72, device=dev), torch.randint(0, 41, (9,))
    calls = {
        "grouped_mm": lambda: grouped_mm(x, w, offsets),
        "grouped_mm_by_ids": lambda: grouped_mm_by_ids(x, w, ids),
        "pack_padded": lambda: pack_padded(xp, lens).values,
    }
    for name, call in calls.items():
        with direct_launch.disabled():
            want = call()
        call()
        before = direct_launch.stats["direct"]
        got = call()
        assert direct_launch.stats["direct"] > before, name
        assert torch.equal(got, want), name

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = grouped_mm(x, w, offsets)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, grouped_mm(x, w, offsets))


def test_a_launcher_that_refuses_the_arguments_turns_the_direct_launch_off(monkeypatch):
    """A future Triton whose compiled-kernel launcher takes other arguments: the call still
    launches (through Triton's path), once, and later calls stay on Triton's path."""
    calls = []

    class Compiled:
        packed_metadata = function = None

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *args):
            raise TypeError("launch() takes 3 positional arguments")

    class Kernel:
        device_caches = {}

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(args) or Compiled()

    class Driver:
        class active:  # noqa: N801 -- mimics triton.runtime.driver.active
            get_current_device = staticmethod(lambda: 0)
            get_current_stream = staticmethod(lambda device: 0)

    monkeypatch.setattr(direct_launch, "ENABLED", True)
    monkeypatch.setattr(direct_launch, "_driver", lambda: Driver)
    monkeypatch.setattr(direct_launch, "_COMPILED", {})
    monkeypatch.setattr(direct_launch, "_COMPILES", {})  # ids of throwaway kernels must not stay
    kernel = Kernel()
    direct_launch.launch(kernel, (1,), (3,), (4,))  # Triton's path: compiles, stores
    with pytest.warns(RuntimeWarning, match="direct kernel launch turned off"):
        direct_launch.launch(kernel, (1,), (3,), (4,))  # direct: refused, relaunched
    assert not direct_launch.ENABLED
    direct_launch.launch(kernel, (1,), (3,), (4,))
    assert calls == [(3, 4)] * 3
