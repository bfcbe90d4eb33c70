// Placement: maps each wave's device groups to concrete device ids, wave by wave, keeping
// groups inside islands, near the devices their inputs come from and near the devices that
// already hold their component's parameters, within device memory. Mirrors _Placer in
// scheduler/reference.py.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <unordered_map>
#include <vector>

#include "dag.hpp"
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
    int device_begin;  // its devices, ascending: Placer::devices()[device_begin, + count]
    int device_count;
};

// A device list per MetaOp (or component), all in one pool with room for the largest list
// each can hold: one allocation instead of one per MetaOp.
class DeviceLists {
  public:
    explicit DeviceLists(const std::vector<int>& capacity);
    Range operator[](int i) const {
        return {pool_.data() + offset_[i], pool_.data() + offset_[i] + size_[i]};
    }
    void assign(int i, const int* devices, int n);

  private:
    std::vector<int> offset_, size_, pool_;
};

class Placer {
  public:
    Placer(const CoreInput& in, const Adjacency& preds);

    // groups: in scheduling order. done[m]: layers of m finished before this wave;
    // rem_layers(m): layers left in m's current tuple; D: the wave length. Groups that cannot
    // fit memory at any smaller count are dropped (the scheduler keeps their layers).
    // The result lives in the Placer until the next call.
    const std::vector<Placed>& place_wave(int wave, const std::vector<Group>& groups,
                                         const std::vector<int>& done,
                                         const std::function<int(int)>& rem_layers, double D);
    // The placed groups' device lists, one after another.
    const std::vector<int>& devices() const { return out_; }

  private:
    void cost(int d, int m, int b, int k, int n, double& act, double& par) const;
    bool fits(int d, int m, int b, int k, int n) const;
    // Records the group's devices out_[begin, begin + n) as taken and holding its slice.
    void commit(int wave, int m, int b, int k, int begin, int n);
    // commit's memory with sharded optimizer state: charges and credits by holder count.
    void commit_sharded(int m, int b, int k, const int* devices, int n);
    std::vector<char>& held_layers(int d, int c);  // d's held bits of c's layers
    void mark_held(int d, int c, int b, int k);
    // Both append the n chosen devices, ascending, to out_.
    void choose(const std::vector<int>& room, int n);
    void choose_free(int n);

    const CoreInput& in_;
    const Adjacency& preds_;
    bool limited_;
    std::vector<double> used_;
    std::unordered_map<int64_t, std::vector<char>> held_;  // key: device * #components + comp
    // With sharded optimizer state: [component][layer] the devices holding it, in the order
    // they took it (each holder's share is 1 / their number; later holders shrink it).
    bool sharded_;
    std::vector<std::vector<std::vector<int>>> holders_;
    std::vector<int> fresh_count_;  // scratch for commit: per layer of the slice, new holders
    std::vector<char*> held_of_;     // scratch for commit: each slice device's held bits at b
    // cost's shares of layers [b, b + k) of c taken on n devices, one per layer and their
    // sum, for the key {c, b, k, n}; reset by each commit
    mutable std::array<int, 4> share_key_{-1, 0, 0, 0};
    mutable std::vector<double> share_of_;
    mutable double share_all_ = 0.0;
    DeviceLists last_dev_;  // per MetaOp: the devices of its latest slice
    std::vector<int> last_wave_;
    DeviceLists comp_last_;  // per component: the devices of its latest slice
    std::vector<int> max_layers_;
    // Scratch, sized num_devices.
    std::vector<double> aff_;
    std::vector<char> free_;
    // The same as bits (device d: bit d % 64 of word d / 64), and the devices with a positive
    // affinity (touched_): choose_free walks the free touched devices ascending without
    // sorting them or scanning every device.
    std::vector<uint64_t> free_bits_, touched_bits_;
    std::vector<int> touched_;
    int num_islands_;
    std::vector<int> isl_free_;  // free devices per island in the current wave
    std::vector<int> island_of_;  // device -> island
    std::vector<char> mark_;      // scratch, all zero between calls
    std::vector<int> room_, ti_, devs_, order_;
    std::vector<double> tsum_, isum_;
    std::vector<int> isl_, beg_, cnt_;  // choose(): islands present in room
    std::vector<double> asum_;
    std::vector<size_t> iorder_;
    std::vector<Group> cont_, rest_;
    std::vector<Placed> placed_;
    std::vector<int> out_;
};

}  // namespace mtmm
