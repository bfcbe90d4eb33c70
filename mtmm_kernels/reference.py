"""Pure-torch references of every kernel: the oracle of the tests and the CPU fallback.

Written for clarity, never for speed.
"""

from __future__ import annotations

import torch

# --- varlen packing -------------------------------------------------------------------------
#
# Two layers. The oracle (varlen_pack, varlen_unpack, varlen_unpack_multimodal) takes the
# public arguments and builds the answer sample by sample with slicing and torch.cat, so
# autograd of it is the reference gradient. The fallback (varlen_*_fallback) implements the
# torch.library ops of mtmm_kernels.varlen on their plan tensors, vectorised, for devices
# Triton does not run on.


def varlen_pack(streams: list[torch.Tensor], lengths: list, group_ids=None,
                num_groups: int | None = None) -> dict:
    """Oracle of pack_multimodal: sample b's packed sequence is x_0[b, :len_0[b]],
    x_1[b, :len_1[b]], ...; with group_ids the sequences are stably sorted by group. Returns a
    dict with the PackedBatch fields (order and group_offsets only with group_ids)."""
    B, H = streams[0].shape[0], streams[0].shape[2]
    lens = [[int(v) for v in torch.as_tensor(lens_B).tolist()] for lens_B in lengths]
    grouped = group_ids is not None
    gids = [int(g) for g in torch.as_tensor(group_ids).tolist()] if grouped else [0] * B
    order = sorted(range(B), key=lambda b: gids[b])  # Python's sort is stable
    pieces, cu, pos, seq, mod = [], [0], [], [], []
    for p, b in enumerate(order):
        n = 0
        for s, x in enumerate(streams):
            length = lens[s][b]
            pieces.append(x[b, :length])
            pos += range(n, n + length)
            mod += [s] * length
            n += length
        seq += [p] * n
        cu.append(cu[-1] + n)
    values = torch.cat(pieces) if pieces else streams[0].new_zeros(0, H)
    out = dict(
        values=values,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max((cu[i + 1] - cu[i] for i in range(B)), default=0),
        position_ids=torch.tensor(pos, dtype=torch.int64),
        seq_ids=torch.tensor(seq, dtype=torch.int32),
        modality_ids=torch.tensor(mod, dtype=torch.int32),
        order=None,
        group_offsets=None,
    )
    if grouped:
        G = num_groups if num_groups is not None else max(gids, default=-1) + 1
        tokens = [0] * G
        for b in range(B):
            tokens[gids[b]] += cu[order.index(b) + 1] - cu[order.index(b)]
        ends = [sum(tokens[: g + 1]) for g in range(G)]
        out["order"] = torch.tensor(order, dtype=torch.int64)
        out["group_offsets"] = torch.tensor(ends, dtype=torch.int32)
    return out


def varlen_unpack(values: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """Oracle of unpack: [B, max_seqlen, H], sequence b in row b, zeros after its end."""
    cu = [int(c) for c in cu_seqlens.tolist()]
    B = len(cu) - 1
    out = values.new_zeros(B, max_seqlen, values.shape[1])
    for b in range(B):
        out[b, : cu[b + 1] - cu[b]] = values[cu[b]:cu[b + 1]]
    return out


def varlen_unpack_multimodal(values: torch.Tensor, cu_seqlens: torch.Tensor, order, lengths: list,
                             max_lens: list[int]) -> list[torch.Tensor]:
    """Oracle of unpack_multimodal: the padded streams that varlen_pack would have packed."""
    cu = [int(c) for c in cu_seqlens.tolist()]
    B = len(cu) - 1
    order = list(range(B)) if order is None else [int(o) for o in order.tolist()]
    lens = [[int(v) for v in torch.as_tensor(lens_B).tolist()] for lens_B in lengths]
    outs = [values.new_zeros(B, L, values.shape[1]) for L in max_lens]
    for p, b in enumerate(order):
        row = cu[p]
        for s, out in enumerate(outs):
            out[b, : lens[s][b]] = values[row:row + lens[s][b]]
            row += lens[s][b]
    return outs


def varlen_plan_fallback(lengths: list[torch.Tensor], group_ids, num_groups: int,
                         max_lens: list[int]):
    """mtmm::varlen_plan without Triton: (lens_SB, cu_seqlens, order, group_offsets, stats)."""
    device = lengths[0].device
    raw = torch.stack([lens_B.to(torch.int64) for lens_B in lengths])  # [S, B]
    Ls = torch.tensor(max_lens, dtype=torch.int64, device=device)[:, None]
    bad_len = ((raw < 0) | (raw > Ls)).sum()
    lens = torch.minimum(raw.clamp(min=0), Ls)
    seq = lens.sum(0)
    B = seq.shape[0]
    if num_groups > 0:
        gid = group_ids.to(torch.int64)
        bad_gid = ((gid < 0) | (gid >= num_groups)).sum()
        gid = gid.clamp(0, num_groups - 1)
        order = torch.sort(gid, stable=True).indices
        group_offsets = torch.zeros(num_groups, dtype=torch.int64, device=device)
        group_offsets.index_add_(0, gid, seq)
        group_offsets = group_offsets.cumsum(0).to(torch.int32)
    else:
        bad_gid = torch.zeros((), dtype=torch.int64, device=device)
        order = torch.arange(B, device=device)
        group_offsets = torch.zeros(0, dtype=torch.int32, device=device)
    cu = torch.zeros(B + 1, dtype=torch.int64, device=device)
    cu[1:] = seq[order].cumsum(0)
    max_seq = seq.max() if B else torch.zeros((), dtype=torch.int64, device=device)
    stats = torch.stack([cu[-1], max_seq, bad_len, bad_gid])
    return lens.to(torch.int32), cu.to(torch.int32), order, group_offsets, stats


def _varlen_token_map(lens_SB, cu_seqlens, order, max_lens):
    """For stream s: (valid [B, L_s] mask, packed row [B, L_s], position in sequence [B, L_s])."""
    B = cu_seqlens.shape[0] - 1
    device = cu_seqlens.device
    cu = cu_seqlens.to(torch.int64)
    order = torch.arange(B, device=device) if order is None else order
    if lens_SB is None:  # one stream whose lengths are the cu_seqlens differences
        lens = torch.empty(1, B, dtype=torch.int64, device=device)
        lens[0, order] = cu[1:] - cu[:-1]
    else:
        lens = lens_SB.to(torch.int64)
    start = torch.empty(B, dtype=torch.int64, device=device)
    start[order] = cu[:-1]  # packed start of sample b
    prefix = torch.zeros(B, dtype=torch.int64, device=device)
    maps = []
    for s, L in enumerate(max_lens):
        r = torch.arange(L, device=device)[None, :]
        valid = (r < lens[s][:, None]) & (start[:, None] + prefix[:, None] + r < cu[-1])
        maps.append((valid, start[:, None] + prefix[:, None] + r, prefix[:, None] + r))
        prefix = prefix + lens[s]
    return maps, order


def varlen_pack_fallback(streams, lens_SB, cu_seqlens, order, total: int):
    """mtmm::varlen_pack without Triton: (values, position_ids, seq_ids, modality_ids)."""
    x0 = streams[0]
    maps, order = _varlen_token_map(lens_SB, cu_seqlens, order, [x.shape[1] for x in streams])
    values = x0.new_zeros(total, x0.shape[2])
    position_ids = torch.zeros(total, dtype=torch.int64, device=x0.device)
    seq_ids = torch.zeros(total, dtype=torch.int32, device=x0.device)
    modality_ids = torch.zeros(total, dtype=torch.int32, device=x0.device)
    packed_index = torch.empty_like(order)
    packed_index[order] = torch.arange(order.shape[0], device=order.device)
    for s, (x, (valid, row, pos)) in enumerate(zip(streams, maps)):
        valid = valid & (row < total)
        dst = row[valid]
        values[dst] = x[valid]
        position_ids[dst] = pos[valid]
        seq_ids[dst] = packed_index[:, None].expand_as(row)[valid].to(torch.int32)
        modality_ids[dst] = s
    return values, position_ids, seq_ids, modality_ids


def varlen_unpack_fallback(values, lens_SB, cu_seqlens, order, max_lens: list[int]):
    """mtmm::varlen_unpack without Triton: the padded streams, zeros in the padding."""
    maps, _ = _varlen_token_map(lens_SB, cu_seqlens, order, max_lens)
    outs = []
    for L, (valid, row, _pos) in zip(max_lens, maps):
        out = values.new_zeros(valid.shape[0], L, values.shape[1])
        valid = valid & (row < values.shape[0])
        out[valid] = values[row[valid]]
        outs.append(out)
    return outs


def varlen_token_meta_fallback(cu_seqlens, total: int):
    """mtmm::varlen_token_meta without Triton: (position_ids, seq_ids) of a packed buffer."""
    cu = cu_seqlens.to(torch.int64)
    rows = torch.arange(total, device=cu.device)
    seq = (torch.searchsorted(cu, rows, right=True) - 1).clamp(0, max(cu.shape[0] - 2, 0))
    pos = rows - cu[seq] if cu.shape[0] > 1 else rows * 0
    return pos, seq.to(torch.int32)



# --- grouped GEMM ---------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types go through fp32, as the kernels accumulate in fp32; fp32/fp64 stay."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _group_bounds(offsets_G: torch.Tensor) -> list[tuple[int, int]]:
    ends = [int(e) for e in offsets_G.tolist()]
    return list(zip([0] + ends[:-1], ends))


def grouped_mm_reference(x_TK: torch.Tensor, w_GKN: torch.Tensor, offsets_G: torch.Tensor,
                         bias_GN: torch.Tensor | None = None) -> torch.Tensor:
    """y[rows of g] = x[rows of g] @ w[g] (+ bias[g]); rows at or past offsets[-1] are zero.

    offsets_G are cumulative END rows (torch.nn.functional.grouped_mm's ``offs``). A Python
    loop over groups, differentiable by autograd, in x's dtype (half types through fp32).
    """
    T, N = x_TK.shape[0], w_GKN.shape[2]
    cdt = _compute_dtype(x_TK.dtype)
    y_TN = x_TK.new_zeros((T, N), dtype=cdt)
    for g, (start, end) in enumerate(_group_bounds(offsets_G)):
        if end <= start:
            continue
        y_g = x_TK[start:end].to(cdt) @ w_GKN[g].to(cdt)
        if bias_GN is not None:
            y_g = y_g + bias_GN[g].to(cdt)
        y_TN = y_TN.index_copy(0, torch.arange(start, end, device=x_TK.device), y_g)
    return y_TN.to(x_TK.dtype)


def grouped_mm_dw_reference(x_TK: torch.Tensor, dy_TN: torch.Tensor, offsets_G: torch.Tensor,
                            need_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW[g] = x_g^T dy_g and dBias[g] = column sums of dy_g (exact zeros for empty groups)."""
    G, K, N = offsets_G.shape[0], x_TK.shape[1], dy_TN.shape[1]
    cdt = _compute_dtype(x_TK.dtype)
    dw_GKN = x_TK.new_zeros((G, K, N), dtype=cdt)
    db_GN = x_TK.new_zeros((G, N), dtype=cdt)
    for g, (start, end) in enumerate(_group_bounds(offsets_G)):
        if end <= start:
            continue
        dw_GKN[g] = x_TK[start:end].to(cdt).t() @ dy_TN[start:end].to(cdt)
        db_GN[g] = dy_TN[start:end].to(cdt).sum(0)
    return dw_GKN.to(x_TK.dtype), (db_GN.to(dy_TN.dtype) if need_bias else None)


def grouped_mm_by_ids_reference(x_TK: torch.Tensor, w_GKN: torch.Tensor, group_ids_T: torch.Tensor,
                                bias_GN: torch.Tensor | None = None) -> torch.Tensor:
    """y[t] = x[t] @ w[group_ids[t]] (+ bias[group_ids[t]]), tokens in any order; one boolean
    selection per group, no sorting (an oracle independent of the kernel's sort)."""
    T, N = x_TK.shape[0], w_GKN.shape[2]
    cdt = _compute_dtype(x_TK.dtype)
    y_TN = x_TK.new_zeros((T, N), dtype=cdt)
    for g in range(w_GKN.shape[0]):
        rows = (group_ids_T == g).nonzero().flatten()
        if rows.numel() == 0:
            continue
        y_g = x_TK[rows].to(cdt) @ w_GKN[g].to(cdt)
        if bias_GN is not None:
            y_g = y_g + bias_GN[g].to(cdt)
        y_TN = y_TN.index_copy(0, rows, y_g)
    return y_TN.to(x_TK.dtype)


def dw_tile_order(group_rows: list[int], tiles_per_group: int, programs: int,
                  balanced: bool) -> list[list[int]]:
    """The dW tiles (g * tiles_per_group + t) each persistent program of the dW kernel takes,
    in order. In group order, program p takes tiles p, p + programs, ...; balanced, the groups
    with the most rows come first (ties: the lower index) and the programs take each round of
    `programs` positions forward in even rounds and backward in odd ones."""
    groups = range(len(group_rows))
    if balanced:
        groups = sorted(groups, key=lambda g: (-group_rows[g], g))
    tiles = [g * tiles_per_group + t for g in groups for t in range(tiles_per_group)]
    taken: list[list[int]] = [[] for _ in range(programs)]
    for pos, tile in enumerate(tiles):
        rnd, j = divmod(pos, programs)
        taken[programs - 1 - j if balanced and rnd % 2 else j].append(tile)
    return taken
