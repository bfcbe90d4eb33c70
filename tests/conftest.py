"""Shared test set-up.

Without a GPU, Triton kernels run in the interpreter on CPU tensors; TRITON_INTERPRET must be
set before triton (and so any kernel module) is imported, which is why it happens here, at the
top of the first file pytest loads.
"""

from __future__ import annotations

import os
import random

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> torch.device:
    """cuda when present, else cpu (where kernels run under the Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
