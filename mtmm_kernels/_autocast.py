"""What ``torch.autocast`` does to mtmm's ops, following what it does to torch's own: the grouped
GEMM is cast like ``nn.Linear`` (to the region's lower-precision dtype), the multi-modal pack
promotes like ``torch.cat`` (mixed floating dtypes meet in the widest). Autocast itself only
knows ops on its lists; mtmm's eager paths never reach its dispatch key."""

from __future__ import annotations

import functools
from typing import Optional

import torch

__all__ = ["any_enabled", "region_dtype", "cast_like_linear", "promote_like_cat"]

# One C call, False outside every autocast region (the common case costs ~0.1 us).
any_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def region_dtype(device_type: str) -> Optional[torch.dtype]:
    """The lower-precision dtype of the autocast region enabled for this device type, or None
    (no region, or a device type autocast does not know, such as meta)."""
    if not any_enabled() or not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _eligible(t, device_type: str) -> bool:
    """What autocast casts: floating-point tensors on its device, float64 excepted."""
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type)


def cast_like_linear(x, *others):
    """x and the others (None allowed) as autocast would hand them to ``nn.Linear``: inside a
    region on x's device, the eligible ones in its dtype; otherwise unchanged. Gradients reach
    the originals through the casts."""
    tensors = (x, *others)
    if not isinstance(x, torch.Tensor):
        return tensors
    dtype = region_dtype(x.device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if _eligible(t, x.device.type) else t for t in tensors)


def promote_like_cat(tensors: list) -> list:
    """Tensors of mixed floating dtypes, inside a region on the first one's device, in the widest
    of their dtypes (autocast's rule for ``torch.cat``: its layers' outputs next to fp32
    embeddings are one batch); otherwise unchanged, mixed dtypes stay the caller's error."""
    dtypes = {t.dtype for t in tensors if isinstance(t, torch.Tensor)}
    if len(dtypes) < 2 or not isinstance(tensors[0], torch.Tensor):
        return tensors
    device_type = tensors[0].device.type
    if region_dtype(device_type) is None:
        return tensors
    floating = [t.dtype for t in tensors if _eligible(t, device_type)]
    if len(floating) < 2:
        return tensors
    wide = functools.reduce(torch.promote_types, floating)
    return [t.to(wide) if _eligible(t, device_type) else t for t in tensors]
