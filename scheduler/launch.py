"""Starting the ranks: local processes (gloo on CPU, one per GPU with NCCL) or under torchrun.

``run_local(fn, nproc, *args)`` starts ``nproc`` processes, initialises torch.distributed in
each (a FileStore rendezvous in a private temporary folder: no port to collide with), calls
``fn(*args)`` and returns every rank's result, rank order. It watches the processes: when one
raises, dies or is killed, the others are terminated and :class:`RankFailedError` names the
rank (and carries its traceback) within ``poll_s`` seconds; ``timeout_s`` bounds the whole run.

``init_from_env()`` joins a group started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR... set).
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist


class RankFailedError(RuntimeError):
    """A rank raised, died or hung; ``rank`` says which."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"rank {rank}: {message}")
        self.rank = rank


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _worker(rank: int, nproc: int, store_path: str, backend: str, timeout_s: float, threads: int,
            fn: Callable, args: tuple, results) -> None:
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank))
    try:
        if backend == "nccl":
            torch.cuda.set_device(local_device(rank))
        dist.init_process_group(
            backend,
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=nproc,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            out = fn(*args)
        finally:
            dist.destroy_process_group()
        # Bytes, not tensors: a tensor in a queue is shared memory that dies with this process.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which raises
        results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise SystemExit(1)


def _decode(value: bytes) -> Any:
    return torch.load(io.BytesIO(value), weights_only=False)


def _poll(procs, results, out: dict, poll_s: float) -> tuple[int, str] | None:
    """Collects results for up to ``poll_s``; returns (rank, why) of a failure, if any."""
    try:
        rank, ok, value = results.get(timeout=poll_s)
    except queue.Empty:
        pass
    else:
        if not ok:
            return rank, f"raised {value}"
        out[rank] = _decode(value)
        return None
    for r, p in enumerate(procs):
        if r not in out and p.exitcode is not None:
            try:  # what it put just before exiting may still be in flight
                rank, ok, value = results.get(timeout=poll_s)
            except queue.Empty:
                return r, f"process died (exit code {p.exitcode})"
            if not ok:
                return rank, f"raised {value}"
            out[rank] = _decode(value)
            return None
    return None


def _root_cause(procs, results, out: dict, first: tuple[int, str], poll_s: float) -> RankFailedError:
    """When one rank dies, its peers soon fail too (connection reset, timeout). Wait a moment
    and blame a rank that died without a word (killed, os._exit, segfault) over one that
    merely lost its peer; else the first error reported."""
    end = time.monotonic() + max(1.0, 10 * poll_s)
    reported = {first[0]: first[1]}
    while time.monotonic() < end:
        try:
            rank, ok, value = results.get(timeout=poll_s)
            if not ok:
                reported.setdefault(rank, f"raised {value}")
        except queue.Empty:
            pass
    for r, p in enumerate(procs):
        if r not in out and r not in reported and p.exitcode not in (None, 0):
            return RankFailedError(r, f"process died (exit code {p.exitcode})")
    return RankFailedError(*first)


def run_local(fn: Callable[..., Any], nproc: int, *args, backend: str | None = None, timeout_s: float = 300.0,
              poll_s: float = 0.1, threads: int = 1, start_method: str = "spawn") -> list[Any]:
    """Runs ``fn(*args)`` on ``nproc`` local ranks; returns their results in rank order.

    ``fn`` and ``args`` must be picklable (a module-level function). Raises RankFailedError
    naming the first rank that failed (the others are stopped), or when ``timeout_s`` passes.
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc: expected an int >= 1, got {nproc!r}")
    backend = backend or default_backend()
    if backend == "nccl" and nproc > torch.cuda.device_count():
        raise ValueError(f"nproc: {nproc} NCCL processes but only {torch.cuda.device_count()} GPUs")
    ctx = torch.multiprocessing.get_context(start_method)
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="mtmm-rdzv-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, nproc, store, backend, timeout_s, threads, fn, args, results),
                        daemon=True)
            for r in range(nproc)
        ]
        for p in procs:
            p.start()
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(out) < nproc:
                failure = _poll(procs, results, out, poll_s)
                if failure is not None:
                    raise _root_cause(procs, results, out, failure, poll_s)
                if time.monotonic() > deadline:
                    missing = [r for r in range(nproc) if r not in out]
                    raise RankFailedError(
                        missing[0], f"no result after {timeout_s:.0f} s (ranks {missing} still running)")
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
            results.close()
    return [out[r] for r in range(nproc)]


def finish_from_env(wait: bool = True) -> None:
    """Leaves the group ``init_from_env`` joined: waits for the other ranks (``wait``; not
    after a failure, where they may never come) and destroys the process group."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> bool:
    """Joins the group torchrun set up (env RANK/WORLD_SIZE); True if it did."""
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True
