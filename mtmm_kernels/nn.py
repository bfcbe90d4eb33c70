"""Modules built on the mtmm ops."""

from __future__ import annotations

import math

import torch
from torch import nn

from .grouped_gemm import grouped_mm, grouped_mm_by_ids

__all__ = ["GroupedLinear"]


class GroupedLinear(nn.Module):
    """G independent linear layers (one per task, modality or expert) applied in one launch.

    ``weight`` is [G, in_features, out_features] (x @ W layout, so a group's slice is the
    transpose of an ``nn.Linear`` weight) and ``bias`` is [G, out_features]; each group is
    initialised like ``nn.Linear(in_features, out_features)``: U(-1/sqrt(in), 1/sqrt(in)).
    Inside ``torch.autocast`` it computes in the region's dtype, as ``nn.Linear`` does.

    Args:
        num_groups: G >= 0.
        in_features: K >= 0.
        out_features: N >= 0.
        bias: whether to learn a per-group additive bias.
        dtype, device: of the parameters.
    """

    def __init__(self, num_groups: int, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        for name, value in (("num_groups", num_groups), ("in_features", in_features),
                            ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.num_groups, self.in_features, self.out_features = num_groups, in_features, out_features
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty((num_groups, in_features, out_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty((num_groups, out_features), **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's kaiming_uniform_(a=sqrt(5)) and its bias rule both reduce to
        # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), with fan_in = in_features for every group.
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor | None = None,
                group_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: [..., in_features], like ``nn.Linear``'s input (rows: its leading dims, flattened
        in order). Exactly one of ``offsets`` ([G] int, cumulative END rows of rows sorted by
        group, over the flattened rows; see ``grouped_mm``) or ``group_ids`` (int in [0, G) of
        x's leading shape, e.g. [B, S] for a per-token task or modality; rows in any order; see
        ``grouped_mm_by_ids``). Returns [..., out_features]."""
        if (offsets is None) == (group_ids is None):
            raise ValueError("GroupedLinear.forward needs exactly one of offsets or group_ids")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., in_features={self.in_features}], "
                             f"got {tuple(x.shape)}")
        lead = x.shape[:-1]
        if isinstance(group_ids, torch.Tensor) and group_ids.shape != lead:
            raise ValueError(f"group_ids must have x's leading shape {tuple(lead)}, "
                             f"got {tuple(group_ids.shape)}")
        if x.dim() == 2:  # rows already: no reshapes on the host path
            if offsets is not None:
                return grouped_mm(x, self.weight, offsets, self.bias)
            return grouped_mm_by_ids(x, self.weight, group_ids, self.bias)
        x_TK = x.reshape(math.prod(lead), self.in_features)  # -1 is ambiguous where K = 0
        if offsets is not None:
            y_TN = grouped_mm(x_TK, self.weight, offsets, self.bias)
        else:
            ids_T = group_ids.reshape(-1) if isinstance(group_ids, torch.Tensor) else group_ids
            y_TN = grouped_mm_by_ids(x_TK, self.weight, ids_T, self.bias)
        return y_TN.reshape(*lead, self.out_features)

    @classmethod
    def from_linears(cls, linears) -> "GroupedLinear":
        """One GroupedLinear whose group g computes what ``linears[g]`` does: a copy of G
        ``nn.Linear`` layers' parameters (per-task heads, say), which must share in and out
        features, dtype and device, and all have a bias or none."""
        linears = list(linears)
        if not linears:
            raise ValueError("linears must hold at least one nn.Linear (G = 0 has no shape "
                             "to take); build GroupedLinear(0, in, out) directly")
        for g, lin in enumerate(linears):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"linears[{g}] must be an nn.Linear, got {type(lin).__name__}")
        first = linears[0]
        has_bias = first.bias is not None
        for g, lin in enumerate(linears[1:], 1):
            if (lin.in_features, lin.out_features) != (first.in_features, first.out_features):
                raise ValueError(f"linears[{g}] is {lin.in_features} -> {lin.out_features}, "
                                 f"linears[0] is {first.in_features} -> {first.out_features}")
            if (lin.bias is not None) != has_bias:
                raise ValueError(f"linears[{g}] {'has' if lin.bias is not None else 'has no'} "
                                 f"bias, linears[0] {'has' if has_bias else 'has no'} bias")
            if lin.weight.dtype != first.weight.dtype or lin.weight.device != first.weight.device:
                raise ValueError(f"linears[{g}] is {lin.weight.dtype} on {lin.weight.device}, "
                                 f"linears[0] is {first.weight.dtype} on {first.weight.device}")
        module = cls(len(linears), first.in_features, first.out_features, bias=has_bias,
                     dtype=first.weight.dtype, device=first.weight.device)
        with torch.no_grad():
            # nn.Linear keeps [out, in] for x @ W.T; a group's slice is [in, out] for x @ W
            module.weight.copy_(torch.stack([lin.weight.t() for lin in linears]))
            if has_bias:
                module.bias.copy_(torch.stack([lin.bias for lin in linears]))
        return module

    def to_linears(self) -> nn.ModuleList:
        """G ``nn.Linear`` layers holding copies of the groups' parameters (the inverse of
        ``from_linears``)."""
        factory = {"dtype": self.weight.dtype, "device": self.weight.device}
        linears = nn.ModuleList(
            nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, **factory)
            for _ in range(self.num_groups))
        with torch.no_grad():
            for g, lin in enumerate(linears):
                lin.weight.copy_(self.weight[g].t())
                if self.bias is not None:
                    lin.bias.copy_(self.bias[g])
        return linears

    def extra_repr(self) -> str:
        return (f"num_groups={self.num_groups}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")
