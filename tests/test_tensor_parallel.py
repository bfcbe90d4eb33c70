"""Tensor parallelism of the grouped GEMM (mtmm_kernels.tensor_parallel), FSDP2 over a
GroupedLinear, and the variable-length packing ops on DTensors, on 2 gloo ranks.

Every case runs on DTensors sharded over the ranks and is compared, forward and backward,
against a float64 reference in the same process: the loop reference
(``reference.grouped_mm_reference``) for the functions, ``nn.Linear`` heads for the
``GroupedLinear`` modules, slices and padding for packing. One spawn runs every case (a rank takes about 10 s to import torch
and Triton); the tests below read its results.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from scheduler.launch import run_local

G, K, N, T = 4, 10, 6, 13
TOL = 1e-5  # fp32 against float64, relative Frobenius error


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _function_case(mesh, by_ids: bool, mode: str, with_bias: bool) -> dict:
    """grouped_mm (or _by_ids) on DTensors placed for column or row parallelism."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from mtmm_kernels import grouped_mm, grouped_mm_by_ids
    from mtmm_kernels.reference import grouped_mm_by_ids_reference, grouped_mm_reference

    gen = torch.Generator().manual_seed(7)
    x, w, b = (torch.randn(s, generator=gen) for s in ((T, K), (G, K, N), (G, N)))
    dy = torch.randn(T, N, generator=gen)
    offsets = torch.tensor([3, 3, 9, 11], dtype=torch.int32)  # an empty group; rows 11, 12 in none
    ids = torch.randint(0, G, (T,), generator=gen)
    index = ids if by_ids else offsets
    x_pl, w_pl, b_pl = ((Replicate(), Shard(2), Shard(1)) if mode == "column"
                        else (Shard(1), Shard(1), Replicate()))
    x_d = distribute_tensor(x, mesh, [x_pl]).requires_grad_()
    w_d = distribute_tensor(w, mesh, [w_pl]).requires_grad_()
    b_d = distribute_tensor(b, mesh, [b_pl]).requires_grad_() if with_bias else None
    call = grouped_mm_by_ids if by_ids else grouped_mm
    y_d = call(x_d, w_d, index, b_d)  # a plain index: replicated by the call
    (y_d.full_tensor() * dy).sum().backward()

    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    ref_call = grouped_mm_by_ids_reference if by_ids else grouped_mm_reference
    y64 = ref_call(x64, w64, index, b64 if with_bias else None)
    (y64 * dy.double()).sum().backward()
    out = {"y": _rel(y_d.full_tensor(), y64), "dx": _rel(x_d.grad.full_tensor(), x64.grad),
           "dw": _rel(w_d.grad.full_tensor(), w64.grad),
           "placements": [repr(p) for p in (y_d.placements[0], w_d.grad.placements[0])]}
    if with_bias:
        out["db"] = _rel(b_d.grad.full_tensor(), b64.grad)
    return out


class GroupedMlp(nn.Module):
    """up (column parallel), ReLU, down (row parallel), both GroupedLinear; the index passed to
    the layers by position, as a caller of nn.Linear-like modules may."""

    def __init__(self, with_bias: bool):
        super().__init__()
        from mtmm_kernels import GroupedLinear

        self.up = GroupedLinear(G, K, 2 * N, bias=with_bias)
        self.down = GroupedLinear(G, 2 * N, K, bias=with_bias)

    def forward(self, x, offsets=None, group_ids=None):
        return self.down(torch.relu(self.up(x, offsets, group_ids)), offsets, group_ids)


def _heads_forward(heads: nn.ModuleList, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The loop reference: row t through heads[ids[t]] (rows whose id is G through none)."""
    y = x.new_zeros(x.shape[:-1] + (heads[0].out_features,))
    for g, head in enumerate(heads):
        rows = ids == g
        y = y.index_put((rows,), head(x[rows]))
    return y


def _module_case(mesh, by_ids: bool, with_bias: bool, compiled: bool = False) -> dict:
    """GroupedMlp under parallelize_module (and torch.compile, fullgraph, where ``compiled``)
    against float64 nn.Linear heads."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    from mtmm_kernels.tensor_parallel import GroupedColwiseParallel, GroupedRowwiseParallel

    torch.manual_seed(11)  # the same parameters on every rank (rank 0's are distributed)
    mlp = GroupedMlp(with_bias)
    heads_up = mlp.up.to_linears().double()
    heads_down = mlp.down.to_linears().double()
    parallelize_module(mlp, mesh, {"up": GroupedColwiseParallel(),
                                   "down": GroupedRowwiseParallel()})
    forward = torch.compile(mlp, fullgraph=True, backend="aot_eager") if compiled else mlp
    gen = torch.Generator().manual_seed(5)
    if by_ids:  # [B, S, K] tokens with a group per token
        x = torch.randn(2, 7, K, generator=gen)
        ids = torch.randint(0, G, (2, 7), generator=gen)
        y = forward(x, group_ids=ids)
    else:  # [T, K] rows sorted by group
        x = torch.randn(T, K, generator=gen)
        offsets = torch.tensor([2, 6, 6, 12])
        ids = torch.bucketize(torch.arange(T), offsets, right=True)  # G past the last group
        y = forward(x, offsets)
    dy = torch.randn(y.shape, generator=gen)
    (y * dy).sum().backward()

    x64 = x.double()
    y64 = _heads_forward(heads_down, torch.relu(_heads_forward(heads_up, x64, ids)), ids)
    (y64 * dy.double()).sum().backward()
    out = {"y": _rel(y, y64), "dtensor": isinstance(y, DTensor),
           "placements": [repr(mlp.up.weight.placements[0]), repr(mlp.down.weight.placements[0])]}
    for name, layer, heads in (("up", mlp.up, heads_up), ("down", mlp.down, heads_down)):
        out[f"d{name}.weight"] = _rel(layer.weight.grad.full_tensor(),
                                      torch.stack([h.weight.grad.t() for h in heads]))
        if with_bias:
            out[f"d{name}.bias"] = _rel(layer.bias.grad.full_tensor(),
                                        torch.stack([h.bias.grad for h in heads]))
    return out


def _fsdp_case(mesh) -> dict:
    """GroupedMlp under FSDP2 (fully_shard: parameters sharded on G, gathered for each layer's
    forward and backward as plain tensors), each rank with a batch of its own, against
    float64 heads whose gradients are averaged over the ranks as FSDP's are."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(11)
    mlp = GroupedMlp(with_bias=True)
    heads = {"up": mlp.up.to_linears().double(), "down": mlp.down.to_linears().double()}
    for layer in (mlp.up, mlp.down, mlp):
        fully_shard(layer, mesh=mesh)
    gen = torch.Generator().manual_seed(5 + torch.distributed.get_rank())
    x = torch.randn(2, 7, K, generator=gen)
    ids = torch.randint(0, G, (2, 7), generator=gen)
    y = mlp(x, group_ids=ids)
    dy = torch.randn(y.shape, generator=gen)
    (y * dy).sum().backward()

    y64 = _heads_forward(heads["down"], torch.relu(_heads_forward(heads["up"], x.double(), ids)),
                         ids)
    (y64 * dy.double()).sum().backward()
    out = {"y": _rel(y, y64)}
    for name, layer in (("up", mlp.up), ("down", mlp.down)):
        for p in heads[name].parameters():
            torch.distributed.all_reduce(p.grad)
            p.grad /= torch.distributed.get_world_size()
        out[f"d{name}.weight"] = _rel(layer.weight.grad.full_tensor(),
                                      torch.stack([h.weight.grad.t() for h in heads[name]]))
        out[f"d{name}.bias"] = _rel(layer.bias.grad.full_tensor(),
                                    torch.stack([h.bias.grad for h in heads[name]]))
    return out


# --- variable-length packing on DTensors ------------------------------------------------------
H = 7  # split unevenly over 2 ranks (4 + 3)
LENGTHS, MAX_LENS, GROUP_IDS = [[2, 5, 0], [1, 0, 4]], [5, 4], [1, 0, 1]


def _placed(x: torch.Tensor, mesh, placement: str):
    """x as a DTensor leaf: sharded on H, replicated, or a partial sum of unequal shares."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    if placement == "partial":  # rank r holds x (r + 1) / 3: the shares add up to x
        share = x * (torch.distributed.get_rank() + 1) / 3
        return DTensor.from_local(share, mesh, [Partial()], run_check=False).requires_grad_()
    pl = Shard(x.dim() - 1) if placement == "shard" else Replicate()
    return distribute_tensor(x, mesh, [pl]).requires_grad_()


def _pack_reference(streams, lengths, order):
    """Packed sequence i is sample order[i]'s rows of every stream, stream after stream."""
    return torch.cat([x[b, :n[b]] for b in order for x, n in zip(streams, lengths)])


def _unpack_reference(values, lengths, max_lens, order):
    pieces, row = {}, 0
    for b in order:
        for s, n in enumerate(lengths):
            pieces[s, b], row = values[row:row + n[b]], row + n[b]
    return [torch.stack([nn.functional.pad(pieces[s, b], (0, 0, 0, L - lengths[s][b]))
                         for b in range(len(order))]) for s, L in enumerate(max_lens)]


def _varlen_case(mesh, placement: str, grouped: bool) -> dict:
    """pack_multimodal then unpack_multimodal on DTensor streams, forward and backward; where
    grouped, also a grouped GEMM (replicated weights) over the packed rows by group_offsets."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    from mtmm_kernels import grouped_mm, pack_multimodal, unpack_multimodal
    from mtmm_kernels.reference import grouped_mm_reference

    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, L, H, generator=gen) for L in MAX_LENS]
    dv = torch.randn(12, H, generator=gen)
    douts = [torch.randn(x.shape, generator=gen) for x in xs]
    w, dy = torch.randn(2, H, 3, generator=gen), torch.randn(12, 3, generator=gen)
    gids = GROUP_IDS if grouped else None
    streams = [_placed(x, mesh, placement) for x in xs]
    packed = pack_multimodal(streams, LENGTHS, gids)
    outs = unpack_multimodal(packed, LENGTHS, MAX_LENS)
    loss = ((packed.values.full_tensor() * dv).sum()
            + sum((o.full_tensor() * d).sum() for o, d in zip(outs, douts)))
    if grouped:
        y = grouped_mm(packed.values, distribute_tensor(w, mesh, [Replicate()]),
                       packed.group_offsets)
        loss = loss + (y.full_tensor() * dy).sum()
    loss.backward()

    order = sorted(range(3), key=lambda b: gids[b]) if grouped else list(range(3))
    x64 = [x.double().requires_grad_() for x in xs]
    v64 = _pack_reference(x64, LENGTHS, order)
    o64 = _unpack_reference(v64, LENGTHS, MAX_LENS, order)
    loss64 = (v64 * dv.double()).sum() + sum((o * d.double()).sum() for o, d in zip(o64, douts))
    if grouped:  # samples 1 (group 0, 5 rows), then 0 and 2 (group 1, 3 + 4 rows)
        y64 = grouped_mm_reference(v64, w.double(), torch.tensor([5, 12]))
        loss64 = loss64 + (y64 * dy.double()).sum()
    loss64.backward()
    seq_lens = [sum(n[b] for n in LENGTHS) for b in order]
    metadata = (packed.position_ids, packed.seq_ids, packed.modality_ids)
    expected = (torch.cat([torch.arange(n) for n in seq_lens]),
                torch.cat([torch.full((n,), i) for i, n in enumerate(seq_lens)]),
                torch.cat([torch.full((n[b],), s) for b in order for s, n in enumerate(LENGTHS)]))
    return {
        **({"y": _rel(y.full_tensor(), y64)} if grouped else {}),
        "values": _rel(packed.values.full_tensor(), v64),
        **{f"out{s}": _rel(o.full_tensor(), r) for s, (o, r) in enumerate(zip(outs, o64))},
        **{f"dx{s}": _rel(x.grad.full_tensor(), r.grad) for s, (x, r) in enumerate(zip(streams, x64))},
        "placements": [repr(t.placements[0]) for t in (packed.values, *outs)],
        "plain metadata": all(type(t) is torch.Tensor for t in (*metadata, packed.cu_seqlens)),
        "metadata": all(torch.equal(t.long(), e) for t, e in zip(metadata, expected)),
    }


def _varlen_padded_case(mesh, compiled: bool) -> dict:
    """pack_padded, then unpack to two lengths (a sharding cache keyed without max_seqlen
    would give the second the first's shape), eager and under torch.compile; and pack() of
    sharded sequences."""
    from mtmm_kernels import pack, pack_padded, unpack

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, H, generator=gen)
    lens = torch.tensor(LENGTHS[0])
    d5, d8 = torch.randn(3, 5, H, generator=gen), torch.randn(3, 8, H, generator=gen)

    def roundtrip(x_d):
        packed = pack_padded(x_d, lens, total=7, max_seqlen=5)
        return unpack(packed.values, packed.cu_seqlens, 5), unpack(packed.values,
                                                                   packed.cu_seqlens, 8)

    run = torch.compile(roundtrip, fullgraph=True, backend="aot_eager") if compiled else roundtrip
    x_d = _placed(x, mesh, "shard")
    u5, u8 = run(x_d)
    ((u5.full_tensor() * d5).sum() + (u8.full_tensor() * d8).sum()).backward()

    x64 = x.double().requires_grad_()
    v64 = _pack_reference([x64], LENGTHS[:1], range(3))
    (r5,), (r8,) = (_unpack_reference(v64, LENGTHS[:1], [L], range(3)) for L in (5, 8))
    ((r5 * d5.double()).sum() + (r8 * d8.double()).sum()).backward()
    seqs = [_placed(x[b, :n].contiguous(), mesh, "shard") for b, n in enumerate(LENGTHS[0])]
    return {"u5": _rel(u5.full_tensor(), r5), "u8": _rel(u8.full_tensor(), r8),
            "dx": _rel(x_d.grad.full_tensor(), x64.grad),
            "pack": _rel(pack(seqs).values.full_tensor(), v64),
            "shapes": [tuple(u5.shape), tuple(u8.shape)],
            "placements": [repr(u.placements[0]) for u in (u5, u8)]}


def _mixed_streams_error(mesh) -> str:
    from mtmm_kernels import pack_multimodal

    x = torch.randn(3, 5, H)
    try:
        pack_multimodal([_placed(x, mesh, "shard"), x], [LENGTHS[0]] * 2)
    except ValueError as e:
        return str(e)
    return "no error"


VARLEN_CASES = [(placement, grouped) for placement in ("shard", "replicate", "partial")
                for grouped in (False, True)]
FUNCTION_CASES = [(by_ids, mode, with_bias) for by_ids in (False, True)
                  for mode in ("column", "row") for with_bias in (False, True)]
MODULE_CASES = [(by_ids, with_bias, False) for by_ids in (False, True)
                for with_bias in (False, True)] + [(True, True, True), (False, True, True)]


def _run_cases() -> dict:
    """Every case on this rank, in one process. A bias-free call precedes a biased one on the
    same placements: a sharding cache keyed without need_bias would hand the biased backward
    the bias-free call's empty dBias shape."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    results = {}
    for case in FUNCTION_CASES:
        results[("function",) + case] = _function_case(mesh, *case)
    for case in MODULE_CASES:
        results[("module",) + case] = _module_case(mesh, *case)
    results["fsdp"] = _fsdp_case(mesh)
    for case in VARLEN_CASES:
        results[("varlen",) + case] = _varlen_case(mesh, *case)
    for compiled in (False, True):
        results[("varlen padded", compiled)] = _varlen_padded_case(mesh, compiled)
    results["mixed streams"] = _mixed_streams_error(mesh)
    return results


@pytest.fixture(scope="module")
def rank_results() -> list[dict]:
    return run_local(_run_cases, 2, backend="gloo", timeout_s=600)


@pytest.mark.parametrize("by_ids,mode,with_bias", FUNCTION_CASES)
def test_functions_on_sharded_operands_match_float64(rank_results, by_ids, mode, with_bias):
    for rank, results in enumerate(rank_results):
        r = results[("function", by_ids, mode, with_bias)]
        errors = {k: v for k, v in r.items() if k != "placements"}
        assert max(errors.values()) < TOL, (rank, errors)
        # column parallel: y and dW sharded on N; row parallel: y a partial sum, dW on K
        expected = ["Shard(dim=1)", "Shard(dim=2)"] if mode == "column" else ["Partial(sum)",
                                                                              "Shard(dim=1)"]
        assert r["placements"] == expected, rank


@pytest.mark.parametrize("by_ids,with_bias,compiled", MODULE_CASES)
def test_grouped_mlp_column_then_row_parallel_matches_linear_heads(rank_results, by_ids,
                                                                   with_bias, compiled):
    for rank, results in enumerate(rank_results):
        r = results[("module", by_ids, with_bias, compiled)]
        assert not r["dtensor"], rank  # the row-parallel output hook all-reduced it
        assert r["placements"] == ["Shard(dim=2)", "Shard(dim=1)"], rank
        errors = {k: v for k, v in r.items() if k not in ("dtensor", "placements")}
        assert len(errors) == (5 if with_bias else 3)
        assert max(errors.values()) < TOL, (rank, errors)


def test_grouped_mlp_under_fsdp2_matches_linear_heads(rank_results):
    for rank, results in enumerate(rank_results):
        errors = results["fsdp"]
        assert len(errors) == 5 and max(errors.values()) < TOL, (rank, errors)


@pytest.mark.parametrize("placement,grouped", VARLEN_CASES)
def test_pack_and_unpack_multimodal_on_dtensor_streams_match_float64(rank_results, placement,
                                                                      grouped):
    """A shard of H stays a shard of H, replicated stays replicated, a partial sum stays one;
    the plan and the token metadata are plain tensors, the same on every rank."""
    expected = {"shard": ["Shard(dim=1)"] + ["Shard(dim=2)"] * 2,
                "replicate": ["Replicate()"] * 3, "partial": ["Partial(sum)"] * 3}[placement]
    for rank, results in enumerate(rank_results):
        r = results[("varlen", placement, grouped)]
        assert r["placements"] == expected, rank
        assert r["plain metadata"] and r["metadata"], rank
        errors = {k: v for k, v in r.items() if isinstance(v, float)}
        assert len(errors) == (6 if grouped else 5) and max(errors.values()) < TOL, (rank, errors)


@pytest.mark.parametrize("compiled", [False, True])
def test_pack_padded_and_unpack_on_sharded_values_match_float64(rank_results, compiled):
    for rank, results in enumerate(rank_results):
        r = results[("varlen padded", compiled)]
        assert r["shapes"] == [(3, 5, H), (3, 8, H)], rank
        assert r["placements"] == ["Shard(dim=2)"] * 2, rank
        errors = {k: v for k, v in r.items() if isinstance(v, float)}
        assert len(errors) == 4 and max(errors.values()) < TOL, (rank, errors)


def test_pack_of_dtensor_and_plain_streams_names_the_stream(rank_results):
    for results in rank_results:
        assert results["mixed streams"] == "streams[1] is not a DTensor, streams[0] is one"


def test_import_does_not_load_dtensor():
    """torch.distributed.tensor takes about 0.8 s to import: only programs with DTensors pay."""
    code = ("import sys, mtmm_kernels; "
            "sys.exit('torch.distributed.tensor' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
