"""CUDA: AMP training saves a loss scale, and the checkpoint resumes on a CPU-only setup.

Run with `pytest -m gpu` on a machine with CUDA.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from frcnn_train import checkpoint
from frcnn_train.launch import run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_amp_checkpoint_from_cuda_resumes_on_cpu(compose_tiny, caplog: pytest.LogCaptureFixture) -> None:
    gpu_run = run(compose_tiny("device=cuda", "trainer.amp=true", "trainer.amp_dtype=fp16", "trainer.max_steps=3",
                               "trainer.epochs=2"))
    last = Path(gpu_run["run_dir"]) / "last.pth"
    ckpt = checkpoint.load_checkpoint(last)  # map_location=cpu
    assert ckpt["scaler"]["scale"] > 0 and "_growth_tracker" in ckpt["scaler"]
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    assert ckpt["rng"]["cuda"], "CUDA RNG state is saved"

    # Resume on GPU: the scaler's scale and growth tracker come back.
    overrides = [f"resume={last}", "trainer.max_steps=4"]
    run(compose_tiny(*overrides), overrides=overrides)
    resumed = checkpoint.load_checkpoint(last)
    assert resumed["trainer"]["global_step"] == 4 and resumed["scaler"]["scale"] > 0

    # Resume on CPU: one warning about the loss scale, then training goes on in fp32.
    overrides = [f"resume={last}", "device=cpu", "trainer.max_steps=null"]
    summary = run(compose_tiny(*overrides), overrides=overrides)
    assert summary["completed"]
    assert sum("loss scale" in r.message for r in caplog.records) == 1
    final = checkpoint.load_checkpoint(last)
    assert final["trainer"]["history"][-1]["changes"][0].startswith("device:")


def test_cpu_checkpoint_resumes_on_cuda(compose_tiny) -> None:
    cpu_run = run(compose_tiny("device=cpu", "trainer.max_steps=2", "trainer.epochs=2"))
    overrides = [f"resume={cpu_run['run_dir']}", "device=cuda", "trainer.max_steps=null"]
    summary = run(compose_tiny(*overrides), overrides=overrides)
    assert summary["completed"] and summary["global_step"] == 8
