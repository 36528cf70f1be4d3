"""torchvision's detection builders as model presets: same tensors, same settings, same detections.

For each builder, our model from configs/model/<builder>.yaml and torchvision's own (random weights,
`weights=None, weights_backbone=None`) are built once per module; torchvision's state dict must load into
ours with nothing missing, unexpected or reshaped, and in eval mode both give the same detections.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from omegaconf import DictConfig

from frcnn_train.config import compose_config
from frcnn_train.models import architecture_spec, build_model, fingerprint
from frcnn_train.weights import plan_load
from frcnn_train.zoo import BUILDERS, builder_for

COCO_CLASSES = 90  # torchvision's 91 outputs, background excluded


@pytest.fixture(scope="module")
def pairs() -> Callable[[str], tuple[DictConfig, torch.nn.Module, torch.nn.Module]]:
    """pairs(builder) -> (our config, our model, torchvision's model), built once per module."""
    built: dict[str, Any] = {}

    def get(builder: str) -> tuple[DictConfig, torch.nn.Module, torch.nn.Module]:
        if builder not in built:
            torch.manual_seed(0)
            cfg = compose_config([f"model={builder}", f"model.num_classes={COCO_CLASSES}"])
            theirs = torchvision.models.get_model(
                builder, weights=None, weights_backbone=None, num_classes=COCO_CLASSES + 1
            )
            built[builder] = (cfg, build_model(cfg.model), theirs)
        return built[builder]

    return get


def _settings(model: torch.nn.Module) -> dict[str, Any]:
    rpn, heads, transform = model.rpn, model.roi_heads, model.transform
    return {
        "min_size": transform.min_size,
        "max_size": transform.max_size,
        "mean": list(transform.image_mean),
        "std": list(transform.image_std),
        "anchors": model.rpn.anchor_generator.sizes,
        "ratios": model.rpn.anchor_generator.aspect_ratios,
        "pre_nms": rpn._pre_nms_top_n,
        "post_nms": rpn._post_nms_top_n,
        "rpn_nms": rpn.nms_thresh,
        "rpn_score": rpn.score_thresh,
        "rpn_batch": rpn.fg_bg_sampler.batch_size_per_image,
        "box_score": heads.score_thresh,
        "box_nms": heads.nms_thresh,
        "per_image": heads.detections_per_img,
        "box_batch": heads.fg_bg_sampler.batch_size_per_image,
        "masks": heads.has_mask(),
    }


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_preset_loads_torchvision_state_dict_and_detects_alike(pairs, builder: str) -> None:
    cfg, ours, theirs = pairs(builder)
    assert (cfg.model.arch, cfg.model.backbone.name, cfg.model.version) == BUILDERS[builder]
    assert builder_for(cfg.model) == builder  # init_from=torchvision picks this builder's weights
    assert _settings(ours) == _settings(theirs)  # sizes, top-n and thresholds as torchvision sets them

    state = theirs.state_dict()
    generator = torch.Generator().manual_seed(1)
    for name, tensor in state.items():  # BatchNorm statistics away from 0 / 1, so that they count
        if name.endswith("running_var"):
            # Large in the backbone: random weights would otherwise grow features to ~1000, where float rounding
            # (our RoIAlign sums in another order) moves boxes by more than the tolerance.
            scale = 40.0 if name.startswith("backbone.body.") else 1.0
            tensor.copy_((torch.rand(tensor.shape, generator=generator) + 0.5) * scale)
        elif name.endswith("running_mean"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    selected, report = plan_load(ours, state)
    assert (report.missing, report.unexpected, report.reshaped) == ([], [], []), report.format()
    assert len(report.loaded) == sum(not k.endswith("num_batches_tracked") for k in state)
    ours.load_state_dict(selected, strict=False)

    # Small images and few proposals keep the R50 models at seconds on a CPU; set alike on both.
    for model in (ours, theirs):
        model.eval()
        model.transform.min_size, model.transform.max_size = (128,), 128
        model.rpn._pre_nms_top_n["testing"], model.rpn._post_nms_top_n["testing"] = 100, 40
        model.rpn.score_thresh = 0.0
        model.roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.0, 20
    images = [torch.rand(3, 128, 112, generator=generator), torch.rand(3, 96, 128, generator=generator)]
    with torch.no_grad():
        mine, reference = ours([i.clone() for i in images]), theirs([i.clone() for i in images])
    for a, b in zip(mine, reference):
        assert len(b["boxes"]) > 0
        assert set(a) == set(b)
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)
        if "masks" in b:
            torch.testing.assert_close(a["masks"], b["masks"], atol=1e-4, rtol=0)


def _tiny(*overrides: str) -> DictConfig:
    cfg = compose_config(
        [
            "model/backbone=resnet18_fpn",
            "model.backbone.fpn_channels=32",
            "model.box_head_dim=32",
            "model.box_head_conv_dim=16",
            "model.box_head_convs=2",
            "model.mask_head_dim=16",
            "model.mask_head_layers=1",
            "model.num_classes=3",
            *overrides,
        ]
    )
    return cfg


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_fingerprint_tells_v1_from_v2(arch: str) -> None:
    v1, v2 = _tiny(f"model={arch}"), _tiny(f"model={arch}", "model.version=v2")
    spec1, spec2 = architecture_spec(v1.model), architecture_spec(v2.model)
    assert "model.version" not in spec1  # v1 specs are what they were: old checkpoints keep their fingerprint
    assert spec2["model.version"] == "v2" and spec2["model.box_head_convs"] == 2
    model1, model2 = build_model(v1.model), build_model(v2.model)
    assert fingerprint(spec1, model1) != fingerprint(spec2, model2)
    keys = set(model2.state_dict())
    assert {
        "rpn.head.conv.1.0.weight",
        "backbone.fpn.inner_blocks.0.1.running_var",
        "roi_heads.box_head.0.1.weight",
    } <= keys
    assert ("roi_heads.mask_head.0.1.running_mean" in keys) == (arch == "mask_rcnn")
    assert not any(
        k.startswith(("rpn.head.conv.1", "backbone.fpn.")) and "running" in k or k.startswith("rpn.head.conv.1")
        for k in model1.state_dict()
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ("model/attention=cbam", "model.attention.sites=[roi_heads,fpn]"),
        ("model/backbone=mobilenet_v3_fpn", "model/attention=se"),
    ],
)
def test_v2_heads_with_attention_and_other_backbones_train_and_predict(overrides: tuple[str, ...]) -> None:
    cfg = _tiny("model=mask_rcnn", "model.version=v2", "model.min_size=64", "model.max_size=64", *overrides)
    model = build_model(cfg.model)
    keys = set(model.state_dict())
    if "model/attention=cbam" in overrides:  # blocks on the v2 FPN (BatchNorm) and on the conv box head's input
        assert {
            "backbone.fpn.attention.0.gamma",
            "roi_heads.attention.box.gamma",
            "roi_heads.attention.mask.gamma",
            "backbone.fpn.inner_blocks.0.1.running_var",
        } <= keys
    images = [torch.rand(3, 64, 64)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]),
            "labels": torch.tensor([1]),
            "masks": torch.zeros(1, 64, 64, dtype=torch.uint8),
        }
    ]
    targets[0]["masks"][0, 4:40, 4:40] = 1
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        assert set(model.eval()(images)[0]) == {"boxes", "labels", "scores", "masks"}


def test_unknown_version_is_refused() -> None:
    from frcnn_train.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.version=v3 .*v1, v2"):
        build_model(_tiny("model.version=v3").model)
