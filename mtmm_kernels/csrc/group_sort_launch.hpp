// The group sort (mtmm_kernels/group_sort.py) launched from C++: its counting kernel, then
// its scatter kernel, the same compiled Triton kernels with their plans looked up in the
// table, so that grouped_mm_by_ids spends no Python on its sort. A call whose plans are not
// in the table returns nothing: the Python path runs it (and fills the table). No Python here.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <tuple>

#include "launch_table.hpp"
#include "plan_launch.hpp"

namespace mtmm {

// How a call of T rows is split over the programs (LaunchPlan::RowSplit).
struct SortSplit {
  int64_t rows_per_program = 0, programs = 0, block_p = 0;
};
SortSplit sort_split(const LaunchPlan::RowSplit& rule, int64_t T);

// Plan keys of the two kernels for ids [T] (contiguous) and G groups. The counting kernel's
// specialisation depends on T and the ids; the scatter kernel's also on the split.
PlanKey sort_counts_key(const at::Device& device, int64_t T, int64_t G, const Operand& ids);
PlanKey sort_scatter_key(const at::Device& device, int64_t T, int64_t G, const Operand& ids,
                         const SortSplit& split);

// The two kernels' plans for T contiguous ids (their key operand `ids`) and G groups, and the
// row split of the call; nothing where a plan is missing or 0 < T < 2**31, G > 0 does not hold.
struct SortPlans {
  std::shared_ptr<const LaunchPlan> counts, scatter;
  SortSplit split;
};
std::optional<SortPlans> sort_plans(const at::Device& device, int64_t T, int64_t G,
                                    const Operand& ids);
// The key operand of ids.contiguous(), before any copy is made; and that copy (or ids).
Operand contiguous_ids_operand(const at::Tensor& ids);
at::Tensor contiguous_ids(const at::Tensor& ids);
// Launches them: (perm [T] int32, offsets [G] int32).
std::tuple<at::Tensor, at::Tensor> launch_sort(const SortPlans& plans, const at::Tensor& ids,
                                               int64_t G);
// The key operand of the sort's perm and offsets (fresh contiguous int32 vectors), for plans
// decided before the sort runs.
Operand sorted_index_operand();

// (perm [T] int32, offsets [G] int32) of group_sort.sort_by_group for ids [T] int32/int64, or
// nothing when a plan is missing (then nothing was launched). Needs 0 < T < 2**31, G > 0.
std::optional<std::tuple<at::Tensor, at::Tensor>> sort_by_group(const at::Tensor& ids,
                                                                int64_t G);

}  // namespace mtmm
