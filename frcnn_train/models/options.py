"""Speed options applied to a built detector: memory format and torch.compile.

Neither changes a state-dict key: channels_last only re-strides the 4-D
weights, and `nn.Module.compile()` compiles the backbone's call in place instead
of wrapping it (a `torch.compile(module)` wrapper would add `_orig_mod.` to every
key). So both may differ between a run and its resume.
"""

from __future__ import annotations

import torch
from torch import nn


def prepare_for_training(model: nn.Module, *, channels_last: bool, compile: bool) -> nn.Module:
    """`model` (already on its device) in channels_last and/or with a compiled backbone + FPN."""
    if channels_last:
        # Convolutions take the weights' layout, so the backbone, FPN and RPN head run NHWC
        # (oneDNN on CPUs, tensor-core kernels on GPUs) without touching the inputs.
        model.to(memory_format=torch.channels_last)
    if compile:
        # Backbone + FPN only: the heads' shapes change every step (proposal counts), which
        # would recompile; dynamic=False keeps the fixed-size batches of one run fast.
        model.backbone.compile(dynamic=False)
    return model
