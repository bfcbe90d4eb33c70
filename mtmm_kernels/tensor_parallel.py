"""Tensor parallelism for the grouped GEMM and the variable-length packing: DTensor sharding
strategies for the ``mtmm`` ops, and ``GroupedColwiseParallel`` / ``GroupedRowwiseParallel``
for ``parallelize_module``.

A ``GroupedLinear`` is G linears side by side, so it splits like one (Megatron-style): column
parallel shards every group's output features (weight [G, in, out] on dim 2, bias on dim 1;
x replicated, y sharded on its last dim), row parallel its input features (weight on dim 1;
x sharded on its last dim, y a partial sum that the output hook all-reduces). Rows are never
split: ``offsets`` and ``group_ids`` index the rows of the whole batch, so they are
replicated on every rank (the public functions replicate plain index tensors themselves).
Packing and unpacking copy rows: a shard of H stays one, and so does a partial sum.

Importing this module registers the strategies; the public functions import it on their
first DTensor operand, so ``torch.distributed.tensor`` (about 0.8 s to import) is loaded only
by programs that use it. Usage::

    from torch.distributed.tensor.parallel import parallelize_module
    from mtmm_kernels.tensor_parallel import GroupedColwiseParallel, GroupedRowwiseParallel

    parallelize_module(mlp, tp_mesh, {"up": GroupedColwiseParallel(),
                                      "down": GroupedRowwiseParallel()})
    y = mlp(x, offsets=offsets_G)  # x and offsets the same on every rank of tp_mesh
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import (DeviceMesh, DTensor, Partial, Replicate, Shard,
                                      distribute_module, distribute_tensor)
from torch.distributed.tensor._op_schema import OpSchema, OpStrategy, RuntimeSchemaInfo
from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from . import group_sort, grouped_gemm, varlen  # noqa: F401  (the ops must exist to be registered)
from .nn import GroupedLinear

__all__ = ["GroupedColwiseParallel", "GroupedRowwiseParallel", "replicated"]

R, P = Replicate(), Partial()


# --- sharding strategies --------------------------------------------------------------------
# Each strategy is (output placements, input placements) on one mesh dimension; DTensor
# expands them over every dimension of the mesh and picks the cheapest redistribution. A
# None placement stands for an argument that is not a tensor (or an optional one not given).


def _opt(t, placement):
    return None if t is None else placement


@register_sharding(torch.ops.mtmm.grouped_mm.default)
def _grouped_mm_strategies(x, w, offsets, bias, perm):
    """y[T, N] = x[T, K] @ w[g] (+ bias[g]) over row groups: linear in (x, w) for a fixed
    bias, so a shard of K gives a partial sum (the bias rides as a partial too: its shares add
    up to it once), a shard of N a shard of y."""
    p = _opt(perm, R)
    return [
        ([R], [R, R, R, _opt(bias, R), p]),
        ([Shard(1)], [R, Shard(2), R, _opt(bias, Shard(1)), p]),  # column parallel
        ([P], [Shard(1), Shard(1), R, _opt(bias, P), p]),  # row parallel
        ([P], [P, R, R, _opt(bias, P), p]),  # a partial x (a row-parallel backward's dy)
        ([P], [R, P, R, _opt(bias, P), p]),
    ]


@register_sharding(torch.ops.mtmm.grouped_mm_dw.default)
def _grouped_mm_dw_strategies(x, dy, offsets, perm, need_bias):
    """dw[g] = x_g^T dy_g ([G, K, N]) and db[g] = the sum of dy_g's rows ([G, N], or [0]
    where need_bias is false): a shard of K gives a shard of dw, a shard of N shards of both."""
    p = _opt(perm, R)

    def db(placement):  # without a bias, db is an empty [0]: nothing to shard
        return placement if need_bias else R

    return [
        ([R, R], [R, R, R, p, None]),
        ([Shard(2), db(Shard(1))], [R, Shard(1), R, p, None]),  # column parallel's dW
        ([Shard(1), R], [Shard(1), R, R, p, None]),  # row parallel's dW
        ([P, R], [P, R, R, p, None]),
        ([P, db(P)], [R, P, R, p, None]),
    ]


@register_sharding(torch.ops.mtmm.sort_by_group.default)
def _sort_by_group_strategies(ids, num_groups):
    """The order of all rows: ids replicated (a shard of rows would sort only its own)."""
    return [([R, R], [R, None])]


@register_sharding(torch.ops.mtmm.varlen_pack.default)
def _varlen_pack_strategies(streams, lens_SB, cu_seqlens, order, total):
    """values [T, H] gathers rows of the streams [B, L_s, H]: a copy, so a shard of H gives a
    shard of H and partial streams a partial sum; the token metadata depends on the plan
    alone (replicated). Rows are never split: the plan indexes the whole batch."""
    index = [_opt(lens_SB, R), R, _opt(order, R), None]
    return [
        ([R, R, R, R], [R] * len(streams) + index),
        ([Shard(1), R, R, R], [Shard(2)] * len(streams) + index),
        ([P, R, R, R], [P] * len(streams) + index),
    ]


def _varlen_unpack_strategy(op_schema: OpSchema) -> OpStrategy:
    """The adjoint of varlen_pack (padding rows are zeros, which shards and partial sums keep).
    Written against the strategy API itself: register_sharding gives an op one output spec per
    return, and this op returns one list of S tensors, which DTensor wraps spec by spec."""
    values, lens_SB, cu_seqlens, order, max_lens = op_schema.args_schema
    S, index = len(max_lens), [_opt(lens_SB, R), R, _opt(order, R)]
    strategy = expand_to_full_mesh_op_strategy(
        op_schema.get_mesh_from_args(), op_schema,
        [[R] * S + [R] + index, [Shard(2)] * S + [Shard(1)] + index, [P] * S + [P] + index],
        input_index=S)
    if S == 1:  # a single output spec is not a list of one
        for spec in strategy.strategies:
            spec.output_specs = (spec.output_specs,)
    return strategy


# Keyed on max_lens (a list of ints, from argument 4 on): the output shapes depend on it.
DTensor._op_dispatcher.sharding_propagator.register_op_strategy(
    torch.ops.mtmm.varlen_unpack.default, _varlen_unpack_strategy,
    RuntimeSchemaInfo(static_argnum=4, needs_pytree=True))


# register_sharding hashes only the arguments from the first int one on into its cache key;
# need_bias is a bool, and a cached [G, N] dBias for a call without bias would be wrong.
DTensor._op_dispatcher.sharding_propagator.op_to_schema_info[
    torch.ops.mtmm.grouped_mm_dw.default] = RuntimeSchemaInfo(static_argnum=4, needs_pytree=True)


def replicated(index: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """``index`` (offsets, group ids: the same on every rank) as a DTensor replicated on
    ``mesh``, for an op whose other operands are DTensors on it; a DTensor unchanged."""
    if isinstance(index, DTensor):
        return index
    return DTensor.from_local(index, mesh, [R] * mesh.ndim, run_check=False)


# --- parallel styles ------------------------------------------------------------------------


def _distribute(module: nn.Module, mesh: DeviceMesh, placements: dict, src_data_rank) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        dist = distribute_tensor(
            param, mesh, [placements[name]], src_data_rank=src_data_rank)
        module.register_parameter(name, nn.Parameter(dist, requires_grad=param.requires_grad))


def _keep_other_args(prepare_input):
    """torch's input hooks return x alone, which drops ``offsets`` or ``group_ids`` passed by
    position: the other arguments are kept."""
    def hook(mod, inputs, mesh):
        return (prepare_input(mod, inputs, mesh), *inputs[1:])
    return hook


def _apply_grouped(style, module: nn.Module, mesh: DeviceMesh, placements: dict) -> nn.Module:
    return distribute_module(
        module, mesh,
        lambda name, mod, mesh_: _distribute(mod, mesh_, placements, style.src_data_rank),
        _keep_other_args(partial(style._prepare_input_fn, style.input_layouts,
                                 style.desired_input_layouts)),
        partial(style._prepare_output_fn, style.output_layouts, style.use_local_output))


class GroupedColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` that also takes a ``GroupedLinear``: every group's output features
    are sharded (weight [G, in, out] as Shard(2), bias [G, out] as Shard(1)); x is
    replicated, y sharded on its last dim (by default turned back into a local tensor).
    ``nn.Linear`` and ``nn.Embedding`` are handled as by ``ColwiseParallel``."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if isinstance(module, GroupedLinear):
            return _apply_grouped(self, module, device_mesh,
                                  {"weight": Shard(2), "bias": Shard(1)})
        return super()._apply(module, device_mesh)


class GroupedRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` that also takes a ``GroupedLinear``: every group's input features
    are sharded (weight [G, in, out] as Shard(1), bias replicated); x comes sharded on its
    last dim, y is all-reduced (by default; ``output_layouts=Shard(...)`` reduce-scatters)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if isinstance(module, GroupedLinear):
            self.desired_input_layouts = (Shard(-1),)
            return _apply_grouped(self, module, device_mesh,
                                  {"weight": Shard(1), "bias": R})
        return super()._apply(module, device_mesh)
