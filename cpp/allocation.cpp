#include "allocation.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace mtmm {

namespace {
constexpr int kBisectionSteps = 200;

// The last index j with f[j] > C; f never increases, so those indices form a prefix.
// The caller guarantees f[0] > C.
size_t last_above(const std::vector<double>& f, double C) {
    size_t j = 0;
    while (j + 1 < f.size() && f[j + 1] > C) ++j;
    return j;
}

std::vector<double> layer_times(const CoreInput& in, int m) {
    std::vector<double> f(in.times[m].size());
    for (size_t j = 0; j < f.size(); ++j)
        f[j] = in.times[m][j] * static_cast<double>(in.layers[m]);
    return f;
}

// devices_for with the segment searched from `j` (updated): the bisection's C changes little
// between calls, and the segment found is the same whatever the start (it is unique).
double devices_from(const std::vector<int>& counts, const std::vector<double>& f, double C,
                    size_t& j) {
    if (C >= f[0]) return static_cast<double>(counts[0]) * f[0] / C;
    while (j > 0 && !(f[j] > C)) --j;
    while (j + 1 < f.size() && f[j + 1] > C) ++j;
    if (j + 1 == f.size()) return static_cast<double>(counts[j]);
    return static_cast<double>(counts[j]) +
           static_cast<double>(counts[j + 1] - counts[j]) * (f[j] - C) / (f[j] - f[j + 1]);
}
}  // namespace

double devices_for(const std::vector<int>& counts, const std::vector<double>& f, double C) {
    size_t j = 0;
    return devices_from(counts, f, C, j);
}

double level_cstar(const CoreInput& in, const std::vector<int>& members) {
    std::vector<std::vector<double>> f;
    f.reserve(members.size());
    for (int m : members) f.push_back(layer_times(in, m));
    const double N = static_cast<double>(in.num_devices);
    std::vector<size_t> hint(members.size(), 0);
    auto total = [&](double C) {
        double s = 0.0;
        for (size_t i = 0; i < members.size(); ++i)
            s += devices_from(in.counts[members[i]], f[i], C, hint[i]);
        return s;
    };
    double lo = -std::numeric_limits<double>::infinity();
    double hi = 0.0;
    for (const auto& fm : f) {
        lo = std::max(lo, fm.back());
        hi += fm[0];
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

std::vector<std::pair<int, int>> bipoint(const CoreInput& in, int m, double C) {
    const int L = in.layers[m];
    const std::vector<double> f = layer_times(in, m);
    if (C >= f[0]) return {{0, L}};
    const size_t j = last_above(f, C);
    if (j + 1 == f.size()) return {{static_cast<int>(j), L}};
    const double t_lo = in.times[m][j], t_hi = in.times[m][j + 1];
    double x = std::floor((f[j] - C) / (t_lo - t_hi) + 0.5);
    x = std::min(std::max(x, 0.0), static_cast<double>(L));
    const int l_hi = static_cast<int>(x);
    std::vector<std::pair<int, int>> out;
    if (L - l_hi > 0) out.emplace_back(static_cast<int>(j), L - l_hi);
    if (l_hi > 0) out.emplace_back(static_cast<int>(j + 1), l_hi);
    return out;
}

double lower_bound(const CoreInput& in, const std::vector<int>& topo_order,
                   const std::vector<std::vector<int>>& preds) {
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
