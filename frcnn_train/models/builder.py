"""`model` config -> a torchvision FasterRCNN / MaskRCNN.

The only place that reads `model.*`. Parts are torchvision's own classes with
torchvision's attribute names, so model-zoo state dicts map onto the default
sizes. Attention blocks (a later addition) are attached by `_add_attention`
after the model is whole, at sites this module names: backbone stage outputs,
FPN levels, the RoI box head and the mask head.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from frcnn_train.errors import ConfigError
from frcnn_train.models.backbones import build_backbone, stage_names

ARCHS: tuple[str, ...] = ("faster_rcnn", "mask_rcnn")
ATTENTION_TYPES_AVAILABLE: tuple[str, ...] = ("none",)

# torchvision's RoI sizes; the box head's input width depends on them.
BOX_ROI_SIZE = 7
MASK_ROI_SIZE = 14


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ConfigError(f"model={arch} is not a meta-architecture; choose one of {', '.join(ARCHS)}")
    return arch


def check_num_classes(num_classes: int | None) -> int:
    if num_classes is None:
        raise ConfigError(
            "model.num_classes is null; it is filled from the dataset before the model is built, "
            "or set it to the number of object classes (background excluded)"
        )
    if int(num_classes) < 1:
        raise ConfigError(f"model.num_classes={num_classes} must be at least 1 (background excluded)")
    return int(num_classes)


def _positive(value: Any, key: str, *, allow_zero: bool = False) -> int:
    if int(value) < 0 or (int(value) == 0 and not allow_zero):
        raise ConfigError(f"model.{key}={value} must be a {'non-negative' if allow_zero else 'positive'} integer")
    return int(value)


def attention_requested(attention_cfg: DictConfig) -> bool:
    """True when the config asks for any attention block (a type other than none, at some site)."""
    return attention_cfg.type != "none" and len(attention_cfg.sites) > 0


def feature_map_names(backbone: BackboneWithFPN) -> list[str]:
    """FPN output names in order: one per returned stage ("0", "1", ...) then "pool" (LastLevelMaxPool)."""
    return [str(i) for i in range(len(backbone.fpn.inner_blocks))] + ["pool"]


def build_anchor_generator(
    anchor_sizes: list[int], aspect_ratios: list[float], num_levels: int
) -> AnchorGenerator:
    """One base size per level when the counts agree; otherwise every level gets all sizes.

    The fallback is what torchvision's MobileNet detectors do (3 FPN levels, 5 sizes).
    """
    if not anchor_sizes or not aspect_ratios or min(anchor_sizes) <= 0 or min(aspect_ratios) <= 0:
        raise ConfigError(
            f"model.anchor_sizes={list(anchor_sizes)} and model.aspect_ratios={list(aspect_ratios)} "
            "must be non-empty lists of positive numbers"
        )
    if len(anchor_sizes) == num_levels:
        sizes = tuple((int(s),) for s in anchor_sizes)
    else:
        sizes = (tuple(int(s) for s in anchor_sizes),) * num_levels
    ratios = (tuple(float(r) for r in aspect_ratios),) * num_levels
    return AnchorGenerator(sizes, ratios)


def build_box_branch(
    *, in_channels: int, featmap_names: list[str], head_dim: int, num_classes: int
) -> tuple[MultiScaleRoIAlign, TwoMLPHead, FastRCNNPredictor]:
    """RoI pooling, two-FC head and predictor; `num_classes` includes background."""
    roi_pool = MultiScaleRoIAlign(featmap_names=featmap_names, output_size=BOX_ROI_SIZE, sampling_ratio=2)
    head = TwoMLPHead(in_channels * BOX_ROI_SIZE**2, representation_size=head_dim)
    return roi_pool, head, FastRCNNPredictor(head_dim, num_classes)


def build_mask_branch(
    *, in_channels: int, featmap_names: list[str], layers: int, dim: int, num_classes: int
) -> tuple[MultiScaleRoIAlign, MaskRCNNHeads, MaskRCNNPredictor]:
    """RoI pooling, `layers` 3x3 convs of width `dim`, and the upsampling predictor."""
    roi_pool = MultiScaleRoIAlign(featmap_names=featmap_names, output_size=MASK_ROI_SIZE, sampling_ratio=2)
    head = MaskRCNNHeads(in_channels, [dim] * layers, dilation=1)
    # With no conv layers the predictor sees the FPN features directly.
    predictor_in = dim if layers > 0 else in_channels
    return roi_pool, head, MaskRCNNPredictor(predictor_in, dim, num_classes)


def build_model(model_cfg: DictConfig) -> nn.Module:
    """Build the detector described by `model_cfg` (the `model` node of the train config)."""
    arch = check_arch(model_cfg.arch)
    num_classes = check_num_classes(model_cfg.num_classes) + 1  # torchvision counts background
    # Refuse unavailable attention before spending time on the backbone.
    _check_attention(model_cfg.attention)

    bb = model_cfg.backbone
    returned_layers = None if bb.returned_layers is None else list(bb.returned_layers)
    backbone = build_backbone(
        bb.name,
        weights=bb.weights,
        trainable_layers=bb.trainable_layers,
        norm=bb.norm,
        returned_layers=returned_layers,
        fpn_channels=bb.fpn_channels,
    )
    levels = feature_map_names(backbone)
    pooled_levels = levels[:-1]  # RoIs are pooled from the stage levels, not the extra "pool" level
    anchors = build_anchor_generator(list(model_cfg.anchor_sizes), list(model_cfg.aspect_ratios), len(levels))
    box_roi_pool, box_head, box_predictor = build_box_branch(
        in_channels=backbone.out_channels,
        featmap_names=pooled_levels,
        head_dim=_positive(model_cfg.box_head_dim, "box_head_dim"),
        num_classes=num_classes,
    )
    kwargs: dict[str, Any] = dict(
        min_size=int(model_cfg.min_size),
        max_size=int(model_cfg.max_size),
        image_mean=[float(v) for v in model_cfg.image_mean],
        image_std=[float(v) for v in model_cfg.image_std],
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=int(model_cfg.rpn_pre_nms_top_n_train),
        rpn_pre_nms_top_n_test=int(model_cfg.rpn_pre_nms_top_n_test),
        rpn_post_nms_top_n_train=int(model_cfg.rpn_post_nms_top_n_train),
        rpn_post_nms_top_n_test=int(model_cfg.rpn_post_nms_top_n_test),
        rpn_batch_size_per_image=_positive(model_cfg.rpn_batch_size_per_image, "rpn_batch_size_per_image"),
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=box_predictor,
        box_batch_size_per_image=_positive(model_cfg.box_batch_size_per_image, "box_batch_size_per_image"),
        box_score_thresh=float(model_cfg.box_score_thresh),
        box_nms_thresh=float(model_cfg.box_nms_thresh),
        box_detections_per_img=int(model_cfg.box_detections_per_img),
    )
    if arch == "mask_rcnn":
        mask_roi_pool, mask_head, mask_predictor = build_mask_branch(
            in_channels=backbone.out_channels,
            featmap_names=pooled_levels,
            layers=_positive(model_cfg.mask_head_layers, "mask_head_layers", allow_zero=True),
            dim=_positive(model_cfg.mask_head_dim, "mask_head_dim"),
            num_classes=num_classes,
        )
        model: nn.Module = MaskRCNN(
            backbone,
            num_classes=None,  # the predictors above already carry it
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
            **kwargs,
        )
    else:
        model = FasterRCNN(backbone, num_classes=None, **kwargs)

    _add_attention(
        model,
        model_cfg.attention,
        stages=stage_names(bb.name, returned_layers),
        fpn_levels=levels,
        arch=arch,
    )
    return model


def _check_attention(attention_cfg: DictConfig) -> None:
    if attention_requested(attention_cfg) and attention_cfg.type not in ATTENTION_TYPES_AVAILABLE:
        raise ConfigError(f"model.attention.type={attention_cfg.type} is not available yet")


def _add_attention(
    model: nn.Module, attention_cfg: DictConfig, *, stages: list[str], fpn_levels: list[str], arch: str
) -> None:
    """Attach attention blocks to a finished model; a no-op until attention.py exists.

    Sites, by module: `model.backbone.body.<stage>` for each of `stages` (stage
    outputs), `model.backbone.fpn` outputs named `fpn_levels`,
    `model.roi_heads.box_head` (after RoI box pooling) and, for mask_rcnn,
    `model.roi_heads.mask_head`. Blocks must be registered as submodules of the
    site they follow so that every other state-dict key stays torchvision's.
    """
    if not attention_requested(attention_cfg):
        return
    _check_attention(attention_cfg)  # raises for every type until attention.py lands
