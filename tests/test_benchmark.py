"""scripts/benchmark.py --vs-torchvision runs both sides on one model and ends with the ratio line."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 35 s of CPU: two models, a few steps, two fresh processes for memory
def test_vs_torchvision_prints_both_sides_and_the_ratio_last(shapes_cache: Path, tmp_path: Path) -> None:
    overrides = [o for o in tiny_overrides(shapes_cache, tmp_path) if not o.startswith("trainer.log_every")]
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--vs-torchvision", "--device", "cpu", "--steps", "2",
         "--rounds", "2", "--warmup", "1", "trainer.log_every=2", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio frcnn_train/torchvision = \d+\.\d\d", lines[-1]), lines[-1]
    for side in ("torchvision", "frcnn_train"):
        row = next(line for line in lines if line.startswith(side + " "))
        speed, memory = re.search(r"([\d.]+) images/s .* peak memory +(\d+) MB", row).groups()
        assert float(speed) > 0 and int(memory) > 100
    assert re.search(r"checkpoint blocking the training thread: frcnn_train \d+ ms, plain synchronous "
                     r"torch.save of the same state \d+ ms", result.stdout)
    assert "resnet18_fpn (FPN 32), 64-64 px, batch 2" in lines[0]
    assert re.fullmatch(r"per-round ratios: [\d.]+ [\d.]+", lines[-2]), lines[-2]


@pytest.mark.slow  # about 15 s: two tiny trainings of one epoch
def test_accuracy_trains_both_sides_and_prints_each_sides_ap(shapes_cache: Path, tmp_path: Path) -> None:
    overrides = [o for o in tiny_overrides(shapes_cache, tmp_path) if not o.startswith("run_name")]
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--vs-torchvision", "--accuracy", "--device", "cpu", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "4 steps of 2 images, 64 px, cpu; AP / AP50 on the 4 val images:" in lines[-3], lines[-3]
    for line, side in zip(lines[-2:], ("torchvision", "frcnn_train")):
        assert re.fullmatch(side + r" +AP +[\d.]+  AP50 +[\d.]+  \(\d+ s\)", line), line
