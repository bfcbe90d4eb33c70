#include "driver_api.hpp"

#include <dlfcn.h>

#include <atomic>
#include <mutex>
#include <stdexcept>
#include <string>

namespace mtmm {
namespace {

// The driver API's types, declared here so that the build needs no CUDA headers: the ABI of
// cuLaunchKernel has been stable since CUDA 4.
using CUresult = int;
using LaunchFn = CUresult (*)(void* f, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                              unsigned block_x, unsigned block_y, unsigned block_z,
                              unsigned shared_bytes, void* stream, void** params, void** extra);
using ErrorStringFn = CUresult (*)(CUresult error, const char** text);
using CtxGetCurrentFn = CUresult (*)(void** context);
using CtxSetCurrentFn = CUresult (*)(void* context);
using DeviceGetFn = CUresult (*)(int* device, int ordinal);
using PrimaryCtxRetainFn = CUresult (*)(void** context, int device);

struct Driver {
  LaunchFn launch = nullptr;
  ErrorStringFn error_string = nullptr;
  CtxGetCurrentFn ctx_get_current = nullptr;
  CtxSetCurrentFn ctx_set_current = nullptr;
  DeviceGetFn device_get = nullptr;
  PrimaryCtxRetainFn primary_ctx_retain = nullptr;
};

template <typename Fn>
Fn symbol(void* lib, const char* name) {
  Fn fn = reinterpret_cast<Fn>(dlsym(lib, name));
  if (fn == nullptr) throw DriverError(std::string("mtmm: libcuda has no ") + name);
  return fn;
}

const Driver& driver() {
  static const Driver loaded = [] {
    Driver d;
    // torch has loaded libcuda by the time a CUDA tensor exists; RTLD_NOLOAD finds that copy.
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (lib == nullptr) throw DriverError("mtmm: cannot load libcuda.so.1");
    d.launch = symbol<LaunchFn>(lib, "cuLaunchKernel");
    d.error_string = reinterpret_cast<ErrorStringFn>(dlsym(lib, "cuGetErrorString"));
    d.ctx_get_current = symbol<CtxGetCurrentFn>(lib, "cuCtxGetCurrent");
    d.ctx_set_current = symbol<CtxSetCurrentFn>(lib, "cuCtxSetCurrent");
    d.device_get = symbol<DeviceGetFn>(lib, "cuDeviceGet");
    d.primary_ctx_retain = symbol<PrimaryCtxRetainFn>(lib, "cuDevicePrimaryCtxRetain");
    return d;
  }();
  return loaded;
}

void check(const Driver& d, CUresult status, const char* call) {
  if (status == 0) return;
  const char* text = nullptr;
  if (d.error_string != nullptr) d.error_string(status, &text);
  throw DriverError(std::string("mtmm: ") + call + " failed with error " +
                    std::to_string(status) + " (" + (text ? text : "unknown") + ")");
}

std::atomic<bool> g_dry_run{false};
std::atomic<bool> g_keep_log{true};
std::atomic<int64_t> g_launches{0};
std::mutex g_log_mutex;
std::vector<LaunchRecord> g_log;

}  // namespace

void set_dry_run(bool on, bool log) {
  g_dry_run = on;
  g_keep_log = log;
}
bool dry_run() { return g_dry_run; }
int64_t launch_count() { return g_launches; }

std::vector<LaunchRecord> take_launch_log() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  std::vector<LaunchRecord> out;
  out.swap(g_log);
  return out;
}

void launch_kernel(uint64_t function, uint32_t grid_x, uint32_t block_x, uint32_t shared_bytes,
                   uint64_t stream, int64_t device_index, void** params,
                   const uint8_t* param_bytes, int num_params, int64_t scratch_bytes) {
  ++g_launches;
  if (g_dry_run) {
    if (!g_keep_log) return;
    LaunchRecord record{function, grid_x, block_x, shared_bytes, stream, {}, scratch_bytes};
    for (int i = 0; i < num_params; ++i) {
      const auto* bytes = static_cast<const uint8_t*>(params[i]);
      record.params.emplace_back(bytes, bytes + param_bytes[i]);
    }
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_log.push_back(std::move(record));
    return;
  }
  const Driver& d = driver();
  // A thread that never made a CUDA runtime call has no current context (the autograd
  // engine's device threads, whose cudaSetDevice torch skips when the device already matches):
  // make the device's primary context, which torch and Triton use, current there.
  void* context = nullptr;
  check(d, d.ctx_get_current(&context), "cuCtxGetCurrent");
  if (context == nullptr) {
    int device = 0;
    check(d, d.device_get(&device, device_index < 0 ? 0 : device_index), "cuDeviceGet");
    check(d, d.primary_ctx_retain(&context, device), "cuDevicePrimaryCtxRetain");
    check(d, d.ctx_set_current(context), "cuCtxSetCurrent");
  }
  CUresult status = d.launch(reinterpret_cast<void*>(function), grid_x, 1, 1, block_x, 1, 1,
                             shared_bytes, reinterpret_cast<void*>(stream), params, nullptr);
  check(d, status, "cuLaunchKernel");
}

}  // namespace mtmm
