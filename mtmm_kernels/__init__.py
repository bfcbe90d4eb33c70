"""mtmm kernels: variable-length multi-modal packing and grouped per-task GEMMs (Triton)."""
