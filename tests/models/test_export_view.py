"""models/export_view.py: the copy made for tracing holds torchvision's classes only and detects the same."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_same_detections
from frcnn_train.models import build_model
from frcnn_train.models.export_view import for_export


@pytest.mark.parametrize("overrides", [("model=mask_rcnn",), ("model/attention=cbam", "model.attention.sites=[fpn]")])
def test_for_export_is_torchvision_and_leaves_the_model_alone(compose_tiny, overrides: tuple[str, ...]) -> None:
    cfg = compose_tiny("model.num_classes=5", "model.box_score_thresh=0.0", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, read_backbone_weights=False).eval()
    classes_before = [type(m) for m in model.modules()]
    exported = for_export(model)
    assert [type(m) for m in model.modules()] == classes_before, "the model itself changed"
    ours = {type(m).__name__ for m in exported.modules() if type(m).__module__.startswith("frcnn_train")}
    # Only the attention blocks are ours; they trace as they are.
    assert ours <= {"CBAM"}, ours
    coders = [type(m.box_coder).__name__ for m in (exported.rpn, exported.roi_heads)]
    assert coders == ["BoxCoder", "BoxCoder"]
    assert exported.state_dict().keys() == model.state_dict().keys()
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model([image])[0], exported([image])[0]
    assert len(want["boxes"]) > 0
    # Our RoIAlign and heads against torchvision's: the same values up to the order of float sums (measured with 1
    # and 2 threads: boxes within 4e-6 px, scores within 6e-8, mask probabilities within 1.1e-6), so 1e-4 has a
    # margin of 25; paired as export_check pairs an exported file's detections, not by position.
    assert_same_detections(got, want, atol=1e-4)


def test_for_export_refuses_other_modules() -> None:
    with pytest.raises(TypeError, match="build_model"):
        for_export(nn.Linear(2, 2))
