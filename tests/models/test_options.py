"""trainer.channels_last / trainer.compile: same state-dict keys and values, and free to change on resume."""

from __future__ import annotations

from pathlib import Path

import torch

from frcnn_train import checkpoint
from frcnn_train.launch import run
from frcnn_train.models import build_model, prepare_for_training


def test_options_keep_every_key_and_value(compose_tiny) -> None:
    cfg = compose_tiny()
    cfg.model.num_classes = 3
    torch.manual_seed(0)
    plain = build_model(cfg.model).state_dict()
    torch.manual_seed(0)
    fast = prepare_for_training(build_model(cfg.model), channels_last=True, compile=True)
    assert list(fast.state_dict()) == list(plain)  # no `_orig_mod.` anywhere
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.values()))
    assert fast.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_run_resumes_without_it(compose_tiny) -> None:
    first = run(compose_tiny("trainer.max_steps=2", "trainer.channels_last=true"))
    last = Path(first["run_dir"]) / "last.pth"
    saved = checkpoint.load_checkpoint(last)
    assert saved["config"]["trainer"]["channels_last"] is True
    overrides = [f"resume={last}", "trainer.channels_last=false", "trainer.max_steps=3"]
    resumed = run(compose_tiny(*overrides), overrides=overrides)
    assert resumed["global_step"] == 3
    assert list(checkpoint.load_checkpoint(last)["model"]) == list(saved["model"])
