"""Multi-task data for the runtime: the built-in synthetic stream and a loader over any datasets.

A step's data is ``{task: batch}``, each batch a dict of tensors whose dim 0 is the task's batch
size. Every rank computes the same full step (data is cheap next to the model) and slices its
own shard, so no rank ever waits for data from another.

- :class:`SyntheticStream`: the model's ``synthetic(task, generator)`` seeded by (seed, step,
  task): any rank, any process count and any restart see the same batches.
- :class:`MultiTaskLoader`: one map-style dataset (``__getitem__`` + ``__len__``) or iterable
  per task; samples are dicts of tensors; variable-length dim 0 is padded and its lengths
  stored under ``<key>_len``.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterable, Iterator, Mapping

import torch

Step = dict[str, dict[str, torch.Tensor]]


def check_tasks_per_step(tasks_per_step: int | None, num_tasks: int) -> None:
    if tasks_per_step is not None and (isinstance(tasks_per_step, bool) or not isinstance(tasks_per_step, int)
                                       or not 1 <= tasks_per_step <= num_tasks):
        raise ValueError(f"tasks_per_step: expected None or an int in [1, {num_tasks}], got {tasks_per_step!r}")


def draw_tasks(names: list[str], k: int, weights: torch.Tensor, seed: int, index: int) -> tuple[str, ...]:
    """k distinct tasks of ``names`` for step ``index``, drawn without replacement with
    probabilities proportional to ``weights`` from (seed, index) alone, in ``names`` order."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/tasks/{index}".encode()))
    picked = torch.multinomial(weights, k, replacement=False, generator=gen)
    return tuple(names[i] for i in sorted(picked.tolist()))


class SyntheticStream:
    """Deterministic synthetic multi-task batches for a built-in model (heterogeneous lengths
    across tasks and, for text, across samples). ``split`` names disjoint streams of the same
    distribution: "train", and any other name (an evaluation set: "eval"). With
    ``tasks_per_step`` k, each step holds k tasks drawn uniformly from (seed, step), each
    with the batch the full stream would give it."""

    def __init__(self, model, seed: int = 0, split: str = "train", tasks_per_step: int | None = None):
        if not callable(getattr(model, "synthetic", None)):
            raise ValueError(f"model: {model.name!r} has no synthetic data; pass datasets to MultiTaskLoader")
        if not isinstance(split, str) or not split:
            raise ValueError(f"split: expected a non-empty name, got {split!r}")
        check_tasks_per_step(tasks_per_step, len(model.tasks))
        self.model, self.seed, self.tasks_per_step = model, seed, tasks_per_step
        self._prefix = "" if split == "train" else f"{split}/"  # train keeps its original seeds

    def tasks_of(self, index: int) -> tuple[str, ...]:
        """The tasks of step ``index``, in the model's order."""
        names = list(self.model.tasks)
        if self.tasks_per_step is None:
            return tuple(names)
        return draw_tasks(names, self.tasks_per_step, torch.ones(len(names), dtype=torch.float64),
                          self.seed, index)

    def step(self, index: int) -> Step:
        out = {}
        for task in self.tasks_of(index):
            key = f"{self._prefix}{self.seed}/{index}/{task}"
            gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            out[task] = self.model.synthetic(task, gen)
        return out

    def __iter__(self) -> Iterator[Step]:
        i = 0
        while True:
            yield self.step(i)
            i += 1


def collate(samples: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks samples; a key whose dim 0 varies is right-padded with zeros and gets
    ``<key>_len`` (int64 [B])."""
    if not samples:
        raise ValueError("samples: empty")
    out = {}
    for key in samples[0]:
        xs = [torch.as_tensor(s[key]) for s in samples]
        if all(x.shape == xs[0].shape for x in xs):
            out[key] = torch.stack(xs)
            continue
        if any(x.dim() == 0 or x.shape[1:] != xs[0].shape[1:] for x in xs):
            raise ValueError(f"samples[{key!r}]: shapes differ beyond dim 0: {[tuple(x.shape) for x in xs]}")
        lens = torch.tensor([x.shape[0] for x in xs])
        pad = xs[0].new_zeros((len(xs), int(lens.max()), *xs[0].shape[1:]))
        for i, x in enumerate(xs):
            pad[i, : x.shape[0]] = x
        out[key], out[f"{key}_len"] = pad, lens
    return out


class MultiTaskLoader:
    """Draws each task's batch from its own dataset, step after step.

    Args:
        datasets: task -> map-style dataset (sampled in a seeded permutation per epoch) or
            iterable dataset (read in order, restarted when exhausted).
        batch_sizes: task -> samples per step (the model's ``Task.batch``).
        seed: shuffling and task-sampling seed; the same on every rank.
        tasks_per_step: None: every task in every step; k: k distinct tasks per step, drawn
            without replacement with probabilities proportional to ``task_weights`` (the
            others are left out of that step; the executor skips them).
        task_weights: task -> positive weight for ``tasks_per_step`` (default: all equal).

    ``step(i)`` gives the i-th step (a ``mtmm train --data`` stream): map-style datasets are
    read at the positions that step covers (the batches their task had in steps 0..i-1), so a
    resumed run reads what an uninterrupted one would; iterable ones can only go on in order.
    The tasks of step i depend on (seed, i) alone.
    """

    def __init__(self, datasets: Mapping[str, Any], batch_sizes: Mapping[str, int], seed: int = 0,
                 *, tasks_per_step: int | None = None, task_weights: Mapping[str, float] | None = None):
        missing = set(batch_sizes) - set(datasets)
        if missing:
            raise ValueError(f"datasets: no dataset for tasks {sorted(missing)}")
        self.datasets, self.batch_sizes, self.seed = dict(datasets), dict(batch_sizes), seed
        check_tasks_per_step(tasks_per_step, len(self.batch_sizes))
        if task_weights is not None and tasks_per_step is None:
            raise ValueError("task_weights: only with tasks_per_step")
        weights = dict.fromkeys(self.batch_sizes, 1.0) if task_weights is None else dict(task_weights)
        if set(weights) != set(self.batch_sizes):
            raise ValueError(f"task_weights: expected a weight for each of {sorted(self.batch_sizes)}, "
                             f"got {sorted(weights)}")
        for t, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf"):
                raise ValueError(f"task_weights: expected a positive finite weight for {t!r}, got {w!r}")
        self.tasks_per_step = tasks_per_step
        self._weights = torch.tensor([float(weights[t]) for t in self.batch_sizes], dtype=torch.float64)
        self._drawn: list[tuple[str, ...]] = []  # the tasks of steps 0, 1, ... computed so far
        self._iters: dict[str, Iterator] = {}
        self._pos: dict[str, int] = {t: 0 for t in batch_sizes}  # samples drawn so far
        self._perms: dict[str, tuple[int, torch.Tensor]] = {}  # task -> (epoch, permutation)
        self._next = 0  # the step step() without an index gives

    def tasks_of(self, index: int) -> tuple[str, ...]:
        """The tasks of step ``index``, in ``batch_sizes`` order."""
        names = list(self.batch_sizes)
        if self.tasks_per_step is None:
            return tuple(names)
        while len(self._drawn) <= index:
            self._drawn.append(draw_tasks(names, self.tasks_per_step, self._weights, self.seed,
                                          len(self._drawn)))
        return self._drawn[index]

    def _is_map(self, task: str) -> bool:
        ds = self.datasets[task]
        return hasattr(ds, "__getitem__") and hasattr(ds, "__len__")

    def _draw(self, task: str) -> Mapping[str, torch.Tensor]:
        ds = self.datasets[task]
        pos = self._pos[task]
        self._pos[task] += 1
        if self._is_map(task):
            n = len(ds)
            if n == 0:
                raise ValueError(f"datasets[{task!r}]: empty")
            epoch, i = divmod(pos, n)
            if self._perms.get(task, (None,))[0] != epoch:  # one permutation per epoch
                gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{task}/{epoch}".encode()))
                self._perms[task] = (epoch, torch.randperm(n, generator=gen))
            return ds[int(self._perms[task][1][i])]
        it = self._iters.get(task)
        for _ in range(2):
            if it is None:
                it = self._iters[task] = iter(ds)
            try:
                return next(it)
            except StopIteration:
                it = None
        raise ValueError(f"datasets[{task!r}]: iterable yields nothing")

    def step(self, index: int | None = None) -> Step:
        """The next step, or the ``index``-th (0-based)."""
        if index is not None:
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise ValueError(f"index: expected an int >= 0, got {index!r}")
            for t, b in self.batch_sizes.items():
                before = sum(t in self.tasks_of(i) for i in range(index)) if self.tasks_per_step else index
                if self._is_map(t):
                    self._pos[t] = before * b
                elif self._pos[t] != before * b:
                    raise ValueError(f"index: datasets[{t!r}] is iterable, read in order, and "
                                     f"is at its batch {self._pos[t] // b}, not {before} (step {index})")
            self._next = index
        tasks = self.tasks_of(self._next)
        self._next += 1
        return {t: collate([self._draw(t) for _ in range(b)]) for t, b in self.batch_sizes.items()
                if t in tasks}

    def __iter__(self) -> Iterator[Step]:
        while True:
            yield self.step()


def shard_batch(batch: Mapping[str, torch.Tensor], begin: int, end: int) -> dict[str, torch.Tensor]:
    """Samples [begin, end) of a batch. Padded dims keep the whole batch's length, so the
    shapes of activations do not depend on how the batch is split."""
    return {k: v[begin:end] for k, v in batch.items()}


def batch_tokens(step: Step, model) -> int:
    """Tokens in a step: every modality's real tokens (lengths where declared) over all tasks."""
    n = 0
    for task, batch in step.items():
        for key, x in batch.items():
            if key.endswith("_len"):
                continue
            if f"{key}_len" in batch:
                n += int(batch[f"{key}_len"].sum())
            elif x.dim() >= 2:
                n += x.shape[0] * x.shape[1]
            else:
                n += x.shape[0]
    return n


def iterate(source: Iterable[Step] | SyntheticStream, start: int = 0) -> Iterator[Step]:
    """Steps from ``start`` on (a resumed run picks up the stream where it stopped)."""
    if isinstance(source, SyntheticStream):
        i = start
        while True:
            yield source.step(i)
            i += 1
    it = iter(source)
    for _ in range(start):
        next(it)
    yield from it
