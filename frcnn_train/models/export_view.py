"""The detector as torchvision's own classes, for tracing into ONNX or TorchScript.

Our subclasses change methods only, for speed in training and batched evaluation
(models/heads.py, roi_align.py, max_pool.py). Several of those methods cannot be
traced: the batched proposal filter and detection post-processing read per-image
counts back to the host (`.tolist()`), which a trace would record as constants
of the example image, and the ONNX exporter refuses one of their sorts; the
channels-last max pooling is an autograd.Function. torchvision's
classes, by contrast, take their tracing branches (`torchvision._is_tracing()`)
that torchvision's own ONNX tests exercise.

`for_export(model)` is therefore a copy in which each of our classes is set back
to the torchvision (or torch) class it specialises. They add no attributes and no
submodules (see `heads.specialise`), so the copy holds the same modules and
weights; its detections equal ours within float rounding (tests/test_export.py).
Attention blocks are plain modules and hooks, which a trace records as they run.
"""

from __future__ import annotations

import copy

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from frcnn_train.models.heads import (
    BatchedRoIHeads,
    BatchedRPN,
    Detector,
    Fp32BoxCoder,
    MaskDetector,
    SameSizeTransform,
)
from frcnn_train.models.max_pool import CpuMaxPool2d
from frcnn_train.models.roi_align import MatmulMultiScaleRoIAlign

# Our module class -> the class it specialises (same attributes, state-dict keys and results).
TORCHVISION_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    Detector: FasterRCNN,
    MaskDetector: MaskRCNN,
    BatchedRPN: RegionProposalNetwork,
    BatchedRoIHeads: RoIHeads,
    SameSizeTransform: GeneralizedRCNNTransform,
    MatmulMultiScaleRoIAlign: MultiScaleRoIAlign,
    CpuMaxPool2d: nn.MaxPool2d,
}


def for_export(model: nn.Module) -> nn.Module:
    """A deep copy of `model` (a detector from models/builder.py) in eval mode with torchvision's classes
    in place of ours; `model` itself is left as it is."""
    if type(model) not in (Detector, MaskDetector):
        raise TypeError(f"for_export takes a model built by frcnn_train.models.build_model, not {type(model).__name__}")
    exported = copy.deepcopy(model).eval()
    for module in exported.modules():
        if type(module) in TORCHVISION_CLASSES:
            module.__class__ = TORCHVISION_CLASSES[type(module)]
        coder = getattr(module, "box_coder", None)
        if type(coder) is Fp32BoxCoder:  # fp32 decoding matters under autocast only; an export runs fp32
            coder.__class__ = BoxCoder
    return exported
