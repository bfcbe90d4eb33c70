// Spindle contraction of an operator graph into MetaOps (chains of identical operators).
#pragma once

#include <cstdint>
#include <vector>

#include "dag.hpp"

namespace mtmm {

struct Contraction {
    std::vector<int> group_of;             // group_of[v]: the MetaOp node v belongs to
    std::vector<std::vector<int>> groups;  // groups[g]: its nodes in chain order
    std::vector<Edge> edges;               // distinct (group, group) flows, sorted
};

// Merges i -> j when i has out-degree 1, j has in-degree 1 and keys[i] == keys[j] (same
// operator type and input shape), until no merge applies. Nodes are visited in the Dag's
// deterministic topological order, so groups are numbered by the position of their first node
// and every flow goes from a smaller to a larger group. Throws GraphError on a cycle, an edge
// naming an unknown node, or a key count that differs from num_nodes.
Contraction contract(int num_nodes, const std::vector<std::int64_t>& keys,
                     const std::vector<Edge>& edges);

}  // namespace mtmm
