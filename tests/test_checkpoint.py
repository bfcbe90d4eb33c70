"""Checkpoints: atomic writes (a crash mid-write keeps the previous file), resuming on another
number of processes equals an uninterrupted single-process run, a dying rank stops the run
with an error naming it and leaves the last checkpoint loadable."""

from __future__ import annotations

import os
import time

import pytest
import torch

from scheduler import checkpoint as ckpt
from scheduler.launch import RankFailedError, run_local
from scheduler.trainer import TrainConfig, train
from test_executor import CLIP, LR, STEPS, TOL, assert_matches_reference, precision, reference_run


def _crash_while_writing(path: str) -> None:
    """Runs in a child process: starts overwriting ``path`` and dies half-way (os._exit)."""
    real_save = torch.save

    def torn_save(obj, f, *a, **k):
        real_save({"format": "garbage"}, f)
        f.write(b"\x00" * 1000)
        f.flush()
        os._exit(9)

    ckpt.torch.save = torn_save
    ckpt.save_atomic({"format": ckpt.FORMAT, "step": 2}, path)


def test_save_atomic_roundtrip(tmp_path):
    path = tmp_path / "sub" / "c.pt"
    ckpt.save_atomic({"format": ckpt.FORMAT, "x": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["x"], torch.arange(3))
    assert os.listdir(path.parent) == ["c.pt"]


def test_exception_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.save_atomic({"format": ckpt.FORMAT, "step": 1}, path)

    def failing_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"format": ckpt.FORMAT, "step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]  # the temporary file is removed


def test_process_killed_mid_write_keeps_previous_checkpoint(tmp_path):
    import multiprocessing as mp

    path = str(tmp_path / "c.pt")
    ckpt.save_atomic({"format": ckpt.FORMAT, "step": 1}, path)
    p = mp.get_context("spawn").Process(target=_crash_while_writing, args=(path,))
    p.start()
    p.join(60)
    assert p.exitcode == 9
    assert ckpt.load(path)["step"] == 1
    assert len(os.listdir(tmp_path)) == 2  # the torn temporary file, never the checkpoint


def test_load_rejects_what_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00\x01 not a zip")
    with pytest.raises(ValueError, match="bad.pt.*not a readable checkpoint"):
        ckpt.load(bad)
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an mtmm checkpoint"):
        ckpt.load(tmp_path / "other.pt")


def _cfg(path, **kw) -> TrainConfig:
    base = dict(model=CLIP, steps=STEPS, method="spindle", lr=LR, progress=False, log_every=0,
                precision=precision(CLIP),
                checkpoint=str(path))
    base.update(kw)
    return TrainConfig(**base)


def test_resume_on_another_process_count_equals_uninterrupted_run(tmp_path):
    """Saved by 3 ranks (parameters spread over them by the plan), resumed by 1."""
    path = tmp_path / "run.pt"
    run_local(train, 3, _cfg(path, steps=2), timeout_s=120)
    state = ckpt.load(path)
    assert state["step"] == 2 and state["model"] == CLIP
    resumed = train(_cfg(path, resume=True, return_state=True))
    assert [h["step"] for h in resumed["history"]] == [2]
    ref_hist, _ = reference_run(CLIP, precision(CLIP))
    full = {"history": [{"losses": ref_hist[0]}, {"losses": ref_hist[1]}, *resumed["history"]],
            "state": resumed["state"]}
    assert_matches_reference(CLIP, full)
    assert ckpt.load(path)["step"] == 3


@pytest.mark.slow
def test_resume_from_2_on_3_processes(tmp_path):
    path = tmp_path / "run.pt"
    run_local(train, 2, _cfg(path, steps=2), timeout_s=120)
    resumed = run_local(train, 3, _cfg(path, resume=True, return_state=True), timeout_s=120)[0]
    ref_hist, _ = reference_run(CLIP, precision(CLIP))
    full = {"history": [{"losses": ref_hist[0]}, {"losses": ref_hist[1]}, *resumed["history"]],
            "state": resumed["state"]}
    assert_matches_reference(CLIP, full)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    train(_cfg(path, steps=1))
    with pytest.raises(ValueError, match="made for model 'tiny-clip', not 'tiny-val'"):
        from scheduler.executor import Executor, make_plan
        from scheduler.tiny_models import get_trainable_model

        model = get_trainable_model("tiny-val")
        ex = Executor(model, make_plan(model, 1, "sequential"))
        ckpt.restore(ex, torch.optim.AdamW(ex.parameters()), ckpt.load(path), model_name="tiny-val")


def test_dying_rank_stops_the_others_naming_it_and_keeps_the_checkpoint(tmp_path):
    path = tmp_path / "run.pt"
    cfg = _cfg(path, steps=5, checkpoint_every=1, die_at_step=2, die_rank=1)
    t0 = time.monotonic()
    with pytest.raises(RankFailedError, match=r"rank 1: process died \(exit code 17\)") as info:
        run_local(train, 3, cfg, timeout_s=120)
    assert info.value.rank == 1
    assert time.monotonic() - t0 < 60  # stopped by the watcher, not by the 120 s timeout
    state = ckpt.load(path)
    assert state["step"] == 2
    _, ref_params = reference_run(CLIP, precision(CLIP), steps=2)
    for name, want in ref_params.items():
        assert float((state["params"][name] - want).norm() / want.norm()) < TOL[precision(CLIP)], name


def test_rank_that_raises_is_named_with_its_error():
    with pytest.raises(RankFailedError, match=r"rank \d: raised ValueError: name: unknown trainable model 'nope'"):
        run_local(train, 2, TrainConfig(model="nope", progress=False), timeout_s=60)
