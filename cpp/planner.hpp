// The Spindle planner: MetaLevels, per-level allocation, wavefront scheduling with resource
// extension, placement. scheduler/reference.py is its Python twin; both give the same plan.
#pragma once

#include "problem.hpp"

namespace mtmm {

struct PlanOptions {
    // A MetaOp becomes ready as soon as its own predecessors are done (mtmm), instead of after
    // the whole previous MetaLevel (the paper).
    bool overlap_levels = false;
    // Wave length that leaves the least device-time idle (mtmm) instead of always the
    // shortest tuple (the paper), which starves groups whose single layer is longer.
    bool least_idle = false;
    // Each MetaOp keeps only the bi-point tuple with more layers, for all its layers.
    bool single_tuple = false;
    // A candidate whose priority is under half the top candidate's joins a wave only after
    // resource extension, on the devices left idle (reference._short).
    bool defer_short = false;
    // Plan the variants of reference.PORTFOLIO and keep the smallest makespan; the flags above
    // are then ignored.
    bool portfolio = false;
};

// Throws PlanningError on bad input (with the MetaOp's name) or when the plan cannot fit in
// memory.
Schedule plan_core(const CoreInput& in, const PlanOptions& options);

}  // namespace mtmm
