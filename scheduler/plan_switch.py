"""Moving a running job to another plan: parameters and optimizer state go peer to peer.

A plan decides which ranks hold each layer, and an ``Executor`` builds only those. To switch
plans between two steps (a re-plan, ``scheduler.replan``), the trainer builds the new
executor and optimizer beside the old ones and calls :func:`migrate_state`:

- every parameter's source is its old owner (``Executor.owned``: the one rank that holds its
  optimizer state whether the optimizer is sharded or not);
- every new holder gets the value, and every rank that will update it (each holder, or its
  owner with ``shard_optimizer``) also gets its optimizer state: the tensors shaped like the
  parameter (AdamW's moments) by point-to-point transfers, in rounds of one bucket of at
  most ``BUCKET_MB`` per pair of ranks and dtype, all of a round in flight at once; the
  small entries (AdamW's ``step``) with the layouts, which every rank exchanges first in one
  ``all_gather_object``;
- a rank that keeps a parameter copies it locally;
- persistent buffers (a BatchNorm's running statistics) go from their old lowest holder to
  their new holders, as values.

Every rank derives the same list of transfers from the exchanged layouts, so each pair posts
its sends and receives in the same order. The values arrive bit for bit: training goes on as
if the plan had not changed (up to the new plan's order of floating-point reductions).
While it runs, a rank holds its old and new share of the model at once, and a round's
buckets (a copy of what it sends, a buffer for what it receives).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

_PARAM = ""  # the key of the parameter's own value among a transfer's entries
# MB a pair of ranks sends per dtype in one round of a switch: what a rank holds beyond its
# old and new share of the model (a copy of what it sends, a buffer for what it receives).
BUCKET_MB = 256.0


def _pair_order(item) -> tuple[int, str]:
    """Sorts {(peer, dtype): ...} items by peer, then dtype: the order both sides post in."""
    (peer, dtype), _ = item
    return peer, str(dtype)


def _buckets(parts: list[tuple[str, str, int]], itemsize: int, limit: float) -> list[list]:
    """``parts`` ((name, key, numel), in order) cut into runs of at most ``limit`` bytes; an
    entry larger than that alone."""
    out: list[list] = []
    size = 0.0
    for part in parts:
        nbytes = part[2] * itemsize
        if not out or (size + nbytes > limit and out[-1]):
            out.append([])
            size = 0.0
        out[-1].append(part)
        size += nbytes
    return out


def _layout(p: torch.Tensor, state: dict) -> tuple:
    """What the owner offers for one parameter: (shape, dtype, {state key: entry}), where an
    entry is ("tensor", dtype) for a tensor shaped like the parameter (sent point to point)
    and ("value", v, on_device) for anything else (carried in the layout itself)."""
    entries: dict[str, tuple] = {}
    for key, v in state.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape == p.shape:
            entries[key] = ("tensor", v.dtype)
        elif torch.is_tensor(v):
            entries[key] = ("value", v.detach().cpu().clone(), v.device.type != "cpu")
        else:
            entries[key] = ("value", v, False)
    return tuple(p.shape), p.dtype, entries


def _transfers(offers: list[dict], needs: list[dict]) -> list[tuple[str, int, int, list[str]]]:
    """[(name, src, dst, entry keys)] in name order, the same on every rank. ``offers[r]``: rank r's layouts of the parameters it owns now;
    ``needs[r]``: {name: whether rank r's new optimizer updates it} of its new parameters."""
    source: dict[str, int] = {}
    for r, offer in enumerate(offers):
        for name in offer:
            if name in source:
                raise ValueError(f"parameter {name!r}: owned by ranks {source[name]} and {r} under the old plan")
            source[name] = r
    needed = {name for need in needs for name in need}
    if needed != set(source):
        lost, missing = sorted(set(source) - needed), sorted(needed - set(source))
        raise ValueError("the plans hold different parameters: "
                         + (f"none of the new plan's ranks holds {lost[:5]}; " if lost else "")
                         + (f"no old rank has {missing[:5]}" if missing else ""))
    out = []
    for name in sorted(needed):
        src = source[name]
        tensors = [k for k, e in offers[src][name][2].items() if e[0] == "tensor"]
        for dst, need in enumerate(needs):
            if name in need:
                out.append((name, src, dst, [_PARAM] + (tensors if need[name] else [])))
    return out


def migrate_state(old_ex, old_opt: torch.optim.Optimizer, new_ex, new_opt: torch.optim.Optimizer,
                  bucket_mb: float | None = None) -> dict[str, Any]:
    """Fills ``new_ex``'s parameters and ``new_opt``'s state from ``old_ex``/``old_opt``.
    Collective: every rank calls it, between steps (gradients are not moved). Transfers go
    in rounds of at most ``bucket_mb`` (default ``BUCKET_MB``) per pair of ranks and dtype.
    Returns {"moved_mb": MB sent between ranks, summed over all of them (the same on every
    rank), "seconds": this rank's wall time, "rounds": this rank's rounds of transfers}."""
    if bucket_mb is not None and (isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float))
                                  or not bucket_mb > 0):
        raise ValueError(f"bucket_mb: expected a positive number, got {bucket_mb!r}")
    t0 = time.perf_counter()
    world = new_ex.world
    # persistent buffers (running statistics) travel like parameters without optimizer state
    old_params = {**dict(old_ex.named_parameters()), **old_ex.named_buffers()}
    new_params = {**dict(new_ex.named_parameters()), **new_ex.named_buffers()}
    offer = {n: _layout(p, old_opt.state.get(p, {})) for n, p in old_params.items() if old_ex.owned(n)}
    need = {n: new_ex.updates(n) for n in new_params}
    if world > 1:
        box: list = [None] * world
        dist.all_gather_object(box, (offer, need))
        offers, needs = [b[0] for b in box], [b[1] for b in box]
    else:
        offers, needs = [offer], [need]
    transfers = _transfers(offers, needs)
    rank, device = new_ex.rank, new_ex.device

    def entry_tensor(name: str, key: str) -> torch.Tensor:
        p = old_params[name]
        return p.detach() if key == _PARAM else old_opt.state[p][key].detach()

    def entry_dtype(name: str, src: int, key: str) -> torch.dtype:
        shape, dtype, entries = offers[src][name]
        return dtype if key == _PARAM else entries[key][1]

    # --- what goes where: per peer and dtype, the entries in transfer order ----------------
    sends: dict[tuple[int, torch.dtype], list[tuple[str, str, int]]] = {}
    recvs: dict[tuple[int, torch.dtype], list[tuple[str, str, int]]] = {}
    moved = 0
    for name, src, dst, keys in transfers:
        shape = offers[src][name][0]
        numel = torch.Size(shape).numel()
        for key in keys:
            dtype = entry_dtype(name, src, key)
            if src != dst:
                moved += numel * dtype.itemsize
            if src == rank and dst != rank:
                sends.setdefault((dst, dtype), []).append((name, key, numel))
            elif dst == rank and src != rank:
                recvs.setdefault((src, dtype), []).append((name, key, numel))
    # --- rounds: each pair's entries in buckets of at most bucket_mb (an entry larger than
    # that alone); round r carries every pair's r-th bucket, so a rank holds at most one
    # bucket per pair and dtype beyond the two models. Both sides of a pair cut the same
    # sequence the same way, so their rounds match.
    limit = (BUCKET_MB if bucket_mb is None else bucket_mb) * 1e6
    send_rounds = {k: _buckets(parts, k[1].itemsize, limit) for k, parts in sends.items()}
    recv_rounds = {k: _buckets(parts, k[1].itemsize, limit) for k, parts in recvs.items()}
    n_rounds = max([len(b) for b in (*send_rounds.values(), *recv_rounds.values())], default=0)
    pending: dict[str, dict[str, torch.Tensor]] = {}  # optimizer state that arrived
    for r in range(n_rounds):
        ops, inbox = [], []
        for (peer, dtype), buckets in sorted(send_rounds.items(), key=_pair_order):
            if r < len(buckets):
                flat = torch.cat([entry_tensor(name, key).reshape(-1) for name, key, _ in buckets[r]])
                ops.append(dist.P2POp(dist.isend, flat.to(device), peer))
        for (peer, dtype), buckets in sorted(recv_rounds.items(), key=_pair_order):
            if r < len(buckets):
                buf = torch.empty(sum(n for _, _, n in buckets[r]), dtype=dtype, device=device)
                inbox.append((buf, buckets[r]))
                ops.append(dist.P2POp(dist.irecv, buf, peer))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        # values into the new parameters now, state aside, so the bucket can go
        for buf, parts in inbox:
            offset = 0
            for name, key, numel in parts:
                got, p = buf[offset:offset + numel], new_params[name]
                offset += numel
                if key == _PARAM:
                    with torch.no_grad():
                        p.copy_(got.view_as(p))
                else:
                    pending.setdefault(name, {})[key] = got.view_as(p).clone()
    # --- what stays on this rank, and the new optimizer's state ------------------------------
    for name, src, dst, keys in transfers:
        if dst != rank:
            continue
        p = new_params[name]
        if src == rank:
            with torch.no_grad():
                p.copy_(entry_tensor(name, _PARAM).view_as(p))
            got = {key: entry_tensor(name, key).view_as(p).clone() for key in keys if key != _PARAM}
        else:
            got = pending.get(name, {})
        entries = offers[src][name][2]
        if not entries or not new_ex.updates(name):  # no state yet (no step), or not its to keep
            continue
        state = {}
        for key, e in entries.items():
            if e[0] == "tensor":
                state[key] = got[key]
            elif torch.is_tensor(e[1]):
                state[key] = e[1].to(p.device) if e[2] else e[1].clone()
            else:
                state[key] = e[1]
        new_opt.state[p] = state
    return {"moved_mb": moved / 1e6, "seconds": time.perf_counter() - t0, "rounds": n_rounds}
