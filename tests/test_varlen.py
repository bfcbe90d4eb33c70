"""Varlen packing (mtmm_kernels.varlen) against the pure-torch oracle in mtmm_kernels.reference.

Packing moves rows without arithmetic, so every comparison is exact (torch.equal), values and
gradients alike. On a CPU the Triton kernels run in the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay small and odd.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import pytest

from mtmm_kernels import reference as R
from mtmm_kernels import varlen as V
from mtmm_kernels.varlen import (PackedBatch, pack, pack_multimodal, pack_padded, unpack,
                                 unpack_multimodal)

HAS_CUDA = torch.cuda.is_available()
FIELDS = ("values", "cu_seqlens", "position_ids", "seq_ids", "modality_ids", "order",
          "group_offsets")


def _dtypes():
    dts = [torch.float32, torch.float16, torch.bfloat16]
    if not HAS_CUDA:
        dts.append(torch.float64)
    return dts


def _lengths(B: int, L: int, *, zeros: bool = True) -> torch.Tensor:
    lens = torch.randint(0, L + 1, (B,))
    if zeros and B > 2:
        lens[1] = 0  # always one empty sequence, and one full one
        lens[2] = L
    return lens


def _assert_matches(pb: PackedBatch, ref: dict, *, multimodal: bool, grouped: bool) -> None:
    for name in FIELDS:
        got = getattr(pb, name)
        want = ref[name]
        if name == "modality_ids" and not multimodal:
            assert got is None
            continue
        if name in ("order", "group_offsets") and not grouped:
            assert got is None
            continue
        assert got.dtype == want.dtype, name
        assert torch.equal(got.cpu(), want.cpu()), name
    assert pb.max_seqlen == ref["max_seqlen"]


# --------------------------------------------------------------------------------------------
# forward against the oracle
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("B,L,H", [(7, 9, 13), (1, 5, 3), (4, 1, 1), (5, 6, 64)])
def test_pack_padded_matches_reference(device, dtype, B, L, H):
    x = torch.randn(B, L, H).to(dtype).to(device)
    lens = _lengths(B, L)
    pb = pack_padded(x, lens)
    _assert_matches(pb, R.varlen_pack([x.cpu()], [lens]), multimodal=False, grouped=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pack_multimodal_grouped_matches_reference(device, dtype):
    B, H, Ls = 9, 11, (5, 1, 7)
    xs = [torch.randn(B, L, H).to(dtype).to(device) for L in Ls]
    lens = [_lengths(B, L) for L in Ls]
    gids = torch.tensor([3, 0, 3, 1, 0, 3, 1, 1, 0])  # group 2 empty
    pb = pack_multimodal(xs, lens, gids, num_groups=5)  # group 4 empty too, at the end
    ref = R.varlen_pack([x.cpu() for x in xs], lens, gids, 5)
    _assert_matches(pb, ref, multimodal=True, grouped=True)


def test_pack_multimodal_ungrouped_and_int_values(device):
    B, H = 6, 5
    xs = [torch.randint(-100, 100, (B, L, H), dtype=torch.int32, device=device) for L in (3, 4)]
    lens = [[3, 0, 1, 2, 0, 3], [0, 0, 4, 1, 2, 4]]
    pb = pack_multimodal(xs, lens)
    _assert_matches(pb, R.varlen_pack([x.cpu() for x in xs], lens), multimodal=True,
                    grouped=False)


def test_random_configurations(device):
    """Seeded sweep over stream counts, shapes, groupings and round trips."""
    g = torch.Generator().manual_seed(7)

    def rint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    for _ in range(12):
        S, B, H = rint(1, 3), rint(1, 9), rint(1, 20)
        Ls = [rint(0, 6) for _ in range(S)]
        xs = [torch.randn(B, L, H, generator=g).to(device) for L in Ls]
        lens = [torch.randint(0, L + 1, (B,), generator=g) for L in Ls]
        G = rint(0, 4)
        gids = torch.randint(0, G, (B,), generator=g) if G else None
        pb = pack_multimodal(xs, lens, gids, G or None)
        _assert_matches(pb, R.varlen_pack([x.cpu() for x in xs], lens, gids, G or None),
                        multimodal=True, grouped=G > 0)
        want = R.varlen_unpack_multimodal(pb.values.cpu(), pb.cu_seqlens.cpu(),
                                          None if pb.order is None else pb.order.cpu(), lens, Ls)
        for out, w in zip(unpack_multimodal(pb, lens, Ls), want):
            assert torch.equal(out.cpu(), w)


def test_all_zero_lengths(device):
    x = torch.randn(4, 6, 5, device=device)
    pb = pack_padded(x, torch.zeros(4, dtype=torch.int32), torch.tensor([1, 0, 1, 1]), 2)
    assert pb.values.shape == (0, 5)
    assert pb.cu_seqlens.tolist() == [0, 0, 0, 0, 0]
    assert pb.group_offsets.tolist() == [0, 0]
    assert pb.order.tolist() == [1, 0, 2, 3]
    assert pb.max_seqlen == 0 and pb.position_ids.numel() == 0
    out = unpack(pb.values, pb.cu_seqlens, 6)
    assert torch.equal(out, torch.zeros_like(x))  # padding is written, never left uninitialised


def test_empty_batch_and_zero_width(device):
    pb = pack_padded(torch.randn(0, 4, 3, device=device), [])
    assert pb.values.shape == (0, 3) and pb.cu_seqlens.tolist() == [0] and pb.max_seqlen == 0
    assert unpack(pb.values, pb.cu_seqlens, 4).shape == (0, 4, 3)
    lens = torch.tensor([2, 0, 3])
    pb = pack_padded(torch.randn(3, 4, 0, device=device), lens, torch.tensor([1, 1, 0]), 2)
    assert pb.values.shape == (5, 0)
    assert pb.position_ids.tolist() == [0, 1, 2, 0, 1]  # metadata still written with H = 0
    assert pb.seq_ids.tolist() == [0, 0, 0, 1, 1] and pb.order.tolist() == [2, 0, 1]


@pytest.mark.parametrize("device_plan", [False, True])
def test_strided_metadata_inputs(device, monkeypatch, device_plan):
    monkeypatch.setattr(V, "_FORCE_DEVICE_PLAN", device_plan)
    x = torch.randn(4, 5, 3, device=device)
    lens = torch.tensor([[5, 9], [0, 9], [2, 9], [4, 9]], device=device)[:, 0]  # stride 2
    gids = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]], device=device)[:, 0]
    pb = pack_padded(x, lens, gids, 2)
    _assert_matches(pb, R.varlen_pack([x.cpu()], [lens.cpu()], gids.cpu(), 2),
                    multimodal=False, grouped=True)
    cu = torch.stack([pb.cu_seqlens, pb.cu_seqlens], 1)[:, 0]
    assert torch.equal(unpack(pb.values, cu, 5).cpu(),
                       R.varlen_unpack(pb.values.cpu(), pb.cu_seqlens.cpu(), 5))


def test_round_trip(device):
    B, L, H = 8, 10, 17
    x = torch.randn(B, L, H, device=device)
    lens = _lengths(B, L)
    pb = pack_padded(x, lens)
    out = unpack(pb.values, pb.cu_seqlens, L)
    valid = (torch.arange(L)[None, :] < lens[:, None]).to(device)
    assert torch.equal(out[valid], x[valid])
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))


def test_multimodal_round_trip_grouped(device):
    B, H, Ls = 7, 6, (4, 3, 5)
    xs = [torch.randn(B, L, H, device=device) for L in Ls]
    lens = [_lengths(B, L) for L in Ls]
    gids = torch.tensor([1, 1, 0, 2, 0, 1, 2])
    pb = pack_multimodal(xs, lens, gids, 3)
    outs = unpack_multimodal(pb, lens, list(Ls))
    for x, lens_B, out in zip(xs, lens, outs):
        valid = (torch.arange(x.shape[1])[None, :] < lens_B[:, None]).to(device)
        assert torch.equal(out[valid], x[valid])
        assert not out[~valid].any()


@pytest.mark.parametrize("max_seqlen", [6, 9])
def test_unpack_matches_reference(device, max_seqlen):
    cu = torch.tensor([0, 3, 3, 9, 10, 10], dtype=torch.int32)  # empty first/middle/last
    values = torch.randn(10, 7)
    out = unpack(values.to(device), cu.to(device), max_seqlen)
    assert torch.equal(out.cpu(), R.varlen_unpack(values, cu, max_seqlen))


@pytest.mark.parametrize("block_r", [2, 4, 8])
def test_unpack_row_blocks_wrap_into_next_sequences(device, monkeypatch, block_r):
    """An unpack program's rows run on into the next sequences: at most once when L >= its
    BLOCK_R (no per-row division), several times when L < BLOCK_R; streams of both kinds in
    one call, in a shuffled order, and B * L no multiple of BLOCK_R."""
    monkeypatch.setattr(V, "_unpack_tile_config", lambda H, element_size: (block_r, 4, 1))
    H, Ls = 3, (1, 3, block_r, block_r + 1, 11)
    B = 7
    lens = [_lengths(B, L) for L in Ls]
    order = torch.randperm(B)
    seq = sum(lens)[order]
    cu = F.pad(seq.cumsum(0), (1, 0)).to(torch.int32)
    values = torch.randn(int(seq.sum()), H)
    pb = PackedBatch(values=values.to(device), cu_seqlens=cu.to(device),
                     max_seqlen=int(seq.max()), position_ids=torch.empty(0),
                     seq_ids=torch.empty(0), order=order.to(device))
    outs = unpack_multimodal(pb, lens, list(Ls))
    want = R.varlen_unpack_multimodal(values, cu, order, lens, list(Ls))
    for got, w in zip(outs, want):
        assert torch.equal(got.cpu(), w)
    L = int(seq.max()) + 1  # one stream: lengths from cu_seqlens
    assert torch.equal(unpack(values.to(device), cu.to(device), L).cpu(),
                       R.varlen_unpack(values, cu, L))


def test_unpack_multimodal_matches_reference(device):
    H, Ls = 3, (2, 4)
    lens = [torch.tensor([2, 0, 1, 2, 0]), torch.tensor([4, 1, 0, 3, 0])]
    order = torch.tensor([3, 0, 4, 2, 1])
    seq = (lens[0] + lens[1])[order]
    cu = F.pad(seq.cumsum(0), (1, 0)).to(torch.int32)
    values = torch.randn(int(seq.sum()), H)
    pb = PackedBatch(values=values.to(device), cu_seqlens=cu.to(device), max_seqlen=5,
                     position_ids=torch.empty(0), seq_ids=torch.empty(0), order=order.to(device))
    outs = unpack_multimodal(pb, lens, list(Ls))
    want = R.varlen_unpack_multimodal(values, cu, order, lens, list(Ls))
    for got, w in zip(outs, want):
        assert torch.equal(got.cpu(), w)


def test_pack_list_matches_reference(device):
    H = 9
    seqs = [torch.randn(n, H, device=device) for n in (3, 0, 5, 1, 0)]
    pb = pack(seqs)
    padded = torch.zeros(len(seqs), 5, H, device=device)
    for i, s in enumerate(seqs):
        padded[i, : s.shape[0]] = s
    ref = R.varlen_pack([padded.cpu()], [[s.shape[0] for s in seqs]])
    _assert_matches(pb, ref, multimodal=False, grouped=False)


# --------------------------------------------------------------------------------------------
# conventions: FlashAttention's unpad_input / cu_seqlens, HuggingFace's flattened position_ids
# --------------------------------------------------------------------------------------------
def test_metadata_follows_flash_attention_and_huggingface(device):
    B, L, H = 6, 8, 5
    x = torch.randn(B, L, H, device=device)
    lens = _lengths(B, L)
    mask = torch.arange(L)[None, :] < lens[:, None]
    # FlashAttention's unpad_input, verbatim in spirit: indices of the mask, int32 cu_seqlens.
    seqlens = mask.sum(-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    fa_cu = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    # HuggingFace DataCollatorWithFlattening: position ids restart at 0 per sequence.
    hf_pos = torch.cat([torch.arange(int(n)) for n in lens])
    pb = pack_padded(x, lens)
    assert pb.cu_seqlens.dtype == torch.int32 and pb.cu_seqlens.shape == (B + 1,)
    assert torch.equal(pb.cu_seqlens.cpu(), fa_cu)
    assert pb.max_seqlen == int(seqlens.max())
    assert torch.equal(pb.values, x.flatten(0, 1)[indices.to(device)])
    assert pb.position_ids.dtype == torch.int64
    assert torch.equal(pb.position_ids.cpu(), hf_pos)
    assert torch.equal(pb.seq_ids.cpu(), torch.repeat_interleave(torch.arange(B), lens).int())


def test_group_order_is_stable_and_offsets_feed_grouped_gemm(device):
    B, L, H = 12, 5, 3
    x = torch.arange(B, dtype=torch.float32)[:, None, None].expand(B, L, H).contiguous()
    lens = _lengths(B, L)
    gids = torch.tensor([2, 0, 2, 1, 0, 2, 2, 0, 1, 0, 2, 1])
    pb = pack_padded(x.to(device), lens, gids.to(torch.int32), 4)
    order = pb.order.cpu()
    # stable: by group, then by input index
    assert order.tolist() == sorted(range(B), key=lambda b: (int(gids[b]), b))
    counts = torch.zeros(4, dtype=torch.int64).index_add_(0, gids, lens)
    assert torch.equal(pb.group_offsets.cpu(), counts.cumsum(0).int())
    # rows of group g are values[offs[g-1]:offs[g]], and carry their sample's value
    sample_of_row = pb.values[:, 0].cpu().long()
    ends = [0] + pb.group_offsets.tolist()
    for g in range(4):
        assert set(gids[sample_of_row[ends[g]:ends[g + 1]]].tolist()) <= {g}


def test_group_offsets_route_rows_through_grouped_gemm(device):
    """The documented pipeline: pack by task -> grouped GEMM on group_offsets -> unpack."""
    import dataclasses

    from mtmm_kernels import grouped_mm

    B, H, N, G, Ls = 6, 8, 5, 3, (4, 3)
    xs = [torch.randn(B, L, H, device=device) for L in Ls]
    lens = [_lengths(B, L) for L in Ls]
    task = torch.tensor([2, 0, 2, 1, 0, 2])
    w = torch.randn(G, H, N, device=device)
    pb = pack_multimodal(xs, lens, task, G)
    y = grouped_mm(pb.values, w, pb.group_offsets)
    outs = unpack_multimodal(dataclasses.replace(pb, values=y), lens, list(Ls))
    for x, lens_B, out in zip(xs, lens, outs):
        valid = (torch.arange(x.shape[1])[None, :] < lens_B[:, None]).to(device)
        want = torch.einsum("blh,bhn->bln", x, w[task.to(device)]) * valid[..., None]
        torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------------------------
# gradients: against autograd of the oracle, and pack/unpack adjointness
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pack_multimodal_backward(device, dtype):
    B, H, Ls = 6, 7, (3, 5)
    base = [torch.randn(B, L, H).to(dtype) for L in Ls]
    lens = [_lengths(B, L) for L in Ls]
    gids = torch.tensor([1, 0, 1, 0, 2, 1])
    xs = [b.to(device, copy=True).requires_grad_() for b in base]
    pb = pack_multimodal(xs, lens, gids, 3)
    grad = torch.randn(pb.values.shape).to(dtype)
    pb.values.backward(grad.to(device))
    xr = [b.detach().clone().requires_grad_() for b in base]
    R.varlen_pack(xr, lens, gids, 3)["values"].backward(grad)
    for x, r in zip(xs, xr):
        assert torch.equal(x.grad.cpu(), r.grad)


def test_unpack_backward(device):
    cu = torch.tensor([0, 4, 4, 6, 11], dtype=torch.int32)
    base = torch.randn(11, 5)
    v = base.to(device, copy=True).requires_grad_()
    out = unpack(v, cu.to(device), 6)
    grad = torch.randn(out.shape)
    out.backward(grad.to(device))
    vr = base.detach().clone().requires_grad_()
    R.varlen_unpack(vr, cu, 6).backward(grad)
    assert torch.equal(v.grad.cpu(), vr.grad)


def test_unpack_multimodal_backward_and_double_backward(device):
    B, H, Ls = 5, 4, (3, 2)
    xs = [torch.randn(B, L, H, device=device) for L in Ls]
    lens = [_lengths(B, L) for L in Ls]
    gids = torch.tensor([1, 0, 1, 1, 0])
    pb = pack_multimodal(xs, lens, gids, 2)
    v = pb.values.clone().requires_grad_()
    packed = PackedBatch(values=v, cu_seqlens=pb.cu_seqlens, max_seqlen=pb.max_seqlen,
                         position_ids=pb.position_ids, seq_ids=pb.seq_ids, order=pb.order)
    outs = unpack_multimodal(packed, lens, list(Ls))
    grads = [torch.randn_like(o).requires_grad_() for o in outs]
    (g_v,) = torch.autograd.grad(outs, v, grads, create_graph=True)
    vr = v.detach().cpu().clone().requires_grad_()
    ref_outs = R.varlen_unpack_multimodal(vr, pb.cu_seqlens.cpu(), pb.order.cpu(), lens, list(Ls))
    torch.autograd.backward(ref_outs, [g.detach().cpu() for g in grads])
    assert torch.equal(g_v.detach().cpu(), vr.grad)
    # the backward is itself differentiable (it is a pack): d<g_v, w>/d grads = unpack(w)
    w = torch.randn_like(g_v)
    second = torch.autograd.grad(g_v, grads, w)
    want = unpack_multimodal(PackedBatch(w, pb.cu_seqlens, 0, pb.position_ids, pb.seq_ids,
                                         order=pb.order), lens, list(Ls))
    for a, b in zip(second, want):
        assert torch.equal(a, b)


def test_pack_and_unpack_are_adjoint(device):
    B, L, H = 7, 6, 9
    x = torch.randn(B, L, H, dtype=torch.float64, device=device)
    lens = _lengths(B, L)
    pb = pack_padded(x, lens)
    y = torch.randn(pb.values.shape, dtype=torch.float64, device=device)
    lhs = (pb.values * y).sum()
    rhs = (x * unpack(y, pb.cu_seqlens, L)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_pack_list_backward(device):
    seqs = [torch.randn(n, 3, device=device, requires_grad=True) for n in (2, 0, 4)]
    pb = pack(seqs)
    g = torch.randn_like(pb.values)
    pb.values.backward(g)
    assert torch.equal(seqs[0].grad, g[:2]) and torch.equal(seqs[2].grad, g[2:])


# --------------------------------------------------------------------------------------------
# layouts, sync-free and fallback paths
# --------------------------------------------------------------------------------------------
def test_non_contiguous_inputs(device):
    B, L, H = 5, 7, 6
    big = torch.randn(L + 3, B, H + 2, device=device)
    x = big[2 : 2 + L, :, 1 : 1 + H].transpose(0, 1)  # strided batch and row, H stride 1
    lens = _lengths(B, L)
    pb = pack_padded(x, lens)
    assert torch.equal(pb.values.cpu(), R.varlen_pack([x.cpu()], [lens])["values"])
    xt = torch.randn(B, H, L, device=device).transpose(1, 2)  # H stride != 1: copied once
    assert torch.equal(pack_padded(xt, lens).values.cpu(),
                       R.varlen_pack([xt.cpu()], [lens])["values"])
    vbig = torch.randn(pb.values.shape[0], 2 * H, device=device)
    v = vbig[:, ::2]  # column stride 2
    assert torch.equal(unpack(v, pb.cu_seqlens, L).cpu(),
                       R.varlen_unpack(v.cpu(), pb.cu_seqlens.cpu(), L))
    v = vbig[:, 1 : 1 + H]  # row stride 2H
    assert torch.equal(unpack(v, pb.cu_seqlens, L).cpu(),
                       R.varlen_unpack(v.cpu(), pb.cu_seqlens.cpu(), L))


@pytest.mark.parametrize("all_starts_max_b", [0, 1024])
def test_both_sequence_searches(device, monkeypatch, all_starts_max_b):
    """The pack kernel finds each row's sequence by binary search or by comparing the row
    with every start at once (B <= ALL_STARTS_MAX_B): same results, empty sequences (repeated
    starts) and a B that is no power of two included."""
    monkeypatch.setattr(V, "ALL_STARTS_MAX_B", all_starts_max_b)
    B, H, Ls = 37, 5, (4, 3)
    xs = [torch.randn(B, L, H, device=device) for L in Ls]
    lens = [_lengths(B, L) for L in Ls]
    lens[0][5:9] = 0
    lens[1][5:9] = 0  # four empty sequences in a row
    gids = torch.randint(0, 3, (B,))
    pb = pack_multimodal(xs, lens, gids, num_groups=3)
    ref = R.varlen_pack([x.cpu() for x in xs], lens, gids, 3)
    _assert_matches(pb, ref, multimodal=True, grouped=True)


@pytest.mark.parametrize("shift", [0, 1, 4])
def test_streams_at_unaligned_addresses(device, shift):
    """The kernels promise Triton 16-byte row vectors only where every stride and every base
    address allows them: streams that start `shift` fp16 elements into their storage (2 or 8
    bytes off a 16-byte boundary) pack and unpack exactly (on a GPU a broken promise is a
    misaligned-address fault). H = 24 is a multiple of 8 but not of 16 elements."""
    B, H, Ls = 5, 24, (3, 6)
    xs = []
    for L in Ls:
        storage = torch.randn(B * L * H + shift).half().to(device)
        xs.append(storage[shift:].view(B, L, H))
    lens = [_lengths(B, L) for L in Ls]
    expected_align = {0: 8, 1: 1, 4: 4}[shift]
    assert V._row_align(2, xs, H, L * H) == expected_align
    pb = pack_multimodal(xs, lens, torch.tensor([1, 0, 1, 0, 0]), num_groups=2)
    ref = R.varlen_pack([x.cpu() for x in xs], lens, torch.tensor([1, 0, 1, 0, 0]), 2)
    _assert_matches(pb, ref, multimodal=True, grouped=True)
    out_storage = torch.zeros(pb.values.numel() + shift, dtype=torch.half, device=device)
    values = out_storage[shift:].view_as(pb.values).copy_(pb.values)
    outs = unpack_multimodal(dataclasses.replace(pb, values=values), lens, Ls)
    for got, x, lens_B in zip(outs, xs, lens):
        valid = torch.arange(x.shape[1], device=device)[None, :] < lens_B.to(device)[:, None]
        assert torch.equal(got, x * valid[..., None])


def test_device_plan_path_matches_and_validates(device, monkeypatch):
    """The path taken for device lengths (totals and checks read back from the plan kernel),
    forced on whatever tensors the device has."""
    monkeypatch.setattr(V, "_FORCE_DEVICE_PLAN", True)
    B, H, Ls = 8, 5, (4, 6)
    xs = [torch.randn(B, L, H, device=device) for L in Ls]
    lens = [_lengths(B, L).to(device) for L in Ls]
    gids = torch.tensor([0, 2, 2, 1, 0, 1, 2, 0], device=device)
    pb = pack_multimodal(xs, lens, gids, 3)
    ref = R.varlen_pack([x.cpu() for x in xs], [lens_B.cpu() for lens_B in lens], gids.cpu(), 3)
    _assert_matches(pb, ref, multimodal=True, grouped=True)
    bad = lens[1].clone()
    bad[3] = 7
    with pytest.raises(ValueError, match="lengths"):
        pack_multimodal(xs, [lens[0], bad])
    with pytest.raises(ValueError, match="group_ids"):
        pack_multimodal(xs, lens, gids + 1, 3)
    # with total given nothing is read back: the kernels clamp, memory stays safe
    T = int(ref["cu_seqlens"][-1])
    pb = pack_multimodal(xs, lens, gids, 3, total=T)
    assert torch.equal(pb.values.cpu(), ref["values"]) and pb.max_seqlen == sum(Ls)


def test_total_and_max_seqlen_given(device):
    x = torch.randn(4, 5, 3, device=device)
    lens = torch.tensor([5, 0, 2, 3])
    pb = pack_padded(x, lens, total=10, max_seqlen=5)
    assert pb.values.shape == (10, 3) and pb.max_seqlen == 5
    with pytest.raises(ValueError, match="total"):
        pack_padded(x, lens, total=11)


def test_fallback_matches_reference(device, monkeypatch):
    monkeypatch.setattr(V, "_use_triton", lambda *tensors: False)
    B, H, Ls = 6, 4, (3, 4)
    xs = [torch.randn(B, L, H, device=device, requires_grad=True) for L in Ls]
    lens = [_lengths(B, L) for L in Ls]
    gids = torch.tensor([1, 0, 1, 2, 0, 1])
    pb = pack_multimodal(xs, lens, gids, 3)
    ref = R.varlen_pack([x.detach().cpu() for x in xs], lens, gids, 3)
    _assert_matches(pb, ref, multimodal=True, grouped=True)
    outs = unpack_multimodal(pb, lens, list(Ls))
    for x, lens_B, out in zip(xs, lens, outs):
        valid = (torch.arange(x.shape[1])[None, :] < lens_B[:, None]).to(device)
        assert torch.equal(out[valid], x[valid]) and not out[~valid].any()
    seqs = [torch.randn(n, 2, device=device) for n in (0, 3, 1)]
    assert pack(seqs).position_ids.tolist() == [0, 1, 2, 0]
    assert torch.equal(unpack(pb.values, pb.cu_seqlens, pb.max_seqlen).cpu(),
                       R.varlen_unpack(ref["values"], ref["cu_seqlens"], ref["max_seqlen"]))


def test_compile_traces_without_graph_breaks_cpu():
    """fullgraph tracing of pack -> linear -> unpack (aot_eager: no code generation)."""
    B, L, H = 4, 6, 8
    lin = torch.nn.Linear(H, H)
    x = torch.randn(B, L, H)
    lens = torch.tensor([6, 0, 3, 2])

    def f(x, lens):
        pb = pack_padded(x, lens, total=11, max_seqlen=L)
        return unpack(lin(pb.values), pb.cu_seqlens, L, validate=False)

    xc = x.clone().requires_grad_()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(xc, lens)
    got.square().sum().backward()
    xr = x.clone().requires_grad_()
    ref = R.varlen_pack([xr], [lens])
    want = R.varlen_unpack(lin(ref["values"]), ref["cu_seqlens"], L)
    want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(xc.grad, xr.grad)  # through the custom ops' registered backward


def test_custom_ops_pass_opcheck(device):
    """Schema, fake implementations and autograd registration of the torch.library ops."""
    B, H, Ls = 4, 5, (3, 2)
    xs = [torch.randn(B, L, H, device=device, requires_grad=True) for L in Ls]
    lens = [torch.tensor([3, 0, 1, 2], device=device), torch.tensor([1, 2, 0, 2], device=device)]
    gids = torch.tensor([1, 0, 1, 0], device=device)
    plan = V._plan_op(lens, gids, 2, list(Ls))
    torch.library.opcheck(V._plan_op, (lens, gids, 2, list(Ls)))
    lens_SB, cu, order = plan[0], plan[1], plan[2]
    T = int(cu[-1])
    torch.library.opcheck(V._pack_op, (xs, lens_SB, cu, order, T))
    values = torch.randn(T, H, device=device, requires_grad=True)
    torch.library.opcheck(V._unpack_op, (values, lens_SB, cu, order, list(Ls)))
    torch.library.opcheck(V._token_meta_op, (cu, T))


def test_unchecked_garbage_metadata_stays_in_bounds(device):
    """validate=False with nonsense metadata: unspecified values, but the right shapes, no
    crash, and rows that the metadata does describe correctly still come out right."""
    values = torch.randn(6, 4, device=device)
    cu = torch.tensor([0, 5, 2, 40], dtype=torch.int32, device=device)
    assert unpack(values, cu, 3, validate=False).shape == (3, 3, 4)
    pb = PackedBatch(values, torch.tensor([0, 2, 6], dtype=torch.int32, device=device), 4,
                     torch.empty(0), torch.empty(0),
                     order=torch.tensor([7, -3], device=device))
    outs = unpack_multimodal(pb, [[2, 9], [0, -1]], [2, 3], validate=False)
    assert [o.shape for o in outs] == [(2, 2, 4), (2, 3, 4)]
    x = torch.randn(2, 3, 4, device=device)
    pb2 = pack_padded(x, torch.tensor([3, 1], device=device), total=4)  # correct total
    assert torch.equal(pb2.values[:3], x[0])


# --------------------------------------------------------------------------------------------
# Tensors without values, dispatch modes
# --------------------------------------------------------------------------------------------
def _shapes_without_values(make, lens_device):
    """pack_multimodal (grouped) and unpack_multimodal, forward and backward, on tensors made
    by `make` (meta, or inside FakeTensorMode); lengths on `lens_device`; total given."""
    xs = [make(torch.randn(3, 5, 4)).requires_grad_(), make(torch.randn(3, 2, 4))]
    lens = [torch.tensor([2, 5, 0]).to(lens_device), torch.tensor([1, 0, 2]).to(lens_device)]
    ids = torch.tensor([1, 0, 1]).to(lens_device)
    packed = pack_multimodal(xs, lens, group_ids=ids, num_groups=2, total=10)
    assert packed.values.shape == (10, 4) and packed.cu_seqlens.shape == (4,)
    assert packed.position_ids.shape == (10,) and packed.order.shape == (3,)
    outs = unpack_multimodal(packed, lens, [5, 2])
    assert [tuple(o.shape) for o in outs] == [(3, 5, 4), (3, 2, 4)]
    outs[0].sum().backward()
    assert xs[0].grad.shape == xs[0].shape
    one = unpack(make(torch.randn(7, 4)), make(torch.tensor([0, 2, 7, 7], dtype=torch.int32)), 5)
    assert one.shape == (3, 5, 4)
    with pytest.raises(ValueError, match="^total must be given"):
        pack_padded(xs[0], lens[0].to(xs[0].device))
    with pytest.raises(ValueError, match="^num_groups must be given"):
        pack_multimodal(xs, lens, group_ids=ids.to(xs[0].device), total=10)


def test_meta_tensors_give_shapes():
    """The custom ops' fake implementations on meta tensors; lengths on the CPU are read, on
    the meta device they need total (the row count depends on their values)."""
    to_meta = lambda t: t.to("meta")  # noqa: E731
    _shapes_without_values(to_meta, "meta")
    packed = pack_padded(to_meta(torch.randn(3, 5, 4)), torch.tensor([2, 5, 0]))
    assert packed.values.shape == (7, 4) and packed.max_seqlen == 5


def test_fake_tensor_mode_gives_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        _shapes_without_values(lambda t: t, "cpu")


def test_dispatch_mode_sees_the_ops(device):
    """Under a dispatch mode the calls take the custom ops: the same values and gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x = torch.randn(3, 5, 4, device=device, requires_grad=True)
    lens = torch.tensor([2, 5, 0])
    expected = pack_padded(x, lens)
    grad = torch.randn_like(expected.values)
    (expected_grad,) = torch.autograd.grad(expected.values, x, grad)
    with Seen() as seen:
        packed = pack_padded(x, lens)
        (x_grad,) = torch.autograd.grad(packed.values, x, grad)
    assert "mtmm.varlen_pack" in seen.ops and "mtmm.varlen_unpack" in seen.ops
    for f in FIELDS:
        a, b = getattr(packed, f), getattr(expected, f)
        assert (a is None and b is None) or torch.equal(a, b), f
    assert torch.equal(x_grad, expected_grad)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def test_bad_input_raises(device):
    x = torch.randn(3, 4, 5, device=device)
    lens = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="lengths"):
        pack_padded(x, torch.tensor([1, 5, 0]))  # > L
    with pytest.raises(ValueError, match="lengths"):
        pack_padded(x, torch.tensor([1, -1, 0]))  # < 0
    with pytest.raises(ValueError, match="lengths"):
        pack_padded(x, torch.tensor([1, 2]))  # wrong B
    with pytest.raises(TypeError, match="lengths"):
        pack_padded(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="group_ids"):
        pack_padded(x, lens, torch.tensor([0.0, 1.0, 0.0]), 2)
    with pytest.raises(ValueError, match="group_ids"):
        pack_padded(x, lens, torch.tensor([0, 2, 1]), 2)
    with pytest.raises(ValueError, match="group_ids"):
        pack_padded(x, lens, torch.tensor([0, -1, 1]), 2)
    with pytest.raises(ValueError, match="num_groups"):
        pack_padded(x, lens, num_groups=2)
    with pytest.raises(ValueError, match="x"):
        pack_padded(x[0], lens)
    with pytest.raises(TypeError, match="x"):
        pack_padded(x.to(torch.bool), lens)
    y = torch.randn(3, 2, 6, device=device)
    with pytest.raises(ValueError, match=r"streams\[1\].*H"):
        pack_multimodal([x, y], [lens, lens])
    with pytest.raises(ValueError, match=r"streams\[1\].*batch"):
        pack_multimodal([x, torch.randn(2, 2, 5, device=device)], [lens, lens])
    with pytest.raises(ValueError, match=r"lengths"):
        pack_multimodal([x, x], [lens])
    with pytest.raises(ValueError, match=r"lengths\[1\]"):
        pack_multimodal([x, x[:, :2]], [lens, lens])  # 3 > L_1 = 2
    values = torch.randn(6, 5, device=device)
    with pytest.raises(ValueError, match="non-decreasing"):
        unpack(values, torch.tensor([0, 4, 2, 6], dtype=torch.int32, device=device), 4)
    with pytest.raises(ValueError, match="start at 0"):
        unpack(values, torch.tensor([1, 4, 6], dtype=torch.int32, device=device), 4)
    with pytest.raises(ValueError, match="6 rows"):
        unpack(values, torch.tensor([0, 4, 5], dtype=torch.int32, device=device), 4)
    with pytest.raises(ValueError, match="max_seqlen"):
        unpack(values, torch.tensor([0, 1, 6], dtype=torch.int32, device=device), 4)
    with pytest.raises(TypeError, match="cu_seqlens"):
        unpack(values, torch.tensor([0, 6], device=device), 6)  # int64
    pb = pack_padded(x, lens)
    with pytest.raises(ValueError, match="lengths"):
        unpack_multimodal(pb, [torch.tensor([1, 2, 2])], [4])  # sums disagree with cu_seqlens
    with pytest.raises(ValueError, match="lengths"):
        unpack_multimodal(pb, [lens], [2])  # 3 > L = 2
    wraps = lens.to(torch.int64).cpu() + torch.tensor([2**32, 0, 0])  # 2**32 + 1: 1 as int32
    with pytest.raises(ValueError, match="lengths"):
        unpack_multimodal(pb, [wraps], [4])
    with pytest.raises(TypeError, match="packed"):
        unpack_multimodal(pb.values, [lens], [4])
    with pytest.raises(ValueError, match="seqs"):
        pack([torch.randn(2, 3), torch.randn(2, 4)])


# --------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_device_lengths_and_bf16(device):
    B, H, Ls = 33, 4096 + 8, (257, 1500, 77)
    xs = [torch.randn(B, L, H, device=device, dtype=torch.bfloat16) for L in Ls]
    lens = [torch.randint(0, L + 1, (B,), device=device) for L in Ls]
    gids = torch.randint(0, 4, (B,), device=device, dtype=torch.int32)
    pb = pack_multimodal(xs, lens, gids, 4)  # device lengths: the one sync path
    ref = R.varlen_pack(xs, lens, gids, 4)
    _assert_matches(pb, ref, multimodal=True, grouped=True)
    outs = unpack_multimodal(pb, lens, list(Ls))
    want = R.varlen_unpack_multimodal(ref["values"], ref["cu_seqlens"], ref["order"], lens,
                                      list(Ls))
    assert all(torch.equal(a, b) for a, b in zip(outs, want))


@pytest.mark.gpu
def test_gpu_capturable_in_cuda_graph(device):
    """total= and device lengths: no host sync, so the pack/unpack pair captures."""
    B, L, H = 16, 128, 256
    x = torch.randn(B, L, H, device=device)
    lens = torch.randint(0, L + 1, (B,), device=device)
    gids = torch.randint(0, 3, (B,), device=device)
    T = int(lens.sum())
    pack_padded(x, lens, gids, 3, total=T, max_seqlen=L)  # warm up (compiles the kernels)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(graph):
        pb = pack_padded(x, lens, gids, 3, total=T, max_seqlen=L)
        out = unpack(pb.values, pb.cu_seqlens, L, validate=False)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref = R.varlen_pack([x], [lens], gids, 3)
    assert torch.equal(pb.values, ref["values"])
    assert torch.equal(out, R.varlen_unpack(ref["values"], ref["cu_seqlens"], L))


@pytest.mark.gpu
def test_gpu_compile_fullgraph(device):
    B, L, H = 8, 64, 128
    lin = torch.nn.Linear(H, H, device=device)
    x = torch.randn(B, L, H, device=device, requires_grad=True)
    lens = torch.randint(0, L + 1, (B,), device=device)
    T = int(lens.sum())

    def f(x, lens):
        pb = pack_padded(x, lens, total=T, max_seqlen=L)
        return unpack(lin(pb.values), pb.cu_seqlens, L, validate=False)

    got = torch.compile(f, fullgraph=True)(x, lens)
    got.sum().backward()
    g_compiled = x.grad.clone()
    x.grad = None
    ref = R.varlen_pack([x], [lens])
    want = R.varlen_unpack(lin(ref["values"]), ref["cu_seqlens"], L)
    want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_compiled, x.grad)


@pytest.mark.gpu
def test_gpu_64bit_offsets(device):
    """More than 2**31 elements in both buffers: the last rows must land where they belong."""
    if torch.cuda.get_device_properties(device).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB")
    B, L, H = 2, (1 << 20) + 3, 1152
    x = torch.empty(B, L, H, device=device, dtype=torch.float16)
    x[:, -8:] = torch.randn(B, 8, H, device=device, dtype=torch.float16)
    lens = torch.tensor([L, L - 1])
    pb = pack_padded(x, lens)
    assert pb.values.numel() > 2**31
    assert torch.equal(pb.values[-7:], x[1, L - 8 : L - 1])
    assert torch.equal(pb.values[L - 8 : L], x[0, -8:])
    out = unpack(pb.values, pb.cu_seqlens, L)
    assert torch.equal(out[1, L - 8 : L - 1], x[1, L - 8 : L - 1])
    assert not out[1, L - 1].any()


def test_multimodal_pack_promotes_under_autocast(device):
    """Inside torch.autocast the streams of one batch come out of its layers (fp16/bf16) and of
    embeddings (fp32): they are packed in the widest dtype, as torch.cat promotes there, with
    each stream's gradient back in its own dtype. Outside autocast the mix stays an error."""
    torch.manual_seed(0)
    lens = [torch.tensor([3, 0, 2]), torch.tensor([1, 3, 2])]
    wide = torch.randn(3, 3, 5, device=device, requires_grad=True)
    narrow = torch.randn(3, 4, 5, device=device).half().requires_grad_()
    with torch.autocast(device.type, dtype=torch.float16):
        packed = pack_multimodal([narrow, wide], lens)
    expected = pack_multimodal([narrow.detach().float(), wide.detach()], lens)
    assert packed.values.dtype == torch.float32
    assert torch.equal(packed.values, expected.values)
    assert torch.equal(packed.modality_ids, expected.modality_ids)
    packed.values.sum().backward()
    assert narrow.grad.dtype == torch.float16 and wide.grad.dtype == torch.float32
    for x, lens_B in ((narrow, lens[0]), (wide, lens[1])):  # ones on every packed row, else zeros
        mask = (torch.arange(x.shape[1])[None, :] < lens_B[:, None]).to(device)
        assert torch.equal(x.grad, mask[..., None].expand_as(x).to(x.dtype))
    with pytest.raises(ValueError, match=r"streams\[1\] is torch.float32"):
        pack_multimodal([narrow, wide], lens)
