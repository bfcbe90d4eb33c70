"""mtmm planner: MetaOps, allocation, wavefront scheduling, placement, simulation, runtime."""
