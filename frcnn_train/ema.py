"""An exponential moving average of the weights (trainer.ema), as timm's ModelEmaV3 and Ultralytics' ModelEMA.

Every `every` optimizer steps: ema = d * ema + (1 - d) * weights, over every floating-point
parameter and buffer (BatchNorm statistics included); integer buffers are copied. The
decay ramps up, d = decay * (1 - exp(-updates / warmup_steps)), so the average does not
drag the random initial weights along early on (Ultralytics' tau). Averaged weights of a
detector usually score higher than the last weights and move less from one epoch to the
next; evaluate, predict, init_from and export use them when a checkpoint has them.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class ModelEma:
    def __init__(self, model: nn.Module, *, decay: float, warmup_steps: int, every: int) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup_steps, self.every = decay, warmup_steps, every
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0
        self._pair(model)

    def _pair(self, model: nn.Module) -> None:
        """Tensors the update reads and writes, matched by state-dict key once (not at every step)."""
        ours, theirs = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        if list(ours) != list(theirs):
            raise ValueError("the EMA and the model have different state-dict keys")
        self._source = model
        floats = [k for k, v in ours.items() if v.is_floating_point()]
        self._floats = ([ours[k].data for k in floats], [theirs[k].data for k in floats])
        self._others = [(ours[k].data, theirs[k].data) for k in ours if not ours[k].is_floating_point()]

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.warmup_steps)) if self.warmup_steps else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """After optimizer step `step` (1-based): average `model` in when the step is one of every `every`."""
        if step % self.every:
            return
        if model is not self._source:
            self._pair(model)
        self.updates += 1
        ema, weights = self._floats
        # lerp: ema + (1 - d) * (weights - ema), one fused kernel per dtype and device.
        torch._foreach_lerp_(ema, weights, 1.0 - self.current_decay())
        for mine, theirs in self._others:
            mine.copy_(theirs)

    @torch.no_grad()
    def restart_from(self, model: nn.Module) -> None:
        """Begin the average at `model`'s current weights (an EMA switched on at a resume)."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
