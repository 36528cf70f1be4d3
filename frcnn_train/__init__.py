"""Resumable Faster R-CNN / Mask R-CNN training on torchvision, configured with Hydra."""

__version__ = "0.1.0"
