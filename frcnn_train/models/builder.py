"""`model` config -> a torchvision FasterRCNN / MaskRCNN (our subclasses in models/heads.py).

The only place that reads `model.*`. Parts are torchvision's own classes with
torchvision's attribute names, so model-zoo state dicts map onto the default
sizes. Attention blocks (models/attention.py) are attached by `_add_attention`
after the model is whole, at the sites `model.attention.sites` names:

| site                      | where the block runs                          | its state-dict keys                     |
|---------------------------|-----------------------------------------------|-----------------------------------------|
| `backbone.<stage>`        | on a stage's output, before the next stage    | `backbone.body.<stage>.attention.*`     |
| `fpn.<level>`             | on one FPN output level                       | `backbone.fpn.attention.<level>.*`      |
| `roi_heads.box`           | on the pooled [N, C, 7, 7] RoI features       | `roi_heads.attention.box.*`             |
| `roi_heads.mask`          | on the pooled [N, C, 14, 14] mask features    | `roi_heads.attention.mask.*`            |

Stages are the ones feeding the FPN: `layer1`..`layer4` for ResNets (fewer with
`returned_layers`), torchvision's feature indices for MobileNets (`14`, `18` for
v2; `13`, `16` for v3). FPN levels keep the FPN's own output names: `0` is the
finest (fed by the first returned stage, stride 4 on a ResNet), then `1`, ...,
and `pool` the extra max-pooled level. Every other key stays torchvision's.

So that one site list fits every backbone, `sites` may also name a group:
`backbone` (every stage above), `fpn` (every level), `roi_heads` (box, and mask
on Mask R-CNN), or `backbone.last` (the coarsest stage).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from frcnn_train.errors import ConfigError
from frcnn_train.models.attention import BLOCKS, attach_after, attach_to_heads, attach_to_levels
from frcnn_train.models.backbones import build_backbone, resolve_norm, stage_names
from frcnn_train.models.heads import Detector, MaskDetector
from frcnn_train.models.roi_align import MatmulMultiScaleRoIAlign

ARCHS: tuple[str, ...] = ("faster_rcnn", "mask_rcnn")
# torchvision's head layouts: v1 as in the original builders, v2 as in the *_v2 builders ("Benchmarking
# Detection Transfer Learning with Vision Transformers"): BatchNorm outside the backbone, deeper heads.
VERSIONS: tuple[str, ...] = ("v1", "v2")
ATTENTION_TYPES: tuple[str, ...] = ("none", *BLOCKS)
# Block type -> {model.attention key: the block's keyword argument}; other keys do not apply to it.
ATTENTION_BLOCK_KEYS: dict[str, dict[str, str]] = {
    "se": {"reduction": "reduction"},
    "cbam": {"reduction": "reduction", "kernel_size": "kernel_size"},
    "eca": {"eca_kernel_size": "kernel_size"},
    "nonlocal": {"inner_channels": "inner_channels", "heads": "heads"},
}
_NULLABLE_KEYS = ("eca_kernel_size", "inner_channels")  # null: chosen from the site's channel count
_ODD_KEYS = ("kernel_size", "eca_kernel_size")

# torchvision's RoI sizes; the box head's input width depends on them.
BOX_ROI_SIZE = 7
MASK_ROI_SIZE = 14


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ConfigError(f"model={arch} is not a meta-architecture; choose one of {', '.join(ARCHS)}")
    return arch


def check_version(version: str) -> str:
    if version not in VERSIONS:
        raise ConfigError(
            f"model.version={version} is not a head layout; choose one of {', '.join(VERSIONS)} "
            "(v2: torchvision's *_v2 builders)"
        )
    return version


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


def feature_map_names(backbone: BackboneWithFPN) -> list[str]:
    """FPN output names in order: one per returned stage ("0", "1", ...) then "pool" (LastLevelMaxPool)."""
    return [str(i) for i in range(len(backbone.fpn.inner_blocks))] + ["pool"]


def build_anchor_generator(anchor_sizes: list[int], aspect_ratios: list[float], num_levels: int) -> AnchorGenerator:
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
    *, in_channels: int, featmap_names: list[str], head_dim: int, num_classes: int, conv_layers: list[int] | None = None
) -> tuple[MultiScaleRoIAlign, nn.Module, FastRCNNPredictor]:
    """RoI pooling, box head and predictor; `num_classes` includes background.

    `conv_layers` None: torchvision's v1 two-FC head; a list of widths: its v2 head (3x3 convs with
    BatchNorm, then one FC layer of `head_dim`), as fasterrcnn_resnet50_fpn_v2 builds it.
    """
    roi_pool = MatmulMultiScaleRoIAlign(featmap_names=featmap_names, output_size=BOX_ROI_SIZE, sampling_ratio=2)
    if conv_layers is None:
        head: nn.Module = TwoMLPHead(in_channels * BOX_ROI_SIZE**2, representation_size=head_dim)
    else:
        head = FastRCNNConvFCHead(
            (in_channels, BOX_ROI_SIZE, BOX_ROI_SIZE), list(conv_layers), [head_dim], norm_layer=nn.BatchNorm2d
        )
    return roi_pool, head, FastRCNNPredictor(head_dim, num_classes)


def build_mask_branch(
    *, in_channels: int, featmap_names: list[str], layers: int, dim: int, num_classes: int, norm: bool = False
) -> tuple[MultiScaleRoIAlign, MaskRCNNHeads, MaskRCNNPredictor]:
    """RoI pooling, `layers` 3x3 convs of width `dim` (with BatchNorm for `norm`: v2), and the upsampling predictor."""
    roi_pool = MatmulMultiScaleRoIAlign(featmap_names=featmap_names, output_size=MASK_ROI_SIZE, sampling_ratio=2)
    head = MaskRCNNHeads(in_channels, [dim] * layers, dilation=1, norm_layer=nn.BatchNorm2d if norm else None)
    # With no conv layers the predictor sees the FPN features directly.
    predictor_in = dim if layers > 0 else in_channels
    return roi_pool, head, MaskRCNNPredictor(predictor_in, dim, num_classes)


def build_model(model_cfg: DictConfig, *, read_backbone_weights: bool = True) -> nn.Module:
    """Build the detector described by `model_cfg` (the `model` node of the train config).

    With `read_backbone_weights=False` (a checkpoint's weights go in next) the
    `model.backbone.weights` file is not read, so it need not exist on this
    machine; the norm and attention init it implies are kept.
    """
    arch = check_arch(model_cfg.arch)
    v2 = check_version(model_cfg.version) == "v2"
    num_classes = check_num_classes(model_cfg.num_classes) + 1  # torchvision counts background
    # Refuse a wrong attention config before spending time on the backbone.
    attention = attention_plan(model_cfg)

    bb = model_cfg.backbone
    returned_layers = None if bb.returned_layers is None else list(bb.returned_layers)
    backbone = build_backbone(
        bb.name,
        weights=bb.weights if read_backbone_weights else None,
        trainable_layers=bb.trainable_layers,
        norm=resolve_norm(bb.norm, bb.weights),
        returned_layers=returned_layers,
        fpn_channels=bb.fpn_channels,
        fpn_norm=v2,
    )
    levels = feature_map_names(backbone)
    pooled_levels = levels[:-1]  # RoIs are pooled from the stage levels, not the extra "pool" level
    anchors = build_anchor_generator(list(model_cfg.anchor_sizes), list(model_cfg.aspect_ratios), len(levels))
    box_roi_pool, box_head, box_predictor = build_box_branch(
        in_channels=backbone.out_channels,
        featmap_names=pooled_levels,
        head_dim=_positive(model_cfg.box_head_dim, "box_head_dim"),
        num_classes=num_classes,
        conv_layers=(
            [_positive(model_cfg.box_head_conv_dim, "box_head_conv_dim")]
            * _positive(model_cfg.box_head_convs, "box_head_convs", allow_zero=True)
        )
        if v2
        else None,
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
        rpn_score_thresh=float(model_cfg.rpn_score_thresh),
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=box_predictor,
        box_batch_size_per_image=_positive(model_cfg.box_batch_size_per_image, "box_batch_size_per_image"),
        box_score_thresh=float(model_cfg.box_score_thresh),
        box_nms_thresh=float(model_cfg.box_nms_thresh),
        box_detections_per_img=int(model_cfg.box_detections_per_img),
    )
    if v2:  # torchvision's v1 head is FasterRCNN's default (conv_depth=1)
        kwargs["rpn_head"] = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2)
    if arch == "mask_rcnn":
        mask_roi_pool, mask_head, mask_predictor = build_mask_branch(
            in_channels=backbone.out_channels,
            featmap_names=pooled_levels,
            layers=_positive(model_cfg.mask_head_layers, "mask_head_layers", allow_zero=True),
            dim=_positive(model_cfg.mask_head_dim, "mask_head_dim"),
            num_classes=num_classes,
            norm=v2,
        )
        model: nn.Module = MaskDetector(
            backbone,
            num_classes=None,  # the predictors above already carry it
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
            **kwargs,
        )
    else:
        model = Detector(backbone, num_classes=None, **kwargs)

    _add_attention(
        model,
        attention,
        stages=stage_names(bb.name, returned_layers),
        identity_init=resolve_identity_init(model_cfg.attention.identity_init, bb.weights),
    )
    return model


# ----------------------------------------------------------------------------- attention


def attention_sites(arch: str, stages: list[str], fpn_levels: list[str]) -> list[str]:
    """Every attention site of a model, in model order (see the module docstring)."""
    sites = [f"backbone.{s}" for s in stages] + [f"fpn.{level}" for level in fpn_levels] + ["roi_heads.box"]
    return sites + ["roi_heads.mask"] if arch == "mask_rcnn" else sites


def valid_attention_sites(model_cfg: DictConfig) -> list[str]:
    """The sites `model_cfg`'s backbone and arch offer, without building anything."""
    bb = model_cfg.backbone
    stages = stage_names(bb.name, None if bb.returned_layers is None else list(bb.returned_layers))
    # One FPN level per returned stage, then LastLevelMaxPool's "pool" (as feature_map_names).
    return attention_sites(check_arch(model_cfg.arch), stages, [str(i) for i in range(len(stages))] + ["pool"])


SITE_GROUPS: tuple[str, ...] = ("backbone", "fpn", "roi_heads", "backbone.last")


def resolve_sites(sites: list[str], valid: list[str]) -> list[str]:
    """`model.attention.sites` with groups expanded, in list order; names that are neither stay for the caller."""
    expanded: list[str] = []
    for site in sites:
        if site == "backbone.last":
            expanded += [s for s in valid if s.startswith("backbone.")][-1:]
        elif site in SITE_GROUPS:
            expanded += [s for s in valid if s.startswith(site + ".")]
        else:
            expanded.append(site)
    return list(dict.fromkeys(expanded))  # a group may cover a site also named on its own


def resolve_identity_init(identity_init: bool | None, backbone_weights: str | None) -> bool:
    """`model.attention.identity_init`; null means on exactly when pretrained backbone weights are loaded."""
    return bool(backbone_weights) if identity_init is None else bool(identity_init)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _site_list(model_cfg: DictConfig, sites: list[str]) -> str:
    return (
        f"valid sites for {model_cfg.arch} with {model_cfg.backbone.name}: {', '.join(sites)}"
        + ("" if model_cfg.arch == "mask_rcnn" else " (roi_heads.mask needs model=mask_rcnn)")
        + f", or the groups {', '.join(SITE_GROUPS)}"
    )


def _block_value(value: Any, key: str, *, nullable: bool, odd: bool) -> int | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (odd and value % 2 == 0):
        raise ConfigError(
            f"{key}={value!r} must be a positive {'odd ' if odd else ''}integer"
            f"{' or null (chosen from the channel count)' if nullable else ''}"
        )
    return int(value)


def _site_block(site: str, attention_cfg: DictConfig, override: Any) -> tuple[str, dict[str, Any]]:
    """(block type, block keyword arguments) at `site`: the model.attention keys, then the site's override."""
    where = f"model.attention.overrides[{site}]"
    if not isinstance(override, dict):
        raise ConfigError(f"{where}={override!r} must be a mapping, e.g. {{type: cbam, reduction: 8}}")
    allowed = ["type", *dict.fromkeys(k for keys in ATTENTION_BLOCK_KEYS.values() for k in keys)]
    unknown = [k for k in override if k not in allowed]
    if unknown:
        raise ConfigError(f"{where} has unknown key {unknown[0]!r}; an override may set {', '.join(allowed)}")
    kind = str(override.get("type", attention_cfg.type))
    if "type" in override and kind not in BLOCKS:
        raise ConfigError(f"{where}.type={kind} is not an attention block; choose one of {', '.join(BLOCKS)}")
    if kind not in BLOCKS:  # model.attention.type=none and no per-site type
        raise ConfigError(
            f"model.attention.sites lists {site} but model.attention.type=none; choose a block with "
            f"model/attention=<{'|'.join(BLOCKS)}>, or give the site a type in {where}"
        )
    keys = ATTENTION_BLOCK_KEYS[kind]
    stray = [k for k in override if k != "type" and k not in keys]
    if stray:
        raise ConfigError(f"{where}.{stray[0]} does not apply to {kind} blocks, which take {', '.join(keys)}")
    kwargs = {}
    for key, argument in keys.items():
        source = f"{where}.{key}" if key in override else f"model.attention.{key}"
        value = override[key] if key in override else attention_cfg[key]
        kwargs[argument] = _block_value(value, source, nullable=key in _NULLABLE_KEYS, odd=key in _ODD_KEYS)
    return kind, kwargs


def _site_overrides(overrides: dict[str, Any], valid: list[str]) -> dict[str, Any]:
    """{site: override}; `{roi_heads: {box: {...}}}` is read as `{roi_heads.box: {...}}`.

    Dotted config paths (Hydra's `a.b=`, OmegaConf.update) split a site name into two
    levels, and a nested YAML mapping is a natural way to write it, so both forms count.
    When both name one site their keys merge and the later entry wins: that is how a
    resume's requested change (nested) lands on the checkpoint's override (dotted).
    """
    found: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if name not in valid and isinstance(value, dict) and any(s.startswith(name + ".") for s in valid):
                walk(value, name)
            elif isinstance(found.get(name), dict) and isinstance(value, dict):
                found[name] = {**found[name], **value}
            else:
                found[name] = value

    walk(overrides, "")
    return found


def attention_plan(model_cfg: DictConfig) -> dict[str, tuple[str, dict[str, Any]]]:
    """{site: (block type, keyword arguments)} in model order; {} when no site is listed.

    Refuses, naming the `model.attention` key: an unknown type, an unknown or repeated
    site, an override for a site not in `sites`, an override key the site's block
    does not take, and out-of-range values. The order is the model's, not the
    list's, so listing the same sites in another order builds the same tensors.
    """
    attention_cfg = model_cfg.attention
    if attention_cfg.type not in ATTENTION_TYPES:
        raise ConfigError(
            f"model.attention.type={attention_cfg.type} is not an attention type; "
            f"choose one of {', '.join(ATTENTION_TYPES)}"
        )
    listed = [str(s) for s in attention_cfg.sites]
    overrides = _plain(attention_cfg.overrides) or {}
    if not listed and not overrides:
        return {}
    valid = valid_attention_sites(model_cfg)
    repeated = sorted({s for s in listed if listed.count(s) > 1})
    if repeated:
        raise ConfigError(
            f"model.attention.sites lists {', '.join(repeated)} more than once; one block per site "
            "(use model.attention.overrides to change a site's block)"
        )
    sites = resolve_sites(listed, valid)
    unknown = [s for s in sites if s not in valid]
    if unknown:
        raise ConfigError(
            f"model.attention.sites: {', '.join(unknown)} {'is not a site' if len(unknown) == 1 else 'are not sites'}; "
            f"{_site_list(model_cfg, valid)}"
        )
    overrides = _site_overrides(overrides, valid)
    stray = [s for s in overrides if s not in sites]
    if stray:
        raise ConfigError(
            f"model.attention.overrides names {', '.join(map(str, stray))}, not in model.attention.sites "
            f"{listed}; add it to the sites or drop the override ({_site_list(model_cfg, valid)})"
        )
    return {site: _site_block(site, attention_cfg, overrides.get(site, {})) for site in valid if site in sites}


def _add_attention(
    model: nn.Module, plan: dict[str, tuple[str, dict[str, Any]]], *, stages: list[str], identity_init: bool
) -> None:
    """Build the blocks of `plan` with their sites' channel counts and attach them (models/attention.py)."""
    if not plan:
        return
    backbone = model.backbone
    # The FPN's lateral convolutions are in stage order and know each stage's width.
    stage_channels = {name: block[0].in_channels for name, block in zip(stages, backbone.fpn.inner_blocks)}
    levels: dict[str, nn.Module] = {}
    heads: dict[str, nn.Module] = {}
    for site, (kind, kwargs) in plan.items():
        area, name = site.split(".", 1)
        channels = stage_channels[name] if area == "backbone" else backbone.out_channels
        try:
            block = BLOCKS[kind](channels, identity_init=identity_init, **kwargs)
        except ValueError as err:  # a value that does not fit this site's channel count
            raise ConfigError(
                f"model.attention: the {kind} block at {site} ({channels} channels) cannot be built: {err}"
            ) from None
        if area == "backbone":
            attach_after(backbone.body[name], block)
        elif area == "fpn":
            levels[name] = block
        else:
            heads[name] = block
    if levels:
        attach_to_levels(backbone.fpn, levels)
    if heads:
        attach_to_heads(model.roi_heads, heads)
