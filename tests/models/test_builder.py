"""build_model: every backbone x arch trains and predicts; every ModelConfig key takes effect."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.models import detection as tv_detection

from frcnn_train.config import ModelConfig
from frcnn_train.errors import ConfigError
from frcnn_train.models import ARCHS, BACKBONES, build_model, diff_layouts, tensor_layout


def _cfg(compose_tiny, *overrides: str) -> DictConfig:
    cfg = compose_tiny(*overrides)
    cfg.model.num_classes = 3  # no dataset is read here
    return cfg


def _batch(with_masks: bool) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=gen) for _ in range(2)]
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 18.0, 60.0, 50.0]]), torch.tensor([[10.0, 10.0, 50.0, 44.0]])]
    targets = []
    for b, label in zip(boxes, ([1, 3], [2])):
        target = {"boxes": b, "labels": torch.tensor(label, dtype=torch.int64)}
        if with_masks:
            masks = torch.zeros(len(b), 64, 64, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(b.int().tolist()):
                masks[i, y0:y1, x0:x1] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_and_arch_trains_and_predicts(compose_tiny, backbone: str, arch: str) -> None:
    torch.manual_seed(0)
    cfg = _cfg(compose_tiny, f"model={arch}", f"model/backbone={backbone}")
    model = build_model(cfg.model)
    images, targets = _batch(with_masks=arch == "mask_rcnn")

    model.train()
    losses = model(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    if arch == "mask_rcnn":
        expected.add("loss_mask")
    assert set(losses) == expected
    assert all(math.isfinite(v.item()) for v in losses.values()), losses

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out in outputs:
        assert {"boxes", "labels", "scores"} <= set(out)
        assert out["boxes"].shape[1:] == (4,)
        assert len(out["boxes"]) <= cfg.model.box_detections_per_img
        if arch == "mask_rcnn":
            assert out["masks"].shape[1:] == (1, 64, 64)


@pytest.mark.parametrize(("arch", "backbone"), [("mask_rcnn", "resnet18_fpn"), ("faster_rcnn", "mobilenet_v3_fpn")])
def test_gradients_reach_every_trainable_parameter(compose_tiny, arch: str, backbone: str) -> None:
    # Backward only on small backbones: it costs more than the forward passes above.
    torch.manual_seed(0)
    model = build_model(_cfg(compose_tiny, f"model={arch}", f"model/backbone={backbone}").model)
    images, targets = _batch(with_masks=arch == "mask_rcnn")
    model.train()
    sum(model(images, targets).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_config_keys_reach_the_model(compose_tiny) -> None:
    cfg = _cfg(
        compose_tiny,
        "model=mask_rcnn",
        "model/backbone=resnet18_fpn",
        "model.box_head_dim=48",
        "model.mask_head_layers=3",
        "model.mask_head_dim=24",
        "model.backbone.fpn_channels=40",
        "model.aspect_ratios=[0.5,1.0,2.0,4.0]",
        "model.min_size=96",
        "model.max_size=160",
        "model.image_mean=[0.5,0.5,0.5]",
        "model.image_std=[0.2,0.3,0.4]",
        "model.rpn_pre_nms_top_n_train=111",
        "model.rpn_pre_nms_top_n_test=55",
        "model.rpn_post_nms_top_n_train=77",
        "model.rpn_post_nms_top_n_test=33",
        "model.rpn_batch_size_per_image=99",
        "model.box_batch_size_per_image=44",
        "model.box_score_thresh=0.3",
        "model.box_nms_thresh=0.4",
        "model.box_detections_per_img=7",
    )
    model = build_model(cfg.model)
    t, rpn, roi = model.transform, model.rpn, model.roi_heads
    assert (t.min_size, t.max_size, t.image_mean, t.image_std) == ((96,), 160, [0.5] * 3, [0.2, 0.3, 0.4])
    assert rpn._pre_nms_top_n == {"training": 111, "testing": 55}
    assert rpn._post_nms_top_n == {"training": 77, "testing": 33}
    assert rpn.fg_bg_sampler.batch_size_per_image == 99
    assert roi.fg_bg_sampler.batch_size_per_image == 44
    assert (roi.score_thresh, roi.nms_thresh, roi.detections_per_img) == (0.3, 0.4, 7)
    assert model.backbone.out_channels == 40
    assert roi.box_head.fc6.in_features == 40 * 7 * 7
    assert roi.box_head.fc6.out_features == roi.box_head.fc7.out_features == 48
    assert roi.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert roi.box_predictor.bbox_pred.out_features == 16
    # 5 FPN levels and 5 sizes: one size per level, so anchors per location = ratios.
    assert rpn.anchor_generator.sizes == ((12,), (24,), (48,), (96,), (192,))  # the shapes preset's
    assert rpn.head.cls_logits.out_channels == 4
    convs = [m for m in roi.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [24, 24, 24]
    assert roi.mask_predictor.conv5_mask.in_channels == 24
    assert roi.mask_predictor.mask_fcn_logits.out_channels == 4


@pytest.mark.parametrize(
    ("backbone", "sizes", "per_location"),
    [
        ("mobilenet_v3_fpn", "[16,32,64,128,256]", 15),  # 3 levels, 5 sizes: every level gets all
        ("mobilenet_v3_fpn", "[32,64,128]", 3),  # 3 levels, 3 sizes: one per level
        ("resnet18_fpn", "[32,64]", 6),  # 5 levels, 2 sizes: every level gets both
    ],
)
def test_anchor_sizes_per_level_or_all(compose_tiny, backbone: str, sizes: str, per_location: int) -> None:
    cfg = _cfg(compose_tiny, f"model/backbone={backbone}", f"model.anchor_sizes={sizes}")
    model = build_model(cfg.model)
    assert model.rpn.head.cls_logits.out_channels == per_location
    assert set(model.rpn.anchor_generator.num_anchors_per_location()) == {per_location}


def test_returned_layers_set_the_fpn_levels(compose_tiny) -> None:
    cfg = _cfg(compose_tiny, "model/backbone=resnet18_fpn", "model.backbone.returned_layers=[2,3,4]")
    model = build_model(cfg.model)
    assert len(model.backbone.fpn.inner_blocks) == 3
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2"]
    assert "layer4" in dict(model.backbone.body.named_children())


def test_num_classes_must_be_set(compose_tiny) -> None:
    cfg = compose_tiny()
    with pytest.raises(ConfigError, match="model.num_classes"):
        build_model(cfg.model)


def test_unknown_arch_lists_valid_names(compose_tiny) -> None:
    cfg = _cfg(compose_tiny)
    cfg.model.arch = "retinanet"
    with pytest.raises(ConfigError, match="retinanet.*faster_rcnn, mask_rcnn"):
        build_model(cfg.model)


def test_unknown_backbone_lists_valid_names(compose_tiny) -> None:
    cfg = _cfg(compose_tiny)
    cfg.model.backbone.name = "vgg16"
    with pytest.raises(ConfigError) as info:
        build_model(cfg.model)
    assert "model.backbone.name=vgg16" in str(info.value)
    assert all(name in str(info.value) for name in BACKBONES)


def test_attention_none_builds_nothing_and_unknown_sites_are_refused(compose_tiny) -> None:
    plain = build_model(_cfg(compose_tiny, "model/backbone=resnet18_fpn").model)
    no_sites = _cfg(compose_tiny, "model/backbone=resnet18_fpn", "model.attention.type=se")
    assert tensor_layout(build_model(no_sites.model)) == tensor_layout(plain)

    cfg = _cfg(compose_tiny, "model.attention.type=se", "model.attention.sites=[backbone.layer5]")
    with pytest.raises(ConfigError, match=r"backbone.layer5 is not a site"):
        build_model(cfg.model)


@pytest.mark.parametrize(
    ("arch", "backbone", "zoo"),
    [
        ("faster_rcnn", "resnet50_fpn", tv_detection.fasterrcnn_resnet50_fpn),
        ("mask_rcnn", "resnet50_fpn", tv_detection.maskrcnn_resnet50_fpn),
        ("faster_rcnn", "mobilenet_v3_fpn", tv_detection.fasterrcnn_mobilenet_v3_large_fpn),
    ],
)
def test_default_sizes_match_torchvision_model_zoo(arch: str, backbone: str, zoo) -> None:
    cfg = OmegaConf.structured(ModelConfig(arch=arch, num_classes=90))
    cfg.backbone.name = backbone
    with torch.device("meta"):  # only names, shapes and dtypes are compared: skip allocation and init
        ours = tensor_layout(build_model(cfg))
        theirs = tensor_layout(zoo(weights=None, weights_backbone=None, num_classes=91))
    assert diff_layouts(theirs, ours) == []
    assert list(ours) == list(theirs)
