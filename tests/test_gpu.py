"""CUDA: AMP training (fp16, bf16) saves and resumes on CUDA and on the CPU; evaluation under AMP equals
fp32; the training step's host syncs; the side-by-side benchmark; channels_last and compile.

Run with `pytest -m gpu` on a machine with CUDA.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from frcnn_train import checkpoint
from frcnn_train.data import build_datasets, build_eval_loader
from frcnn_train.evaluation import evaluate
from frcnn_train.launch import run
from frcnn_train.models import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_amp_checkpoint_from_cuda_resumes_on_cuda_and_cpu(compose_tiny, caplog: pytest.LogCaptureFixture,
                                                          dtype: str) -> None:
    gpu_run = run(compose_tiny("device=cuda", "trainer.amp=true", f"trainer.amp_dtype={dtype}",
                               "trainer.max_steps=3", "trainer.epochs=2"))
    last = Path(gpu_run["run_dir"]) / "last.pth"
    ckpt = checkpoint.load_checkpoint(last)  # map_location=cpu
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    assert ckpt["rng"]["cuda"], "CUDA RNG state is saved"
    if dtype == "fp16":
        assert ckpt["scaler"]["scale"] > 0 and "_growth_tracker" in ckpt["scaler"]
    else:
        assert not ckpt["scaler"], "bf16 needs no loss scaling"

    # Resume on GPU for one step: the scaler continues from the saved scale and growth tracker
    # (a fresh scaler would start at 65536 with the tracker at 0).
    overrides = [f"resume={last}", "trainer.max_steps=4"]
    run(compose_tiny(*overrides), overrides=overrides)
    resumed = checkpoint.load_checkpoint(last)
    assert resumed["trainer"]["global_step"] == 4
    assert resumed["architecture"]["fingerprint"] == ckpt["architecture"]["fingerprint"]
    if dtype == "fp16":
        before, after = ckpt["scaler"], resumed["scaler"]
        grew = (after["scale"], after["_growth_tracker"]) == (before["scale"], before["_growth_tracker"] + 1)
        backed_off = (after["scale"], after["_growth_tracker"]) == (before["scale"] * 0.5, 0)  # an inf step
        assert grew or backed_off, (before, after)

    # Resume on CPU: the identical model is rebuilt (fingerprint checked by the resume); fp32 from here on.
    overrides = [f"resume={last}", "device=cpu", "trainer.max_steps=null"]
    summary = run(compose_tiny(*overrides), overrides=overrides)
    assert summary["completed"]
    if dtype == "fp16":
        assert sum("loss scale" in r.message for r in caplog.records) == 1
    final = checkpoint.load_checkpoint(last)
    assert final["architecture"]["fingerprint"] == ckpt["architecture"]["fingerprint"]
    assert any(c.startswith("device:") for c in final["trainer"]["history"][-1]["changes"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_evaluation_under_cuda_autocast_equals_fp32(compose_tiny, dtype: torch.dtype) -> None:
    cfg = compose_tiny()
    data = build_datasets(cfg.data, with_masks=False)
    cfg.model.num_classes = len(data.classes)
    torch.manual_seed(0)
    model = build_model(cfg.model).cuda()
    runs = {}
    for amp in (None, dtype):
        loader = build_eval_loader(data.val, batch_size=2, num_workers=0)
        _, runs[amp] = evaluate(model, loader, coco_gt=data.val.coco, label_to_cat_id=data.val.label_to_cat_id,
                                device=torch.device("cuda"), with_masks=False, autocast_dtype=amp)
    assert len(runs[None]) > 20 and len(runs[dtype]) == len(runs[None])
    for a, b in zip(runs[None], runs[dtype]):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) <= 1e-3


def test_training_step_syncs_on_cuda(compose_tiny) -> None:
    """CUDA's sync debug mode flags every device-to-host wait; the Trainer's own are the finiteness
    check (one per step) and the loss read every trainer.log_every steps."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = run(compose_tiny("device=cuda", "trainer.epochs=3", "trainer.log_every=3",
                                       "trainer.eval_every=0", "trainer.amp=true", "trainer.amp_dtype=bf16"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert summary["global_step"] == 12
    ours = [w for w in caught if w.filename.endswith("trainer.py") and "synchroniz" in str(w.message)]
    assert len(ours) <= 12 + 12 // 3, [f"{w.lineno}: {w.message}" for w in ours]


def test_channels_last_and_compile_train_and_save_plain_keys(compose_tiny) -> None:
    summary = run(compose_tiny("device=cuda", "trainer.max_steps=3", "trainer.epochs=2",
                               "trainer.channels_last=true", "trainer.compile=true"))
    last = Path(summary["run_dir"]) / "last.pth"
    assert not any("_orig_mod" in key for key in checkpoint.load_checkpoint(last)["model"])
    overrides = [f"resume={last}", "trainer.compile=false", "trainer.channels_last=false", "trainer.max_steps=null"]
    assert run(compose_tiny(*overrides), overrides=overrides)["completed"]


def test_benchmark_vs_torchvision_on_cuda(shapes_cache: Path, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--vs-torchvision", "--device", "cuda", "--steps", "2",
         "--rounds", "2", "--warmup", "1", "trainer.batch_size=2", f"data.cache_dir={shapes_cache}",
         "data.shapes.num_train=8", "data.num_workers=0"],
        cwd=root, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": python_path()},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("faster_rcnn resnet50_fpn (FPN 256), 800-1333 px, batch 2, AMP torch.float16, cuda")
    assert re.fullmatch(r"ratio frcnn_train/torchvision = \d+\.\d\d", lines[-1]), lines[-1]
    assert "CUDA max_memory_allocated" in result.stdout


def test_cpu_checkpoint_resumes_on_cuda(compose_tiny) -> None:
    cpu_run = run(compose_tiny("device=cpu", "trainer.max_steps=2", "trainer.epochs=2"))
    overrides = [f"resume={cpu_run['run_dir']}", "device=cuda", "trainer.max_steps=null"]
    summary = run(compose_tiny(*overrides), overrides=overrides)
    assert summary["completed"] and summary["global_step"] == 8


def test_trainer_loaders_pin_uint8_batches_on_cuda(compose_tiny) -> None:
    """uint8 images (a quarter of float32's bytes) and uint8 masks, pinned, from the run's persistent workers."""
    from frcnn_train.data import TrainLoader

    data = build_datasets(compose_tiny().data, with_masks=True)
    loader = TrainLoader(data.train, batch_size=2, num_workers=2, seed=0, pin_memory=True)
    try:
        for epoch in (0, 1):
            images, targets = next(iter(loader.at(epoch)))
            assert all(image.dtype == torch.uint8 and image.is_pinned() for image in images)
            assert targets[0]["boxes"].is_pinned() and targets[0]["masks"].dtype == torch.uint8
            assert targets[0]["masks"].is_pinned()
    finally:
        loader.close()


def test_uint8_becomes_on_cuda_the_float_the_cpu_conversion_gave() -> None:
    """The conversion moved from the loader (CPU) to the model's transform (CUDA): every value stays bitwise."""
    from frcnn_train.models.heads import to_unit_float

    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_unit_float(every.cuda()).cpu(), every.float().div_(255.0))
