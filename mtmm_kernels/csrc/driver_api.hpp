// The CUDA driver calls the C++ launch path makes (cuLaunchKernel, and the current context's
// check), and a dry-run mode that logs launches instead (tests on machines without a GPU).
// No torch, no Python here.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace mtmm {

// A driver call that failed (libcuda missing, a launch refused): nothing was launched.
struct DriverError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// One launch, as the log keeps it: what cuLaunchKernel would have received.
struct LaunchRecord {
  uint64_t function = 0;
  uint32_t grid_x = 0;
  uint32_t block_x = 0;
  uint32_t shared_bytes = 0;
  uint64_t stream = 0;
  std::vector<std::vector<uint8_t>> params;  // each kernel parameter's bytes, in order
  int64_t scratch_bytes = 0;                 // size of the global scratch handed to the kernel
};

// Launches a 1-D grid of `function` (a CUfunction) on `stream` (a CUstream) of device
// `device_index`; `params` and `param_bytes` describe the kernel parameters as cuLaunchKernel
// takes them. A calling thread without a current CUDA context gets the device's primary one
// first. Throws DriverError with the driver's message when a driver call fails.
void launch_kernel(uint64_t function, uint32_t grid_x, uint32_t block_x, uint32_t shared_bytes,
                   uint64_t stream, int64_t device_index, void** params,
                   const uint8_t* param_bytes, int num_params, int64_t scratch_bytes);

// Launches made so far, dry runs included (tests ask whether the C++ path ran).
int64_t launch_count();

// In dry-run mode launches are appended to a log (with `log`; else only counted) instead of
// reaching a device.
void set_dry_run(bool on, bool log = true);
bool dry_run();
std::vector<LaunchRecord> take_launch_log();

}  // namespace mtmm
