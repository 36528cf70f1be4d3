"""The Checkpointer: last.pth, best/epoch links, keep_last rotation by epoch number."""
from __future__ import annotations

from pathlib import Path

import torch

from frcnn_train import checkpoint
from frcnn_train.checkpointer import Checkpointer
from frcnn_train.logs import RunLogger


def trainer_state(step: int, size: int = 10, epoch: int = 0) -> dict:
    return {
        "model": {"w": torch.full((size,), float(step))}, "optimizer": {}, "scheduler": {}, "scaler": {},
        "trainer": {"epoch": epoch, "global_step": step, "step_in_epoch": 0, "best_metric": None,
                    "best_step": None, "history": []},
        "rng": {},
    }


def make_checkpointer(run_dir: Path, keep_last: int = 3) -> Checkpointer:
    extras = {"config": {"run_name": "x"}, "architecture": {"fingerprint": None, "spec": {}}, "classes": ["a"]}
    return Checkpointer(run_dir, extras=extras, keep_last=keep_last, logger=RunLogger(run_dir, enabled=False))


def test_keep_last_rotates_by_epoch_number_and_only_epoch_files(tmp_path: Path) -> None:
    """Past epoch 9999 a name sort would put epoch_10000 first; other files are never this run's to delete."""
    others = ["epoch_best.pth", "epoch_0001_backup.pth", "epoch_1.pth", "notes.txt"]
    for name in others:
        (tmp_path / name).write_bytes(b"user file")
    ckpt = make_checkpointer(tmp_path, keep_last=2)
    for epoch in (9998, 9999, 10000, 10001):
        ckpt.save(trainer_state(epoch, epoch=epoch), epoch_end=epoch)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("epoch_"))
    assert kept == sorted(["epoch_10000.pth", "epoch_10001.pth", "epoch_best.pth", "epoch_0001_backup.pth",
                           "epoch_1.pth"])
    assert all((tmp_path / name).read_bytes() == b"user file" for name in others)
    assert checkpoint.load_checkpoint(tmp_path / "epoch_10001.pth")["trainer"]["global_step"] == 10001


def test_rotation_keeps_epoch_files_ahead_of_a_resume_from_an_older_epoch(tmp_path: Path) -> None:
    ckpt = make_checkpointer(tmp_path, keep_last=1)
    ckpt.save(trainer_state(5, epoch=5), epoch_end=5)
    ckpt.save(trainer_state(2, epoch=2), epoch_end=2)  # resumed from epoch 1: epoch 5 is not older than 2
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_0002.pth", "epoch_0005.pth"]
