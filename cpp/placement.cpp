#include "placement.hpp"

#include <algorithm>
#include <cassert>

#include "allocation.hpp"

namespace mtmm {

DeviceLists::DeviceLists(const std::vector<int>& capacity)
    : offset_(capacity.size()), size_(capacity.size(), 0) {
    int total = 0;
    for (size_t i = 0; i < capacity.size(); ++i) {
        offset_[i] = total;
        total += capacity[i];
    }
    pool_.resize(total);
}

void DeviceLists::assign(int i, const int* devices, int n) {
    std::copy(devices, devices + n, pool_.begin() + offset_[i]);
    size_[i] = n;
}

namespace {
// Index of the lowest set bit of x != 0.
inline int lowest_bit(uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctzll(x);
#else
    int i = 0;
    for (; !(x & 1); x >>= 1) ++i;
    return i;
#endif
}

// MB of gradient per GB of param_gb (16 bytes per parameter, of which the bf16 gradient is 2):
// what a layer's all-reduce moves. reference_placement.GRAD_MB_PER_PARAM_GB.
constexpr double kGradMbPerParamGb = 1e3 * 2 / 16;
// MB of a layer's state but its gradient per GB of param_gb: what a device that does not hold
// the layer yet would receive when the job switches to the plan (CoreInput::held).
constexpr double kStateMbPerParamGb = 1e3 * 14 / 16;

// The most devices a MetaOp's slice can use, per MetaOp or (by_component) per component.
std::vector<int> list_capacity(const CoreInput& in, bool by_component) {
    std::vector<int> cap(by_component ? in.param_gb.size() : in.layers.size(), 0);
    for (size_t m = 0; m < in.layers.size(); ++m) {
        const int i = by_component ? in.component[m] : static_cast<int>(m);
        cap[i] = std::max(cap[i], in.counts[m].back());
    }
    return cap;
}
}  // namespace

Placer::Placer(const CoreInput& in, const Adjacency& preds)
    : in_(in),
      preds_(preds),
      limited_(in.device_memory_gb >= 0.0),
      used_(in.num_devices, 0.0),
      last_dev_(list_capacity(in, false)),
      last_wave_(in.layers.size(), -1),
      comp_last_(list_capacity(in, true)),
      max_layers_(in.param_gb.size(), 0),
      aff_(in.num_devices, 0.0),
      free_(in.num_devices, 1),
      free_bits_((in.num_devices + 63) / 64, 0),
      touched_bits_((in.num_devices + 63) / 64, 0),
      num_islands_((in.num_devices + in.island_size - 1) / in.island_size),
      isl_free_(num_islands_, 0),
      island_of_(in.num_devices),
      mark_(in.num_devices, 0) {
    for (int d = 0; d < in.num_devices; ++d) island_of_[d] = d / in.island_size;
    for (size_t m = 0; m < in.layers.size(); ++m)
        max_layers_[in.component[m]] = std::max(max_layers_[in.component[m]], in.layers[m]);
    sharded_ = limited_ && in.shard_fraction > 0.0;
    if (sharded_) {
        holders_.resize(in.param_gb.size());
        for (size_t c = 0; c < holders_.size(); ++c) holders_[c].resize(max_layers_[c]);
    }
}

void Placer::cost(int d, int m, int b, int k, int n, double& act, double& par) const {
    const int c = in_.component[m];
    act = static_cast<double>(k) * in_.activation_gb[m] / static_cast<double>(n);
    par = 0.0;
    if (in_.param_gb[c] == 0.0) return;
    const int64_t key = static_cast<int64_t>(d) * static_cast<int64_t>(in_.param_gb.size()) + c;
    auto it = held_.find(key);
    const std::vector<char>* held = it == held_.end() ? nullptr : &it->second;
    if (!sharded_) {
        int fresh = k;
        if (held) {
            fresh = 0;
            for (int j = b; j < b + k; ++j) fresh += (*held)[j] ? 0 : 1;
        }
        par = in_.param_gb[c] * static_cast<double>(fresh);
        return;
    }
    // A layer d takes will have at least max(n, holders + 1) holders once this slice commits
    // (d and the slice's n devices among them), so d's share is at most 1 / that.
    // Every room scan asks this of most devices for one key: the per-layer shares and their
    // sum over all k layers (a device holding none of them) are kept until the next commit.
    if (share_key_ != std::array<int, 4>{c, b, k, n}) {
        share_key_ = {c, b, k, n};
        share_of_.resize(k);
        share_all_ = 0.0;
        for (int j = 0; j < k; ++j) {
            const int after = std::max(n, static_cast<int>(holders_[c][b + j].size()) + 1);
            share_of_[j] = 1.0 / static_cast<double>(after);
            share_all_ += share_of_[j];
        }
    }
    int fresh = k;
    double share = share_all_;
    if (held) {
        fresh = 0;
        share = 0.0;
        for (int j = 0; j < k; ++j) {
            if ((*held)[b + j]) continue;
            ++fresh;
            share += share_of_[j];
        }
    }
    par = in_.param_gb[c] *
          ((1.0 - in_.shard_fraction) * static_cast<double>(fresh) + in_.shard_fraction * share);
}

std::vector<char>& Placer::held_layers(int d, int c) {
    const int64_t key = static_cast<int64_t>(d) * static_cast<int64_t>(in_.param_gb.size()) + c;
    auto& held = held_[key];
    if (held.empty()) held.assign(max_layers_[c], 0);
    return held;
}

void Placer::mark_held(int d, int c, int b, int k) {
    std::vector<char>& held = held_layers(d, c);
    for (int j = b; j < b + k; ++j) held[j] = 1;
}

void Placer::commit_sharded(int m, int b, int k, const int* devices, int n) {
    // Each holder of a layer keeps 1 / (its holders) of the sharded state: the slice's new
    // holders pay their share of the final count, and the earlier holders are credited the
    // part of theirs the new ones take over (what plan.memory_per_device computes at the end).
    const int c = in_.component[m];
    const double p = in_.param_gb[c], f = in_.shard_fraction;
    share_key_ = {-1, 0, 0, 0};  // the holder counts change
    held_of_.resize(n);
    for (int i = 0; i < n; ++i) held_of_[i] = held_layers(devices[i], c).data() + b;
    fresh_count_.assign(k, 0);
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < k; ++j) fresh_count_[j] += held_of_[i][j] ? 0 : 1;
    const double act = static_cast<double>(k) * in_.activation_gb[m] / static_cast<double>(n);
    for (int i = 0; i < n; ++i) {
        int fresh = 0;
        double share = 0.0;
        for (int j = 0; j < k; ++j) {
            if (held_of_[i][j]) continue;
            ++fresh;
            const int after = static_cast<int>(holders_[c][b + j].size()) + fresh_count_[j];
            share += 1.0 / static_cast<double>(after);
        }
        const int d = devices[i];
        used_[d] = used_[d] + act + p * ((1.0 - f) * static_cast<double>(fresh) + f * share);
    }
    for (int j = 0; j < k; ++j) {
        std::vector<int>& holders = holders_[c][b + j];
        const int before = static_cast<int>(holders.size());
        if (fresh_count_[j] == 0) continue;
        if (before > 0) {
            const double credit = f * p *
                (1.0 / static_cast<double>(before) -
                 1.0 / static_cast<double>(before + fresh_count_[j]));
            for (int h : holders) used_[h] = used_[h] - credit;
        }
        for (int i = 0; i < n; ++i)
            if (!held_of_[i][j]) holders.push_back(devices[i]);
    }
    for (int i = 0; i < n; ++i) std::fill(held_of_[i], held_of_[i] + k, char{1});
}

bool Placer::fits(int d, int m, int b, int k, int n) const {
    if (!limited_) return true;
    double act, par;
    cost(d, m, b, k, n, act, par);
    return used_[d] + act + par <= in_.device_memory_gb;
}

void Placer::commit(int wave, int m, int b, int k, int begin, int n) {
    const int c = in_.component[m];
    const int* devices = out_.data() + begin;
    // The devices come ascending, so whole runs of them share a bitset word and an island:
    // each run's bits and count are gathered in registers and written once (one memory
    // update per word or island instead of a chain of updates to the same place per device).
    int word = -1, island = -1, in_island = 0;
    uint64_t bits = 0;
    for (int i = 0; i < n; ++i) {
        const int d = devices[i];
        free_[d] = 0;
        if ((d >> 6) != word) {
            if (word >= 0) free_bits_[word] &= ~bits;
            word = d >> 6;
            bits = 0;
        }
        bits |= uint64_t{1} << (d & 63);
        if (island_of_[d] != island) {
            if (island >= 0) isl_free_[island] -= in_island;
            island = island_of_[d];
            in_island = 0;
        }
        ++in_island;
    }
    if (word >= 0) free_bits_[word] &= ~bits;
    if (island >= 0) isl_free_[island] -= in_island;
    if (limited_ && sharded_ && in_.param_gb[c] > 0.0) {
        commit_sharded(m, b, k, devices, n);
    } else if (limited_) {
        for (int i = 0; i < n; ++i) {
            const int d = devices[i];
            double act, par;
            cost(d, m, b, k, n, act, par);
            used_[d] = used_[d] + act + par;
            mark_held(d, c, b, k);
        }
    }
    last_dev_.assign(m, devices, n);
    last_wave_[m] = wave;
    comp_last_.assign(c, devices, n);
}

void Placer::choose(const std::vector<int>& room, int n) {
    const int S = in_.island_size;
    // Islands present in `room` (ascending), each a contiguous run of room; the affinity sum
    // is taken in ascending device order, exactly as the Python twin adds it.
    isl_.clear();
    beg_.clear();
    cnt_.clear();
    asum_.clear();
    for (size_t idx = 0; idx < room.size(); ++idx) {
        const int d = room[idx], i = d / S;
        if (isl_.empty() || isl_.back() != i) {
            isl_.push_back(i);
            beg_.push_back(static_cast<int>(idx));
            cnt_.push_back(0);
            asum_.push_back(0.0);
        }
        ++cnt_.back();
        asum_.back() += aff_[d];
    }
    // The room devices of island `pos` into devs_, by affinity descending, then id.
    auto best_first = [&](size_t pos) {
        devs_.assign(room.begin() + beg_[pos], room.begin() + beg_[pos] + cnt_[pos]);
        std::sort(devs_.begin(), devs_.end(), [&](int a, int b) {
            if (aff_[a] != aff_[b]) return aff_[a] > aff_[b];
            return a < b;
        });
    };
    const size_t begin = out_.size();
    if (n <= S) {
        int best = -1;
        for (size_t pos = 0; pos < isl_.size(); ++pos) {
            if (cnt_[pos] < n) continue;
            // Most affinity, then the tightest fit, then the lowest id (ascending order).
            if (best < 0 || asum_[pos] > asum_[best] ||
                (asum_[pos] == asum_[best] && cnt_[pos] < cnt_[best]))
                best = static_cast<int>(pos);
        }
        if (best >= 0) {
            best_first(best);
            out_.insert(out_.end(), devs_.begin(), devs_.begin() + n);
            std::sort(out_.begin() + begin, out_.end());
            return;
        }
    }
    iorder_.resize(isl_.size());
    for (size_t pos = 0; pos < isl_.size(); ++pos) iorder_[pos] = pos;
    std::sort(iorder_.begin(), iorder_.end(), [&](size_t a, size_t b) {
        if (asum_[a] != asum_[b]) return asum_[a] > asum_[b];
        if (cnt_[a] != cnt_[b]) return cnt_[a] > cnt_[b];
        return isl_[a] < isl_[b];
    });
    int taken = 0;
    for (size_t pos : iorder_) {
        best_first(pos);
        for (int d : devs_) {
            out_.push_back(d);
            if (++taken == n) {
                std::sort(out_.begin() + begin, out_.end());
                return;
            }
        }
    }
    assert(false && "room holds fewer than n devices");
}

// choose(room = every free device, n) without scanning every device: only the free devices
// with a positive affinity (the set bits of free_bits_ & touched_bits_, ascending) and the
// per-island free counts matter.
void Placer::choose_free(int n) {
    const int S = in_.island_size, N = in_.num_devices;
    // Affinity sum per island, added in ascending device order like the full scan (zeros add
    // nothing, so skipping them changes no bit).
    ti_.clear();
    tsum_.clear();
    for (size_t w = 0; w < free_bits_.size(); ++w) {
        for (uint64_t x = free_bits_[w] & touched_bits_[w]; x != 0; x &= x - 1) {
            const int d = static_cast<int>(w * 64) + lowest_bit(x);
            if (ti_.empty() || ti_.back() != island_of_[d]) {
                ti_.push_back(island_of_[d]);
                tsum_.push_back(0.0);
            }
            tsum_.back() += aff_[d];
        }
    }
    // Free devices of island i into devs_, ascending.
    auto island_devices = [&](int i) {
        devs_.clear();
        for (int d = i * S; d < std::min(N, (i + 1) * S); ++d)
            if (free_[d]) devs_.push_back(d);
    };
    // ... then by affinity descending, then id (an island without touched free devices is all
    // zeros: ascending already).
    auto by_affinity = [&](int i) {
        if (std::binary_search(ti_.begin(), ti_.end(), i))
            std::sort(devs_.begin(), devs_.end(), [&](int a, int b) {
                if (aff_[a] != aff_[b]) return aff_[a] > aff_[b];
                return a < b;
            });
    };
    if (n <= S) {
        int best = -1;
        double best_sum = 0.0;
        for (size_t k = 0; k < ti_.size(); ++k) {
            const int i = ti_[k];
            if (isl_free_[i] < n) continue;
            if (best < 0 || tsum_[k] > best_sum ||
                (tsum_[k] == best_sum && isl_free_[i] < isl_free_[best])) {
                best = i;
                best_sum = tsum_[k];
            }
        }
        if (best < 0) {  // every fitting island has zero affinity: the tightest, lowest id
            for (int i = 0; i < num_islands_; ++i)
                if (isl_free_[i] >= n && (best < 0 || isl_free_[i] < isl_free_[best])) best = i;
        }
        if (best >= 0) {
            island_devices(best);
            const size_t begin = out_.size();
            // Taking every free device of the island needs no order; else the n with the most
            // affinity, listed ascending.
            if (n < static_cast<int>(devs_.size())) {
                by_affinity(best);
                out_.insert(out_.end(), devs_.begin(), devs_.begin() + n);
                std::sort(out_.begin() + begin, out_.end());
            } else {
                out_.insert(out_.end(), devs_.begin(), devs_.end());
            }
            return;
        }
    }
    // Spanning: islands by (affinity desc, free count desc, id asc).
    isum_.assign(num_islands_, 0.0);
    for (size_t k = 0; k < ti_.size(); ++k) isum_[ti_[k]] = tsum_[k];
    order_.clear();
    for (int i = 0; i < num_islands_; ++i)
        if (isl_free_[i] > 0) order_.push_back(i);
    std::sort(order_.begin(), order_.end(), [&](int a, int b) {
        if (isum_[a] != isum_[b]) return isum_[a] > isum_[b];
        if (isl_free_[a] != isl_free_[b]) return isl_free_[a] > isl_free_[b];
        return a < b;
    });
    // Take islands in that order: all free devices of each while they fit in n (no need to
    // order them), then the n - taken with the most affinity of the last one (marked).
    int taken = 0, partial = -1;
    size_t used = 0;
    for (; used < order_.size() && taken < n; ++used) {
        const int i = order_[used];
        if (taken + isl_free_[i] <= n) {
            taken += isl_free_[i];
            continue;
        }
        island_devices(i);
        by_affinity(i);
        for (int j = 0; j < n - taken; ++j) mark_[devs_[j]] = 1;
        partial = i;
        taken = n;
    }
    assert(taken == n && "fewer than n free devices");
    // List them ascending (islands are contiguous ranges, so sorting the few islands used is
    // enough).
    std::sort(order_.begin(), order_.begin() + used);
    for (size_t k = 0; k < used; ++k) {
        const int i = order_[k];
        const int end = std::min(N, (i + 1) * S);
        if (i != partial) {
            for (int d = i * S; d < end; ++d)
                if (free_[d]) out_.push_back(d);
        } else {
            for (int d = i * S; d < end; ++d)
                if (mark_[d]) {
                    out_.push_back(d);
                    mark_[d] = 0;
                }
        }
    }
}

const std::vector<Placed>& Placer::place_wave(int wave, const std::vector<Group>& groups,
                                             const std::vector<int>& done,
                                             const std::function<int(int)>& rem_layers,
                                             double D) {
    const int N = in_.num_devices;
    std::fill(free_.begin(), free_.end(), 1);
    std::fill(free_bits_.begin(), free_bits_.end(), ~uint64_t{0});
    if (N % 64 != 0) free_bits_.back() = (uint64_t{1} << (N % 64)) - 1;
    for (int i = 0; i < num_islands_; ++i)
        isl_free_[i] = std::min(in_.island_size, N - i * in_.island_size);
    std::vector<Group>& cont = cont_;
    std::vector<Group>& rest = rest_;
    cont.clear();
    rest.clear();
    // Groups that keep their devices: first those that ran in the previous wave at the same
    // count, then those that ran earlier at the same count (if their devices are still free).
    for (const Group& g : groups) {
        const bool same_count =
            static_cast<int>(last_dev_[g.metaop].size()) == in_.counts[g.metaop][g.count_index];
        (same_count ? cont : rest).push_back(g);
    }
    std::sort(cont.begin(), cont.end(), [&](const Group& a, const Group& b) {
        const bool pa = last_wave_[a.metaop] == wave - 1, pb = last_wave_[b.metaop] == wave - 1;
        if (pa != pb) return pa;
        return a.metaop < b.metaop;
    });
    std::sort(rest.begin(), rest.end(), [&](const Group& a, const Group& b) {
        const int na = in_.counts[a.metaop][a.count_index];
        const int nb = in_.counts[b.metaop][b.count_index];
        if (na != nb) return na > nb;
        return a.metaop < b.metaop;
    });
    placed_.clear();
    out_.clear();
    for (const Group& g : cont) {
        const int m = g.metaop, n = in_.counts[m][g.count_index];
        const Range devs = last_dev_[m];
        bool ok = true;
        for (int d : devs) ok = ok && free_[d] && fits(d, m, done[m], g.layers, n);
        if (ok) {
            const int begin = static_cast<int>(out_.size());
            out_.insert(out_.end(), devs.begin(), devs.end());
            commit(wave, m, done[m], g.layers, begin, n);
            placed_.push_back({m, g.count_index, g.layers, begin, n});
        } else {
            rest.push_back(g);  // retried below, after the others, on any devices
        }
    }
    for (const Group& g : rest) {
        const int m = g.metaop, c = in_.component[m];
        // Affinity in MB that stay where they are: the MetaOp's own hidden state (or its
        // predecessors' outputs), the gradient of the k layers it would otherwise
        // synchronise with its component's last group, and, in a re-plan, the k layers'
        // state where the running job keeps it.
        auto add = [&](Range devs, double weight) {
            for (int d : devs) {
                if (aff_[d] == 0.0) {
                    touched_.push_back(d);
                    touched_bits_[d >> 6] |= uint64_t{1} << (d & 63);
                }
                aff_[d] += weight;
            }
        };
        if (done[m] > 0) {
            add(last_dev_[m], 1.0 + in_.hidden_mb[m]);
        } else {
            for (int p : preds_[m]) add(last_dev_[p], 1.0 + in_.output_mb[p]);
        }
        if (in_.param_gb[c] > 0.0) {
            add(comp_last_[c], kGradMbPerParamGb * in_.param_gb[c] * static_cast<double>(g.layers));
            if (!in_.held.empty()) {
                const auto& held = in_.held[c];
                const int end = std::min(done[m] + g.layers, static_cast<int>(held.size()));
                for (int j = done[m]; j < end; ++j)
                    add(Range{held[j].data(), held[j].data() + held[j].size()},
                        kStateMbPerParamGb * in_.param_gb[c]);
            }
        }
        for (int cj = g.count_index; cj >= 0; --cj) {
            const int n = in_.counts[m][cj];
            const int kj = cj == g.count_index ? g.layers
                                               : layers_fitting(D, in_.times[m][cj], rem_layers(m));
            if (kj == 0) break;
            const int begin = static_cast<int>(out_.size());
            if (limited_) {
                room_.clear();
                for (int d = 0; d < N; ++d)
                    if (free_[d] && fits(d, m, done[m], kj, n)) room_.push_back(d);
                if (static_cast<int>(room_.size()) < n) continue;
                choose(room_, n);
            } else {
                // Without a memory limit every free device is room, and the scheduler never
                // proposes more than are free: the same choice, from island counts.
                choose_free(n);
            }
            commit(wave, m, done[m], kj, begin, n);
            placed_.push_back({m, cj, kj, begin, n});
            break;
        }
        for (int d : touched_) {
            aff_[d] = 0.0;
            touched_bits_[d >> 6] = 0;
        }
        touched_.clear();
    }
    return placed_;
}

}  // namespace mtmm
