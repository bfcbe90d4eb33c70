#include "group_sort_launch.hpp"

#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>

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

std::optional<std::tuple<at::Tensor, at::Tensor>> sort_by_group(const at::Tensor& ids_in,
                                                                int64_t G) {
  if (ids_in.dim() != 1 || G <= 0) return std::nullopt;
  const int64_t T = ids_in.size(0);
  if (T <= 0 || T >= (int64_t(1) << 31)) return std::nullopt;
  const at::Tensor ids = ids_in.contiguous();
  const Operand ids_key = operand(ids);
  auto counts_plan = plan_table().get(sort_counts_key(ids.device(), T, G, ids_key));
  if (!counts_plan) return std::nullopt;
  const SortSplit split = sort_split(counts_plan->split, T);
  auto scatter_plan = plan_table().get(sort_scatter_key(ids.device(), T, G, ids_key, split));
  if (!scatter_plan) return std::nullopt;

  c10::OptionalDeviceGuard guard(ids.device());
  const auto int32 = ids.options().dtype(at::kInt);
  at::Tensor perm = at::empty({T}, int32);
  at::Tensor offsets = at::empty({G}, int32);
  at::Tensor counts = at::empty({split.programs, counts_plan->split.block_g}, int32);
  const uint64_t t = static_cast<uint64_t>(T), g = static_cast<uint64_t>(G);
  const uint64_t rows = static_cast<uint64_t>(split.rows_per_program);
  // In the order of the kernels' leading parameters (group_sort._launch_group_sort's heads).
  run_plan(*counts_plan, {address(ids), address(counts), t, g, rows}, split.programs,
           ids.device());
  run_plan(*scatter_plan,
           {address(ids), address(counts), address(perm), address(offsets), t, g, rows,
            static_cast<uint64_t>(split.programs)},
           split.programs, ids.device());
  return std::make_tuple(perm, offsets);
}

}  // namespace mtmm
