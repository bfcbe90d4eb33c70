"""Varlen packing throughput (GB/s, bytes read + written) against the device copy ceiling, side
by side with the pure-torch ways to do the same in the same session.

Cases (bf16):
  text64    64 text sequences, H=4096, log-normal lengths around 900, the longest 3600 (~70%
            padding, like the measured 69%).
  mixed256  256 sequences, H=1024, each an image (257), an audio clip (100-1500) or a caption
            (5-77) at random.
  mm3       3-stream multi-modal batch, B=128, H=4096: image 257 (10% of samples lack it),
            audio 100-1500, text 5-77.
Targets (issue 3): pack and unpack >= 90% of copy bandwidth; the multi-modal pack >= 2x faster
than the fastest pure-torch way to build the same buffer and metadata. Within a case the mtmm
method runs last and records ``speedup_vs_best_torch`` (latency; ``pipelined_`` and ``kernel_``
prefixes for the other timings) against the baselines of this session.
Bytes: pack reads and writes the T real rows; unpack reads T rows and writes B x L rows
(its zeros included). Metadata bytes are not counted.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from device_timing import TIMINGS
from mtmm_kernels import varlen as V
from mtmm_kernels.varlen import pack_multimodal, pack_padded, unpack, unpack_multimodal

DTYPE = torch.bfloat16
_DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu only for smoke runs of this file
# MTMM_BENCH_SHRINK=k divides B, the lengths and H by k (a CPU smoke run under the interpreter)
_SHRINK = int(os.environ.get("MTMM_BENCH_SHRINK", "1"))
_BEST_TORCH: dict[tuple[str, str], dict[str, float]] = {}  # (case, op) -> basis -> fastest ms


def _rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _text_lengths(g, B, lo, hi):
    return torch.randint(lo, hi + 1, (B,), generator=g)


@functools.cache
def _padded_case(case: str):
    """(x [B, L, H] on the GPU, CPU lengths [B])."""
    g = _rng()
    if case == "text64":
        B, H = 64, 4096
        lens = torch.exp(torch.randn(B, generator=g) * 0.6 + math.log(900)).round().long()
        lens = lens.clamp(1, 3600)
        lens[0] = 3600
    elif case == "mixed256":
        B, H = 256, 1024
        kind = torch.randint(0, 3, (B,), generator=g)
        lens = torch.where(kind == 0, 257, torch.where(
            kind == 1, _text_lengths(g, B, 100, 1500), _text_lengths(g, B, 5, 77)))
    else:
        raise KeyError(case)
    lens, H = _shrink(lens, H)
    x = torch.randn(lens.shape[0], int(lens.max()), H, device=_DEV, dtype=DTYPE)
    return x, lens


def _shrink(lens: torch.Tensor, H: int, L: int | None = None):
    if _SHRINK == 1:
        return (lens, H) if L is None else (lens, H, L)
    k = _SHRINK
    lens = (lens[: max(1, lens.shape[0] // k)] + k - 1) // k
    H = H // k + 1  # odd
    return (lens, H) if L is None else (lens, H, -(-L // k))


@functools.cache
def _mm_case():
    """3 padded streams on the GPU and their CPU lengths."""
    g = _rng()
    B, H = 128, 4096
    image = torch.where(torch.rand(B, generator=g) < 0.1, 0, 257)
    audio = _text_lengths(g, B, 100, 1500)
    text = _text_lengths(g, B, 5, 77)
    lens, Ls = [], []
    for lens_B, L in zip((image, audio, text), (257, 1500, 77)):
        lens_B, H_small, L = _shrink(lens_B, H, L)
        lens.append(lens_B)
        Ls.append(L)
    xs = [torch.randn(lens[0].shape[0], L, H_small, device=_DEV, dtype=DTYPE) for L in Ls]
    return xs, lens


def _nbytes(rows: int, H: int) -> int:
    return rows * H * torch.empty((), dtype=DTYPE).element_size()


def _record(measure, benchmark, fn, *, case, op, method, bytes_, shape):
    """Time one method; an mtmm method records its speed-up over the fastest torch way of
    this session on each timing basis (latency, pipelined, kernel time)."""
    ms = measure(fn, dtype=DTYPE, shape=shape, bytes=bytes_, method=method, case=f"{case}/{op}")
    info = benchmark.extra_info
    times = {key.removesuffix("_ms"): info.get(key) for key in TIMINGS}
    key = (case, op)
    if not method.startswith("mtmm"):
        best = _BEST_TORCH.setdefault(key, {})
        for basis, t in times.items():
            if t is not None:
                best[basis] = min(best.get(basis, math.inf), t)
    elif key in _BEST_TORCH:
        for basis, t in times.items():
            if t and basis in _BEST_TORCH[key]:
                prefix = "" if basis == "device" else f"{basis}_"
                info[f"{prefix}speedup_vs_best_torch"] = _BEST_TORCH[key][basis] / t
    return ms


def _values(out) -> torch.Tensor:
    """The packed rows from whatever a method returns."""
    if isinstance(out, V.PackedBatch):
        return out.values
    if isinstance(out, tuple):
        return out[0]
    return out.values() if out.is_nested else out


def _pack_kernel_only(xs, lens, T):
    """The copy kernel alone (plan precomputed, no Python checks, no custom-op dispatch): what
    the bandwidth target is about; the end-to-end methods add the host overhead."""
    plan = V._launch_plan([lens_B.to(_DEV) for lens_B in lens], None, 0, [x.shape[1] for x in xs])
    lens_SB, cu = plan[0], plan[1]
    return lambda: V._launch_pack(xs, lens_SB, cu, None, T)


# --------------------------------------------------------------------------------------------
# pack: padded [B, L, H] -> [T, H]
# --------------------------------------------------------------------------------------------
PACK_METHODS = ["torch_cat", "index_select", "bool_mask", "nested_jagged", "mtmm",
                "mtmm_device_lengths_total", "mtmm_kernel"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["text64", "mixed256"])
@pytest.mark.parametrize("method", PACK_METHODS)
def test_pack(measure, benchmark, case, method):
    x, lens = _padded_case(case)
    B, L, H = x.shape
    T = int(lens.sum())
    lens_list = lens.tolist()
    mask = (torch.arange(L)[None, :] < lens[:, None]).to(_DEV)
    idx = mask.flatten().nonzero().flatten()
    lens_dev = lens.to(_DEV)
    fns = {
        "torch_cat": lambda: torch.cat([x[b, :n] for b, n in enumerate(lens_list)]),
        "index_select": lambda: x.flatten(0, 1).index_select(0, idx),  # FA unpad_input
        "bool_mask": lambda: x[mask],
        "nested_jagged": lambda: torch.nested.as_nested_tensor(
            [x[b, :n] for b, n in enumerate(lens_list)], layout=torch.jagged),
        "mtmm": lambda: pack_padded(x, lens),
        "mtmm_device_lengths_total": lambda: pack_padded(x, lens_dev, total=T, max_seqlen=L),
        "mtmm_kernel": _pack_kernel_only([x], [lens], T),
    }
    assert torch.equal(_values(fns[method]()), x.flatten(0, 1)[idx])  # same buffer, untimed
    _record(measure, benchmark, fns[method], case=case, op="pack", method=method,
            bytes_=2 * _nbytes(T, H), shape=[B, L, H])


# --------------------------------------------------------------------------------------------
# unpack: [T, H] -> zero-padded [B, L, H]
# --------------------------------------------------------------------------------------------
UNPACK_METHODS = ["index_put_zeros", "index_copy", "nested_to_padded", "mtmm", "mtmm_kernel"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["text64", "mixed256"])
@pytest.mark.parametrize("method", UNPACK_METHODS)
def test_unpack(measure, benchmark, case, method):
    x, lens = _padded_case(case)
    B, L, H = x.shape
    pb = pack_padded(x, lens)
    values, cu = pb.values, pb.cu_seqlens
    mask = (torch.arange(L)[None, :] < lens[:, None]).to(_DEV)
    idx = mask.flatten().nonzero().flatten()
    nt = torch.nested.nested_tensor_from_jagged(values, offsets=cu.long())

    def index_put_zeros():  # FlashAttention's pad_input
        out = values.new_zeros(B * L, H)
        out[idx] = values
        return out.view(B, L, H)

    fns = {
        "index_put_zeros": index_put_zeros,
        "index_copy": lambda: values.new_zeros(B * L, H).index_copy_(0, idx, values),
        "nested_to_padded": lambda: nt.to_padded_tensor(0.0, (B, L, H)),
        "mtmm": lambda: unpack(values, cu, L, validate=False),
        "mtmm_kernel": lambda: V._launch_unpack(values, None, cu, None, [L])[0],
    }
    want = torch.zeros(B * L, H, device=_DEV, dtype=DTYPE)
    want[idx] = values
    assert torch.equal(fns[method]().reshape(B * L, H), want)
    _record(measure, benchmark, fns[method], case=case, op="unpack", method=method,
            bytes_=_nbytes(values.shape[0], H) + _nbytes(B * L, H), shape=[B, L, H])


# --------------------------------------------------------------------------------------------
# multi-modal pack and unpack, buffer and metadata
# --------------------------------------------------------------------------------------------
def _torch_metadata(lens_dev: list[torch.Tensor], T: int):
    """cu_seqlens, position_ids, seq_ids, modality_ids with device ops and no sync."""
    S, B = len(lens_dev), lens_dev[0].shape[0]
    L_SB = torch.stack(lens_dev)
    seq = L_SB.sum(0)
    cu = F.pad(seq.cumsum(0), (1, 0))
    seq_ids = torch.repeat_interleave(torch.arange(B, device=_DEV), seq, output_size=T)
    position_ids = torch.arange(T, device=_DEV) - cu[seq_ids]
    mod = torch.arange(S, device=_DEV).repeat(B)
    modality_ids = torch.repeat_interleave(mod, L_SB.t().flatten(), output_size=T)
    return cu.int(), position_ids, seq_ids.int(), modality_ids.int()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["torch_cat_meta", "torch_index_meta", "mtmm",
                                    "mtmm_device_lengths_total", "mtmm_kernel"])
def test_pack_multimodal(measure, benchmark, method):
    xs, lens = _mm_case()
    B, H = xs[0].shape[0], xs[0].shape[2]
    T = int(sum(lens_B.sum() for lens_B in lens))
    lens_list = [lens_B.tolist() for lens_B in lens]
    lens_dev = [lens_B.to(_DEV) for lens_B in lens]
    # index baseline: gather rows of the three streams flattened, precomputed once
    flat = [x.flatten(0, 1) for x in xs]
    seq = torch.stack(lens).sum(0)
    cu = F.pad(seq.cumsum(0), (1, 0))
    src, dst = [], []
    for s, (x, lens_B) in enumerate(zip(xs, lens)):
        valid = torch.arange(x.shape[1])[None, :] < lens_B[:, None]
        prefix = sum(lens[:s]) if s else torch.zeros_like(lens_B)
        d = (cu[:-1] + prefix)[:, None] + torch.arange(x.shape[1])[None, :]
        src.append(valid.flatten().nonzero().flatten().to(_DEV))
        dst.append(d[valid].to(_DEV))

    def torch_cat_meta():
        pieces = [xs[s][b, :lens_list[s][b]] for b in range(B) for s in range(len(xs))]
        return torch.cat(pieces), _torch_metadata(lens_dev, T)

    def torch_index_meta():
        out = xs[0].new_empty(T, H)
        for f, si, di in zip(flat, src, dst):
            out.index_copy_(0, di, f.index_select(0, si))
        return out, _torch_metadata(lens_dev, T)

    fns = {
        "torch_cat_meta": torch_cat_meta,
        "torch_index_meta": torch_index_meta,
        "mtmm": lambda: pack_multimodal(xs, lens),
        "mtmm_device_lengths_total": lambda: pack_multimodal(
            xs, lens_dev, total=T, max_seqlen=int(seq.max())),
        "mtmm_kernel": _pack_kernel_only(xs, lens, T),
    }
    # every method builds the same buffer and metadata (checked, not timed)
    ref = pack_multimodal(xs, lens)
    out = fns[method]()
    if isinstance(out, V.PackedBatch):
        meta = (out.cu_seqlens, out.position_ids, out.seq_ids, out.modality_ids)
    elif method == "mtmm_kernel":
        meta = (ref.cu_seqlens, *out[1:])
    else:
        meta = out[1]
    assert torch.equal(_values(out), ref.values)
    for got, want in zip(meta, (ref.cu_seqlens, ref.position_ids, ref.seq_ids,
                                ref.modality_ids)):
        assert torch.equal(got, want)
    _record(measure, benchmark, fns[method], case="mm3", op="pack", method=method,
            bytes_=2 * _nbytes(T, H), shape=[B, [x.shape[1] for x in xs], H])


def _unpack_kernel_only(pb, lens, Ls):
    lens_SB = torch.stack(lens).to(torch.int32).to(_DEV)
    return lambda: V._launch_unpack(pb.values, lens_SB, pb.cu_seqlens, pb.order, Ls)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["torch_index_put", "mtmm", "mtmm_kernel"])
def test_unpack_multimodal(measure, benchmark, method):
    xs, lens = _mm_case()
    B, H = xs[0].shape[0], xs[0].shape[2]
    pb = pack_multimodal(xs, lens)
    Ls = [x.shape[1] for x in xs]
    seq = torch.stack(lens).sum(0)
    cu = F.pad(seq.cumsum(0), (1, 0))
    src = []
    for s, lens_B in enumerate(lens):
        valid = torch.arange(Ls[s])[None, :] < lens_B[:, None]
        prefix = sum(lens[:s]) if s else torch.zeros_like(lens_B)
        d = (cu[:-1] + prefix)[:, None] + torch.arange(Ls[s])[None, :]
        src.append((valid.flatten().nonzero().flatten().to(_DEV), d[valid].to(_DEV)))

    def torch_index_put():
        outs = []
        for L, (pad_idx, packed_idx) in zip(Ls, src):
            out = pb.values.new_zeros(B * L, H)
            out[pad_idx] = pb.values[packed_idx]
            outs.append(out.view(B, L, H))
        return outs

    fns = {
        "torch_index_put": torch_index_put,
        "mtmm": lambda: unpack_multimodal(pb, lens, Ls, validate=False),
        "mtmm_kernel": _unpack_kernel_only(pb, lens, Ls),
    }
    T = pb.values.shape[0]
    want = unpack_multimodal(pb, lens, Ls)
    assert all(torch.equal(a, b) for a, b in zip(fns[method](), want))
    _record(measure, benchmark, fns[method], case="mm3", op="unpack", method=method,
            bytes_=_nbytes(T, H) + _nbytes(B * sum(Ls), H), shape=[B, Ls, H])


# --------------------------------------------------------------------------------------------
# tile sweep (for tuning varlen._tile_config and _unpack_tile_config on the device): the copy
# kernels alone
# --------------------------------------------------------------------------------------------
PACK_SWEEP = [  # (BLOCK_R, BLOCK_H, num_warps); the default for bf16 is (4, 2048, 4) at H = 4096
    (2, 2048, 4), (4, 2048, 4), (8, 2048, 8), (4, 4096, 8), (2, 4096, 8),
    (4, 1024, 4), (8, 1024, 4), (16, 1024, 8), (32, 1024, 8), (16, 512, 4),
]
UNPACK_SWEEP = [  # the default for bf16 is (2, 4096, 8) at H = 4096, (2, 1024, 4) at 1024
    (2, 4096, 8), (4, 4096, 8), (1, 4096, 4), (2, 2048, 4), (4, 2048, 4), (2, 2048, 8),
    (2, 1024, 4), (4, 1024, 4), (2, 1024, 2), (8, 1024, 4), (1, 1024, 4),
]
SWEEP = [(op, config) for op, configs in (("pack", PACK_SWEEP), ("unpack", UNPACK_SWEEP))
         for config in configs]


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["text64", "mixed256"])
@pytest.mark.parametrize("op,config", SWEEP,
                         ids=["{}-r{}_h{}_w{}".format(op, *c) for op, c in SWEEP])
def test_tile_sweep(measure, monkeypatch, case, op, config):
    x, lens = _padded_case(case)
    B, L, H = x.shape
    if config[1] > 2 * H:  # mostly masked lanes: not a candidate for this H
        pytest.skip(f"BLOCK_H={config[1]} for H={H}")
    monkeypatch.setattr(V, "_tile_config" if op == "pack" else "_unpack_tile_config",
                        lambda H, element_size: config)
    pb = pack_padded(x, lens)
    T = pb.values.shape[0]
    if op == "pack":
        fn, nbytes = _pack_kernel_only([x], [lens], T), 2 * _nbytes(T, H)
    else:
        fn = lambda: V._launch_unpack(pb.values, None, pb.cu_seqlens, None, [L])  # noqa: E731
        nbytes = _nbytes(T, H) + _nbytes(B * L, H)
    measure(fn, dtype=DTYPE, shape=[B, L, H], bytes=nbytes, rounds=3,
            method="mtmm_kernel_r{}_h{}_w{}".format(*config), case=f"{case}/{op}/sweep")


# --------------------------------------------------------------------------------------------
# search sweep: how the pack kernel finds each row's sequence (varlen.ALL_STARTS_MAX_B)
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["text64", "mixed256", "mm3"])
@pytest.mark.parametrize("search", ["binary", "all_starts", "binary_r16_w8",
                                    "all_starts_r16_w8"])
def test_search_sweep(measure, monkeypatch, case, search):
    """Binary search (log2(B) dependent loads per row) against comparing each row with every
    start (one load round trip), the copy kernel alone, side by side in one session; at
    H = 1024 also with 16 rows per program at 8 warps."""
    if search.endswith("_r16_w8"):
        if case != "mixed256":
            pytest.skip("the 16-row tile is a candidate at H = 1024 only")
        monkeypatch.setattr(V, "_tile_config", lambda H, element_size: (16, 1024, 8))
    binary = search.startswith("binary")
    monkeypatch.setattr(V, "ALL_STARTS_MAX_B", 0 if binary else 1 << 20)
    if case == "mm3":
        xs, lens = _mm_case()
    else:
        x, lens1 = _padded_case(case)
        xs, lens = [x], [lens1]
    T = int(sum(int(lens_B.sum()) for lens_B in lens))
    H = xs[0].shape[2]
    measure(_pack_kernel_only(xs, lens, T), dtype=DTYPE, bytes=2 * _nbytes(T, H), rounds=3,
            shape=[xs[0].shape[0], [x.shape[1] for x in xs], H],
            method=f"mtmm_kernel_{search}", case=f"{case}/pack/search")
