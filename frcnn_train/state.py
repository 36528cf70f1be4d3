"""The one registry of what a checkpoint holds of a run's state (fvcore's `Checkpointer(model, **checkpointables)`).

Every stateful part of training is declared in `PARTS` and registered once, by that
key, with an object that has `state_dict()` / `load_state_dict()`. The checkpoint's
required keys (checkpoint.REQUIRED_KEYS), `inspect`'s listing and the tests' bitwise
full-state comparison all derive from `PARTS`, so a new piece of state is declared here,
registered in launch.py, and is then saved, restored, inspected and compared everywhere.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch

# Checkpoint key -> what it holds (inspect prints these). Loaded in this order: the counters come
# before the RNG streams, whose restore on another number of processes derives seeds from the step.
PARTS: dict[str, str] = {
    "model": "the model's weights, without DDP/compile prefixes",
    "ema": "the exponential moving average of the weights (trainer.ema); null when off",
    "optimizer": "optimizer state and parameter groups",
    "scheduler": "the LR schedule's position",
    "scaler": "the fp16 loss scale (empty unless trainer.amp_dtype=fp16 on CUDA)",
    "trainer": "counters (epoch, global step, step in epoch), best metric, last metrics, resume history",
    "rng": "every RNG stream (python, numpy, torch, CUDA; each rank's) and the data order",
}
# Parts a checkpoint may lack: written before they existed (a missing part restores nothing).
OPTIONAL_PARTS = ("ema", "scaler")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class Registry:
    """The run's checkpointed parts, by PARTS key; `None` registers a part that is off (no EMA)."""

    def __init__(self, **parts: Stateful | None) -> None:
        unknown = set(parts) - set(PARTS)
        missing = set(PARTS) - set(parts)
        if unknown or missing:
            raise ValueError(
                f"register exactly the parts declared in state.PARTS: unknown {sorted(unknown)}, "
                f"missing {sorted(missing)}"
            )
        self.parts = {key: parts[key] for key in PARTS}

    def state_dict(self) -> dict[str, Any]:
        """Every part's state (gathers all ranks' RNG streams: call on every rank)."""
        return {key: None if part is None else part.state_dict() for key, part in self.parts.items()}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        for key, part in self.parts.items():
            if part is not None and ckpt.get(key) is not None:
                part.load_state_dict(ckpt[key])


# ---------------------------------------------------------------- counters
@dataclass
class Counters:
    """Where training stands: the checkpoint's `trainer` part."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps done
    step_in_epoch: int = 0  # steps done in the epoch in progress
    best_metric: float | None = None
    best_step: int | None = None  # the step best.pth was saved at
    best_metric_name: str = "bbox/AP"
    last_metrics: dict[str, float] = field(default_factory=dict)
    metrics_epoch: int | None = None  # the epoch and step last_metrics were computed at
    metrics_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per resume
    # The run's layout, written for a resume on another number of processes (resume.keep_global_batch);
    # never loaded: a resumed run has its own.
    world_size: int = 1
    batch_size: int = 1
    accumulate: int = 1

    LAYOUT = ("world_size", "batch_size", "accumulate")

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name not in self.LAYOUT and f.name in state:  # older checkpoints lack the newer counters
                setattr(self, f.name, copy.deepcopy(state[f.name]))

    def consumed(self) -> int:
        """Samples of this epoch's global sequence already trained on (the same for any world size)."""
        return self.step_in_epoch * self.batch_size * self.accumulate * self.world_size

    def data_order(self, seed: int) -> dict[str, int]:
        return {"seed": seed, "epoch": self.epoch, "consumed": self.consumed()}


def describe_position(counters: dict[str, Any], steps_per_epoch: int | None = None) -> str:
    """Where a run stands, numbered as the progress line numbers epochs (from 1): "step 40 (the end of
    epoch 10)", "step 6 (step 3 of 100 in epoch 1)". Every message and `inspect` say it this way."""
    epoch, in_epoch, step = counters["epoch"], counters["step_in_epoch"], counters["global_step"]
    if in_epoch == 0:
        return f"step {step} (the end of epoch {epoch})" if epoch else f"step {step} (before epoch 1)"
    of = f" of {steps_per_epoch}" if steps_per_epoch else ""
    return f"step {step} (step {in_epoch}{of} in epoch {epoch + 1})"


class Scaler:
    """The GradScaler as a part: an fp16 scale in a checkpoint that now trains without one is dropped, saying so."""

    def __init__(self, scaler: torch.amp.GradScaler, warn: Callable[[str], None]) -> None:
        self.scaler, self.warn = scaler, warn

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
        else:
            self.warn(
                f"The checkpoint carries an fp16 loss scale ({state.get('scale', float('nan')):.0f}) that has "
                "no use without CUDA fp16 autocast; continuing without loss scaling."
            )
