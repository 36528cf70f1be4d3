"""The registry of checkpointed state (state.py): one declaration of every part, and what derives from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from frcnn_train import checkpoint
from frcnn_train.state import OPTIONAL_PARTS, PARTS, Counters, Registry, describe_position


class Box:
    def __init__(self, value: int) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_the_registry_takes_exactly_the_declared_parts() -> None:
    parts = {key: Box(i) for i, key in enumerate(PARTS)}
    with pytest.raises(ValueError, match=r"missing \['rng'\]"):
        Registry(**{k: v for k, v in parts.items() if k != "rng"})
    with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
        Registry(**parts, extra=Box(9))
    registry = Registry(**{**parts, "ema": None})
    state = registry.state_dict()
    assert list(state) == list(PARTS) and state["ema"] is None and state["model"] == {"value": 0}
    fresh = Registry(**{key: Box(-1) for key in PARTS})
    fresh.load_state_dict(state)
    assert fresh.parts["model"].value == 0 and fresh.parts["ema"].value == -1, "a part saved as off stays as built"


def test_required_keys_and_the_resume_comparison_derive_from_the_parts() -> None:
    from conftest import TRAINING_STATE

    assert set(checkpoint.REQUIRED_KEYS) == {"config", "architecture", "classes"} | (set(PARTS) - set(OPTIONAL_PARTS))
    assert set(TRAINING_STATE) == set(PARTS) - {"trainer"}


def test_counters_keep_the_resuming_runs_layout() -> None:
    saved = Counters(
        epoch=2, global_step=9, step_in_epoch=1, world_size=4, batch_size=2, accumulate=1, history=[{"from": "x"}]
    ).state_dict()
    mine = Counters(world_size=1, batch_size=2, accumulate=4)
    mine.load_state_dict(saved)
    assert (mine.epoch, mine.global_step, mine.step_in_epoch, mine.history) == (2, 9, 1, [{"from": "x"}])
    assert (mine.world_size, mine.accumulate) == (1, 4)
    mine.history.append({"from": "y"})
    assert saved["history"] == [{"from": "x"}], "loading copies, it does not share"
    assert mine.consumed() == 1 * 2 * 4 * 1
    older = {"epoch": 1, "global_step": 4, "step_in_epoch": 0, "best_metric": None, "history": []}
    fresh = Counters()
    fresh.load_state_dict(older)  # written before best_step and the metrics' position existed
    assert fresh.best_step is None and fresh.metrics_step is None


@pytest.mark.parametrize(
    "counters, per_epoch, text",
    [
        ({"epoch": 10, "step_in_epoch": 0, "global_step": 40}, 4, "step 40 (the end of epoch 10)"),
        ({"epoch": 0, "step_in_epoch": 3, "global_step": 3}, 100, "step 3 (step 3 of 100 in epoch 1)"),
        ({"epoch": 0, "step_in_epoch": 0, "global_step": 0}, None, "step 0 (before epoch 1)"),
        ({"epoch": 1, "step_in_epoch": 4, "global_step": 8}, None, "step 8 (step 4 in epoch 2)"),
    ],
)
def test_positions_are_numbered_as_the_progress_line(counters: dict, per_epoch: int | None, text: str) -> None:
    assert describe_position(counters, per_epoch) == text


def test_inspect_lists_the_parts_a_checkpoint_holds(tiny_runs, capsys) -> None:
    from frcnn_train import inspect

    run_dir: Path = tiny_runs("parts", "trainer.max_steps=1")
    assert inspect.main([str(run_dir / "last.pth")]) == 0
    line = next(text for text in capsys.readouterr().out.splitlines() if text.startswith("state"))
    assert line.split(None, 1)[1] == "model, optimizer, scheduler, scaler, trainer, rng; no EMA (trainer.ema off)"
    assert torch.load(run_dir / "last.pth", weights_only=True)["ema"] is None
