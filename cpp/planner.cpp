#include "planner.hpp"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>
#include <optional>
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
    // The message is built only on failure: check() runs on every plan.
    auto fail = [&](size_t m, const char* why) {
        throw PlanningError("MetaOp '" + names[m] + "': " + why);
    };
    for (size_t m = 0; m < n; ++m) {
        if (layers[m] < 1) fail(m, "layers must be >= 1");
        if (counts[m].empty()) fail(m, "no valid device count <= num_devices");
        if (counts[m].size() != times[m].size()) fail(m, "counts and times differ in length");
        for (size_t j = 0; j < counts[m].size(); ++j) {
            if (counts[m][j] < 1 || counts[m][j] > num_devices ||
                (j > 0 && counts[m][j] <= counts[m][j - 1]))
                fail(m, "counts must ascend inside [1, num_devices]");
            if (!(times[m][j] > 0.0) || !std::isfinite(times[m][j]))
                fail(m, "times must be positive and finite");
            if (j > 0 && times[m][j] > times[m][j - 1])
                fail(m, "non-monotonic times (a larger count is slower)");
        }
        if (component[m] < 0 || component[m] >= static_cast<int>(param_gb.size()))
            fail(m, "component id out of range");
        if (!(activation_gb[m] >= 0.0) || !(output_mb[m] >= 0.0))
            fail(m, "activation_gb and output_mb must be >= 0");
    }
    for (double p : param_gb)
        if (!(p >= 0.0)) throw PlanningError("param_gb must be >= 0");
}

namespace {

// A MetaOp's bi-point tuples (at most two), inline: no allocation per MetaOp and variant.
struct Tuples {
    int size = 0;
    int cur = 0;               // current tuple
    int count_index[2] = {0, 0};
    int left[2] = {0, 0};      // layers left

    void assign(const std::vector<std::pair<int, int>>& t) {
        assert(t.size() >= 1 && t.size() <= 2);
        size = static_cast<int>(t.size());
        cur = 0;
        for (int i = 0; i < size; ++i) {
            count_index[i] = t[i].first;
            left[i] = t[i].second;
        }
    }
    void assign_one(int ci, int layers) {
        size = 1;
        cur = 0;
        count_index[0] = ci;
        left[0] = layers;
    }
};

struct State {
    std::vector<Tuples> tuples;
    const CoreInput* in;

    double rem_time(int m) const {
        const Tuples& t = tuples[m];
        double s = 0.0;
        for (int i = t.cur; i < t.size; ++i)
            s += static_cast<double>(t.left[i]) * in->times[m][t.count_index[i]];
        return s;
    }
};

// mtmm's wave length (reference.py's _least_idle_length): among D0 and the smallest few longer
// ends of a group's tuple or of one layer of a group, the one that leaves the smallest fraction
// of the groups' device-time idle; ties: the shorter.
constexpr size_t kIdleCandidates = 8;

template <class RemLayers>
double least_idle_length(const CoreInput& in, const std::vector<Group>& groups, double D0,
                         const RemLayers& rem_layers, std::vector<double>& ends) {
    ends.clear();
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
    for (int m = 0; m < n_ops; ++m) {
        Tuples& t = st.tuples[m];
        if (fastest)
            t.assign_one(static_cast<int>(in.counts[m].size()) - 1, in.layers[m]);
        else
            t.assign(prep.tuples[m]);
        if (options.single_tuple && !fastest && t.size == 2) {
            // The tuple with more layers (ties: the lower count) takes all the layers.
            t.assign_one(t.left[0] >= t.left[1] ? t.count_index[0] : t.count_index[1],
                         in.layers[m]);
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
    auto rem_layers = [&](int m) { return st.tuples[m].left[st.tuples[m].cur]; };

    // Candidates kept sorted by (priority descending, index ascending): a sorted vector (no
    // node allocations; a wave touches few), updated only for the MetaOps a wave touched (the
    // Python twin re-sorts every wave; the order is the same).
    auto cmp = [](const std::pair<double, int>& a, const std::pair<double, int>& b) {
        if (a.first != b.first) return a.first > b.first;
        return a.second < b.second;
    };
    std::vector<std::pair<double, int>> cands;
    cands.reserve(n_ops);
    std::vector<double> key(n_ops, 0.0);
    auto enter = [&](int m) {
        key[m] = st.rem_time(m) + tail[m];
        const std::pair<double, int> e{key[m], m};
        cands.insert(std::lower_bound(cands.begin(), cands.end(), e, cmp), e);
    };
    auto leave = [&](int m) {
        const std::pair<double, int> e{key[m], m};
        auto it = std::lower_bound(cands.begin(), cands.end(), e, cmp);
        assert(it != cands.end() && it->second == m);
        cands.erase(it);
    };
    if (options.overlap_levels) {
        for (int m = 0; m < n_ops; ++m)
            if (pred_left[m] == 0) enter(m);
    }
    std::vector<Group> groups, sized;
    std::vector<double> ends;
    std::vector<std::pair<double, int>> heap;
    double t_now = 0.0;
    int current_level = -1, remaining = n_ops;
    while (remaining > 0) {
        if (!options.overlap_levels && cands.empty()) {
            ++current_level;
            for (int m : members[current_level]) enter(m);
        }
        // Propose each candidate's current tuple, highest priority first, while it fits.
        // defer_short: the short candidates (priority under half the top one's) wait for the
        // second pass, after resource extension.
        const double top = cands.empty() ? 0.0 : cands.front().first;
        auto propose = [&](int free, bool pass_short) {
            for (const auto& [prio, m] : cands) {
                if (free == 0) break;
                if (options.defer_short && (2.0 * prio < top) != pass_short) continue;
                const int ci = st.tuples[m].count_index[st.tuples[m].cur];
                const int n = in.counts[m][ci];
                if (n <= free) {
                    groups.push_back({m, ci, 0});
                    free -= n;
                }
            }
            return free;
        };
        groups.clear();
        int free = propose(N, false);
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
        if (options.defer_short) free = propose(free, true);
        // The wave lasts until the first group finishes its tuple; the others are sliced.
        double D = 0.0;
        for (size_t g = 0; g < groups.size(); ++g) {
            const int m = groups[g].metaop;
            const double r =
                static_cast<double>(rem_layers(m)) * in.times[m][groups[g].count_index];
            D = g == 0 ? r : std::min(D, r);
        }
        if (options.least_idle) D = least_idle_length(in, groups, D, rem_layers, ends);
        sized.clear();
        for (const Group& g : groups) {
            const int k =
                layers_fitting(D, in.times[g.metaop][g.count_index], rem_layers(g.metaop));
            if (k > 0) sized.push_back({g.metaop, g.count_index, k});
        }
        const int wave_index = static_cast<int>(out.waves.size());
        std::vector<Placed>& placed = placer.place_wave(wave_index, sized, done, rem_layers, D);
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
            leave(m);
            Tuples& tup = st.tuples[m];
            tup.left[tup.cur] -= p.layers;
            if (tup.left[tup.cur] == 0) {
                ++tup.cur;
                if (tup.cur == tup.size) {
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
    out.defer_short = options.defer_short;
    return out;
}

}  // namespace

Schedule plan_core(const CoreInput& in, const PlanOptions& options) {
    in.check();
    const double inf = std::numeric_limits<double>::infinity();
    const Prepared prep(in);
    if (!options.portfolio) return *plan_once(in, prep, options, false, inf);
    // Same variants, same order as reference.PORTFOLIO: overlap_levels, least_idle,
    // single_tuple, fastest, defer_short. Branch and bound: a variant stops as soon as it
    // cannot beat the best plan so far; the result is the same as planning every variant to
    // the end.
    static const bool kVariants[5][5] = {{false, true, true, false, false},
                                         {true, true, true, false, false},
                                         {true, false, true, false, false},
                                         {false, false, false, true, false},
                                         {false, true, true, false, true}};
    std::optional<Schedule> best;
    std::string first_error;
    for (const auto& v : kVariants) {
        PlanOptions o = options;
        o.overlap_levels = v[0];
        o.least_idle = v[1];
        o.single_tuple = v[2];
        o.defer_short = v[4];
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
