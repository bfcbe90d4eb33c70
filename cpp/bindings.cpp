// The only file that knows Python: exposes the planner core as scheduler._core.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>

#include "contract.hpp"
#include "dag.hpp"
#include "planner.hpp"

namespace py = pybind11;

namespace {

struct PlannerInput {
    mtmm::CoreInput in;
    std::vector<py::str> names_py;      // the plan dict's "metaop" values, shared by every plan
    std::vector<py::object> device_ids;  // the ints 0 .. num_devices - 1, shared likewise
};

// The plan dict's keys, interned once (user code's literal keys then match by identity).
struct PlanKeys {
    py::str metaop, layer_begin, layer_end, devices, start_ms, duration_ms, slices;
    // plan(): the plan's top-level keys and its variant's.
    py::str method, backend, options, makespan_ms, lower_bound_ms, relaxed_ms, level_cstar_ms,
        variant, waves;
    py::str variant_keys[5];
};

const PlanKeys& plan_keys() {
    auto interned = [](const char* s) {
        return py::reinterpret_steal<py::str>(PyUnicode_InternFromString(s));
    };
    // Never freed: the module keeps them for the interpreter's lifetime.
    static const PlanKeys* keys = new PlanKeys{
        interned("metaop"),       interned("layer_begin"),    interned("layer_end"),
        interned("devices"),      interned("start_ms"),       interned("duration_ms"),
        interned("slices"),       interned("method"),         interned("backend"),
        interned("options"),      interned("makespan_ms"),    interned("lower_bound_ms"),
        interned("relaxed_ms"),   interned("level_cstar_ms"), interned("variant"),
        interned("waves"),
        {interned("overlap_levels"), interned("least_idle"), interned("single_tuple"),
         interned("fastest"), interned("defer_short")}};
    return *keys;
}

void set_item(const py::dict& d, const py::str& key, PyObject* value) {
    if (PyDict_SetItem(d.ptr(), key.ptr(), value) != 0) throw py::error_already_set();
}

std::shared_ptr<PlannerInput> make_input(int num_devices, int island_size,
                                         std::vector<std::string> names, std::vector<int> layers,
                                         std::vector<std::vector<int>> counts,
                                         std::vector<std::vector<double>> times,
                                         std::vector<int> component, std::vector<double> param_gb,
                                         std::vector<double> activation_gb,
                                         std::vector<double> output_mb,
                                         std::vector<double> hidden_mb,
                                         std::vector<mtmm::Edge> flows, double device_memory_gb,
                                         double shard_fraction,
                                         std::vector<std::vector<std::vector<int>>> held) {
    auto pin = std::make_shared<PlannerInput>();
    mtmm::CoreInput& in = pin->in;
    in.num_devices = num_devices;
    in.island_size = island_size;
    in.names = std::move(names);
    in.layers = std::move(layers);
    in.counts = std::move(counts);
    in.times = std::move(times);
    in.component = std::move(component);
    in.param_gb = std::move(param_gb);
    in.activation_gb = std::move(activation_gb);
    in.output_mb = std::move(output_mb);
    in.hidden_mb = std::move(hidden_mb);
    in.flows = std::move(flows);
    in.device_memory_gb = device_memory_gb;
    in.shard_fraction = shard_fraction;
    in.held = std::move(held);
    pin->names_py.reserve(in.names.size());
    for (const auto& n : in.names) pin->names_py.emplace_back(n);
    pin->device_ids.reserve(std::max(num_devices, 0));
    for (int d = 0; d < num_devices; ++d) pin->device_ids.push_back(py::int_(d));
    return pin;
}

constexpr size_t kReleaseGilFrom = 256;  // MetaOps

// Plans pin with these options; core_ms: the algorithm alone.
mtmm::Schedule run_core(const PlannerInput& pin, bool overlap_levels, bool least_idle,
                        bool single_tuple, bool portfolio, bool defer_short, double& core_ms) {
    mtmm::PlanOptions opt;
    opt.defer_short = defer_short;
    opt.overlap_levels = overlap_levels;
    opt.least_idle = least_idle;
    opt.single_tuple = single_tuple;
    opt.portfolio = portfolio;
    // Other Python threads may run while a large problem is planned; on a small one
    // (microseconds) releasing and taking back the GIL would cost more than it gives.
    std::optional<py::gil_scoped_release> release;
    if (pin.in.layers.size() >= kReleaseGilFrom) release.emplace();
    const auto t0 = std::chrono::steady_clock::now();
    mtmm::Schedule s = mtmm::plan_core(pin.in, opt);
    core_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return s;
}

// The plan's waves, built here with the C API (much faster than a Python loop over slices):
// dicts filled with interned keys, device ids from PlannerInput's cached ints.
py::list waves_list(const PlannerInput& pin, const mtmm::Schedule& s) {
    py::list waves(s.waves.size());
    const PlanKeys& k = plan_keys();
    for (size_t w = 0; w < s.waves.size(); ++w) {
        const mtmm::Wave& wave = s.waves[w];
        py::list slices(wave.slice_count);
        for (int j = 0; j < wave.slice_count; ++j) {
            const mtmm::Slice& sl = s.slices[wave.slice_begin + j];
            PyObject* devs = PyList_New(sl.device_count);
            if (!devs) throw py::error_already_set();
            for (int d = 0; d < sl.device_count; ++d) {
                PyObject* id = pin.device_ids[s.devices[sl.device_begin + d]].ptr();
                Py_INCREF(id);
                PyList_SET_ITEM(devs, d, id);
            }
            py::dict slice;
            set_item(slice, k.metaop, pin.names_py[sl.metaop].ptr());
            set_item(slice, k.layer_begin, py::int_(sl.layer_begin).ptr());
            set_item(slice, k.layer_end, py::int_(sl.layer_end).ptr());
            set_item(slice, k.devices, py::reinterpret_steal<py::object>(devs).ptr());
            PyList_SET_ITEM(slices.ptr(), j, slice.release().ptr());
        }
        py::dict wd;
        set_item(wd, k.start_ms, py::float_(wave.start_ms).ptr());
        set_item(wd, k.duration_ms, py::float_(wave.duration_ms).ptr());
        set_item(wd, k.slices, slices.ptr());
        PyList_SET_ITEM(waves.ptr(), w, wd.release().ptr());
    }
    return waves;
}

py::dict plan_to_dict(const PlannerInput& pin, bool overlap_levels, bool least_idle,
                      bool single_tuple, bool portfolio, bool defer_short) {
    double core_ms = 0.0;
    const mtmm::Schedule s = run_core(pin, overlap_levels, least_idle, single_tuple, portfolio,
                                      defer_short, core_ms);
    py::dict r;
    r["waves"] = waves_list(pin, s);
    r["level_cstar"] = s.level_cstar;
    r["levels"] = s.levels;
    r["relaxed_ms"] = s.relaxed_ms;
    r["lower_bound_ms"] = s.lower_bound_ms;
    r["makespan_ms"] = s.makespan_ms;
    r["core_ms"] = core_ms;
    r["variant"] = py::make_tuple(s.overlap_levels, s.least_idle, s.single_tuple, s.fastest,
                                  s.defer_short);
    return r;
}

// scheduler/planner.py's plan dict itself, keys in its order (method, backend, options,
// makespan_ms, lower_bound_ms, relaxed_ms, level_cstar_ms, variant, waves), with core_ms
// beside it: the caller adds planner_ms and core_ms, and copies nothing.
py::tuple plan_dict(const PlannerInput& pin, const py::object& method,
                    const py::object& backend, const py::object& options, bool overlap_levels,
                    bool least_idle, bool single_tuple, bool portfolio, bool defer_short) {
    double core_ms = 0.0;
    const mtmm::Schedule s = run_core(pin, overlap_levels, least_idle, single_tuple, portfolio,
                                      defer_short, core_ms);
    const PlanKeys& k = plan_keys();
    py::dict plan;
    set_item(plan, k.method, method.ptr());
    set_item(plan, k.backend, backend.ptr());
    set_item(plan, k.options, options.ptr());
    set_item(plan, k.makespan_ms, py::float_(s.makespan_ms).ptr());
    set_item(plan, k.lower_bound_ms, py::float_(s.lower_bound_ms).ptr());
    set_item(plan, k.relaxed_ms, py::float_(s.relaxed_ms).ptr());
    py::list cstar(s.level_cstar.size());
    for (size_t i = 0; i < s.level_cstar.size(); ++i)
        PyList_SET_ITEM(cstar.ptr(), i, py::float_(s.level_cstar[i]).release().ptr());
    set_item(plan, k.level_cstar_ms, cstar.ptr());
    py::dict variant;
    const bool flags[5] = {s.overlap_levels, s.least_idle, s.single_tuple, s.fastest,
                           s.defer_short};
    for (int i = 0; i < 5; ++i) set_item(variant, k.variant_keys[i], flags[i] ? Py_True : Py_False);
    set_item(plan, k.variant, variant.ptr());
    set_item(plan, k.waves, waves_list(pin, s).ptr());
    return py::make_tuple(std::move(plan), core_ms);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "mtmm planner core (C++17)";
    py::register_exception<mtmm::GraphError>(m, "GraphError", PyExc_ValueError);

    m.def("topological_order",
          [](int num_nodes, const std::vector<mtmm::Edge>& edges) {
              return mtmm::Dag(num_nodes, edges).topological_order();
          },
          py::arg("num_nodes"), py::arg("edges"),
          "Deterministic topological order (smallest ready node first). ValueError on a cycle.");
    m.def("metalevels", &mtmm::metalevels, py::arg("num_nodes"), py::arg("edges"),
          "Longest-path depth of every node of a DAG given as (src, dst) edges. ValueError on "
          "a cycle or an edge naming an unknown node.");
    m.def("contract",
          [](int num_nodes, const std::vector<std::int64_t>& keys,
             const std::vector<mtmm::Edge>& edges) {
              auto c = mtmm::contract(num_nodes, keys, edges);
              return py::make_tuple(std::move(c.groups), std::move(c.edges));
          },
          py::arg("num_nodes"), py::arg("keys"), py::arg("edges"),
          "Spindle contraction: (groups, meta_edges). Merges i -> j when i has out-degree 1, "
          "j in-degree 1 and keys[i] == keys[j]. ValueError on a cycle or a bad edge.");
    // --- planner (scheduler/planner.py wraps it; the plan's waves are built here)
    auto& planning_error =
        py::register_exception<mtmm::PlanningError>(m, "PlanningError", PyExc_ValueError);
    // registered after its base, so its translator is tried first
    py::register_exception<mtmm::PlanMemoryError>(m, "PlanMemoryError", planning_error.ptr());
    // A problem converted once (scheduler/planner.py keeps it on the Problem): planning it again
    // skips converting the nested lists and building the MetaOp names' Python strings.
    py::class_<PlannerInput, std::shared_ptr<PlannerInput>>(
        m, "PlannerInput", "The arrays of scheduler.reference.CoreInput, converted once.")
        .def(py::init(&make_input), py::arg("num_devices"), py::arg("island_size"),
             py::arg("names"), py::arg("layers"), py::arg("counts"), py::arg("times"),
             py::arg("component"), py::arg("param_gb"), py::arg("activation_gb"),
             py::arg("output_mb"), py::arg("hidden_mb"), py::arg("flows"),
             py::arg("device_memory_gb"), py::arg("shard_fraction") = 0.0,
             py::arg("held") = std::vector<std::vector<std::vector<int>>>{});
    m.def("plan", &plan_dict, py::arg("input"), py::arg("method"), py::arg("backend"),
          py::arg("options"), py::arg("overlap_levels"), py::arg("least_idle"),
          py::arg("single_tuple"), py::arg("portfolio"), py::arg("defer_short"),
          "The same as plan_core, as (plan, core_ms): plan is scheduler.planner's plan dict "
          "(method, backend and options as given, then makespan_ms, lower_bound_ms, "
          "relaxed_ms, level_cstar_ms, variant, waves), without planner_ms and core_ms.");
    m.def("plan_core",
          [](const PlannerInput& pin, bool overlap_levels, bool least_idle, bool single_tuple,
             bool portfolio, bool defer_short) {
              return plan_to_dict(pin, overlap_levels, least_idle, single_tuple, portfolio,
                                  defer_short);
          },
          py::arg("input"), py::arg("overlap_levels"), py::arg("least_idle"),
          py::arg("single_tuple"), py::arg("portfolio"), py::arg("defer_short") = false,
          "Spindle planner core on a PlannerInput: a dict with the plan's waves (plan format), "
          "level_cstar, levels, relaxed_ms, lower_bound_ms, makespan_ms, variant and core_ms "
          "(the algorithm alone). ValueError (PlanningError) on bad input or out of memory.");
    m.def("plan_core",
          [](int num_devices, int island_size, std::vector<std::string> names,
             std::vector<int> layers, std::vector<std::vector<int>> counts,
             std::vector<std::vector<double>> times, std::vector<int> component,
             std::vector<double> param_gb, std::vector<double> activation_gb,
             std::vector<double> output_mb, std::vector<double> hidden_mb,
             std::vector<mtmm::Edge> flows,
             double device_memory_gb, bool overlap_levels, bool least_idle,
             bool single_tuple, bool portfolio, bool defer_short, double shard_fraction,
             std::vector<std::vector<std::vector<int>>> held) {
              const auto pin = make_input(num_devices, island_size, std::move(names),
                                          std::move(layers), std::move(counts),
                                          std::move(times), std::move(component),
                                          std::move(param_gb), std::move(activation_gb),
                                          std::move(output_mb), std::move(hidden_mb),
                                          std::move(flows),
                                          device_memory_gb, shard_fraction, std::move(held));
              return plan_to_dict(*pin, overlap_levels, least_idle, single_tuple, portfolio,
                                  defer_short);
          },
          py::arg("num_devices"), py::arg("island_size"), py::arg("names"), py::arg("layers"),
          py::arg("counts"), py::arg("times"), py::arg("component"), py::arg("param_gb"),
          py::arg("activation_gb"), py::arg("output_mb"), py::arg("hidden_mb"), py::arg("flows"),
          py::arg("device_memory_gb"), py::arg("overlap_levels"), py::arg("least_idle"),
          py::arg("single_tuple"), py::arg("portfolio"), py::arg("defer_short") = false,
          py::arg("shard_fraction") = 0.0,
          py::arg("held") = std::vector<std::vector<std::vector<int>>>{},
          "The same on the arrays themselves (converted for this call only).");
}
