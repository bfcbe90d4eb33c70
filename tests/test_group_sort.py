"""sort_by_group (the counting sort behind grouped_mm_by_ids) against torch.sort."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mtmm_kernels.group_sort import MAX_GROUPS, sort_by_group  # noqa: E402


def expected(ids: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order with ids outside [0, G) last (as one pseudo-group), and END offsets."""
    key = torch.where((ids >= 0) & (ids < G), ids, G).long()
    perm = torch.sort(key, stable=True).indices
    ends = torch.stack([(key <= g).sum() for g in range(G)]) if G else key.new_zeros(0)
    return perm, ends.to(torch.int32)


@pytest.mark.parametrize("T, G", [(0, 3), (1, 1), (17, 3), (1000, 32), (3001, 7),
                                  (700, MAX_GROUPS), (300, MAX_GROUPS + 1)])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_sort_by_group_is_a_stable_sort(device, T, G, ids_dtype):
    ids = torch.randint(0, G, (T,), dtype=ids_dtype)
    if T > 10:
        ids[T // 2:T // 2 + 5] = 0  # runs of equal ids: order within a group must stay
    perm, offsets = sort_by_group(ids.to(device), G)
    want_perm, want_offsets = expected(ids, G)
    assert offsets.dtype == torch.int32 and offsets.shape == (G,)
    assert torch.equal(perm.cpu().long(), want_perm)
    assert torch.equal(offsets.cpu(), want_offsets)


def test_ids_outside_the_groups_go_last_in_order(device):
    G = 5
    ids = torch.tensor([3, -1, 2**40, 0, 5, 4, -2**40, 3, 2**31 + 1, 1], dtype=torch.int64)
    perm, offsets = sort_by_group(ids.to(device), G)
    want_perm, want_offsets = expected(ids, G)
    assert torch.equal(perm.cpu().long(), want_perm)
    assert torch.equal(offsets.cpu(), want_offsets)
    assert int(offsets[-1]) == 5  # five valid ids; the other five rows lie past the end


def test_strided_ids(device):
    ids = torch.randint(0, 4, (200,))[::2]
    perm, offsets = sort_by_group(ids.to(device), 4)
    want_perm, want_offsets = expected(ids, 4)
    assert torch.equal(perm.cpu().long(), want_perm)
    assert torch.equal(offsets.cpu(), want_offsets)
