"""The machine code the kernels compile to for a Hopper GPU (sm_90), checked without a GPU.

bench/sass_report.py compiles every kernel through its real launcher for sm_90 and reads the
cubins with the tools Triton bundles. These tests hold the properties the kernel issues ask
for, which no CPU run of the interpreter can see: 16-byte loads and stores in the varlen copy
kernels (any H whose rows allow them), warpgroup MMAs and TMA or cp.async pipelines in the
grouped GEMM, and no register spills anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = [
    pytest.mark.skipif(
        not all((_BIN / tool).exists() for tool in ("ptxas", "cuobjdump", "nvdisasm")),
        reason="this Triton bundles no NVIDIA toolchain"),
    # compiling every kernel for sm_90 takes about 90 s of one core: out of the plain run
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[str, dict]:
    """The report, compiled by one process per core (at most 4), each taking every n-th case:
    a compile runs on one core."""
    tmp = tmp_path_factory.mktemp("sass")
    shards = max(1, min(4, os.cpu_count() or 1))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "sass_report.py"), "--shard", f"{i}/{shards}",
         "--json", str(tmp / f"report{i}.json")],
        env={**env, "TRITON_CACHE_DIR": str(tmp / f"cache{i}")},  # afresh, leaving no trace
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(shards)]
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, stderr[-3000:]
    finally:
        for proc in procs:
            proc.kill()  # (no-op for those done) none outlives a failed one
    report = [row for i in range(shards)
              for row in json.loads((tmp / f"report{i}.json").read_text())]
    by_case = {row["case"]: row for row in report}
    assert len(by_case) == len(report), "two shards reported the same case"
    return by_case


def test_every_kernel_compiles_without_spills(rows):
    assert len(rows) >= 20
    spilled = {case: row["local_bytes"] for case, row in rows.items() if row["local_bytes"]}
    assert not spilled


def test_varlen_rows_move_as_16_byte_vectors(rows):
    """Every varlen case in the report has rows and base addresses that allow 16-byte
    vectors (H = 1000 included: 2000-byte rows), so no data load or store may be narrower.
    The narrow loads left are the per-row metadata (cu_seqlens, lengths, order)."""
    varlen = {case: row for case, row in rows.items()
              if "pack" in case and "8-byte aligned" not in case}
    assert len(varlen) >= 14
    for case, row in varlen.items():
        # two rows of one vector per thread at least (the unpack at H = 1024, bf16)
        assert row["ldg128"] >= 2 and row["stg128"] == row["ldg128"], case
        assert row["stg"] <= 3, case  # the pack's metadata stores only
        if "H=1000" in case:  # the same vectors as its power-of-two twin
            twin = varlen[case.replace("H=1000", "H=1024")]
            assert (row["ldg128"], row["stg128"]) == (twin["ldg128"], twin["stg128"]), case
    pack3 = varlen["pack S=3 H=4096 B=128 bfloat16 grouped"]
    # one gather of one tile, not one masked load of the whole tile per stream (24 before)
    assert pack3["ldg128"] == varlen["pack S=1 H=4096 B=64 bfloat16"]["ldg128"]


def test_pack_loads_no_metadata_between_search_and_data(rows):
    """A pack program that compares its rows with every start (forced at B = 256, where the
    default is the binary search since the H200 measured it faster there) gets what it needs
    from that one load: the sequence and its start (one stream), or the sequence, stream and
    row of every (sequence, stream) segment (several streams in sample order, the starts
    built from the lengths loaded beside them). No per-row metadata load stands between the
    search and the data load: 12-20 narrow loads at B = 256 (one stream) and 22 (three
    streams) when the start and the lengths were loaded after the search. (At B = 64 Triton
    3.6 loads the starts twice, in two layouts, side by side: no count bound there.)"""
    for case in ("pack S=1 H=1024 B=256 bfloat16 all-starts",
                 "pack S=1 H=1000 B=256 float32 all-starts"):
        assert rows[case]["ldg"] <= 4, case
    assert rows["pack S=3 H=4096 B=128 bfloat16"]["ldg"] <= 8


def test_varlen_vectors_never_outgrow_the_alignment(rows):
    """Streams whose base address is 8 bytes off a 16-byte boundary: the pack may promise
    8-byte vectors, never 16 (a 16-byte load there is a misaligned-address fault)."""
    row = rows["pack S=3 H=4096 B=128 bfloat16 grouped 8-byte aligned"]
    assert row["ldg128"] == 0 and row["stg128"] == 0
    assert row["ldg"] >= 8  # the data still moves, in narrower vectors


def test_grouped_gemm_uses_hopper_tensor_cores_and_async_loads(rows):
    gemm = {case: row for case, row in rows.items() if case.startswith("grouped_mm")}
    assert len(gemm) >= 10
    for case, row in gemm.items():
        assert row["hgmma"] > 0 and row["hmma"] == 0, case  # wgmma, not the Ampere path
        if "tma=1" in case:
            assert row["utmaldg"] > 0, case
        if "tma=0" in case or "by_ids" in case:  # gathered x rows never use descriptors
            assert row["ldgsts"] > 0, case  # pointer loads pipelined through cp.async
        if "tma=0" in case:  # loads of later steps in flight while one step's MMAs run
            assert row["cp_async_depth"] > 0, case  # gathered dW rows too (0 before 11-27)
    assert any("by_ids" in case and "tma=1" in case for case in gemm)  # w's descriptor
    assert any("dW" in case and "flat" in case for case in gemm)  # one loop over the tiles
    assert sum("by_ids dW" in case for case in gemm) >= 6  # per tile and flattened
    stores = [case for case in gemm if "tma-store" in case]
    assert stores and all(gemm[case]["utmastg"] > 0 for case in stores)  # y's descriptor


def test_warp_specialized_grouped_gemm_configs_compile_to_three_warp_groups(rows):
    """A WS config's num_warps=4 compiles, where Triton's Hopper warp specialization takes the
    loop, to a producer warp group and two consumer warp groups (12 warps, registers moved to
    the consumers by setmaxnreg); where it gives up, to the 4 warps asked for."""
    from mtmm_kernels import grouped_gemm as gg

    if not gg._WS_TRITON:
        pytest.skip(f"Triton {triton.__version__}: no warp-specialized configs")
    ws = {case: row for case, row in rows.items()
          if case.startswith("grouped_mm") and " ws" in case}
    assert any(" fwd " in case for case in ws) and sum(" dW " in case for case in ws) >= 2
    for case, row in ws.items():
        assert row["num_warps"] == 12 and row["utmaldg"] > 0, case


def test_persistent_grouped_gemm_programs_fit_on_an_sm_at_once(rows):
    """A persistent config ("p<n>": a grid of n programs per SM, each walking its share of
    the tiles) is sized for n programs resident on each SM at once, so that they hide each
    other's pipeline fills and epilogues. Where fewer fit, its grid runs in waves of long
    programs instead: the last programs start only when the first finish."""
    import re

    persistent = {case: int(m.group(1)) for case in rows
                  if case.startswith("grouped_mm") and (m := re.search(r" p(\d+)\b", case))}
    assert len(persistent) >= 10 and 2 in persistent.values()
    for case, n in persistent.items():
        assert rows[case]["ctas_per_sm"] >= n, (case, rows[case]["ctas_per_sm"])
