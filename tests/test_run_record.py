"""A run remembers how it was started and resumed; a resume in another precision says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from frcnn_train import checkpoint
from frcnn_train.config import compose_config
from frcnn_train.inspect import main as inspect_main
from frcnn_train.launch import run
from frcnn_train.resume import describe_precision_change, merge_for_resume


def test_overrides_of_the_launch_and_of_each_resume_are_kept_and_shown(compose_tiny, capsys) -> None:
    first = ["trainer.max_steps=1", "seed=3"]
    run_dir = Path(run(compose_tiny(*first), overrides=first)["run_dir"])
    again = [f"resume={run_dir}", "trainer.max_steps=2", "trainer.amp=true"]
    run(compose_tiny(*again), overrides=again)

    ckpt = checkpoint.load_checkpoint(run_dir / "last.pth")
    assert ckpt["launch"]["overrides"] == first and ckpt["launch"]["precision"] == "fp32"
    resumed = ckpt["trainer"]["history"][-1]
    assert resumed["overrides"] == again and resumed["device"] == "cpu"
    assert "trainer.amp: False -> True" in resumed["changes"], "trainer.amp is mutable on resume"
    assert "Overrides: trainer.max_steps=1 seed=3" in (run_dir / "train.log").read_text()

    assert inspect_main([str(run_dir / "last.pth")]) == 0
    out = capsys.readouterr().out
    launched = next(line for line in out.splitlines() if line.startswith("launched"))
    assert launched.endswith("on cpu (fp32): trainer.max_steps=1 seed=3")
    assert f"on cpu (fp32): resume={run_dir} trainer.max_steps=2 trainer.amp=true" in out


def _ckpt(amp: bool, launch: str | None, *resumes: str) -> dict:
    return {
        "launch": {"precision": launch} if launch else None,
        "config": {"trainer": {"amp": amp}},
        "trainer": {"history": [{"precision": p} for p in resumes]},
    }


def test_a_change_of_precision_on_resume_is_one_warning_line() -> None:
    cuda = torch.device("cuda", 0)
    # A CPU run with trainer.amp=true trained in fp32; on a GPU the same config means fp16 autocast.
    line = describe_precision_change(_ckpt(True, "fp32"), "fp16", cuda)
    assert "trained in fp32, training continues in fp16 on cuda:0" in line and "\n" not in line
    assert describe_precision_change(_ckpt(True, "fp32"), "fp32", torch.device("cpu")) == ""
    # The newest record counts: launched in fp32, resumed in bf16, now fp16.
    assert "trained in bf16, training continues in fp16" in describe_precision_change(
        _ckpt(True, "fp32", "bf16"), "fp16", cuda
    )
    # Checkpoints from before the record: without trainer.amp they were fp32; with it, unknown (no claim).
    assert "trained in fp32" in describe_precision_change(_ckpt(False, None), "bf16", cuda)
    assert describe_precision_change(_ckpt(True, None), "bf16", cuda) == ""


@pytest.mark.parametrize("key, value", [("trainer.amp", "true"), ("trainer.amp_dtype", "bf16")])
def test_precision_keys_are_mutable_on_resume(key: str, value: str) -> None:
    saved = OmegaConf.to_container(compose_config(), resolve=True)
    _, changes = merge_for_resume(saved, compose_config([f"{key}={value}"]), [f"{key}={value}"], "last.pth")
    assert changes and changes[0].startswith(f"{key}: ")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cpu_run_continued_on_a_gpu_with_amp_warns_once(compose_tiny, caplog: pytest.LogCaptureFixture) -> None:
    first = ["device=cpu", "trainer.amp=true", "trainer.max_steps=1"]
    run_dir = Path(run(compose_tiny(*first), overrides=first)["run_dir"])
    again = [f"resume={run_dir}", "device=cuda", "trainer.max_steps=2"]
    caplog.clear()
    run(compose_tiny(*again), overrides=again)
    warnings = [r.message for r in caplog.records if "Precision changes" in r.message]
    assert len(warnings) == 1 and "trained in fp32, training continues in fp16 on cuda:0" in warnings[0]
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark, "auto on CUDA: fast"
