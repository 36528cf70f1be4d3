"""The training step reads from the device only what it must decide on (DESIGN.md's speed rule).

Per optimizer step: one read for the finiteness check; the losses are read
once every trainer.log_every steps. Counted on the CPU by wrapping every way a
tensor reaches the host; `pytest -m gpu` checks the same with CUDA's sync debug mode.
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

from frcnn_train.launch import run

# The training loop's functions, by file: the Trainer's step, and the step log that reads the losses.
STEP_FUNCTIONS = {"trainer.py": {"_train_epoch", "train_step", "_check_finite"}, "progress.py": {"step"}}


def test_step_reads_the_host_once_plus_once_per_log_line(compose_tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: Counter[str] = Counter()

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_name in STEP_FUNCTIONS.get(caller.co_filename.rsplit("/", 1)[-1], ()):
                reads[f"{caller.co_name}:{name}"] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    # 8 images, batch 2, accumulate 2: 2 optimizer steps per epoch, 6 in all; a log line every 3 steps.
    summary = run(
        compose_tiny(
            "trainer.epochs=3",
            "trainer.accumulate=2",
            "trainer.log_every=3",
            "trainer.grad_clip=10.0",
            "trainer.eval_every=0",
        )
    )
    assert summary["global_step"] == 6
    assert reads == Counter({"_check_finite:tolist": 6, "step:tolist": 2}), reads
