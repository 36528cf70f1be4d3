"""scripts/benchmark.py --vs-torchvision: both modes run both sides on one model, print each side's figures
and end with the ratio line; a non-finite loss ends it in one line naming the side."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import python_path, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--vs-torchvision", "--device", "cpu", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": python_path()},
    )


def _speed_overrides(shapes_cache: Path, tmp_path: Path) -> list[str]:
    return [o for o in tiny_overrides(shapes_cache, tmp_path) if not o.startswith("trainer.log_every")] + [
        "trainer.log_every=2"
    ]


@pytest.mark.slow  # about a minute of CPU: two tiny models, each side in its own process, their loader's workers
@pytest.mark.parametrize("mode", [[], ["--compute-only"]], ids=["end-to-end", "compute-only"])
def test_vs_torchvision_prints_both_sides_and_the_ratio_last(
    shapes_cache: Path, tmp_path: Path, mode: list[str]
) -> None:
    result = _benchmark(
        *mode,
        "--steps",
        "2",
        "--rounds",
        "2",
        "--warmup",
        "1",
        "--json",
        str(tmp_path / "b.json"),
        *_speed_overrides(shapes_cache, tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "resnet18_fpn (FPN 32), 64-64 px, batch 2" in lines[0]
    assert ("compute-only" if mode else "end-to-end") in lines[0]
    assert re.fullmatch(r"ratio frcnn_train/torchvision = \d+\.\d\d", lines[-1]), lines[-1]
    assert re.fullmatch(r"per-round ratios: [\d.]+ [\d.]+", lines[-2]), lines[-2]
    assert sum(line.startswith("  round ") for line in lines) == 2
    for side in ("torchvision", "frcnn_train"):
        row = next(line for line in lines if line.startswith(side + " "))
        speed, memory = re.search(r"([\d.]+) images/s .* peak memory +(\d+) MB", row).groups()
        assert float(speed) > 0 and int(memory) > 100
    assert re.search(
        r"checkpoint blocking the training thread: frcnn_train \d+ ms, plain synchronous "
        r"torch.save of the same state \d+ ms",
        result.stdout,
    )
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["mode"] == ("compute-only" if mode else "end-to-end")
    assert len(record["rounds_images_per_s"]["frcnn_train"]) == 2 and record["blocking_ms"]
    assert f"{record['ratio']:.2f}" in lines[-1]


@pytest.mark.slow  # about 20 s: one process per mode, each side fails at its second step
@pytest.mark.parametrize(
    "mode, side",
    [(["--compute-only"], "torchvision"), (["--sides", "frcnn_train"], "frcnn_train")],
    ids=["compute-only", "end-to-end"],
)
def test_a_non_finite_loss_ends_the_benchmark_in_one_line_naming_the_side(
    shapes_cache: Path, tmp_path: Path, mode: list[str], side: str
) -> None:
    """A huge LR (no warmup, no clipping) makes either side's loss NaN at its second step."""
    result = _benchmark(
        *mode,
        "--steps",
        "2",
        "--rounds",
        "2",
        "--warmup",
        "1",
        *_speed_overrides(shapes_cache, tmp_path),
        "optim.lr=1e8",
        "schedule.warmup_steps=0",
        "trainer.grad_clip=null",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(rf"error: {side} side: the loss became (nan|inf|non-finite) at step \d", last), last
    assert "ratio" not in result.stdout


@pytest.mark.slow  # about 15 s: two tiny trainings of one epoch
def test_accuracy_trains_both_sides_and_prints_each_sides_ap(shapes_cache: Path, tmp_path: Path) -> None:
    overrides = [o for o in tiny_overrides(shapes_cache, tmp_path) if not o.startswith("run_name")]
    result = _benchmark("--accuracy", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "4 steps of 2 images, 64 px, cpu; AP / AP50 on the 4 val images:" in lines[-3], lines[-3]
    for line, side in zip(lines[-2:], ("torchvision", "frcnn_train")):
        assert re.fullmatch(side + r" +AP +[\d.]+  AP50 +[\d.]+  \(\d+ s\)", line), line


@pytest.mark.parametrize("builder", ["fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn_v2"])
def test_the_torchvision_side_of_a_v2_preset_is_torchvisions_v2_builder(builder: str) -> None:
    """gpu_check's zoo_v2_* sections set our v2 preset beside torchvision's own *_v2 builder: the same layout
    (ours loads strictly), built by that builder; v2 heads at other sizes are refused in one line."""
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

    from frcnn_train.config import compose_config
    from frcnn_train.models import build_model

    sys.path.insert(0, str(ROOT / "scripts"))
    from torchvision_side import torchvision_model

    cfg = compose_config([f"model={builder}", "model.num_classes=5"])
    theirs = torchvision_model(cfg.model, 5)
    assert type(theirs).__module__.startswith("torchvision.") and isinstance(
        theirs.roi_heads.box_head, FastRCNNConvFCHead
    )
    theirs.load_state_dict(build_model(cfg.model).state_dict())
    cfg.model.box_head_conv_dim = 128
    with pytest.raises(SystemExit, match="v2 heads at torchvision's own sizes only"):
        torchvision_model(cfg.model, 5)
