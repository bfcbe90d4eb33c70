"""Checkpoints: whole-model state gathered by parameter name, written atomically.

A checkpoint holds every parameter and its optimizer state once, and every persistent buffer
(a BatchNorm's running statistics) once, keyed by its global name
(``components.<c>.layers.<i>...``), not by rank, so it can be resumed on any number of
processes with any plan: each rank takes the entries of the parameters it builds.

Writing is atomic: the bytes go to a temporary file in the same folder, are flushed and
fsynced, then ``os.replace`` swaps it in (and the folder is fsynced). A crash at any point
leaves either the old checkpoint or the new one, never a mix; a leftover temporary file is
ignored by ``load``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist

FORMAT = "mtmm-checkpoint-1"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` so that a crash never leaves a partial file there."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def local_state(executor, optimizer) -> dict:
    """This rank's share: the parameters it owns (lowest holder) and their optimizer state, and
    the persistent buffers it owns (lowest holder)."""
    by_param = {p: n for n, p in executor.named_parameters()}
    params, optim = {}, {}
    for name, p in executor.named_parameters():
        if executor.owned(name):
            params[name] = p.detach().cpu().clone()
    for p, st in optimizer.state.items():
        name = by_param[p]
        if executor.owned(name):
            optim[name] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
    buffers = {n: t.detach().cpu().clone() for n, t in executor.named_buffers().items() if executor.owned(n)}
    return {"params": params, "optim": optim, "buffers": buffers}


def gather_state(executor, optimizer, *, step: int, model_name: str, extra: dict | None = None) -> dict | None:
    """The whole state on rank 0 (None on the others); every rank must call it."""
    mine = local_state(executor, optimizer)
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if dist.get_rank() != 0:
            return None
    else:
        parts = [mine]
    state = {"format": FORMAT, "model": model_name, "step": step, "params": {}, "optim": {},
             "buffers": {}, "extra": extra or {}}
    for part in parts:
        state["params"].update(part["params"])
        state["optim"].update(part["optim"])
        state["buffers"].update(part["buffers"])
    return state


def save(executor, optimizer, path, *, step: int, model_name: str, extra: dict | None = None) -> None:
    """Gathers and writes atomically (rank 0 writes); every rank must call it."""
    state = gather_state(executor, optimizer, step=step, model_name=model_name, extra=extra)
    if state is not None:
        save_atomic(state, path)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def load(path) -> dict:
    """Reads a checkpoint; ValueError if it is not one."""
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 -- a torn or foreign file
        raise ValueError(f"path: {os.fspath(path)!r} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"path: {os.fspath(path)!r} is not an mtmm checkpoint")
    return state


def restore(executor, optimizer, state: dict, *, model_name: str) -> int:
    """Loads this rank's parameters, buffers and optimizer state; returns the step to continue
    from."""
    if state["model"] != model_name:
        raise ValueError(f"checkpoint: made for model {state['model']!r}, not {model_name!r}")
    params = dict(executor.named_parameters())
    _copy_values("parameter", params, state["params"])
    if "buffers" in state:  # checkpoints written before buffers were kept have none
        _copy_values("buffer", executor.named_buffers(), state["buffers"])
    updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, p in params.items():
        st = state["optim"].get(name)
        if st is not None and id(p) in updated:  # a sharded optimizer: its owner's only
            optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and k != "step" else v) for k, v in st.items()}
    return int(state["step"])


def _copy_values(kind: str, targets: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Each target tensor takes its value from ``values`` (a checkpoint's parameters or
    buffers); ValueError naming what is missing or misshapen."""
    missing = [n for n in targets if n not in values]
    if missing:
        raise ValueError(f"checkpoint: no values for {kind}s {missing[:5]}{'...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, t in targets.items():
            src = values[name]
            if src.shape != t.shape:
                raise ValueError(f"checkpoint: {kind} {name!r} has shape {tuple(src.shape)}, "
                                 f"expected {tuple(t.shape)}")
            t.copy_(src)
