#include "placement.hpp"

#include <algorithm>
#include <cassert>

#include "allocation.hpp"

namespace mtmm {

Placer::Placer(const CoreInput& in, const std::vector<std::vector<int>>& preds)
    : in_(in),
      preds_(preds),
      limited_(in.device_memory_gb >= 0.0),
      used_(in.num_devices, 0.0),
      last_dev_(in.layers.size()),
      last_wave_(in.layers.size(), -1),
      comp_last_(in.param_gb.size()),
      max_layers_(in.param_gb.size(), 0),
      aff_(in.num_devices, 0.0),
      free_(in.num_devices, 1),
      num_islands_((in.num_devices + in.island_size - 1) / in.island_size),
      isl_free_(num_islands_, 0),
      island_of_(in.num_devices),
      mark_(in.num_devices, 0) {
    for (int d = 0; d < in.num_devices; ++d) island_of_[d] = d / in.island_size;
    // commit() copies every placed device list of m here: sized once, never reallocated.
    for (size_t m = 0; m < in.layers.size(); ++m) last_dev_[m].reserve(in.counts[m].back());
    for (size_t m = 0; m < in.layers.size(); ++m)
        max_layers_[in.component[m]] = std::max(max_layers_[in.component[m]], in.layers[m]);
}

void Placer::cost(int d, int m, int b, int k, int n, double& act, double& par) const {
    const int c = in_.component[m];
    act = static_cast<double>(k) * in_.activation_gb[m] / static_cast<double>(n);
    par = 0.0;
    if (in_.param_gb[c] == 0.0) return;
    const int64_t key = static_cast<int64_t>(d) * static_cast<int64_t>(in_.param_gb.size()) + c;
    auto it = held_.find(key);
    int fresh = k;
    if (it != held_.end()) {
        fresh = 0;
        for (int j = b; j < b + k; ++j) fresh += it->second[j] ? 0 : 1;
    }
    par = in_.param_gb[c] * static_cast<double>(fresh);
}

bool Placer::fits(int d, int m, int b, int k, int n) const {
    if (!limited_) return true;
    double act, par;
    cost(d, m, b, k, n, act, par);
    return used_[d] + act + par <= in_.device_memory_gb;
}

void Placer::commit(int wave, int m, int b, int k, const std::vector<int>& devices) {
    const int c = in_.component[m];
    if (limited_) {
        const int n = static_cast<int>(devices.size());
        for (int d : devices) {
            double act, par;
            cost(d, m, b, k, n, act, par);
            used_[d] = used_[d] + act + par;
            const int64_t key =
                static_cast<int64_t>(d) * static_cast<int64_t>(in_.param_gb.size()) + c;
            auto& held = held_[key];
            if (held.empty()) held.assign(max_layers_[c], 0);
            for (int j = b; j < b + k; ++j) held[j] = 1;
        }
    }
    last_dev_[m] = devices;
    last_wave_[m] = wave;
    comp_last_[c] = devices;
}

std::vector<int> Placer::choose(const std::vector<int>& room, int n) {
    const int S = in_.island_size;
    // Islands present in `room` (ascending), each a contiguous run of room; the affinity sum
    // is taken in ascending device order, exactly as the Python twin adds it.
    std::vector<int> isl, beg, cnt;
    std::vector<double> asum;
    for (size_t idx = 0; idx < room.size(); ++idx) {
        const int d = room[idx], i = d / S;
        if (isl.empty() || isl.back() != i) {
            isl.push_back(i);
            beg.push_back(static_cast<int>(idx));
            cnt.push_back(0);
            asum.push_back(0.0);
        }
        ++cnt.back();
        asum.back() += aff_[d];
    }
    auto best_first = [&](size_t pos) {
        std::vector<int> devs(room.begin() + beg[pos], room.begin() + beg[pos] + cnt[pos]);
        std::sort(devs.begin(), devs.end(), [&](int a, int b) {
            if (aff_[a] != aff_[b]) return aff_[a] > aff_[b];
            return a < b;
        });
        return devs;
    };
    if (n <= S) {
        int best = -1;
        for (size_t pos = 0; pos < isl.size(); ++pos) {
            if (cnt[pos] < n) continue;
            // Most affinity, then the tightest fit, then the lowest id (ascending order).
            if (best < 0 || asum[pos] > asum[best] ||
                (asum[pos] == asum[best] && cnt[pos] < cnt[best]))
                best = static_cast<int>(pos);
        }
        if (best >= 0) {
            std::vector<int> out = best_first(best);
            out.resize(n);
            std::sort(out.begin(), out.end());
            return out;
        }
    }
    std::vector<size_t> order(isl.size());
    for (size_t pos = 0; pos < isl.size(); ++pos) order[pos] = pos;
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        if (asum[a] != asum[b]) return asum[a] > asum[b];
        if (cnt[a] != cnt[b]) return cnt[a] > cnt[b];
        return isl[a] < isl[b];
    });
    std::vector<int> chosen;
    for (size_t pos : order) {
        for (int d : best_first(pos)) {
            chosen.push_back(d);
            if (static_cast<int>(chosen.size()) == n) {
                std::sort(chosen.begin(), chosen.end());
                return chosen;
            }
        }
    }
    assert(false && "room holds fewer than n devices");
    return chosen;
}

void Placer::take(const std::vector<int>& devices) {
    for (int d : devices) {
        free_[d] = 0;
        --isl_free_[island_of_[d]];
    }
}

// choose(room = every free device, n) without scanning every device: only devices with a
// positive affinity (touched_) and the per-island free counts matter.
std::vector<int> Placer::choose_free(int n) {
    const int S = in_.island_size, N = in_.num_devices;
    // The free devices with a positive affinity, ascending: sort the few, or scan all N when
    // they are many (same list; touched_ holds each device once, exactly those with aff_ > 0).
    tf_.clear();
    if (touched_.size() * 16 < static_cast<size_t>(N)) {
        for (int d : touched_)
            if (free_[d]) tf_.push_back(d);
        std::sort(tf_.begin(), tf_.end());
    } else {
        for (int d = 0; d < N; ++d)
            if (free_[d] && aff_[d] > 0.0) tf_.push_back(d);
    }
    // Affinity sum per island, added in ascending device order like the full scan (zeros add
    // nothing, so skipping them changes no bit).
    ti_.clear();
    tsum_.clear();
    for (int d : tf_) {
        if (ti_.empty() || ti_.back() != island_of_[d]) {
            ti_.push_back(island_of_[d]);
            tsum_.push_back(0.0);
        }
        tsum_.back() += aff_[d];
    }
    // Free devices of island i into devs_, by affinity descending then id. An island without
    // touched free devices is all zeros: ascending already.
    auto island_devices = [&](int i, bool touched) {
        devs_.clear();
        for (int d = i * S; d < std::min(N, (i + 1) * S); ++d)
            if (free_[d]) devs_.push_back(d);
        if (touched)
            std::sort(devs_.begin(), devs_.end(), [&](int a, int b) {
                if (aff_[a] != aff_[b]) return aff_[a] > aff_[b];
                return a < b;
            });
    };
    auto is_touched = [&](int i) { return std::binary_search(ti_.begin(), ti_.end(), i); };
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
            island_devices(best, is_touched(best));
            std::vector<int> out(devs_.begin(), devs_.begin() + n);
            std::sort(out.begin(), out.end());
            return out;
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
    // Mark the chosen devices island by island, then list them ascending (islands are
    // contiguous ranges, so sorting the few islands used is enough).
    int taken = 0;
    size_t used = 0;
    for (; used < order_.size() && taken < n; ++used) {
        island_devices(order_[used], is_touched(order_[used]));
        for (int d : devs_) {
            mark_[d] = 1;
            if (++taken == n) break;
        }
    }
    assert(taken == n && "fewer than n free devices");
    std::sort(order_.begin(), order_.begin() + used);
    std::vector<int> chosen;
    chosen.reserve(n);
    for (size_t k = 0; k < used; ++k) {
        const int i = order_[k];
        for (int d = i * S; d < std::min(N, (i + 1) * S); ++d)
            if (mark_[d]) {
                chosen.push_back(d);
                mark_[d] = 0;
            }
    }
    return chosen;
}

std::vector<Placed>& Placer::place_wave(int wave, const std::vector<Group>& groups,
                                       const std::vector<int>& done,
                                       const std::function<int(int)>& rem_layers, double D) {
    const int N = in_.num_devices;
    std::fill(free_.begin(), free_.end(), 1);
    for (int i = 0; i < num_islands_; ++i)
        isl_free_[i] = std::min(in_.island_size, N - i * in_.island_size);
    std::vector<Group>& cont = cont_;
    std::vector<Group>& rest = rest_;
    cont.clear();
    rest.clear();
    for (const Group& g : groups) {
        const bool continuing =
            last_wave_[g.metaop] == wave - 1 &&
            static_cast<int>(last_dev_[g.metaop].size()) == in_.counts[g.metaop][g.count_index];
        (continuing ? cont : rest).push_back(g);
    }
    std::sort(cont.begin(), cont.end(),
              [](const Group& a, const Group& b) { return a.metaop < b.metaop; });
    std::sort(rest.begin(), rest.end(), [&](const Group& a, const Group& b) {
        const int na = in_.counts[a.metaop][a.count_index];
        const int nb = in_.counts[b.metaop][b.count_index];
        if (na != nb) return na > nb;
        return a.metaop < b.metaop;
    });
    std::vector<Placed>& placed = placed_;
    placed.clear();
    for (const Group& g : cont) {
        const int m = g.metaop, n = in_.counts[m][g.count_index];
        const std::vector<int>& devs = last_dev_[m];
        bool ok = true;
        for (int d : devs) ok = ok && fits(d, m, done[m], g.layers, n);
        if (ok) {
            take(devs);
            placed.push_back({m, g.count_index, g.layers, devs});
            commit(wave, m, done[m], g.layers, placed.back().devices);
        } else {
            rest.push_back(g);  // retried below, after the others, on any devices
        }
    }
    for (const Group& g : rest) {
        const int m = g.metaop, c = in_.component[m];
        // Affinity: MB that would not have to move (or be allocated) if placed on a device.
        auto add = [&](const std::vector<int>& devs, double weight) {
            for (int d : devs) {
                if (aff_[d] == 0.0) touched_.push_back(d);
                aff_[d] += weight;
            }
        };
        if (done[m] > 0) {
            add(last_dev_[m], 1.0 + in_.output_mb[m]);
        } else {
            for (int p : preds_[m]) add(last_dev_[p], 1.0 + in_.output_mb[p]);
        }
        if (in_.param_gb[c] > 0.0) add(comp_last_[c], 1024.0 * in_.param_gb[c]);
        for (int cj = g.count_index; cj >= 0; --cj) {
            const int n = in_.counts[m][cj];
            const int kj = cj == g.count_index ? g.layers
                                               : layers_fitting(D, in_.times[m][cj], rem_layers(m));
            if (kj == 0) break;
            std::vector<int> devs;
            if (limited_) {
                room_.clear();
                for (int d = 0; d < N; ++d)
                    if (free_[d] && fits(d, m, done[m], kj, n)) room_.push_back(d);
                if (static_cast<int>(room_.size()) < n) continue;
                devs = choose(room_, n);
            } else {
                // Without a memory limit every free device is room, and the scheduler never
                // proposes more than are free: the same choice, from island counts.
                devs = choose_free(n);
            }
            take(devs);
            commit(wave, m, done[m], kj, devs);
            placed.push_back({m, cj, kj, std::move(devs)});
            break;
        }
        for (int d : touched_) aff_[d] = 0.0;
        touched_.clear();
    }
    return placed;
}

}  // namespace mtmm
