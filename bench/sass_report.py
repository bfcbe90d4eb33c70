"""What the kernels compile to on an NVIDIA GPU, read on a machine without one.

Triton compiles for any target without a device: this script points Triton at a stand-in
driver for one architecture (sm_90, Hopper, by default), calls the real launchers with CPU
tensors (Triton binds, specialises and compiles exactly as for a launch; only the launch
itself is skipped) and reads the cubins with the ``cuobjdump`` and ``nvdisasm`` that ship with
Triton. For every kernel and config it reports registers per thread, local memory (register
spills), static and dynamic shared memory, and the instructions that decide speed:

  ldg128 / stg128    16-byte global loads / stores (what a copy kernel needs)
  ldg / stg          narrower global loads / stores (metadata, gathers)
  ldgsts             cp.async global -> shared copies (pipelined pointer loads)
  utmaldg / utmastg  TMA tensor loads / stores (descriptors on Hopper)
  hgmma / hmma       warpgroup (Hopper) / warp-level tensor-core MMAs
  bar                block-wide barriers (cross-warp reductions and shared-memory hand-offs)
  cp_async_depth     the most cp.async groups a wait leaves in flight (DEPBAR.LE SB0, n):
                     0 where a loop of pointer loads waits for each load (not pipelined)
  ctas_per_sm        how many programs of the kernel an SM holds at once (registers, shared
                     memory, threads); the grouped GEMM cases' "p<n>": n persistent per SM

    python bench/sass_report.py [--arch 90] [--json OUT.json] [--only varlen|grouped_gemm]
                                [--shard I/N]

tests/test_sass.py runs it and checks the properties the kernel issues ask for (16-byte
copies in the varlen kernels, wgmma and TMA in the grouped GEMM, no spills anywhere). It
needs no GPU; it does need Triton's NVIDIA backend (its bundled ptxas, cuobjdump, nvdisasm)
and must run without TRITON_INTERPRET (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # mtmm_kernels without install

from offline import offline_target  # noqa: E402  (after the path is set)

_INSTRUCTIONS = {  # report name -> SASS opcode pattern (the opcode up to its first space)
    "ldg128": r"LDG\.E(\.[A-Z]+)*\.128",
    "stg128": r"STG\.E(\.[A-Z]+)*\.128",
    "ldg": r"LDG\.E(?!.*\.128)[.A-Z0-9]*",
    "stg": r"STG\.E(?!.*\.128)[.A-Z0-9]*",
    "ldgsts": r"LDGSTS[.A-Z0-9]*",
    "utmaldg": r"UTMALDG[.A-Z0-9]*",
    "utmastg": r"UTMASTG[.A-Z0-9]*",
    "hgmma": r"HGMMA[.A-Za-z0-9]*",
    "hmma": r"HMMA[.A-Z0-9]*",
    "bar": r"BAR\.SYNC[.A-Z0-9_]*",
}


def _tool(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not bundled with this Triton ({path})")
    return str(path)


def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int) -> int:
    """How many of a kernel's programs one Hopper SM holds at once (the occupancy
    calculator's rule for sm_90: 64K registers allocated per warp in units of 256, 228 KB of
    shared memory with 1 KB reserved per program, 2048 threads, 32 programs). A persistent
    grid of P programs per SM needs P here, or its last programs wait for the first ones."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * num_warps)
    by_shared = 233472 // (-(-(shared_bytes + 1024) // 128) * 128)
    return min(by_regs, by_shared, 2048 // (32 * num_warps), 32)


def sass_summary(kernel) -> dict:
    """Registers, spills, shared memory and instruction counts of one compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], check=True,
                              capture_output=True, text=True).stdout
    resources = dict(re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", usage))
    opcodes = Counter(m.group(1) for m in re.finditer(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?"
                                                      r"([A-Z][\w.]*)", sass, re.M))
    counts = {name: sum(n for op, n in opcodes.items() if re.fullmatch(pattern, op))
              for name, pattern in _INSTRUCTIONS.items()}
    waits = [int(n, 16) for n in re.findall(r"DEPBAR\.LE\s+SB0,\s*0x([0-9a-f]+)", sass)]
    meta = kernel.metadata
    registers = int(resources.get("REG", -1))
    shared = int(resources.get("SHARED", 0)) + int(getattr(meta, "shared", 0))
    return {
        "kernel": meta.name,
        "num_warps": meta.num_warps,
        "num_stages": meta.num_stages,
        "registers": registers,
        "local_bytes": int(resources.get("LOCAL", 0)) + int(resources.get("STACK", 0)),
        "shared_static": int(resources.get("SHARED", 0)),
        "shared_dynamic": int(getattr(meta, "shared", 0)),
        **counts,
        "cp_async_depth": max(waits, default=0),
        "ctas_per_sm": ctas_per_sm(registers, shared, meta.num_warps),
        # the instructions and operands in order, addresses and encodings stripped: equal
        # digests mean the same machine code
        "sass_digest": hashlib.sha256("\n".join(
            m.group(1).strip() for m in re.finditer(r"^\s*/\*[0-9a-f]+\*/\s+([^;]*);", sass, re.M)
        ).encode()).hexdigest()[:16],
    }


# --- the cases: each calls a real launcher with CPU tensors ---------------------------------


def _patched(module, name: str, value, fn):
    """fn, run with module.name set to value."""
    def run():
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            fn()
        finally:
            setattr(module, name, saved)
    return run


def _varlen_cases():
    from mtmm_kernels import varlen as V

    def padded(B, L, H, dtype):
        return torch.zeros(B, L, H, dtype=dtype)

    # the benchmark's batch sizes: B = 64 at H = 4096 (text64), 256 at H = 1024 (mixed256)
    for dtype in (torch.bfloat16, torch.float32):
        for H, B in ((4096, 64), (1024, 256), (1000, 256)):
            L = 16
            x = padded(B, L, H, dtype)
            cu = torch.arange(0, B + 1, dtype=torch.int32) * 10
            lens_SB = torch.full((1, B), 10, dtype=torch.int32)
            T = 10 * B
            def pack(x=x, cu=cu, lens_SB=lens_SB, T=T):
                return V._launch_pack([x], lens_SB, cu, None, T)
            yield f"pack S=1 H={H} B={B} {str(dtype)[6:]}", pack
            if B > V.ALL_STARTS_MAX_B:  # the compare-every-start search, where not the default
                yield (f"pack S=1 H={H} B={B} {str(dtype)[6:]} all-starts",
                       _patched(V, "ALL_STARTS_MAX_B", 1024, pack))
            values = torch.zeros(T, H, dtype=dtype)
            yield (f"unpack S=1 H={H} B={B} {str(dtype)[6:]}",
                   lambda v=values, cu=cu: V._launch_unpack(v, None, cu, None, [L]))
    # a tall tile (small H) with many sequences: the search must stay within registers
    x_small = padded(512, 8, 128, torch.bfloat16)
    cu_512 = torch.arange(0, 513, dtype=torch.int32) * 4
    yield ("pack S=1 H=128 B=512 bfloat16",
           lambda: V._launch_pack([x_small], None, cu_512, None, 4 * 512))
    B, Ls = 128, (257, 1500, 77)  # mm3
    xs = [padded(B, L, 4096, torch.bfloat16) for L in Ls]
    lens_SB = torch.full((3, B), 5, dtype=torch.int32)
    cu = torch.arange(0, B + 1, dtype=torch.int32) * 15
    order = torch.arange(B)
    yield ("pack S=3 H=4096 B=128 bfloat16 grouped",
           lambda: V._launch_pack(xs, lens_SB, cu, order, 15 * B))
    # the benchmark's mm3: sample order, searched by (sequence, stream) start
    yield ("pack S=3 H=4096 B=128 bfloat16",
           lambda: V._launch_pack(xs, lens_SB, cu, None, 15 * B))
    # streams 8 bytes off a 16-byte boundary: 8-byte vectors at most, never 16
    shifted = [torch.zeros(B * L * 4096 + 4, dtype=torch.bfloat16)[4:].view(B, L, 4096)
               for L in Ls]
    yield ("pack S=3 H=4096 B=128 bfloat16 grouped 8-byte aligned",
           lambda: V._launch_pack(shifted, lens_SB, cu, order, 15 * B))
    values = torch.zeros(15 * B, 4096, dtype=torch.bfloat16)
    yield ("unpack S=3 H=4096 B=128 bfloat16 grouped",
           lambda: V._launch_unpack(values, lens_SB, cu, order, list(Ls)))


def _grouped_gemm_cases():
    from mtmm_kernels import grouped_gemm as gg

    gg.AUTOTUNE = False  # _launch takes the first config that survives pruning: one at a time
    gg._tma_device_ok = lambda t: True  # the target has TMA; the tensors are on the CPU
    T, K, N, G = 4096, 4096, 4096, 8
    x = torch.zeros(T, K, dtype=torch.bfloat16)
    w = torch.zeros(G, K, N, dtype=torch.bfloat16)
    dy = torch.zeros(T, N, dtype=torch.bfloat16)
    offsets = (torch.arange(1, G + 1, dtype=torch.int32) * (T // G))

    def with_config(attr, config, fn):
        return _patched(gg, attr, [config], fn)

    def label(config):
        kw = config.kwargs
        tiles = " ".join(f"{k[6:]}{kw[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        flat = " flat" if kw.get("FLATTEN") else ""
        store = " tma-store" if kw.get("TMA_STORE") else ""
        store += " ws" if kw.get("WS") else ""  # warp specialized
        persistent = f" p{kw['PROGS_PER_SM']}" if kw.get("PROGS_PER_SM") else ""
        return (f"{tiles} w{config.num_warps} s{config.num_stages} tma={int(kw['TMA'])}"
                f"{flat}{store}{persistent}")

    def offered(configs):  # (warp-specialized configs only on the Triton releases they need)
        return [c for c in configs if gg._WS_TRITON or not c.kwargs.get("WS")]

    for config in offered(gg._mm_configs(False)):
        yield (f"grouped_mm fwd bf16 K=N=4096 {label(config)}",
               with_config("_MM_CONFIGS", config,
                           lambda: gg._launch_grouped_mm(x, w, offsets, None, None)))
    for config in offered(gg._dw_configs(False)):  # (persistent ones compile apart: p<n>)
        yield (f"grouped_mm dW bf16 K=N=4096 {label(config)}",
               with_config("_DW_CONFIGS", config,
                           lambda: gg._launch_grouped_mm_dw(x, dy, offsets, None, False)))
    perm = torch.arange(T)
    # gathered rows: pointer loads for x; w by pointer or through its descriptor
    pointer = [c for c in gg._mm_configs(False) if not c.kwargs["TMA"]]
    for config in (pointer[-1], gg._mm_configs(False)[0]):
        yield (f"grouped_mm_by_ids fwd bf16 K=N=4096 {label(config)}",
               with_config("_MM_CONFIGS", config,
                           lambda: gg._launch_grouped_mm(x, w, offsets, None, perm)))
    # dW over gathered rows: pointer loads, each step's row numbers loaded a step ahead
    for config in [c for c in gg._dw_configs(False) if not c.kwargs["TMA"]]:
        yield (f"grouped_mm_by_ids dW bf16 K=N=4096 {label(config)}",
               with_config("_DW_CONFIGS", config,
                           lambda: gg._launch_grouped_mm_dw(x, dy, offsets, perm, False)))


def _group_sort_cases():
    from mtmm_kernels.group_sort import _launch_group_sort

    T = 16000
    for G in (32, 255):
        ids = torch.zeros(T, dtype=torch.int64)
        yield f"group_sort T={T} G={G}", lambda ids=ids, G=G: _launch_group_sort(ids, G)


CASES = {"varlen": _varlen_cases, "grouped_gemm": _grouped_gemm_cases,
         "group_sort": _group_sort_cases}


def report(arch: int = 90, only: str | None = None, shard: tuple[int, int] = (0, 1)
           ) -> list[dict]:
    """One row per compiled kernel. shard (i, n): only every n-th case from the i-th, so that
    n processes compile the cases between them (each compile is single-threaded)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    index, shards = shard
    rows = []
    with offline_target(arch) as compiled:
        numbered = (case for group, cases in CASES.items() if not only or group == only
                    for case in cases())
        for i, (name, call) in enumerate(numbered):
            if i % shards != index:
                continue
            before = len(compiled)
            call()
            launched = compiled[before:]
            assert launched, f"{name}: no launch"
            for kernel in launched:  # one row per launch; named after the kernel if several
                case = name if len(launched) == 1 else f"{name} [{kernel.name}]"
                rows.append({"case": case, "arch": f"sm_{arch}", **sass_summary(kernel)})
    return rows


def _table(rows: list[dict]) -> str:
    cols = ["case", "registers", "local_bytes", "shared_dynamic", *_INSTRUCTIONS,
            "cp_async_depth", "ctas_per_sm"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--json", help="write the rows here as JSON")
    parser.add_argument("--only", choices=sorted(CASES))
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="report only every N-th case from the I-th (default: all)")
    args = parser.parse_args()
    try:
        index, shards = map(int, args.shard.split("/"))
    except ValueError:
        index, shards = -1, 0
    if not 0 <= index < shards:
        parser.error(f"--shard: expected I/N with 0 <= I < N, got {args.shard!r}")
    import triton
    rows = report(args.arch, args.only, (index, shards))
    print(f"Triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}\n")
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
