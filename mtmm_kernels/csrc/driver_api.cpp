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

struct Driver {
  LaunchFn launch = nullptr;
  ErrorStringFn error_string = nullptr;
};

const Driver& driver() {
  static const Driver loaded = [] {
    Driver d;
    // torch has loaded libcuda by the time a CUDA tensor exists; RTLD_NOLOAD finds that copy.
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (lib == nullptr) throw std::runtime_error("mtmm: cannot load libcuda.so.1");
    d.launch = reinterpret_cast<LaunchFn>(dlsym(lib, "cuLaunchKernel"));
    d.error_string = reinterpret_cast<ErrorStringFn>(dlsym(lib, "cuGetErrorString"));
    if (d.launch == nullptr) throw std::runtime_error("mtmm: libcuda has no cuLaunchKernel");
    return d;
  }();
  return loaded;
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
                   uint64_t stream, void** params, const uint8_t* param_bytes, int num_params,
                   int64_t scratch_bytes) {
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
  CUresult status = d.launch(reinterpret_cast<void*>(function), grid_x, 1, 1, block_x, 1, 1,
                             shared_bytes, reinterpret_cast<void*>(stream), params, nullptr);
  if (status != 0) {
    const char* text = nullptr;
    if (d.error_string != nullptr) d.error_string(status, &text);
    throw std::runtime_error("mtmm: cuLaunchKernel failed with error " +
                             std::to_string(status) + " (" + (text ? text : "unknown") + ")");
  }
}

}  // namespace mtmm
