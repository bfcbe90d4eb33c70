// Launch records: everything a launch of one compiled Triton kernel needs besides the
// per-call values (tensor addresses, the row count), stored under a key of the properties
// Triton specialised and mtmm planned on. Python fills the table (mtmm_kernels/_cpp_launch.py)
// from kernels Triton compiled; the C++ op reads it. No torch, no Python here.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace mtmm {

// The kernel a plan launches: a plan key's first word, so that keys of different kernels differ.
enum class KernelKind : int64_t { kMm = 0, kDw = 1, kSortCounts = 2, kSortScatter = 3 };

// One kernel parameter that is not a constexpr, in signature order.
struct ParamSlot {
  static constexpr int8_t kFixed = -1;
  int8_t source = kFixed;  // index into the per-call values, or kFixed
  uint8_t bytes = 0;       // 1, 2, 4 or 8 (an address is 8)
  int64_t value = 0;       // the value of a fixed parameter
};

struct LaunchPlan {
  uint64_t function = 0;       // CUfunction of the compiled kernel
  uint32_t block_x = 0;        // 32 * num_warps
  uint32_t shared_bytes = 0;   // dynamic shared memory
  int64_t scratch_bytes = 0;   // global scratch per program (in-kernel descriptors), 0: none
  // The grouped GEMM's grid: grid_fixed when positive, else min((cdiv(T, block_m) + G + 1) *
  // cdiv(N, block_n), grid_cap), the persistent kernel's bound on its tiles. (The group sort's
  // grid comes from its row split.)
  int64_t grid_fixed = 0;
  int64_t block_m = 0;
  int64_t block_n = 0;
  int64_t grid_cap = 0;
  std::vector<ParamSlot> slots;
  // The group sort's counting plan (mtmm_kernels/group_sort.py) also holds how a call splits
  // its T rows: rows_per_program = cdiv(cdiv(T, max_programs), row_step) * row_step, one
  // program per rows_per_program rows, block_g counts per program, and the scatter kernel's
  // BLOCK_P = max(16, min(next_power_of_2(programs), block_p_cap)).
  struct RowSplit {
    int64_t max_programs = 0, row_step = 0, block_g = 0, block_p_cap = 0;
  } split;

  int64_t grid(int64_t T, int64_t G, int64_t N) const {
    if (grid_fixed > 0) return grid_fixed;
    int64_t tiles = ((T + block_m - 1) / block_m + G + 1) * ((N + block_n - 1) / block_n);
    return tiles < grid_cap ? tiles : grid_cap;
  }
};

using PlanKey = std::vector<int64_t>;

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const noexcept {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the 64-bit words
    for (int64_t v : key) {
      h ^= static_cast<uint64_t>(v);
      h *= 1099511628211ull;
    }
    return static_cast<size_t>(h);
  }
};

// The table is read by the autograd engine's threads and written under Python's GIL.
class PlanTable {
 public:
  void put(const PlanKey& key, LaunchPlan plan) {
    auto shared = std::make_shared<const LaunchPlan>(std::move(plan));
    std::lock_guard<std::mutex> lock(mutex_);
    if (plans_.size() >= kMaxPlans) plans_.clear();
    plans_[key] = std::move(shared);
  }
  // The plan under `key`, or null.
  std::shared_ptr<const LaunchPlan> get(const PlanKey& key) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = plans_.find(key);
    return it == plans_.end() ? nullptr : it->second;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    plans_.clear();
  }
  size_t size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return plans_.size();
  }

 private:
  static constexpr size_t kMaxPlans = 4096;
  mutable std::mutex mutex_;
  std::unordered_map<PlanKey, std::shared_ptr<const LaunchPlan>, PlanKeyHash> plans_;
};

PlanTable& plan_table();

}  // namespace mtmm
