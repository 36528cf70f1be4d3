"""Detection models: config -> torchvision FasterRCNN / MaskRCNN, and their architecture fingerprint."""

from frcnn_train.models.backbones import BACKBONES, build_backbone, stage_names
from frcnn_train.models.builder import ARCHS, build_model, valid_attention_sites
from frcnn_train.models.fingerprint import (
    architecture_spec,
    diff_layouts,
    diff_specs,
    fingerprint,
    tensor_layout,
)
from frcnn_train.models.options import prepare_for_training

__all__ = [
    "ARCHS",
    "BACKBONES",
    "architecture_spec",
    "build_backbone",
    "build_model",
    "diff_layouts",
    "diff_specs",
    "fingerprint",
    "prepare_for_training",
    "stage_names",
    "tensor_layout",
    "valid_attention_sites",
]
