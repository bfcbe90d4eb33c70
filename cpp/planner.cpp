#include "planner.hpp"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <exception>
#include <limits>
#include <functional>
#include <memory>
#include <sstream>
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
        activation_gb.size() != n || output_mb.size() != n || hidden_mb.size() != n)
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
        if (!(activation_gb[m] >= 0.0) || !(output_mb[m] >= 0.0) || !(hidden_mb[m] >= 0.0))
            fail(m, "activation_gb, output_mb and hidden_mb must be >= 0");
    }
    for (double p : param_gb)
        if (!(p >= 0.0)) throw PlanningError("param_gb must be >= 0");
    if (!(shard_fraction >= 0.0 && shard_fraction < 1.0))
        throw PlanningError("shard_fraction must be in [0, 1)");
    if (!held.empty() && held.size() != param_gb.size())
        throw PlanningError("held must be empty or hold one entry per component");
    for (const auto& layers : held)
        for (const auto& devices : layers)
            for (size_t i = 0; i < devices.size(); ++i)
                if (devices[i] < 0 || devices[i] >= num_devices ||
                    (i > 0 && devices[i] <= devices[i - 1]))
                    throw PlanningError("held: device ids must ascend inside [0, num_devices)");
}

namespace {

// A MetaOp's bi-point tuples (at most two), inline: no allocation per MetaOp and variant.
struct Tuples {
    int size = 0;
    int cur = 0;               // current tuple
    int count_index[2] = {0, 0};
    int left[2] = {0, 0};      // layers left

    void assign(const BiPoint& t) {
        assert(t.size >= 1 && t.size <= 2);
        size = t.size;
        cur = 0;
        for (int i = 0; i < size; ++i) {
            count_index[i] = t.count_index[i];
            left[i] = t.layers[i];
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
constexpr int kIdleCandidates = 8;

// Resource extension scans for the top group up to this many growable groups, else keeps a
// heap.
constexpr size_t kScanGroups = 16;

// What least_idle_length needs of one group: its layer time, device count and layers left.
struct IdleItem {
    double T;
    double n;
    int left;
};

template <class RemLayers>
double least_idle_length(const CoreInput& in, const std::vector<Group>& groups, double D0,
                         const RemLayers& rem_layers, std::vector<IdleItem>& scratch) {
    // The kIdleCandidates - 1 smallest distinct ends above D0, ascending (the twin sorts them
    // all and keeps the first ones; a wave may hold hundreds of groups). scratch holds each
    // group's (T, n, layers left) for the idle sums below.
    double ends[kIdleCandidates];
    ends[0] = D0;
    int size = 1;
    auto offer = [&](double e) {
        if (!(e > D0)) return;
        if (size == kIdleCandidates && !(e < ends[size - 1])) return;
        int i = size;
        while (i > 1 && ends[i - 1] > e) --i;
        if (i > 1 && ends[i - 1] == e) return;
        if (size < kIdleCandidates) ++size;
        for (int j = size - 1; j > i; --j) ends[j] = ends[j - 1];
        ends[i] = e;
    };
    scratch.clear();
    for (const Group& g : groups) {
        const double T = in.times[g.metaop][g.count_index];
        const int left = rem_layers(g.metaop);
        offer(static_cast<double>(left) * T);
        offer(T);
        scratch.push_back({T, static_cast<double>(in.counts[g.metaop][g.count_index]), left});
    }
    // All candidates' idle sums in one pass over the groups: each sum still adds the groups in
    // order (the same floats as the twin's loop per candidate), and the independent sums
    // overlap in the CPU instead of waiting on one another.
    double idle[kIdleCandidates] = {};
    for (const IdleItem& it : scratch)
        for (int i = 0; i < size; ++i)
            idle[i] += it.n * (ends[i] - static_cast<double>(
                                             layers_fitting(ends[i], it.T, it.left)) * it.T);
    double best = D0, best_frac = 0.0;
    for (int i = 0; i < size; ++i) {
        const double frac = idle[i] / ends[i];
        if (i == 0 || frac < best_frac) {
            best = ends[i];
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
    Adjacency members;  // members[lv]: the MetaOps of level lv, ascending
    std::vector<double> level_cstar;
    double relaxed_ms = 0.0;
    std::vector<BiPoint> tuples;
    double lower_bound_ms = 0.0;
    // The least device-time one layer of each MetaOp can take (min over its counts of n * T),
    // and all layers' sum: the portfolio's bound on a variant's remaining time (Run::bound).
    std::vector<double> min_work;
    double total_work = 0.0;

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
        members.offset.assign(num_levels + 1, 0);
        for (int m = 0; m < n_ops; ++m) ++members.offset[level[m] + 1];
        for (int lv = 0; lv < num_levels; ++lv) members.offset[lv + 1] += members.offset[lv];
        members.nodes.resize(n_ops);
        {
            std::vector<int> next(members.offset.begin(), members.offset.end() - 1);
            for (int m = 0; m < n_ops; ++m) members.nodes[next[level[m]]++] = m;
        }
        level_cstar.resize(num_levels);
        std::vector<double> scratch;
        for (int lv = 0; lv < num_levels; ++lv) {
            level_cstar[lv] = mtmm::level_cstar(in, members[lv], scratch);
            relaxed_ms += level_cstar[lv];
        }
        tuples.resize(n_ops);
        for (int m = 0; m < n_ops; ++m) tuples[m] = bipoint(in, m, level_cstar[level[m]]);
        lower_bound_ms = lower_bound(in, order, dag.pred);
        min_work.resize(n_ops);
        for (int m = 0; m < n_ops; ++m) {
            double w = static_cast<double>(in.counts[m][0]) * in.times[m][0];
            for (size_t j = 1; j < in.counts[m].size(); ++j)
                w = std::min(w, static_cast<double>(in.counts[m][j]) * in.times[m][j]);
            min_work[m] = w;
            total_work += static_cast<double>(in.layers[m]) * w;
        }
    }
};

// One variant, planned one wave at a time, so that the portfolio can advance its variants side
// by side (plan_core).
class Run {
  public:
    Run(const CoreInput& in, const Prepared& prep, const PlanOptions& options, bool fastest)
        : in_(in),
          prep_(prep),
          opt_(options),
          fastest_(fastest),
          n_ops_(static_cast<int>(in.layers.size())),
          done_(n_ops_, 0),
          tail_(n_ops_, 0.0),
          pred_left_(n_ops_),
          finished_(n_ops_, 0),
          drop_(n_ops_, 0),
          placer_(in, prep.dag.pred),
          rem_layers_([this](int m) { return rem_layers(m); }),
          remaining_(n_ops_),
          work_left_(prep.total_work) {
        st_.in = &in;
        st_.tuples.resize(n_ops_);
        for (int m = 0; m < n_ops_; ++m) {
            Tuples& t = st_.tuples[m];
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
        const Dag& dag = prep.dag;
        if (opt_.overlap_levels) {
            for (auto it = prep.order.rbegin(); it != prep.order.rend(); ++it)
                for (int s : dag.succ[*it])
                    tail_[*it] = std::max(tail_[*it], st_.rem_time(s) + tail_[s]);
        }
        for (int m = 0; m < n_ops_; ++m) pred_left_[m] = static_cast<int>(dag.pred[m].size());
        cands_.reserve(n_ops_);
        if (opt_.overlap_levels) {
            for (int m = 0; m < n_ops_; ++m)
                if (pred_left_[m] == 0) enter(m);
            update_candidates();
        }
    }

    // rem_layers_ points at this Run.
    Run(const Run&) = delete;
    Run& operator=(const Run&) = delete;

    bool finished() const { return remaining_ == 0; }
    double now() const { return t_now_; }
    // A lower bound on the makespan this variant will end with. Every wave lasts at least
    // k * T of each of its groups and holds at most num_devices devices, so the waves still to
    // come last at least (device-time of the layers left, at their least) / num_devices. The
    // margins cover rounding, for up to millions of MetaOps and waves: work_left_'s sums and
    // running subtractions (each off by at most an ulp of total_work), and the makespan's own
    // sum of wave lengths.
    double bound() const {
        const double rem = std::max(0.0, work_left_ - prep_.total_work * 1e-9) /
                           static_cast<double>(in_.num_devices);
        return (t_now_ + rem) * (1.0 - 1e-9);
    }
    void step();
    Schedule take();

  private:
    int rem_layers(int m) const { return st_.tuples[m].left[st_.tuples[m].cur]; }
    // Candidates kept sorted by (priority descending, index ascending). A wave's changes are
    // collected (enter, leave) and merged in once by update_candidates: one pass over the
    // list per wave instead of one per MetaOp the wave touched.
    void enter(int m) { pending_.emplace_back(st_.rem_time(m) + tail_[m], m); }
    void leave(int m) { drop_[m] = 1; }
    void update_candidates();
    int propose(int free, bool pass_short);

    const CoreInput& in_;
    const Prepared& prep_;
    const PlanOptions opt_;
    const bool fastest_;
    const int n_ops_;
    State st_;
    std::vector<int> done_;
    std::vector<double> tail_;
    std::vector<int> pred_left_;
    std::vector<char> finished_;
    std::vector<char> drop_;  // left the candidates this wave
    std::vector<std::pair<double, int>> cands_, pending_, merged_;
    Placer placer_;
    const std::function<int(int)> rem_layers_;
    std::vector<Group> groups_, sized_;
    std::vector<IdleItem> idle_items_;
    std::vector<std::pair<double, int>> grow_;  // resource extension: (time, position)
    Schedule out_;
    double t_now_ = 0.0;
    int current_level_ = -1;
    int remaining_;
    double work_left_;  // sum over the layers not yet placed of Prepared::min_work
};

// A function object rather than a function pointer, so that std::sort inlines it.
struct ByPriority {
    bool operator()(const std::pair<double, int>& a, const std::pair<double, int>& b) const {
        if (a.first != b.first) return a.first > b.first;
        return a.second < b.second;
    }
};
constexpr ByPriority by_priority{};

void Run::update_candidates() {
    std::sort(pending_.begin(), pending_.end(), by_priority);
    merged_.clear();
    auto p = pending_.begin();
    for (const auto& c : cands_) {
        if (drop_[c.second]) {
            drop_[c.second] = 0;
            continue;
        }
        for (; p != pending_.end() && by_priority(*p, c); ++p) merged_.push_back(*p);
        merged_.push_back(c);
    }
    merged_.insert(merged_.end(), p, pending_.end());
    pending_.clear();
    cands_.swap(merged_);
}

// Each candidate's current tuple joins the wave, highest priority first, while it fits.
// defer_short: the short candidates (priority under half the top one's) wait for the second
// pass, after resource extension.
int Run::propose(int free, bool pass_short) {
    const double top = cands_.empty() ? 0.0 : cands_.front().first;
    for (const auto& [prio, m] : cands_) {
        if (free == 0) break;
        if (opt_.defer_short && (2.0 * prio < top) != pass_short) continue;
        const Tuples& t = st_.tuples[m];
        const int ci = t.count_index[t.cur];
        const int n = in_.counts[m][ci];
        if (n <= free) {
            groups_.push_back({m, ci, 0});
            free -= n;
        }
    }
    return free;
}

void Run::step() {
    if (!opt_.overlap_levels && cands_.empty()) {
        ++current_level_;
        for (int m : prep_.members[current_level_]) enter(m);
        update_candidates();
    }
    groups_.clear();
    int free = propose(in_.num_devices, false);
    // Resource extension: grow the group with the most remaining time of its tuple to its
    // next valid count, one step at a time, while devices stay idle; only a step that makes
    // the layer faster counts. Ties: earlier group. The growable groups are kept as
    // (time, position); the top one is found by a scan when they are few (cheaper than a
    // heap), else by a max-heap, which picks the same. A group that cannot grow now leaves for
    // good, as free only shrinks.
    grow_.clear();
    for (size_t g = 0; g < groups_.size(); ++g) {
        const int m = groups_[g].metaop, ci = groups_[g].count_index;
        if (ci + 1 < static_cast<int>(in_.counts[m].size()) &&
            in_.times[m][ci + 1] < in_.times[m][ci])
            grow_.emplace_back(static_cast<double>(rem_layers(m)) * in_.times[m][ci],
                               static_cast<int>(g));
    }
    auto before = [](const std::pair<double, int>& a, const std::pair<double, int>& b) {
        return a.first < b.first || (a.first == b.first && a.second > b.second);
    };
    const bool heap = grow_.size() > kScanGroups;
    if (heap) std::make_heap(grow_.begin(), grow_.end(), before);
    while (free > 0 && !grow_.empty()) {
        size_t top = 0;
        if (heap) {
            std::pop_heap(grow_.begin(), grow_.end(), before);
            top = grow_.size() - 1;
        } else {
            for (size_t i = 1; i < grow_.size(); ++i)
                if (before(grow_[top], grow_[i])) top = i;
        }
        const int g = grow_[top].second;
        Group& grp = groups_[g];
        const int m = grp.metaop, ci = grp.count_index;
        const int delta = in_.counts[m][ci + 1] - in_.counts[m][ci];
        bool keep = false;
        if (delta <= free) {
            free -= delta;
            ++grp.count_index;
            if (ci + 2 < static_cast<int>(in_.counts[m].size()) &&
                in_.times[m][ci + 2] < in_.times[m][ci + 1]) {
                grow_[top].first = static_cast<double>(rem_layers(m)) * in_.times[m][ci + 1];
                keep = true;
            }
        }
        if (!keep) {  // (with the heap, top is the last entry)
            grow_[top] = grow_.back();
            grow_.pop_back();
        } else if (heap) {
            std::push_heap(grow_.begin(), grow_.end(), before);
        }
    }
    if (opt_.defer_short) free = propose(free, true);
    // The wave lasts until the first group finishes its tuple; the others are sliced.
    double D = 0.0;
    for (size_t g = 0; g < groups_.size(); ++g) {
        const int m = groups_[g].metaop;
        const double r = static_cast<double>(rem_layers(m)) * in_.times[m][groups_[g].count_index];
        D = g == 0 ? r : std::min(D, r);
    }
    if (opt_.least_idle)
        D = least_idle_length(in_, groups_, D, [this](int m) { return rem_layers(m); },
                              idle_items_);
    sized_.clear();
    for (const Group& g : groups_) {
        const int k = layers_fitting(D, in_.times[g.metaop][g.count_index], rem_layers(g.metaop));
        if (k > 0) sized_.push_back({g.metaop, g.count_index, k});
    }
    const int wave_index = static_cast<int>(out_.waves.size());
    const std::vector<Placed>& placed = placer_.place_wave(wave_index, sized_, done_, rem_layers_, D);
    if (placed.empty()) {
        const int m = sized_[0].metaop;
        const int n = in_.counts[m][0];
        std::ostringstream msg;  // a stream prints 16 as "16" and 24.5 as "24.5", like %g
        msg << "cannot fit in memory: MetaOp '" << in_.names[m] << "' (layers from " << done_[m]
            << ") does not fit the free memory of "
            << (n == 1 ? std::string("any device") : "any " + std::to_string(n) + " devices")
            << " (device_memory_gb = " << in_.device_memory_gb << ")";
        throw PlanMemoryError(msg.str());
    }
    Wave wave{t_now_, 0.0, static_cast<int>(out_.slices.size()), static_cast<int>(placed.size())};
    const int dev_base = static_cast<int>(out_.devices.size());
    const std::vector<int>& devices = placer_.devices();
    out_.devices.insert(out_.devices.end(), devices.begin(), devices.end());
    const Dag& dag = prep_.dag;
    for (const Placed& p : placed) {
        const int m = p.metaop;
        wave.duration_ms =
            std::max(wave.duration_ms, static_cast<double>(p.layers) * in_.times[m][p.count_index]);
        out_.slices.push_back(
            {m, done_[m], done_[m] + p.layers, dev_base + p.device_begin, p.device_count});
        done_[m] += p.layers;
        work_left_ -= static_cast<double>(p.layers) * prep_.min_work[m];
        leave(m);
        Tuples& tup = st_.tuples[m];
        tup.left[tup.cur] -= p.layers;
        if (tup.left[tup.cur] == 0) {
            ++tup.cur;
            if (tup.cur == tup.size) {
                finished_[m] = 1;
                --remaining_;
                for (int s : dag.succ[m])
                    if (--pred_left_[s] == 0 && opt_.overlap_levels) enter(s);
            }
        }
        if (!finished_[m]) enter(m);
    }
    update_candidates();
    t_now_ += wave.duration_ms;
    out_.waves.push_back(wave);
}

Schedule Run::take() {
    out_.levels = prep_.level;
    out_.level_cstar = prep_.level_cstar;
    out_.relaxed_ms = prep_.relaxed_ms;
    out_.makespan_ms = t_now_;
    out_.lower_bound_ms = prep_.lower_bound_ms;
    out_.overlap_levels = opt_.overlap_levels;
    out_.least_idle = opt_.least_idle;
    out_.single_tuple = opt_.single_tuple;
    out_.fastest = fastest_;
    out_.defer_short = opt_.defer_short;
    return std::move(out_);
}

}  // namespace

Schedule plan_core(const CoreInput& in, const PlanOptions& options) {
    in.check();
    const Prepared prep(in);
    if (!options.portfolio) {
        Run run(in, prep, options, false);
        while (!run.finished()) run.step();
        return run.take();
    }
    // Same variants, same order as reference.PORTFOLIO: overlap_levels, least_idle,
    // single_tuple, fastest, defer_short. The result is the first variant (in this order) with
    // the smallest makespan; the twin plans them one after another, stopping each as soon as
    // it cannot beat the best so far. Here they advance side by side, always the one with the
    // smallest lower bound on its final makespan (Run::bound: its plan's end plus the least
    // time its work left can take): a variant is dropped once that bound is past the best
    // makespan, or once its end, with work left, is past it (or reaches it, for a variant that
    // would lose the tie). A variant that will lose is thus dropped as soon as its bound
    // shows it, often long before its plan reaches the best makespan, and the best variant is
    // the one stepped while the others' bounds are higher. The chosen plan is the same: a
    // dropped variant's makespan is larger than the best (or equal and later).
    static const bool kVariants[5][5] = {{false, true, true, false, false},
                                         {true, true, true, false, false},
                                         {true, false, true, false, false},
                                         {false, false, false, true, false},
                                         {false, true, true, false, true}};
    constexpr int kCount = 5;
    std::vector<std::unique_ptr<Run>> runs(kCount);
    std::exception_ptr errors[kCount];  // rethrown as they came, so their type survives
    for (int v = 0; v < kCount; ++v) {
        PlanOptions o = options;
        o.overlap_levels = kVariants[v][0];
        o.least_idle = kVariants[v][1];
        o.single_tuple = kVariants[v][2];
        o.defer_short = kVariants[v][4];
        runs[v] = std::make_unique<Run>(in, prep, o, kVariants[v][3]);
    }
    std::vector<char> active(kCount, 1);
    double bounds[kCount];
    for (int v = 0; v < kCount; ++v) bounds[v] = runs[v]->bound();
    int best = -1;
    double best_ms = 0.0;
    for (;;) {
        int v = -1;
        for (int i = 0; i < kCount; ++i)
            if (active[i] && (v < 0 || bounds[i] < bounds[v])) v = i;
        if (v < 0) break;
        Run& run = *runs[v];
        try {
            run.step();
        } catch (const PlanningError&) {
            errors[v] = std::current_exception();
            active[v] = 0;
            runs[v].reset();
            continue;
        }
        bounds[v] = run.bound();
        if (run.finished()) {
            active[v] = 0;
            const double t = run.now();
            if (best < 0 || t < best_ms || (t == best_ms && v < best)) {
                if (best >= 0) runs[best].reset();
                best = v;
                best_ms = t;
            } else {
                runs[v].reset();
            }
        }
        // Drop the variants that can no longer win (planned past the best with work left, or
        // bound to end past it).
        for (int i = 0; i < kCount; ++i) {
            if (!active[i] || best < 0) continue;
            const double t = runs[i]->now();
            if (t > best_ms || (t == best_ms && i > best) || bounds[i] > best_ms) {
                active[i] = 0;
                runs[i].reset();
            }
        }
    }
    if (best < 0) {
        for (const std::exception_ptr& e : errors)
            if (e) std::rethrow_exception(e);
        throw PlanningError("no variant of the portfolio gave a plan");
    }
    return runs[best]->take();
}

}  // namespace mtmm
