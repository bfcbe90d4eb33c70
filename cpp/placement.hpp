// Placement: maps each wave's device groups to concrete device ids, wave by wave, keeping
// groups inside islands, near the devices their inputs come from and near the devices that
// already hold their component's parameters, within device memory. Mirrors _Placer in
// scheduler/reference.py.
#pragma once

#include <cstdint>
#include <functional>
#include <unordered_map>
#include <vector>

#include "problem.hpp"

namespace mtmm {

struct Group {
    int metaop;
    int count_index;
    int layers;  // k: layers this group runs in the wave
};

struct Placed {
    int metaop;
    int count_index;
    int layers;
    std::vector<int> devices;  // ascending
};

class Placer {
  public:
    Placer(const CoreInput& in, const std::vector<std::vector<int>>& preds);

    // groups: in scheduling order. done[m]: layers of m finished before this wave;
    // rem_layers(m): layers left in m's current tuple; D: the wave length. Groups that cannot
    // fit memory at any smaller count are dropped (the scheduler keeps their layers).
    // The result lives in the Placer until the next call (its device lists may be moved out).
    std::vector<Placed>& place_wave(int wave, const std::vector<Group>& groups,
                                   const std::vector<int>& done,
                                   const std::function<int(int)>& rem_layers, double D);

  private:
    void cost(int d, int m, int b, int k, int n, double& act, double& par) const;
    bool fits(int d, int m, int b, int k, int n) const;
    void commit(int wave, int m, int b, int k, const std::vector<int>& devices);
    std::vector<int> choose(const std::vector<int>& room, int n);
    std::vector<int> choose_free(int n);
    void take(const std::vector<int>& devices);

    const CoreInput& in_;
    const std::vector<std::vector<int>>& preds_;
    bool limited_;
    std::vector<double> used_;
    std::unordered_map<int64_t, std::vector<char>> held_;  // key: device * #components + comp
    std::vector<std::vector<int>> last_dev_;
    std::vector<int> last_wave_;
    std::vector<std::vector<int>> comp_last_;
    std::vector<int> max_layers_;
    // Scratch, sized num_devices.
    std::vector<double> aff_;
    std::vector<char> free_;
    std::vector<int> touched_;
    int num_islands_;
    std::vector<int> isl_free_;  // free devices per island in the current wave
    std::vector<int> island_of_;  // device -> island
    std::vector<char> mark_;      // scratch, all zero between calls
    std::vector<int> room_, tf_, ti_, devs_, order_;
    std::vector<double> tsum_, isum_;
    std::vector<Group> cont_, rest_;
    std::vector<Placed> placed_;
};

}  // namespace mtmm
