#include "planner.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <set>
#include <string>

#include "allocation.hpp"
#include "dag.hpp"
#include "placement.hpp"

namespace mtmm {

void CoreInput::check() const {
    const size_t n = layers.size();
    if (num_devices < 1) throw PlanningError("num_devices must be >= 1");
    if (island_size < 1) throw PlanningError("island_size must be >= 1");
    if (n == 0) throw PlanningError("metaops must hold at least one MetaOp");
    if (names.size() != n || counts.size() != n || times.size() != n || component.size() != n ||
        activation_gb.size() != n || output_mb.size() != n)
        throw PlanningError("per-MetaOp arrays must all have one entry per MetaOp");
    for (size_t m = 0; m < n; ++m) {
        const std::string who = "MetaOp '" + names[m] + "': ";
        if (layers[m] < 1) throw PlanningError(who + "layers must be >= 1");
        if (counts[m].empty()) throw PlanningError(who + "no valid device count <= num_devices");
        if (counts[m].size() != times[m].size())
            throw PlanningError(who + "counts and times differ in length");
        for (size_t j = 0; j < counts[m].size(); ++j) {
            if (counts[m][j] < 1 || counts[m][j] > num_devices ||
                (j > 0 && counts[m][j] <= counts[m][j - 1]))
                throw PlanningError(who + "counts must ascend inside [1, num_devices]");
            if (!(times[m][j] > 0.0) || !std::isfinite(times[m][j]))
                throw PlanningError(who + "times must be positive and finite");
            if (j > 0 && times[m][j] > times[m][j - 1])
                throw PlanningError(who + "non-monotonic times (a larger count is slower)");
        }
        if (component[m] < 0 || component[m] >= static_cast<int>(param_gb.size()))
            throw PlanningError(who + "component id out of range");
        if (!(activation_gb[m] >= 0.0) || !(output_mb[m] >= 0.0))
            throw PlanningError(who + "activation_gb and output_mb must be >= 0");
    }
    for (double p : param_gb)
        if (!(p >= 0.0)) throw PlanningError("param_gb must be >= 0");
}

namespace {

struct State {
    std::vector<std::vector<std::pair<int, int>>> tuples;  // (count index, layers left)
    std::vector<int> cur;                                   // current tuple
    const CoreInput* in;

    double rem_time(int m) const {
        double s = 0.0;
        for (size_t t = cur[m]; t < tuples[m].size(); ++t)
            s += static_cast<double>(tuples[m][t].second) * in->times[m][tuples[m][t].first];
        return s;
    }
};

// mtmm's wave length (reference.py's _least_idle_length): among D0 and the smallest few longer
// ends of a group's tuple or of one layer of a group, the one that leaves the smallest fraction
// of the groups' device-time idle; ties: the shorter.
constexpr size_t kIdleCandidates = 8;

template <class RemLayers>
double least_idle_length(const CoreInput& in, const std::vector<Group>& groups, double D0,
                         const RemLayers& rem_layers) {
    std::vector<double> ends;
    for (const Group& g : groups) {
        const double T = in.times[g.metaop][g.count_index];
        const double e = static_cast<double>(rem_layers(g.metaop)) * T;
        if (e > D0) ends.push_back(e);
        if (T > D0) ends.push_back(T);
    }
    std::sort(ends.begin(), ends.end());
    ends.erase(std::unique(ends.begin(), ends.end()), ends.end());
    if (ends.size() > kIdleCandidates - 1) ends.resize(kIdleCandidates - 1);
    ends.insert(ends.begin(), D0);
    double best = D0, best_frac = 0.0;
    for (size_t i = 0; i < ends.size(); ++i) {
        const double D = ends[i];
        double idle = 0.0;
        for (const Group& g : groups) {
            const double T = in.times[g.metaop][g.count_index];
            const double n = static_cast<double>(in.counts[g.metaop][g.count_index]);
            idle += n * (D - static_cast<double>(layers_fitting(D, T, rem_layers(g.metaop))) * T);
        }
        const double frac = idle / D;
        if (i == 0 || frac < best_frac) {
            best = D;
            best_frac = frac;
        }
    }
    return best;
}

}  // namespace

namespace {

// What every variant shares: the DAG, its MetaLevels, the levels' C*, the bi-point tuples and
// the lower bound (computed once for the whole portfolio).
struct Prepared {
    Dag dag;
    std::vector<int> order;
    std::vector<int> level;
    std::vector<std::vector<int>> members;
    std::vector<double> level_cstar;
    double relaxed_ms = 0.0;
    std::vector<std::vector<std::pair<int, int>>> tuples;
    double lower_bound_ms = 0.0;

    explicit Prepared(const CoreInput& in)
        : dag(static_cast<int>(in.layers.size()), in.flows) {
        const int n_ops = static_cast<int>(in.layers.size());
        try {
            order = dag.topological_order();
        } catch (const GraphError& e) {
            throw PlanningError(std::string("the flows have a cycle: ") + e.what());
        }
        level.assign(n_ops, 0);
        for (int u : order)
            for (int v : dag.succ[u]) level[v] = std::max(level[v], level[u] + 1);
        const int num_levels = *std::max_element(level.begin(), level.end()) + 1;
        members.resize(num_levels);
        for (int m = 0; m < n_ops; ++m) members[level[m]].push_back(m);
        level_cstar.resize(num_levels);
        for (int lv = 0; lv < num_levels; ++lv) {
            level_cstar[lv] = mtmm::level_cstar(in, members[lv]);
            relaxed_ms += level_cstar[lv];
        }
        tuples.resize(n_ops);
        for (int m = 0; m < n_ops; ++m) tuples[m] = bipoint(in, m, level_cstar[level[m]]);
        lower_bound_ms = lower_bound(in, order, dag.pred);
    }
};

// One variant. Returns nothing as soon as the plan's end reaches `bound` with work left.
std::optional<Schedule> plan_once(const CoreInput& in, const Prepared& prep,
                                  const PlanOptions& options, bool fastest, double bound) {
    const int n_ops = static_cast<int>(in.layers.size());
    const int N = in.num_devices;
    const Dag& dag = prep.dag;
    const std::vector<int>& order = prep.order;
    const std::vector<int>& level = prep.level;
    const std::vector<std::vector<int>>& members = prep.members;

    Schedule out;
    out.levels = level;
    out.level_cstar = prep.level_cstar;
    out.relaxed_ms = prep.relaxed_ms;
    State st;
    st.in = &in;
    st.tuples.resize(n_ops);
    st.cur.assign(n_ops, 0);
    for (int m = 0; m < n_ops; ++m) {
        if (fastest)
            st.tuples[m] = {{static_cast<int>(in.counts[m].size()) - 1, in.layers[m]}};
        else
            st.tuples[m] = prep.tuples[m];
        if (options.single_tuple && !fastest && st.tuples[m].size() == 2) {
            // The tuple with more layers (ties: the lower count) takes all the layers.
            const auto& t = st.tuples[m];
            const int ci = t[0].second >= t[1].second ? t[0].first : t[1].first;
            st.tuples[m] = {{ci, in.layers[m]}};
        }
    }
    std::vector<int> done(n_ops, 0);

    std::vector<double> tail(n_ops, 0.0);
    if (options.overlap_levels) {
        for (auto it = order.rbegin(); it != order.rend(); ++it)
            for (int s : dag.succ[*it]) tail[*it] = std::max(tail[*it], st.rem_time(s) + tail[s]);
    }

    std::vector<int> pred_left(n_ops);
    for (int m = 0; m < n_ops; ++m) pred_left[m] = static_cast<int>(dag.pred[m].size());
    std::vector<char> finished(n_ops, 0);
    Placer placer(in, dag.pred);
    auto rem_layers = [&](int m) { return st.tuples[m][st.cur[m]].second; };

    // Candidates kept sorted by (priority descending, index ascending): a set, updated only for
    // the MetaOps a wave touched (the Python twin re-sorts every wave; the order is the same).
    auto cmp = [](const std::pair<double, int>& a, const std::pair<double, int>& b) {
        if (a.first != b.first) return a.first > b.first;
        return a.second < b.second;
    };
    std::set<std::pair<double, int>, decltype(cmp)> cands(cmp);
    std::vector<double> key(n_ops, 0.0);
    auto enter = [&](int m) {
        key[m] = st.rem_time(m) + tail[m];
        cands.emplace(key[m], m);
    };
    if (options.overlap_levels) {
        for (int m = 0; m < n_ops; ++m)
            if (pred_left[m] == 0) enter(m);
    }
    std::vector<Group> groups, sized;
    std::vector<std::pair<double, int>> heap;
    double t_now = 0.0;
    int current_level = -1, remaining = n_ops;
    while (remaining > 0) {
        if (!options.overlap_levels && cands.empty()) {
            ++current_level;
            for (int m : members[current_level]) enter(m);
        }
        // Propose each candidate's current tuple, highest priority first, while it fits.
        int free = N;
        groups.clear();
        for (const auto& [prio, m] : cands) {
            const int ci = st.tuples[m][st.cur[m]].first;
            const int n = in.counts[m][ci];
            if (n <= free) {
                groups.push_back({m, ci, 0});
                free -= n;
                if (free == 0) break;
            }
        }
        // Resource extension: grow the group with the most remaining time of its tuple to its
        // next valid count, one step at a time, while devices stay idle; only a step that makes
        // the layer faster counts. Ties: earlier group. (A max-heap on (r, -position) gives the
        // linear scan's choice: a group that cannot grow now never can, as free only shrinks.)
        heap.clear();
        for (size_t g = 0; g < groups.size(); ++g) {
            const int m = groups[g].metaop, ci = groups[g].count_index;
            if (ci + 1 < static_cast<int>(in.counts[m].size()) &&
                in.times[m][ci + 1] < in.times[m][ci])
                heap.emplace_back(static_cast<double>(rem_layers(m)) * in.times[m][ci],
                                  -static_cast<int>(g));
        }
        std::make_heap(heap.begin(), heap.end());
        while (free > 0 && !heap.empty()) {
            std::pop_heap(heap.begin(), heap.end());
            const int g = -heap.back().second;
            heap.pop_back();
            Group& grp = groups[g];
            const int m = grp.metaop, ci = grp.count_index;
            const int delta = in.counts[m][ci + 1] - in.counts[m][ci];
            if (delta > free) continue;
            free -= delta;
            ++grp.count_index;
            if (ci + 2 < static_cast<int>(in.counts[m].size()) &&
                in.times[m][ci + 2] < in.times[m][ci + 1]) {
                heap.emplace_back(static_cast<double>(rem_layers(m)) * in.times[m][ci + 1], -g);
                std::push_heap(heap.begin(), heap.end());
            }
        }
        // The wave lasts until the first group finishes its tuple; the others are sliced.
        double D = 0.0;
        for (size_t g = 0; g < groups.size(); ++g) {
            const int m = groups[g].metaop;
            const double r =
                static_cast<double>(rem_layers(m)) * in.times[m][groups[g].count_index];
            D = g == 0 ? r : std::min(D, r);
        }
        if (options.least_idle) D = least_idle_length(in, groups, D, rem_layers);
        sized.clear();
        for (const Group& g : groups) {
            const int k =
                layers_fitting(D, in.times[g.metaop][g.count_index], rem_layers(g.metaop));
            if (k > 0) sized.push_back({g.metaop, g.count_index, k});
        }
        const int wave_index = static_cast<int>(out.waves.size());
        std::vector<Placed> placed = placer.place_wave(wave_index, sized, done, rem_layers, D);
        if (placed.empty()) {
            const int m = sized[0].metaop;
            throw PlanningError("cannot fit in memory: MetaOp '" + in.names[m] + "' (layers from " +
                                std::to_string(done[m]) +
                                ") does not fit the free memory of any " +
                                std::to_string(in.counts[m][0]) + " devices (device_memory_gb = " +
                                std::to_string(in.device_memory_gb) + ")");
        }
        Wave wave{t_now, 0.0, {}};
        wave.slices.reserve(placed.size());
        for (Placed& p : placed) {
            const int m = p.metaop;
            wave.duration_ms =
                std::max(wave.duration_ms,
                         static_cast<double>(p.layers) * in.times[m][p.count_index]);
            wave.slices.push_back({m, done[m], done[m] + p.layers, std::move(p.devices)});
            done[m] += p.layers;
            cands.erase({key[m], m});
            auto& tup = st.tuples[m][st.cur[m]];
            tup.second -= p.layers;
            if (tup.second == 0) {
                ++st.cur[m];
                if (st.cur[m] == static_cast<int>(st.tuples[m].size())) {
                    finished[m] = 1;
                    --remaining;
                    for (int s : dag.succ[m])
                        if (--pred_left[s] == 0 && options.overlap_levels) enter(s);
                }
            }
            if (!finished[m]) enter(m);
        }
        t_now += wave.duration_ms;
        out.waves.push_back(std::move(wave));
        if (t_now >= bound && remaining > 0) return std::nullopt;
    }
    out.makespan_ms = t_now;
    out.lower_bound_ms = prep.lower_bound_ms;
    out.overlap_levels = options.overlap_levels;
    out.least_idle = options.least_idle;
    out.single_tuple = options.single_tuple;
    out.fastest = fastest;
    return out;
}

}  // namespace

Schedule plan_core(const CoreInput& in, const PlanOptions& options) {
    in.check();
    const double inf = std::numeric_limits<double>::infinity();
    const Prepared prep(in);
    if (!options.portfolio) return *plan_once(in, prep, options, false, inf);
    // Same variants, same order as reference.PORTFOLIO: overlap_levels, least_idle,
    // single_tuple, fastest. Branch and bound: a variant stops as soon as it cannot beat the
    // best plan so far; the result is the same as planning every variant to the end.
    static const bool kVariants[4][4] = {{false, true, true, false},
                                         {true, true, true, false},
                                         {true, false, true, false},
                                         {false, false, false, true}};
    std::optional<Schedule> best;
    std::string first_error;
    for (const auto& v : kVariants) {
        PlanOptions o = options;
        o.overlap_levels = v[0];
        o.least_idle = v[1];
        o.single_tuple = v[2];
        try {
            std::optional<Schedule> s =
                plan_once(in, prep, o, v[3], best ? best->makespan_ms : inf);
            if (s && (!best || s->makespan_ms < best->makespan_ms)) best = std::move(s);
        } catch (const PlanningError& e) {
            if (first_error.empty()) first_error = e.what();
        }
    }
    if (!best) throw PlanningError(first_error);
    return std::move(*best);
}

}  // namespace mtmm
