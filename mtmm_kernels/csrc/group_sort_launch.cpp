#include "group_sort_launch.hpp"

#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>

#include "checks.hpp"

namespace mtmm {

namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_power_of_2(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

PlanKey sort_key_head(KernelKind kind, const at::Device& device, int64_t T, int64_t G,
                      const Operand& ids) {
  PlanKey key{static_cast<int64_t>(kind), static_cast<int64_t>(device.type()), device.index(),
              T == 1, T % 16 == 0, G};
  append(key, ids);
  return key;
}

}  // namespace

SortSplit sort_split(const LaunchPlan::RowSplit& rule, int64_t T) {
  SortSplit split;
  split.rows_per_program = cdiv(cdiv(T, rule.max_programs), rule.row_step) * rule.row_step;
  split.programs = cdiv(T, split.rows_per_program);
  split.block_p = std::max<int64_t>(16, std::min(next_power_of_2(split.programs),
                                                 rule.block_p_cap));
  return split;
}

PlanKey sort_counts_key(const at::Device& device, int64_t T, int64_t G, const Operand& ids) {
  return sort_key_head(KernelKind::kSortCounts, device, T, G, ids);
}

PlanKey sort_scatter_key(const at::Device& device, int64_t T, int64_t G, const Operand& ids,
                         const SortSplit& split) {
  PlanKey key = sort_key_head(KernelKind::kSortScatter, device, T, G, ids);
  // Triton specialises rows_per_program (a multiple of row_step, itself one of 16) and the
  // program count on == 1 and % 16; BLOCK_P is a constexpr of the compiled kernel.
  key.insert(key.end(), {split.rows_per_program % 16 == 0, split.programs == 1,
                         split.programs % 16 == 0, split.block_p});
  return key;
}

std::optional<SortPlans> sort_plans(const at::Device& device, int64_t T, int64_t G,
                                    const Operand& ids) {
  if (T <= 0 || T >= (int64_t(1) << 31) || G <= 0) return std::nullopt;
  SortPlans plans;
  plans.counts = plan_table().get(sort_counts_key(device, T, G, ids));
  if (!plans.counts) return std::nullopt;
  plans.split = sort_split(plans.counts->split, T);
  plans.scatter = plan_table().get(sort_scatter_key(device, T, G, ids, plans.split));
  if (!plans.scatter) return std::nullopt;
  return plans;
}

Operand contiguous_ids_operand(const at::Tensor& ids) {
  return ids.is_contiguous() ? operand(ids) : fresh_operand(ids.scalar_type(), {1});
}

at::Tensor contiguous_ids(const at::Tensor& ids) {
  at::Tensor out = ids.contiguous();
  MTMM_ASSERT(out.is_same(ids) || address(out) % 16 == 0,
              "a contiguous copy of the ids is not 16-byte aligned");
  return out;
}

std::tuple<at::Tensor, at::Tensor> launch_sort(const SortPlans& plans, const at::Tensor& ids,
                                               int64_t G) {
  const int64_t T = ids.size(0);
  c10::OptionalDeviceGuard guard(ids.device());
  const auto int32 = ids.options().dtype(at::kInt);
  at::Tensor perm = at::empty({T}, int32);
  at::Tensor offsets = at::empty({G}, int32);
  at::Tensor counts = at::empty({plans.split.programs, plans.counts->split.block_g}, int32);
  const uint64_t t = static_cast<uint64_t>(T), g = static_cast<uint64_t>(G);
  const uint64_t rows = static_cast<uint64_t>(plans.split.rows_per_program);
  // In the order of the kernels' leading parameters (group_sort._launch_group_sort's heads).
  run_plan(*plans.counts, {address(ids), address(counts), t, g, rows}, plans.split.programs,
           ids.device());
  run_plan(*plans.scatter,
           {address(ids), address(counts), address(perm), address(offsets), t, g, rows,
            static_cast<uint64_t>(plans.split.programs)},
           plans.split.programs, ids.device());
  return {perm, offsets};
}

std::optional<std::tuple<at::Tensor, at::Tensor>> sort_by_group(const at::Tensor& ids_in,
                                                                int64_t G) {
  if (ids_in.dim() != 1) return std::nullopt;
  auto plans = sort_plans(ids_in.device(), ids_in.size(0), G, contiguous_ids_operand(ids_in));
  if (!plans) return std::nullopt;
  return launch_sort(*plans, contiguous_ids(ids_in), G);
}

Operand sorted_index_operand() { return fresh_operand(at::kInt, {1}); }

}  // namespace mtmm
