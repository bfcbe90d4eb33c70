#include "plan_launch.hpp"

#include <ATen/ops/empty.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <map>
#include <mutex>
#include <utility>

#include "checks.hpp"
#include "driver_api.hpp"

namespace mtmm {

PlanTable& plan_table() {
  static PlanTable table;
  return table;
}

Operand operand(const at::Tensor& t) {
  Operand o;
  if (!t.defined()) return o;
  o.defined = true;
  o.dtype = static_cast<int64_t>(t.scalar_type());
  o.align = static_cast<int64_t>(address(t) % 16);
  for (int64_t d = 0; d < t.dim() && d < 3; ++d) o.stride[d] = t.stride(d);
  return o;
}

Operand fresh_operand(at::ScalarType dtype, std::initializer_list<int64_t> strides) {
  Operand o;
  o.defined = true;
  o.dtype = static_cast<int64_t>(dtype);
  o.align = 0;
  int64_t d = 0;
  for (int64_t stride : strides) o.stride[d++] = stride;
  return o;
}

void append(PlanKey& key, const Operand& t) {
  key.insert(key.end(), {t.defined, t.dtype, t.align, t.stride[0], t.stride[1], t.stride[2]});
}

uint64_t address(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); }

namespace {

StreamResolver g_stream_resolver;
std::mutex g_streams_mutex;
std::map<std::pair<int64_t, int64_t>, uint64_t> g_streams;  // (device, stream id) -> handle

// torch with c10::Stream::native_handle (2026 on) gives the CUstream directly...
template <typename S>
auto native_handle_of(const S& stream, int) -> decltype(stream.native_handle(), uint64_t()) {
  return reinterpret_cast<uint64_t>(stream.native_handle());
}

// ... an older one through Python, once per stream (a stream id names one stream for good).
template <typename S>
uint64_t native_handle_of(const S& stream, long) {
  return stream_handle_from_resolver(stream.device_index(), stream.id());
}

uint64_t current_stream(const at::Device& device) {
  if (device.is_cpu()) return 0;  // dry-run tests
  c10::impl::VirtualGuardImpl guard(device.type());
  return native_handle_of(guard.getStream(device), 0);
}

}  // namespace

void run_plan(const LaunchPlan& plan, const CallValues& values, int64_t grid,
              const at::Device& device) {
  constexpr size_t kMaxParams = 64;
  const size_t n = plan.slots.size();
  MTMM_ASSERT(n + 2 <= kMaxParams, "too many kernel parameters");
  if (grid <= 0) return;
  at::Tensor scratch;
  int64_t scratch_total = 0;
  if (plan.scratch_bytes > 0) {
    scratch_total = grid * plan.scratch_bytes;
    scratch = at::empty({scratch_total}, at::TensorOptions().dtype(at::kByte).device(device));
  }
  std::array<uint64_t, kMaxParams> storage;
  std::array<void*, kMaxParams> params;
  std::array<uint8_t, kMaxParams> bytes;
  for (size_t i = 0; i < n; ++i) {
    const ParamSlot& slot = plan.slots[i];
    storage[i] = slot.source == ParamSlot::kFixed ? static_cast<uint64_t>(slot.value)
                                                  : values[slot.source];
    params[i] = &storage[i];  // little-endian: a narrower parameter reads the low bytes
    bytes[i] = slot.bytes;
  }
  // Triton's kernels end with the global and the profile scratch pointers.
  storage[n] = scratch.defined() ? address(scratch) : 0;
  storage[n + 1] = 0;
  for (size_t i = n; i < n + 2; ++i) {
    params[i] = &storage[i];
    bytes[i] = 8;
  }
  launch_kernel(plan.function, static_cast<uint32_t>(grid), plan.block_x, plan.shared_bytes,
                current_stream(device), device.index(), params.data(), bytes.data(),
                static_cast<int>(n + 2), scratch_total);
}

void set_stream_resolver(StreamResolver resolver) { g_stream_resolver = std::move(resolver); }

uint64_t stream_handle_from_resolver(int64_t device_index, int64_t stream_id) {
  const std::pair<int64_t, int64_t> key{device_index, stream_id};
  {
    std::lock_guard<std::mutex> lock(g_streams_mutex);
    auto it = g_streams.find(key);
    if (it != g_streams.end()) return it->second;
  }
  MTMM_CHECK(g_stream_resolver, "mtmm: no way to find the CUDA stream's handle");
  const uint64_t handle = g_stream_resolver(device_index, stream_id);
  std::lock_guard<std::mutex> lock(g_streams_mutex);
  g_streams[key] = handle;
  return handle;
}

uint64_t current_stream_handle(const at::Device& device, bool through_resolver) {
  if (!through_resolver) return current_stream(device);
  c10::impl::VirtualGuardImpl guard(device.type());
  return native_handle_of(guard.getStream(device), 0L);  // the older torch's way, on any torch
}

}  // namespace mtmm
