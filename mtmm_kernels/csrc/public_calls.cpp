#include "public_calls.hpp"

#include "checks.hpp"
#include "driver_api.hpp"
#include "group_sort_launch.hpp"
#include "grouped_mm_launch.hpp"

namespace mtmm {

namespace {

// An int32/int64 vector of `length` entries on `device`.
bool index_vector(const at::Tensor& t, int64_t length, const at::Device& device) {
  return t.dim() == 1 && (t.scalar_type() == at::kInt || t.scalar_type() == at::kLong) &&
         t.size(0) == length && t.device() == device;
}

// x [T, K] and w [G, K, N] of one fp16/bf16 dtype, bias none or [G, N] of it, T < 2**31, all
// on x's device, which is a CUDA one (or any in a dry run).
bool plain_operands(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  if (x.dim() != 2 || w.dim() != 3) return false;
  const auto dtype = x.scalar_type();
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || w.scalar_type() != dtype) return false;
  if (w.size(1) != x.size(1) || x.size(0) >= (int64_t(1) << 31)) return false;
  if (!(x.is_cuda() || dry_run()) || w.device() != x.device()) return false;
  if (bias.defined()) {
    if (bias.dim() != 2 || bias.size(0) != w.size(0) || bias.size(1) != w.size(2)) return false;
    if (bias.scalar_type() != dtype || bias.device() != x.device()) return false;
  }
  return true;
}

}  // namespace

std::optional<at::Tensor> grouped_mm_public(const at::Tensor& x, const at::Tensor& w,
                                            const at::Tensor& offsets,
                                            const std::optional<at::Tensor>& bias) {
  const at::Tensor b = bias.value_or(at::Tensor());
  if (!plain_operands(x, w, b)) return std::nullopt;
  // (strided offsets: the Python function makes them contiguous first)
  if (!index_vector(offsets, w.size(0), x.device()) || !offsets.is_contiguous()) {
    return std::nullopt;
  }
  auto call = plan_call(x, w, b, operand(offsets), Operand{}, /*autograd=*/true);
  if (!call) return std::nullopt;
  return run_call(*call, x, w, offsets, bias, std::nullopt);
}

std::optional<at::Tensor> grouped_mm_by_ids_public(const at::Tensor& x, const at::Tensor& w,
                                                   const at::Tensor& group_ids,
                                                   const std::optional<at::Tensor>& bias) {
  const at::Tensor b = bias.value_or(at::Tensor());
  if (!plain_operands(x, w, b)) return std::nullopt;
  if (!index_vector(group_ids, x.size(0), x.device())) return std::nullopt;
  const int64_t G = w.size(0);
  auto sort = sort_plans(x.device(), x.size(0), G, contiguous_ids_operand(group_ids));
  if (!sort) return std::nullopt;
  // The GEMM's plans for the sort's results, whose layout is known before they exist.
  const Operand index = sorted_index_operand();
  auto call = plan_call(x, w, b, index, index, /*autograd=*/true);
  if (!call) return std::nullopt;
  auto [perm, offsets] = launch_sort(*sort, contiguous_ids(group_ids), G);
  MTMM_ASSERT(address(perm) % 16 == 0 && address(offsets) % 16 == 0,
              "the group sort's outputs are not 16-byte aligned");
  return run_call(*call, x, w, offsets, bias, perm);
}

}  // namespace mtmm
