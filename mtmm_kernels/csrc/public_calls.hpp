// The public functions' plain calls, checked and launched in one C++ call: grouped_mm and
// grouped_mm_by_ids on fp16/bf16 CUDA tensors whose plans are in the table. Anything else,
// valid or not, returns nothing and nothing is launched: the Python function then checks the
// arguments (naming the bad one) and takes its own path. No Python here.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace mtmm {

// grouped_mm(x, w, offsets, bias) where x [T, K] and w [G, K, N] share an fp16/bf16 dtype,
// offsets [G] is a contiguous int32/int64 vector, bias is none or [G, N] of x's dtype, and
// all are on x's device, a CUDA one (or any in a dry run). Offsets' values are not read (as
// the Python function does not read a GPU tensor's).
std::optional<at::Tensor> grouped_mm_public(const at::Tensor& x, const at::Tensor& w,
                                            const at::Tensor& offsets,
                                            const std::optional<at::Tensor>& bias);

// grouped_mm_by_ids(x, w, group_ids, bias) with group_ids [T] int32/int64 on x's device: the
// group sort and the GEMM, both planned (decided before either is launched).
std::optional<at::Tensor> grouped_mm_by_ids_public(const at::Tensor& x, const at::Tensor& w,
                                                   const at::Tensor& group_ids,
                                                   const std::optional<at::Tensor>& bias);

}  // namespace mtmm
