// Allocation of one MetaLevel: bisection for the relaxed optimum C*, bi-point discretisation;
// and the lower bound. Mirrors scheduler/reference.py operation for operation.
#pragma once

#include <utility>
#include <vector>

#include "problem.hpp"

namespace mtmm {

// Relaxed inverse of f(n) = layers * T(n) (f given at the valid counts): the real device
// count that finishes in C. Linear between counts, n = c0 * f0 / C below the smallest count.
double devices_for(const std::vector<int>& counts, const std::vector<double>& f, double C);

// C* of the level whose MetaOps are `members` (ascending indices).
double level_cstar(const CoreInput& in, const std::vector<int>& members);

// (count index, layers) tuples of MetaOp m for the level optimum C, lower count first.
std::vector<std::pair<int, int>> bipoint(const CoreInput& in, int m, double C);

// The most layers k <= cap with k * T <= D (the quotient is only a first guess: exact
// comparisons decide). Inline: the wave loop calls it for every group and candidate length.
inline int layers_fitting(double D, double T, int cap) {
    const double q = D / T;
    int k = q >= static_cast<double>(cap) ? cap : static_cast<int>(q);
    while (k < cap && static_cast<double>(k + 1) * T <= D) ++k;
    while (k > 0 && static_cast<double>(k) * T > D) --k;
    return k;
}

// max(critical path at the fastest counts, least total device-time / N).
double lower_bound(const CoreInput& in, const std::vector<int>& topo_order,
                   const std::vector<std::vector<int>>& preds);

}  // namespace mtmm
