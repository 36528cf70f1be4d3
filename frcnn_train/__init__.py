"""Resumable Faster R-CNN / Mask R-CNN training on torchvision, configured with Hydra.

The Python API (frcnn_train.api): `load(source)` returns a Detector, `train(overrides)` runs a training.
Both are imported on first use, so `import frcnn_train` (and every command's start-up) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "train", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from frcnn_train.api import load

        return load
    if name == "train":  # the module, which is callable as api.train (see train._CallableModule)
        return importlib.import_module("frcnn_train.train")
    raise AttributeError(f"module 'frcnn_train' has no attribute {name!r}")
