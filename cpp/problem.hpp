// The planner's input and output as flat arrays; scheduler/reference.py's CoreInput/Schedule.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace mtmm {

// A problem the caller got wrong. bindings.cpp maps it to ValueError.
struct PlanningError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// A wave that fits no devices' free memory: a problem that a plan with fewer devices per slice
// may still fit (scheduler/count_caps.py retries on exactly this error, not on the others).
struct PlanMemoryError : PlanningError {
    using PlanningError::PlanningError;
};

struct CoreInput {
    int num_devices = 0;
    int island_size = 1;
    std::vector<std::string> names;
    std::vector<int> layers;
    std::vector<std::vector<int>> counts;     // usable valid counts (<= num_devices), ascending
    std::vector<std::vector<double>> times;   // times[m][j]: ms of one layer on counts[m][j]
    std::vector<int> component;               // component id of each MetaOp
    std::vector<double> param_gb;             // per component, per layer
    std::vector<double> activation_gb;        // per MetaOp, one layer, whole batch
    std::vector<double> output_mb;            // per MetaOp
    std::vector<double> hidden_mb;            // per MetaOp: between two of its layers
    std::vector<std::pair<int, int>> flows;
    double device_memory_gb = -1.0;           // < 0: unlimited
    // share of every param_gb that is optimizer state sharded among a layer's holders (ZeRO-1);
    // a slice on n devices is charged (1 - f + f / n) of it per fresh layer (its devices are
    // holders, so that much at most)
    double shard_fraction = 0.0;
    // held[c][j]: the devices holding layer j of component c now, ascending (a re-plan's
    // Problem.held_state; placement prefers them). Empty: none given.
    std::vector<std::vector<std::vector<int>>> held;

    // Throws PlanningError when the arrays disagree in length or break the format's rules.
    void check() const;
};

// The plan is stored flat (three arrays instead of a vector per wave and per slice): one
// allocation per array instead of one per slice, and bindings.cpp walks it in one pass.
struct Slice {
    int metaop;
    int layer_begin;
    int layer_end;
    int device_begin;  // its devices: Schedule::devices[device_begin, device_begin + device_count)
    int device_count;
};

struct Wave {
    double start_ms;
    double duration_ms;
    int slice_begin;  // its slices: Schedule::slices[slice_begin, slice_begin + slice_count)
    int slice_count;
};

struct Schedule {
    std::vector<Wave> waves;
    std::vector<Slice> slices;
    std::vector<int> devices;  // each slice's devices, ascending
    std::vector<double> level_cstar;
    std::vector<int> levels;
    double relaxed_ms = 0.0;
    double lower_bound_ms = 0.0;
    double makespan_ms = 0.0;
    // The variant that produced it (see PlanOptions).
    bool overlap_levels = false;
    bool least_idle = false;
    bool single_tuple = false;
    bool fastest = false;
    bool defer_short = false;
};

}  // namespace mtmm
