"""The Checkpointer: what a save holds, how it reaches disk, best/epoch links, keep_last rotation.

In the spirit of fvcore's Checkpointer/PeriodicCheckpointer: the Trainer hands
over its state (`Trainer.state_dict()`) and says which kind of save this is; this
object owns everything about files. `checkpoint.py` owns the file format.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frcnn_train import checkpoint, distributed
from frcnn_train.logs import RunLogger

EPOCH_FILE_RE = re.compile(r"^epoch_(\d{4,})\.pth$")


# ---------------------------------------------------------------- RNG streams
def rng_state() -> dict[str, Any]:
    """Every global RNG the training step can draw from, as weights_only-loadable values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    if not state:  # migrated pre-v1 checkpoints carry none
        return
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def gather_rng(data_order: dict[str, int]) -> dict[str, Any]:
    """This process's RNG streams, every rank's (collective: call on all ranks), and the data order.

    Each rank draws from its own streams (RPN sampling depends on its images).
    """
    return {**rng_state(), "ranks": distributed.gather_lists([rng_state()]), "data": dict(data_order)}


def restore_rng(state: dict[str, Any]) -> None:
    """This rank's streams when the world size is unchanged, else rank 0's (saved at top level)."""
    ranks = state.get("ranks", [])
    set_rng_state(ranks[distributed.rank()] if len(ranks) == distributed.world_size() else state)


# ---------------------------------------------------------------- files
def epoch_files(run_dir: Path) -> dict[int, Path]:
    """This run's per-epoch checkpoints by epoch number (only names `epoch_NNNN.pth`, nothing else)."""
    found = {}
    for path in run_dir.glob("epoch_*.pth"):
        match = EPOCH_FILE_RE.match(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return found


class Checkpointer:
    """Writes last.pth, links best.pth / epoch_NNNN.pth to it, and keeps `keep_last` epoch files.

    Only the process with `enabled` (global rank 0) touches files; every rank still
    calls `save`, because building the state gathers all ranks' RNG streams.
    """

    def __init__(self, run_dir: Path, *, extras: dict[str, Any], keep_last: int, logger: RunLogger,
                 enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.extras = extras  # config, architecture, classes: fixed for the run
        self.keep_last = keep_last
        self.logger = logger
        self.enabled = enabled

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pth"

    def save(self, state: dict[str, Any], *, epoch_end: int | None = None, best: bool = False) -> Path:
        """Write `state` as last.pth; at an epoch end (its number) also epoch_NNNN.pth; `best`: best.pth."""
        if self.enabled:
            checkpoint.save_checkpoint(checkpoint.make_checkpoint(**self.extras, **state), self.last_path)
            if best:
                checkpoint.copy_checkpoint(self.last_path, self.run_dir / "best.pth")
            if epoch_end is not None and self.keep_last > 0:
                checkpoint.copy_checkpoint(self.last_path, self.run_dir / f"epoch_{epoch_end:04d}.pth")
                self._rotate(epoch_end)
        return self.last_path

    def _rotate(self, epoch: int) -> None:
        """Delete epoch files older than the newest `keep_last` up to `epoch`, by number.

        Files numbered above `epoch` (left by a run resumed from an older epoch) are not
        this timeline's past; they are overwritten when training reaches them.
        """
        for number, path in epoch_files(self.run_dir).items():
            if number <= epoch - self.keep_last:
                path.unlink(missing_ok=True)
