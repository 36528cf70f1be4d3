"""ResNet and MobileNet backbones with an FPN, built from torchvision's own pieces.

The module tree is torchvision's (`body.layer1`, `fpn.inner_blocks.0`, ...), so
torchvision model-zoo detection weights map onto it. ImageNet weights come from a
local file or by the name of torchvision's weights (zoo.py: fetched once into
torch's hub cache).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _mobilenet_extractor,
    _resnet_fpn_extractor,
)
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from frcnn_train.errors import CheckpointError, ConfigError
from frcnn_train.logs import log
from frcnn_train.models.heads import specialise
from frcnn_train.models.max_pool import CpuMaxPool2d
from frcnn_train.weights import read_state_dict
from frcnn_train.zoo import backbone_weights, full_name

# Backbone name -> torchvision classifier whose feature layers it reuses.
_CLASSIFIERS: dict[str, str] = {
    "resnet18_fpn": "resnet18",
    "resnet34_fpn": "resnet34",
    "resnet50_fpn": "resnet50",
    "resnet101_fpn": "resnet101",
    "mobilenet_v2_fpn": "mobilenet_v2",
    "mobilenet_v3_fpn": "mobilenet_v3_large",
}
BACKBONES: tuple[str, ...] = tuple(_CLASSIFIERS)

NORMS: tuple[str, ...] = ("auto", "frozen_bn", "bn", "syncbn")
# syncbn is built as BatchNorm2d and converted to SyncBatchNorm only under DDP (launch.py), so
# a bn and a syncbn model have the same state-dict keys and one checkpoint serves both.
_NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "frozen_bn": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
    "syncbn": nn.BatchNorm2d,
}

# torchvision builds the FPN with 256 channels; we rebuild it only when asked for another width.
_TORCHVISION_FPN_CHANNELS = 256
_RESNET_STAGES = ["layer1", "layer2", "layer3", "layer4"]


def _check_name(name: str) -> str:
    if name not in _CLASSIFIERS:
        raise ConfigError(f"model.backbone.name={name} is not a backbone; choose one of {', '.join(BACKBONES)}")
    return _CLASSIFIERS[name]


def classifier_name(name: str) -> str:
    """The torchvision classifier a backbone is cut from (resnet50_fpn -> resnet50)."""
    return _check_name(name)


def _is_resnet(name: str) -> bool:
    return _check_name(name).startswith("resnet")


def _mobilenet_stage_indices(features: nn.Sequential) -> list[int]:
    # torchvision's _mobilenet_extractor rule (the strided blocks delimit stages); repeated here
    # because stage_names and range checks need it without building a model.
    return [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]


def _meta_classifier(tv_name: str) -> nn.Module:
    # Building on the meta device costs no memory or init time; only the structure is read.
    with torch.device("meta"):
        return getattr(tvm, tv_name)(weights=None)


@functools.cache
def _mobilenet_stages(tv_name: str) -> tuple[int, ...]:
    return tuple(_mobilenet_stage_indices(_meta_classifier(tv_name).features))


def _num_stages(name: str) -> int:
    if _is_resnet(name):
        return 5  # conv1 + layer1..layer4, as torchvision counts trainable layers
    return len(_mobilenet_stages(_check_name(name)))


def default_returned_layers(name: str) -> list[int]:
    """torchvision's default stages that feed the FPN for this backbone."""
    if _is_resnet(name):
        return [1, 2, 3, 4]
    n = _num_stages(name)
    return [n - 2, n - 1]


def resolve_norm(norm: str, weights: str | None) -> str:
    """`auto` -> frozen_bn with pretrained weights, bn without (torchvision's rule)."""
    if norm == "auto":
        return "frozen_bn" if weights else "bn"
    if norm not in _NORM_LAYERS:
        raise ConfigError(f"model.backbone.norm={norm} is not a norm; choose one of {', '.join(NORMS)}")
    return norm


def stage_names(name: str, returned_layers: list[int] | None = None) -> list[str]:
    """Names, under `backbone.body`, of the stages whose outputs feed the FPN."""
    layers = resolve_returned_layers(name, returned_layers)
    if _is_resnet(name):
        return [_RESNET_STAGES[i - 1] for i in layers]
    indices = _mobilenet_stages(_check_name(name))
    return [str(indices[i]) for i in layers]


def resolve_returned_layers(name: str, returned_layers: list[int] | None) -> list[int]:
    """The validated stage numbers that feed the FPN; None -> torchvision's default."""
    if returned_layers is None:
        return default_returned_layers(name)
    layers = [int(i) for i in returned_layers]
    low, high = (1, 4) if _is_resnet(name) else (0, _num_stages(name) - 1)
    increasing = all(a < b for a, b in zip(layers, layers[1:]))
    if not layers or not increasing or layers[0] < low or layers[-1] > high:
        raise ConfigError(
            f"model.backbone.returned_layers={layers} does not fit {name}; "
            f"give increasing stage numbers in [{low}, {high}] or null for {default_returned_layers(name)}"
        )
    return layers


def _check_trainable_layers(name: str, trainable_layers: int | None) -> int:
    n = _num_stages(name)
    if trainable_layers is None:
        return n
    if not 0 <= int(trainable_layers) <= n:
        raise ConfigError(
            f"model.backbone.trainable_layers={trainable_layers} is out of range for {name}; "
            f"give a number in [0, {n}] or null for all {n}"
        )
    return int(trainable_layers)


def build_backbone(
    name: str,
    *,
    weights: str | None,
    trainable_layers: int | None,
    norm: str,
    returned_layers: list[int] | None,
    fpn_channels: int,
    fpn_norm: bool = False,
) -> BackboneWithFPN:
    """A torchvision classifier (optionally with ImageNet weights) cut into an FPN backbone.

    `trainable_layers` counts stages from the top as torchvision does (resnet: 0-5,
    mobilenet: 0-6); None trains everything. It is honoured even without weights,
    where torchvision would silently train everything instead. `fpn_norm`: BatchNorm
    in the FPN, as torchvision's *_v2 builders have it.
    """
    classifier_name = _check_name(name)
    norm_layer = _NORM_LAYERS[resolve_norm(norm, weights)]
    layers = resolve_returned_layers(name, returned_layers)
    trainable = _check_trainable_layers(name, trainable_layers)
    if int(fpn_channels) <= 0:
        raise ConfigError(f"model.backbone.fpn_channels={fpn_channels} must be a positive number of channels")

    classifier = getattr(tvm, classifier_name)(weights=None, norm_layer=norm_layer)
    if _is_resnet(name):  # same module and results, a faster CPU forward
        classifier.maxpool = specialise(classifier.maxpool, CpuMaxPool2d)
    if weights:
        load_imagenet_weights(classifier, weights, name)
    fpn_norm_layer = nn.BatchNorm2d if fpn_norm else None
    if _is_resnet(name):
        backbone = _resnet_fpn_extractor(classifier, trainable, returned_layers=layers, norm_layer=fpn_norm_layer)
    else:
        backbone = _mobilenet_extractor(classifier, True, trainable, returned_layers=layers, norm_layer=fpn_norm_layer)
    if int(fpn_channels) != _TORCHVISION_FPN_CHANNELS:
        _replace_fpn(backbone, int(fpn_channels), fpn_norm_layer)
    return backbone


def _replace_fpn(backbone: BackboneWithFPN, fpn_channels: int, norm_layer: Callable[..., nn.Module] | None) -> None:
    # torchvision's extractors hard-code 256 FPN channels; rebuilding just the FPN
    # keeps their freezing and layer selection instead of copying that code.
    in_channels = [block[0].in_channels for block in backbone.fpn.inner_blocks]
    backbone.fpn = FeaturePyramidNetwork(
        in_channels, fpn_channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer
    )
    backbone.out_channels = fpn_channels


# ----------------------------------------------------------------------------- local ImageNet weights

_HEAD_PREFIXES = ("fc.", "classifier.")


def _layout(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    # num_batches_tracked exists with BatchNorm2d but not FrozenBatchNorm2d; it carries no weights.
    return {
        k: tuple(v.shape)
        for k, v in state.items()
        if not k.startswith(_HEAD_PREFIXES) and not k.endswith("num_batches_tracked")
    }


def _read_state_dict(path: Path, where: str) -> dict[str, Tensor]:
    try:  # the same reader as init_from: wrappers ({"state_dict": ...}), module./_orig_mod. prefixes
        return read_state_dict(path)[0]
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None


def _guess_origin(layout: dict[str, tuple[int, ...]]) -> str | None:
    if any(k.startswith(("backbone.body.", "roi_heads.", "rpn.")) for k in layout):
        return "a detection checkpoint (use init_from= for those)"
    for candidate in _CLASSIFIERS.values():
        if _layout(_meta_classifier(candidate).state_dict()) == layout:
            return f"a {candidate} file"
    return None


def load_imagenet_weights(classifier: nn.Module, weights: str, name: str) -> None:
    """Load ImageNet classification weights into `classifier`, all feature tensors or nothing: a local file, or
    a name of torchvision's weights for it (IMAGENET1K_V1, DEFAULT, ...; zoo.backbone_weights fetches it).

    `name` is the backbone name (e.g. resnet50_fpn), used in the error message.
    """
    where = "model.backbone.weights"
    path, named = backbone_weights(_CLASSIFIERS[name], weights, where)
    state = _read_state_dict(path, where)
    expected, found = _layout(classifier.state_dict()), _layout(state)
    matched = [k for k, shape in expected.items() if found.get(k) == shape]
    tv_name = _CLASSIFIERS[name]
    if len(matched) != len(expected) or len(found) != len(expected):
        reshaped = [k for k in expected if k in found and found[k] != expected[k]]
        extra = [k for k in found if k not in expected]
        problems = [f"{len(matched)} of {len(expected)} backbone tensors found"]
        if reshaped:
            problems.append(
                f"{len(reshaped)} with other shapes, e.g. {reshaped[0]} {list(found[reshaped[0]])} "
                f"vs {list(expected[reshaped[0]])}"
            )
        if extra:
            problems.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
        origin = _guess_origin(found)
        if origin:
            problems.append(f"it looks like {origin}")
        raise CheckpointError(
            f"{where}: {path} does not match {tv_name} ({'; '.join(problems)}); point it at {tv_name} ImageNet weights"
        )
    # The head keeps its own init (detection never uses it), and so does num_batches_tracked
    # when an old file lacks it; every other tensor was checked above.
    own = classifier.state_dict()
    used = {k for k in own if k in state and not k.startswith(_HEAD_PREFIXES)}
    merged = {k: state[k] if k in used else v for k, v in own.items()}
    classifier.load_state_dict(merged, strict=True)
    # Confirms the file in the run's output; a wrong one would otherwise show only as a low AP.
    head = sum(k.startswith(_HEAD_PREFIXES) for k in state)
    counters = len(state) - len(used) - head
    log.info(
        "%s: loaded %d %s tensors from %s%s; skipped %d classifier-head tensor(s) and %d BatchNorm step "
        "counter(s), which detection does not use.",
        where,
        len(used),
        tv_name,
        f"{full_name(named)} in " if named is not None else "",
        path,
        head,
        counters,
    )
