"""mtmm kernels: variable-length multi-modal packing and grouped per-task GEMMs (Triton)."""
from .grouped_gemm import grouped_mm, grouped_mm_by_ids  # noqa: E402,F401
from .nn import GroupedLinear  # noqa: E402,F401
from .varlen import (PackedBatch, pack, pack_multimodal, pack_padded, unpack,  # noqa: E402,F401
                     unpack_multimodal)
