#include "grouped_mm_launch.hpp"

#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <memory>
#include <utility>

#include "checks.hpp"
#include "driver_api.hpp"

namespace mtmm {

namespace {

BackwardFallback g_fallback;
LaunchErrorHandler g_launch_error_handler;

// floor(log2(max(T / G, 1))): the tile-height bucket of grouped_gemm._m_bucket.
int64_t m_bucket(int64_t T, int64_t G) {
  int64_t q = T / (G > 1 ? G : 1);
  int64_t bucket = 0;
  while (q > 1) {
    q >>= 1;
    ++bucket;
  }
  return bucket;
}

// What every key starts with: the kernel, the device, and how Triton specialises the row count.
PlanKey key_head(KernelKind kind, const at::Device& device, int64_t T, int64_t K, int64_t N,
                 int64_t G) {
  return {static_cast<int64_t>(kind), static_cast<int64_t>(device.type()), device.index(),
          T == 1, T % 16 == 0, K, N, G, m_bucket(T, G)};
}

// Whether every defined tensor of `others` lives on x's device (callers of the raw ops may not
// have checked: a kernel must never get another device's addresses).
bool on_device_of(const at::Tensor& x, std::initializer_list<const at::Tensor*> others) {
  for (const at::Tensor* t : others) {
    if (t->defined() && t->device() != x.device()) return false;
  }
  return true;
}

at::Tensor launch_mm(const LaunchPlan& plan, const at::Tensor& x, const at::Tensor& w,
                     const at::Tensor& bias, const at::Tensor& offsets, const at::Tensor& perm) {
  const int64_t T = x.size(0), G = w.size(0), N = w.size(2);
  at::Tensor y = at::empty({T, N}, x.options());
  // Placeholders as in grouped_gemm._launch_grouped_mm: y for a missing bias (HAS_BIAS=False),
  // offsets for a missing permutation (GATHER=False); neither is read.
  const at::Tensor& bias_arg = bias.defined() ? bias : y;
  const at::Tensor& perm_arg = perm.defined() ? perm : offsets;
  run_plan(plan, {address(x), address(w), address(bias_arg), address(y), address(offsets),
                  address(perm_arg), static_cast<uint64_t>(T)},
           plan.grid(T, G, N), x.device());
  return y;
}

std::pair<at::Tensor, at::Tensor> launch_dw(const LaunchPlan& plan, const at::Tensor& x,
                                            const at::Tensor& dy, const at::Tensor& offsets,
                                            const at::Tensor& perm, bool need_bias) {
  const int64_t T = x.size(0), K = x.size(1), N = dy.size(1), G = offsets.size(0);
  at::Tensor dw = at::empty({G, K, N}, x.options());
  at::Tensor db = need_bias ? at::empty({G, N}, dy.options()) : at::empty({0}, dy.options());
  // As in grouped_gemm._launch_grouped_mm_dw: dw stands in for an unwanted dBias (never written).
  const at::Tensor& db_arg = need_bias ? db : dw;
  const at::Tensor& perm_arg = perm.defined() ? perm : offsets;
  run_plan(plan, {address(x), address(dy), address(offsets), address(perm_arg), address(dw),
                  address(db_arg), static_cast<uint64_t>(T)},
           plan.grid(T, G, N), x.device());
  return {dw, db};
}

Operand transposed_12(const Operand& w) {
  Operand t = w;
  std::swap(t.stride[1], t.stride[2]);
  return t;
}

// A gradient as autograd usually hands it over: a fresh contiguous [T, N] tensor.
Operand fresh_rows(int64_t N, at::ScalarType dtype) { return fresh_operand(dtype, {N, 1}); }

}  // namespace

PlanKey mm_key(const at::Device& device, int64_t T, int64_t K, int64_t N, int64_t G,
               const Operand& x, const Operand& w, const Operand& bias, const Operand& offsets,
               const Operand& perm) {
  PlanKey key = key_head(KernelKind::kMm, device, T, K, N, G);
  key.reserve(key.size() + 30);
  for (const Operand* t : {&x, &w, &bias, &offsets, &perm}) append(key, *t);
  return key;
}

PlanKey dw_key(const at::Device& device, int64_t T, int64_t K, int64_t N, int64_t G,
               const Operand& x, const Operand& dy, const Operand& offsets, const Operand& perm,
               bool need_bias) {
  PlanKey key = key_head(KernelKind::kDw, device, T, K, N, G);
  key.reserve(key.size() + 25);
  for (const Operand* t : {&x, &dy, &offsets, &perm}) append(key, *t);
  key.push_back(need_bias);
  return key;
}

std::optional<std::tuple<at::Tensor, at::Tensor>> grouped_mm_dw(
    const at::Tensor& x, const at::Tensor& dy, const at::Tensor& offsets,
    const std::optional<at::Tensor>& perm_opt, bool need_bias) {
  const int64_t T = x.size(0), K = x.size(1), N = dy.size(1), G = offsets.size(0);
  if (T <= 0 || K <= 0 || N <= 0 || G <= 0) return std::nullopt;
  const at::Tensor perm = perm_opt.value_or(at::Tensor());
  if (!on_device_of(x, {&dy, &offsets, &perm})) return std::nullopt;
  auto plan = plan_table().get(dw_key(x.device(), T, K, N, G, operand(x), operand(dy),
                                      operand(offsets), operand(perm), need_bias));
  if (!plan) return std::nullopt;
  c10::OptionalDeviceGuard guard(x.device());
  auto [dw, db] = launch_dw(*plan, x, dy, offsets, perm, need_bias);
  return std::make_tuple(dw, db);
}

void set_backward_fallback(BackwardFallback fallback) { g_fallback = std::move(fallback); }

void set_launch_error_handler(LaunchErrorHandler handler) {
  g_launch_error_handler = std::move(handler);
}

namespace {

struct BackwardPlans {
  std::shared_ptr<const LaunchPlan> dx, dw;  // null where that gradient is not needed
};

// The backward's plans for a gradient laid out as `dy`, or nothing if a needed one is missing.
std::optional<BackwardPlans> backward_plans(const at::Tensor& x, const at::Tensor& w,
                                            const Operand& offsets, const Operand& perm,
                                            const Operand& dy, bool need_x, bool need_w,
                                            bool need_b) {
  const int64_t T = x.size(0), K = x.size(1), G = w.size(0), N = w.size(2);
  BackwardPlans plans;
  if (need_x) {  // dX = dy @ w^T: the forward kernel with K and N exchanged
    plans.dx = plan_table().get(mm_key(x.device(), T, N, K, G, dy, transposed_12(operand(w)),
                                       Operand{}, offsets, perm));
    if (!plans.dx) return std::nullopt;
  }
  if (need_w || need_b) {
    plans.dw = plan_table().get(dw_key(x.device(), T, K, N, G, operand(x), dy, offsets, perm,
                                       need_b));
    if (!plans.dw) return std::nullopt;
  }
  return plans;
}

bool is_fresh_rows(const at::Tensor& t) {
  return t.is_contiguous() && address(t) % 16 == 0;
}

class GroupedMmFunction : public torch::autograd::Function<GroupedMmFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w, const at::Tensor& offsets,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& perm,
                            std::shared_ptr<const LaunchPlan> plan) {
    // An absent bias is no autograd input: gradient slots count x, w, offsets (and bias).
    ctx->save_for_backward({x, w, offsets, perm.value_or(at::Tensor())});
    ctx->saved_data["has_bias"] = bias.has_value();
    c10::OptionalDeviceGuard guard(x.device());
    return launch_mm(*plan, x, w, bias.value_or(at::Tensor()), offsets,
                     perm.value_or(at::Tensor()));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &offsets = saved[2], &perm = saved[3];
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = ctx->needs_input_grad(1);
    const bool need_b = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3);
    at::Tensor dy = grads[0];
    if (c10::GradMode::is_enabled()) {
      // create_graph=True: these launches would record no graph (a second derivative would
      // silently be zero); the Python backward computes the gradients by differentiable calls.
      MTMM_CHECK(g_fallback, "mtmm.grouped_mm: create_graph=True needs the Python backward");
      auto [dx, dw, db] = g_fallback(x, w, offsets, perm, dy, need_x, need_w, need_b);
      return {dx, dw, at::Tensor(), db, at::Tensor(), at::Tensor()};
    }
    auto plans = backward_plans(x, w, operand(offsets), operand(perm), operand(dy), need_x,
                                need_w, need_b);
    if (!plans && !is_fresh_rows(dy)) {  // e.g. the expanded ones of y.sum(): planned layout
      dy = dy.clone(at::MemoryFormat::Contiguous);
      plans = backward_plans(x, w, operand(offsets), operand(perm), operand(dy), need_x, need_w,
                             need_b);
    }
    at::Tensor dx, dw, db;
    bool launched = false;
    if (plans) {
      try {
        c10::OptionalDeviceGuard guard(x.device());
        if (plans->dx) {
          dx = launch_mm(*plans->dx, dy, w.transpose(1, 2), at::Tensor(), offsets, perm);
        }
        if (plans->dw) {
          auto [dw_all, db_all] = launch_dw(*plans->dw, x, dy, offsets, perm, need_b);
          if (need_w) dw = dw_all;
          if (need_b) db = db_all;
        }
        launched = true;
      } catch (const DriverError& error) {
        // A launch the driver refused ran nothing: the Python path computes these gradients,
        // and the handler turns the C++ path off for later calls (as a refused forward does).
        if (g_launch_error_handler) g_launch_error_handler(error.what());
      }
    }
    if (!launched) {
      MTMM_CHECK(g_fallback, "mtmm.grouped_mm: no backward plan and no fallback");
      std::tie(dx, dw, db) = g_fallback(x, w, offsets, perm, dy, need_x, need_w, need_b);
    }
    return {dx, dw, at::Tensor(), db, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::optional<PlannedCall> plan_call(const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& bias, const Operand& offsets,
                                     const Operand& perm, bool autograd) {
  const int64_t T = x.size(0), K = x.size(1), G = w.size(0), N = w.size(2);
  if (T <= 0 || K <= 0 || N <= 0 || G <= 0) return std::nullopt;
  PlannedCall call;
  call.plan = plan_table().get(mm_key(x.device(), T, K, N, G, operand(x), operand(w),
                                      operand(bias), offsets, perm));
  if (!call.plan) return std::nullopt;
  const bool bias_grad = bias.defined() && bias.requires_grad();
  call.trains = autograd && c10::GradMode::is_enabled() &&
                (x.requires_grad() || w.requires_grad() || bias_grad);
  // Train only where the backward for the usual gradient (fresh, contiguous) is planned too.
  if (call.trains &&
      !backward_plans(x, w, offsets, perm, fresh_rows(N, x.scalar_type()),
                      x.requires_grad(), w.requires_grad(), bias_grad)) {
    return std::nullopt;
  }
  return call;
}

at::Tensor run_call(const PlannedCall& call, const at::Tensor& x, const at::Tensor& w,
                    const at::Tensor& offsets, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& perm) {
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_perm = perm.has_value() && perm->defined();
  if (!call.trains) {
    c10::OptionalDeviceGuard guard(x.device());
    return launch_mm(*call.plan, x, w, has_bias ? *bias : at::Tensor(), offsets,
                     has_perm ? *perm : at::Tensor());
  }
  return GroupedMmFunction::apply(x, w, offsets, has_bias ? bias : std::optional<at::Tensor>(),
                                  has_perm ? perm : std::optional<at::Tensor>(), call.plan);
}

std::optional<at::Tensor> grouped_mm(const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& offsets,
                                     const std::optional<at::Tensor>& bias_opt,
                                     const std::optional<at::Tensor>& perm_opt,
                                     bool autograd) {
  const at::Tensor bias = bias_opt.value_or(at::Tensor());
  const at::Tensor perm = perm_opt.value_or(at::Tensor());
  if (!on_device_of(x, {&w, &offsets, &bias, &perm})) return std::nullopt;
  auto call = plan_call(x, w, bias, operand(offsets), operand(perm), autograd);
  if (!call) return std::nullopt;
  return run_call(*call, x, w, offsets, bias_opt, perm_opt);
}

}  // namespace mtmm
