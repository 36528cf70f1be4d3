"""torchrun: two CPU processes (gloo) train, stop, and resume exactly."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_overrides
from frcnn_train import checkpoint


def torchrun(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "-m", "frcnn_train.train", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_torchrun_stop_and_resume_matches_an_uninterrupted_run(shapes_cache: Path, tmp_path: Path) -> None:
    base = tiny_overrides(shapes_cache, tmp_path) + ["trainer.epochs=2", "trainer.batch_size=1"]
    out = torchrun(*base, "run_name=stopped", "trainer.max_steps=3")
    assert out.count("step 3/4") == 1, "only rank 0 prints progress"
    assert "torchrun --nproc_per_node=2 -m frcnn_train.train resume=" in out
    torchrun(*base, f"resume={tmp_path / 'stopped'}", "trainer.max_steps=null")
    torchrun(*base, "run_name=reference")
    resumed = checkpoint.load_checkpoint(tmp_path / "stopped" / "last.pth")
    reference = checkpoint.load_checkpoint(tmp_path / "reference" / "last.pth")
    assert resumed["trainer"]["global_step"] == reference["trainer"]["global_step"] == 8
    assert len(resumed["rng"]["ranks"]) == 2
    for key, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    assert resumed["trainer"]["last_metrics"] == reference["trainer"]["last_metrics"]
