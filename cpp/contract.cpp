#include "contract.hpp"

#include <algorithm>
#include <string>

namespace mtmm {

Contraction contract(int num_nodes, const std::vector<std::int64_t>& keys,
                     const std::vector<Edge>& edges) {
    const Dag dag(num_nodes, edges);
    if (static_cast<int>(keys.size()) != num_nodes) {
        throw GraphError("keys has " + std::to_string(keys.size()) + " entries for " +
                         std::to_string(num_nodes) + " nodes");
    }
    Contraction out;
    out.group_of.assign(num_nodes, -1);
    // Merging i -> j leaves a node with i's in-edges and j's out-edges, so no other edge's
    // contractibility changes: one pass over maximal chains equals merging until a fixpoint.
    for (int v : dag.topological_order()) {
        const auto& pv = dag.pred[v];
        if (pv.size() == 1 && dag.succ[pv[0]].size() == 1 && keys[pv[0]] == keys[v]) {
            out.group_of[v] = out.group_of[pv[0]];
            out.groups[out.group_of[v]].push_back(v);
        } else {
            out.group_of[v] = static_cast<int>(out.groups.size());
            out.groups.push_back({v});
        }
    }
    for (const auto& [u, v] : edges)
        if (out.group_of[u] != out.group_of[v])
            out.edges.emplace_back(out.group_of[u], out.group_of[v]);
    std::sort(out.edges.begin(), out.edges.end());
    out.edges.erase(std::unique(out.edges.begin(), out.edges.end()), out.edges.end());
    return out;
}

}  // namespace mtmm
