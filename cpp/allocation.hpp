// Allocation of one MetaLevel: bisection for the relaxed optimum C*, bi-point discretisation;
// and the lower bound. Mirrors scheduler/reference.py operation for operation.
#pragma once

#include <utility>
#include <vector>

#include "dag.hpp"
#include "problem.hpp"

namespace mtmm {

// Relaxed inverse of f(n) = layers * T(n) (f given at the valid counts): the real device
// count that finishes in C. Linear between counts, n = c0 * f0 / C below the smallest count.
double devices_for(const std::vector<int>& counts, const std::vector<double>& f, double C);

// C* of the level whose MetaOps are `members` (ascending indices). f: scratch.
double level_cstar(const CoreInput& in, Range members, std::vector<double>& f);

// A MetaOp's (count index, layers) tuples, at most two, lower count first; inline.
struct BiPoint {
    int size = 0;
    int count_index[2] = {0, 0};
    int layers[2] = {0, 0};
};

// The tuples of MetaOp m for the level optimum C.
BiPoint bipoint(const CoreInput& in, int m, double C);

// The most layers k <= cap with k * T <= D (the quotient is only a first guess: exact
// comparisons decide). Inline: the wave loop calls it for every group and candidate length.
inline int layers_fitting(double D, double T, int cap) {
    if (T > D) return 0;  // the answers the loops below reach, without the division
    if (static_cast<double>(cap) * T <= D) return cap;
    const double q = D / T;
    int k = q >= static_cast<double>(cap) ? cap : static_cast<int>(q);
    while (k < cap && static_cast<double>(k + 1) * T <= D) ++k;
    while (k > 0 && static_cast<double>(k) * T > D) --k;
    return k;
}

// max(critical path at the fastest counts, least total device-time / N).
double lower_bound(const CoreInput& in, const std::vector<int>& topo_order,
                   const Adjacency& preds);

}  // namespace mtmm
