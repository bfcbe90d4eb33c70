// Directed acyclic graphs given as edge lists: validation, topological order, MetaLevels.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

namespace mtmm {

using Edge = std::pair<int, int>;

// Raised for graphs a caller got wrong (bad node ids, cycles). bindings.cpp maps it to ValueError.
struct GraphError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// The nodes of a Range are a contiguous run of one array.
struct Range {
    const int* first;
    const int* last;
    const int* begin() const { return first; }
    const int* end() const { return last; }
    size_t size() const { return static_cast<size_t>(last - first); }
    int operator[](size_t i) const { return first[i]; }
};

// Each node's neighbours, all in one array (compressed rows: two allocations, not one per
// node; the planner builds a Dag on every call).
struct Adjacency {
    std::vector<int> offset;  // node u's neighbours: nodes[offset[u], offset[u + 1])
    std::vector<int> nodes;
    Range operator[](int u) const {
        return {nodes.data() + offset[u], nodes.data() + offset[u + 1]};
    }
};

struct Dag {
    int num_nodes = 0;
    Adjacency succ;  // succ[u]: targets of u's out-edges, in input order
    Adjacency pred;  // pred[v]: sources of v's in-edges, in input order

    // Throws GraphError when an edge names a node outside [0, num_nodes).
    Dag(int num_nodes, const std::vector<Edge>& edges);

    // Kahn's algorithm, smallest ready node first, so the order is deterministic.
    // Throws GraphError naming one node of a cycle when the graph is not acyclic.
    std::vector<int> topological_order() const;

    // MetaLevel of every node: 0 for sources, else 1 + the largest level of its predecessors
    // (longest-path depth), so nodes that share a level never depend on each other.
    std::vector<int> levels() const;
};

// Convenience: levels of the DAG with these edges.
std::vector<int> metalevels(int num_nodes, const std::vector<Edge>& edges);

}  // namespace mtmm
