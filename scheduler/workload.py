"""Dynamic workloads: each iteration's task mix and sequence lengths change.

The paper plans once for a fixed task mix. Real multi-task data is not fixed: batches of
captions, clips and recordings differ in length from one iteration to the next, and tasks join
and leave a run (a new dataset is mixed in, another is exhausted or paused). This generator
produces one problem per iteration from a zoo model through the zoo and graph APIs:

* **Task presence**: a two-state Markov chain per task; an active task leaves with probability
  ``p_leave`` per iteration, an inactive one joins with probability ``p_join`` (stationary share
  of active tasks ``p_join / (p_join + p_leave)``); at least ``min_active`` tasks stay active.
* **Sequence lengths** (transformer components; projections and losses see one embedding per
  sample and keep their nominal length): per-sample lengths are log-normal around the task's
  nominal length for that component, with a per-iteration drift of the median (which source
  the batch came from):
  ``len = nominal * exp(N(0, shift_sigma)) * exp(N(0, length_sigma))`` per sample; the batch's
  tokens per sample is the mean (packed batches compute on real tokens only), rounded to a
  multiple of ``quantum`` tokens.
* Batch sizes stay fixed, so the valid device counts of every MetaOp do not change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .checks import check_positive_int

__all__ = ["WorkloadConfig", "Workload"]


@dataclass(frozen=True)
class WorkloadConfig:
    model: str = "multitask-clip"
    tasks: int | None = None      # None: all the model's tasks (10 for Multitask-CLIP)
    gpus: int = 32
    island_size: int = 8
    length_sigma: float = 0.5
    shift_sigma: float = 0.35
    p_leave: float = 0.05
    p_join: float = 0.2
    min_active: int = 1
    quantum: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("length_sigma", "shift_sigma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("p_leave", "p_join"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("gpus", "min_active", "quantum"):
            check_positive_int(name, getattr(self, name))


class Workload:
    """Iterates over per-iteration problems (issue-5 problem dicts) of a zoo model.

    ``nominal_problem()`` is the problem a static planner sees: every task present at its
    nominal lengths. ``next_problem()`` draws the next iteration. Deterministic for a seed.
    """

    def __init__(self, config: WorkloadConfig | None = None, cost=None):
        from scheduler import zoo

        self.config = config or WorkloadConfig()
        self.cost = cost
        self.spec = zoo.model_spec(self.config.model, self.config.tasks)
        self.rng = np.random.default_rng(self.config.seed)
        self.active = np.ones(len(self.spec.tasks), dtype=bool)
        self.iteration = 0

    def _problem(self, spec) -> dict:
        from scheduler import graph

        c = self.config
        return graph.to_problem(spec, c.gpus, island_size=min(c.island_size, c.gpus),
                                cost=self.cost)

    def nominal_problem(self) -> dict:
        return self._problem(self.spec)

    def _step_presence(self) -> None:
        c, u = self.config, self.rng.random(len(self.active))
        leave = self.active & (u < c.p_leave)
        join = ~self.active & (u < c.p_join)
        self.active = (self.active & ~leave) | join
        short = c.min_active - int(self.active.sum())
        if short > 0:  # rejoin random inactive tasks until enough are active
            idle = np.flatnonzero(~self.active)
            self.active[self.rng.choice(idle, size=min(short, idle.size), replace=False)] = True

    def _lengths(self, task) -> dict[str, int]:
        c = self.config
        shift = float(np.exp(self.rng.normal(0.0, c.shift_sigma)))
        out = {}
        for comp, nominal in task.seq_lens.items():
            if self.spec.component(comp).kind != "transformer":
                out[comp] = nominal  # a projection or a loss sees one embedding per sample
                continue
            noise = self.rng.normal(0.0, c.length_sigma, size=task.batch)
            samples = nominal * shift * np.exp(noise)
            # Mean of a log-normal is exp(sigma^2/2) above its median; divide it out so the
            # nominal length stays the expected tokens per sample.
            mean = float(samples.mean()) / np.exp(c.length_sigma ** 2 / 2)
            q = c.quantum if nominal >= c.quantum else 1
            out[comp] = max(q, int(round(mean / q)) * q)
        return out

    def next_spec(self):
        """The next iteration's ModelSpec: the active tasks with freshly drawn lengths."""
        if self.iteration > 0:
            self._step_presence()
        self.iteration += 1
        tasks = tuple(dataclasses.replace(t, seq_lens=self._lengths(t))
                      for t, on in zip(self.spec.tasks, self.active) if on)
        return dataclasses.replace(self.spec, tasks=tasks)

    def next_problem(self) -> dict:
        return self._problem(self.next_spec())

    def __iter__(self):
        while True:
            yield self.next_problem()
