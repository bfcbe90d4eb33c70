// Launching one planned kernel from C++: the per-call values packed into the plan's parameter
// slots, the global scratch allocated with torch's allocator, cuLaunchKernel on torch's current
// stream. Shared by every op of the C++ launch path (grouped_mm_launch, group_sort_launch).
// No Python here.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <functional>
#include <initializer_list>

#include "launch_table.hpp"

namespace mtmm {

// What a plan key holds of one tensor: strides, dtype and address modulo 16 (what Triton
// specialises a pointer on, and what decides whether a tile may use TMA).
struct Operand {
  bool defined = false;
  int64_t dtype = -1;
  int64_t align = -1;
  int64_t stride[3] = {-1, -1, -1};
};
Operand operand(const at::Tensor& t);
// The operand of a tensor the caller has yet to make with at::empty (or a contiguous copy):
// contiguous with these strides, and 16-byte aligned, as torch's allocators align far past
// that (callers that depend on it assert it).
Operand fresh_operand(at::ScalarType dtype, std::initializer_list<int64_t> strides);
void append(PlanKey& key, const Operand& t);

uint64_t address(const at::Tensor& t);

// Per-call values, in the order of a kernel's leading parameters (ParamSlot::source indexes it).
constexpr int kMaxCallValues = 8;
using CallValues = std::array<uint64_t, kMaxCallValues>;

// Launches `plan` over `grid` programs on the current stream of `device` (nothing for a grid
// of 0), its parameters taken from the plan's slots and `values`.
void run_plan(const LaunchPlan& plan, const CallValues& values, int64_t grid,
              const at::Device& device);

// The current stream's CUstream. torch before c10::Stream::native_handle has no C++ way to it
// without CUDA's headers: there it comes from a resolver (device, stream id) -> handle, set by
// the bindings to ask torch's Python API, once per stream.
using StreamResolver = std::function<uint64_t(int64_t, int64_t)>;
void set_stream_resolver(StreamResolver resolver);
uint64_t stream_handle_from_resolver(int64_t device_index, int64_t stream_id);
// The current stream's CUstream as launches find it, or through the resolver (tests).
uint64_t current_stream_handle(const at::Device& device, bool through_resolver);

}  // namespace mtmm
