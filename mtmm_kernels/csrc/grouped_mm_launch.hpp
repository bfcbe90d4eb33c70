// The grouped GEMM's forward and backward launched from C++: the same compiled Triton kernels
// as mtmm_kernels/grouped_gemm.py, with their launch plans looked up here, so that a call
// spends no Python between the public function and the GPU, and autograd calls a C++
// backward. A call whose plans are not in the table returns nothing: the Python path runs
// it (and fills the table). No Python here; bindings.cpp is the only file that knows it.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <tuple>

#include "launch_table.hpp"
#include "plan_launch.hpp"

namespace mtmm {

// Plan keys, computed alike when Python registers a plan and when a call looks it up.
// kMm: the forward/dX kernel, x [T, K] @ w [G, K, N] (+ bias [G, N]) with offsets [G] and,
// for rows in any order, the permutation perm [T] that sorts them by group.
PlanKey mm_key(const at::Device& device, int64_t T, int64_t K, int64_t N, int64_t G,
               const Operand& x, const Operand& w, const Operand& bias, const Operand& offsets,
               const Operand& perm);
// kDw: the dW/dBias kernel, x [T, K] and dy [T, N] with offsets [G] (and perm [T]).
PlanKey dw_key(const at::Device& device, int64_t T, int64_t K, int64_t N, int64_t G,
               const Operand& x, const Operand& dy, const Operand& offsets, const Operand& perm,
               bool need_bias);

// y = grouped_mm(x, w, offsets, bias), or with perm the same for rows in any order (rows
// gathered and scattered through perm); nothing when a plan it needs is not in the table
// (then nothing was launched). Needs T, K, N and G all positive. With `autograd`, inputs that
// need gradients get the C++ autograd node; without, it only launches (for callers that run
// their own autograd, such as the custom op's registered one).
std::optional<at::Tensor> grouped_mm(const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& offsets,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& perm, bool autograd);

// The plans a call of grouped_mm takes, decided before anything is launched: the forward's,
// and whether it trains (autograd on, an input that needs gradients), in which case the
// backward's plans for a fresh contiguous gradient exist too. Nothing where a plan is missing.
// offsets and perm are given as key operands, so that a caller can decide for tensors it has
// yet to make (grouped_mm_by_ids, before its group sort).
struct PlannedCall {
  std::shared_ptr<const LaunchPlan> plan;
  bool trains = false;
};
std::optional<PlannedCall> plan_call(const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& bias, const Operand& offsets,
                                     const Operand& perm, bool autograd);
// Launches a planned call (with the C++ autograd node where it trains).
at::Tensor run_call(const PlannedCall& call, const at::Tensor& x, const at::Tensor& w,
                    const at::Tensor& offsets, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& perm);

// (dW, dBias) = grouped_mm's weight and bias gradients for x [T, K] and dy [T, N] (dBias
// [G, N] with need_bias, else empty), or nothing when the plan is not in the table. Needs T,
// K, N and G all positive. For callers that run their own autograd (torch.compile's).
std::optional<std::tuple<at::Tensor, at::Tensor>> grouped_mm_dw(
    const at::Tensor& x, const at::Tensor& dy, const at::Tensor& offsets,
    const std::optional<at::Tensor>& perm, bool need_bias);

// What the backward calls when a plan is missing (a gradient with an unplanned layout) or
// under create_graph=True (differentiable gradients):
// (x, w, offsets, perm (undefined: none), dy, need_x, need_w, need_bias) -> (dx, dw, dbias),
// undefined where not needed. Set by the bindings to the Python path.
using BackwardFallback = std::function<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, bool, bool, bool)>;
void set_backward_fallback(BackwardFallback fallback);

// Told the message of a launch error in the backward (which then calls the fallback). Set by
// the bindings to turn the Python side's use of this path off.
using LaunchErrorHandler = std::function<void(const std::string&)>;
void set_launch_error_handler(LaunchErrorHandler handler);

}  // namespace mtmm
