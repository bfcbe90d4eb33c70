// The only file that knows Python: exposes the planner core as scheduler._core.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "dag.hpp"

namespace py = pybind11;

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
}
