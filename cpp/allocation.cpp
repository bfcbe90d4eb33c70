#include "allocation.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace mtmm {

namespace {
constexpr int kBisectionSteps = 200;

// devices_for on f[0, size) with the segment searched from `j` (updated): the bisection's C
// changes little between calls, and the segment found is the same whatever the start (it is
// unique).
double devices_from(const int* counts, const double* f, size_t size, double C, size_t& j) {
    if (C >= f[0]) return static_cast<double>(counts[0]) * f[0] / C;
    while (j > 0 && !(f[j] > C)) --j;
    while (j + 1 < size && f[j + 1] > C) ++j;
    if (j + 1 == size) return static_cast<double>(counts[j]);
    return static_cast<double>(counts[j]) +
           static_cast<double>(counts[j + 1] - counts[j]) * (f[j] - C) / (f[j] - f[j + 1]);
}
}  // namespace

double devices_for(const std::vector<int>& counts, const std::vector<double>& f, double C) {
    size_t j = 0;
    return devices_from(counts.data(), f.data(), f.size(), C, j);
}

double level_cstar(const CoreInput& in, Range members, std::vector<double>& f) {
    // f: the members' f(c_j) = T(c_j) * L one after another; member i's start at f_at[i].
    const size_t n = members.size();
    std::vector<size_t> f_at(n + 1), hint(n, 0);
    f.clear();
    for (size_t i = 0; i < n; ++i) {
        const int m = members[i];
        f_at[i] = f.size();
        for (double t : in.times[m]) f.push_back(t * static_cast<double>(in.layers[m]));
    }
    f_at[n] = f.size();
    const double N = static_cast<double>(in.num_devices);
    auto total = [&](double C) {
        double s = 0.0;
        for (size_t i = 0; i < n; ++i)
            s += devices_from(in.counts[members[i]].data(), f.data() + f_at[i],
                              f_at[i + 1] - f_at[i], C, hint[i]);
        return s;
    };
    double lo = -std::numeric_limits<double>::infinity();
    double hi = 0.0;
    for (size_t i = 0; i < n; ++i) {
        lo = std::max(lo, f[f_at[i + 1] - 1]);
        hi += f[f_at[i]];
    }
    hi = std::max(hi, lo);
    if (total(lo) <= N) return lo;
    for (int it = 0; it < kBisectionSteps; ++it) {
        const double mid = 0.5 * (lo + hi);
        if (!(lo < mid && mid < hi)) break;
        if (total(mid) > N)
            lo = mid;
        else
            hi = mid;
    }
    return hi;
}

BiPoint bipoint(const CoreInput& in, int m, double C) {
    const int L = in.layers[m];
    const std::vector<double>& T = in.times[m];
    const size_t size = T.size();
    auto f = [&](size_t j) { return T[j] * static_cast<double>(L); };
    BiPoint out;
    auto add = [&](int count_index, int layers) {
        out.count_index[out.size] = count_index;
        out.layers[out.size] = layers;
        ++out.size;
    };
    if (C >= f(0)) {
        add(0, L);
        return out;
    }
    // The last index j with f[j] > C; f never increases, so those indices form a prefix.
    size_t j = 0;
    while (j + 1 < size && f(j + 1) > C) ++j;
    if (j + 1 == size) {
        add(static_cast<int>(j), L);
        return out;
    }
    const double t_lo = T[j], t_hi = T[j + 1];
    double x = std::floor((f(j) - C) / (t_lo - t_hi) + 0.5);
    x = std::min(std::max(x, 0.0), static_cast<double>(L));
    const int l_hi = static_cast<int>(x);
    if (L - l_hi > 0) add(static_cast<int>(j), L - l_hi);
    if (l_hi > 0) add(static_cast<int>(j + 1), l_hi);
    return out;
}

double lower_bound(const CoreInput& in, const std::vector<int>& topo_order,
                   const Adjacency& preds) {
    const size_t n = in.layers.size();
    std::vector<double> fastest(n), finish(n, 0.0);
    double device_time = 0.0;
    for (size_t m = 0; m < n; ++m) {
        const double L = static_cast<double>(in.layers[m]);
        double best_t = std::numeric_limits<double>::infinity();
        double best_dt = std::numeric_limits<double>::infinity();
        for (size_t j = 0; j < in.counts[m].size(); ++j) {
            best_t = std::min(best_t, in.times[m][j] * L);
            best_dt = std::min(best_dt, static_cast<double>(in.counts[m][j]) * in.times[m][j] * L);
        }
        fastest[m] = best_t;
        device_time += best_dt;
    }
    double cp = 0.0;
    for (int v : topo_order) {
        double start = 0.0;
        for (int u : preds[v]) start = std::max(start, finish[u]);
        finish[v] = fastest[v] + start;
        cp = std::max(cp, finish[v]);
    }
    return std::max(cp, device_time / static_cast<double>(in.num_devices));
}

}  // namespace mtmm
