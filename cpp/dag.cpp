#include "dag.hpp"

#include <algorithm>
#include <functional>
#include <queue>
#include <string>

namespace mtmm {

static int checked_node_count(int n) {
    if (n < 0) throw GraphError("num_nodes must be >= 0, got " + std::to_string(n));
    return n;
}

Dag::Dag(int n, const std::vector<Edge>& edges) : num_nodes(checked_node_count(n)) {
    succ.offset.assign(num_nodes + 1, 0);
    pred.offset.assign(num_nodes + 1, 0);
    for (size_t e = 0; e < edges.size(); ++e) {
        const auto [u, v] = edges[e];
        if (u < 0 || u >= n || v < 0 || v >= n) {
            throw GraphError("edge " + std::to_string(e) + " (" + std::to_string(u) + " -> " +
                             std::to_string(v) + ") names a node outside [0, " + std::to_string(n) +
                             ")");
        }
        ++succ.offset[u + 1];
        ++pred.offset[v + 1];
    }
    for (int u = 0; u < num_nodes; ++u) {
        succ.offset[u + 1] += succ.offset[u];
        pred.offset[u + 1] += pred.offset[u];
    }
    // Filled in edge order, so each node's neighbours keep the input order.
    succ.nodes.resize(edges.size());
    pred.nodes.resize(edges.size());
    std::vector<int> next_succ(succ.offset.begin(), succ.offset.end() - 1);
    std::vector<int> next_pred(pred.offset.begin(), pred.offset.end() - 1);
    for (const auto& [u, v] : edges) {
        succ.nodes[next_succ[u]++] = v;
        pred.nodes[next_pred[v]++] = u;
    }
}

std::vector<int> Dag::topological_order() const {
    std::vector<int> indegree(num_nodes);
    for (int v = 0; v < num_nodes; ++v) indegree[v] = static_cast<int>(pred[v].size());
    std::priority_queue<int, std::vector<int>, std::greater<int>> ready;
    for (int v = 0; v < num_nodes; ++v)
        if (indegree[v] == 0) ready.push(v);
    std::vector<int> order;
    order.reserve(num_nodes);
    while (!ready.empty()) {
        const int u = ready.top();
        ready.pop();
        order.push_back(u);
        for (int v : succ[u])
            if (--indegree[v] == 0) ready.push(v);
    }
    if (static_cast<int>(order.size()) != num_nodes) {
        // Every node left with a positive in-degree lies on or behind a cycle; name the smallest.
        int culprit = -1;
        for (int v = 0; v < num_nodes && culprit < 0; ++v)
            if (indegree[v] > 0) culprit = v;
        throw GraphError("the graph has a cycle through or before node " + std::to_string(culprit));
    }
    return order;
}

std::vector<int> Dag::levels() const {
    std::vector<int> level(num_nodes, 0);
    for (int u : topological_order())
        for (int v : succ[u]) level[v] = std::max(level[v], level[u] + 1);
    return level;
}

std::vector<int> metalevels(int num_nodes, const std::vector<Edge>& edges) {
    return Dag(num_nodes, edges).levels();
}

}  // namespace mtmm
