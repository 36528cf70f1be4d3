"""torchvision's model zoo by name: weights enums, torch's hub cache, and zoo models ready for inference.

Three ways in, all resolved through torchvision's weights API (`get_model_weights`):

- `model.backbone.weights=IMAGENET1K_V1|IMAGENET1K_V2|DEFAULT` (or `ResNet50_Weights.IMAGENET1K_V2`): a member
  of the backbone classifier's enum; a path to a local file still works;
- `init_from=torchvision` (the COCO weights of the builder the configured model is) or
  `init_from=torchvision:<builder>[.<ENUM>]`;
- `frcnn-predict torchvision:<builder>[.<ENUM>] ...` and `frcnn-export`: `from_torchvision`.

A file is fetched once into torch's hub cache (`$TORCH_HOME/hub/checkpoints/<file name of the URL>`) by
`torch.hub.load_state_dict_from_url` (progress bar, torchvision's hash check), as torchvision itself does, and
read from there afterwards. Offline and not cached: one sentence with the URL and the path to put the file at.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from torchvision.models import get_model_weights

from frcnn_train.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import nn

PREFIX = "torchvision"
# torchvision's detection builders -> (arch, backbone, version). configs/model/<builder>.yaml builds each
# (tests/models/test_zoo.py checks both agree and that torchvision's state dicts load without a miss).
BUILDERS: dict[str, tuple[str, str, str]] = {
    "fasterrcnn_resnet50_fpn": ("faster_rcnn", "resnet50_fpn", "v1"),
    "fasterrcnn_resnet50_fpn_v2": ("faster_rcnn", "resnet50_fpn", "v2"),
    "maskrcnn_resnet50_fpn": ("mask_rcnn", "resnet50_fpn", "v1"),
    "maskrcnn_resnet50_fpn_v2": ("mask_rcnn", "resnet50_fpn", "v2"),
    "fasterrcnn_mobilenet_v3_large_fpn": ("faster_rcnn", "mobilenet_v3_fpn", "v1"),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("faster_rcnn", "mobilenet_v3_fpn", "v1"),
}
# Two builders share a layout and differ in the image size (min_size) they were trained at: for
# init_from=torchvision, the one nearest model.min_size is taken.
_TRAINED_SIZE = {"fasterrcnn_mobilenet_v3_large_320_fpn": 320}
_DEFAULT_SIZE = 800
# torchvision keeps COCO's 91 category ids as labels; the ids COCO leaves unused are named "N/A".
UNUSED_CLASS = "N/A"
# What frcnn-predict and frcnn-export take as their model (--help of both).
SOURCE_HELP = (
    "checkpoint file (or run directory: best.pth, else last.pth), or "
    "torchvision:<builder>[.<weights>] for torchvision's COCO weights"
)
BACKGROUND = "__background__"
# A bare enum member (IMAGENET1K_V1, DEFAULT) or a qualified one (ResNet50_Weights.IMAGENET1K_V1).
_NAME = re.compile(r"^(?:[A-Za-z][A-Za-z0-9]*_Weights\.)?[A-Za-z][A-Za-z0-9_]*$")


def is_zoo_source(value: Any) -> bool:
    """`torchvision` or `torchvision:<builder>[.<ENUM>]`."""
    return isinstance(value, str) and (value == PREFIX or value.startswith(PREFIX + ":"))


def _members(enum: Any) -> list[str]:
    return list(enum.__members__)  # DEFAULT is an alias, listed too


def pick_weights(model_name: str, name: str, key: str) -> Any:
    """The member `name` (IMAGENET1K_V1, DEFAULT or <Enum>.<NAME>) of `model_name`'s weights enum, or one sentence."""
    enum = get_model_weights(model_name)
    enum_name, _, member = name.rpartition(".")
    if (enum_name and enum_name != enum.__name__) or member not in enum.__members__:
        raise ConfigError(
            f"{key}={name} is not a weights name of torchvision's {model_name}; choose one of "
            f"{', '.join(_members(enum))} ({enum.__name__}), or give a local file"
        )
    return enum[member]


def full_name(weights: Any) -> str:
    """`ResNet50_Weights.IMAGENET1K_V2` (DEFAULT resolved to the member it stands for)."""
    return f"{type(weights).__name__}.{weights.name}"


def cache_path(weights: Any) -> Path:
    """Where torch.hub keeps the file: <hub dir>/checkpoints/<file name of the URL>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def fetch(weights: Any, key: str) -> Path:
    """The cached file of `weights`, downloaded first when missing (progress bar, torchvision's hash check)."""
    path = cache_path(weights)
    if path.is_file():
        return path
    try:  # what torchvision's own weights.get_state_dict() does; a failed download leaves no partial file
        torch.hub.load_state_dict_from_url(
            weights.url,
            model_dir=str(path.parent),
            map_location="cpu",
            progress=True,
            check_hash=True,
            weights_only=True,
        )
    except (urllib.error.URLError, OSError, ConnectionError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise CheckpointError(
            f"{key}: {full_name(weights)} is not in torch's cache and could not be downloaded ({reason}); "
            f"download {weights.url} and save it as {path} (set TORCH_HOME to use another cache)"
        ) from None
    except RuntimeError as err:  # torch.hub's "invalid hash value" for a damaged download
        raise CheckpointError(
            f"{key}: the download of {weights.url} is damaged ({str(err).splitlines()[0]}); "
            f"run again, or download it by hand to {path}"
        ) from None
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(weights: Any) -> str:
    """What torchvision's metadata says of the weights: their metrics, recipe and licence (when it names one)."""
    meta = weights.meta
    parts = []
    for dataset, metrics in meta.get("_metrics", {}).items():
        shown = ", ".join(
            f"{name.replace('_map', ' AP').replace('acc@', 'top-')} {value:g}" for name, value in metrics.items()
        )
        parts.append(f"{dataset} {shown}")
    if licence := meta.get("license") or meta.get("licence"):
        parts.append(f"licence {licence}")
    if recipe := meta.get("recipe"):
        parts.append(f"recipe {recipe}")
    return "; ".join(parts)


def classes(weights: Any) -> list[str]:
    """The class names in label order, background excluded; COCO's unused ids stay as "N/A" so labels keep
    torchvision's numbering (label = COCO category id)."""
    categories = list(weights.meta["categories"])
    return categories[1:] if categories and categories[0] == BACKGROUND else categories


# ---------------------------------------------------------------- the backbone's ImageNet weights
def backbone_weights(classifier: str, value: str, key: str = "model.backbone.weights") -> tuple[Path, Any]:
    """(file, weights enum member or None) for `model.backbone.weights`: an existing file as it is, else a name
    of `classifier`'s torchvision weights, fetched into the cache. A missing path that is no name stays for
    the caller's "does not exist" sentence."""
    path = Path(value).expanduser()
    if path.exists() or not _NAME.match(value):
        return path, None
    weights = pick_weights(classifier, value, key)
    return fetch(weights, key), weights


# ---------------------------------------------------------------- detection weights (init_from, from_torchvision)
def parse_source(source: str, key: str) -> tuple[str, str]:
    """`torchvision:<builder>[.<ENUM>]` -> (builder, enum member name; DEFAULT when not given)."""
    rest = source[len(PREFIX) + 1 :] if source.startswith(PREFIX + ":") else ""
    builder, _, member = rest.partition(".")
    if builder not in BUILDERS:
        raise ConfigError(
            f"{key}={source} does not name a torchvision detector; give {PREFIX}:<builder>[.<weights>] "
            f"with a builder among {', '.join(BUILDERS)}"
        )
    return builder, member or "DEFAULT"


def builder_for(model_cfg: DictConfig) -> str:
    """The torchvision builder whose layout `model_cfg` builds (init_from=torchvision)."""
    layout = (str(model_cfg.arch), str(model_cfg.backbone.name), str(model_cfg.version))
    matches = [b for b, spec in BUILDERS.items() if spec == layout]
    if not matches:
        raise ConfigError(
            f"init_from={PREFIX}: torchvision has no COCO weights for {layout[0]} with {layout[1]} "
            f"({layout[2]} heads); "
            f"choose one of its detectors with model=<{'|'.join(BUILDERS)}>, or name one with "
            f"init_from={PREFIX}:<builder> to load what fits"
        )
    return min(matches, key=lambda b: abs(_TRAINED_SIZE.get(b, _DEFAULT_SIZE) - int(model_cfg.min_size)))


def detection_weights(source: str, model_cfg: DictConfig | None, key: str = "init_from") -> Any:
    """The weights enum member `source` names; `torchvision` alone takes the builder `model_cfg` is."""
    if source == PREFIX:
        if model_cfg is None:
            raise ConfigError(
                f"{key}={PREFIX} needs a builder here; give {PREFIX}:<builder>, one of {', '.join(BUILDERS)}"
            )
        builder, member = builder_for(model_cfg), "DEFAULT"
    else:
        builder, member = parse_source(source, key)
    return pick_weights(builder, member, key)


@dataclass
class Fetched:
    """A weights file named in the config, resolved to a local file before the run directory is made."""

    key: str  # the config key: init_from or model.backbone.weights
    value: str  # as the user gave it
    path: Path
    weights: Any = None  # the torchvision enum member; None for a local file

    def line(self) -> str:
        """The one start-up line: what, from which file, and torchvision's metrics and recipe."""
        if self.weights is None:
            return f"{self.key}={self.value}: {self.path}"
        return f"{self.key}={self.value}: {full_name(self.weights)} from {self.path} ({describe(self.weights)})"

    def record(self) -> dict[str, Any]:
        """What the checkpoint keeps (plain types: weights_only-loadable)."""
        return {
            "value": self.value,
            "weights": full_name(self.weights) if self.weights is not None else None,
            "file": self.path.name,
            "sha256": sha256(self.path),
        }


def fetch_for_run(cfg: DictConfig) -> list[Fetched]:
    """Every zoo name of a new run's config resolved to a cached file (downloading once), before any run
    directory is made; local files are listed too, for the checkpoint's record. Missing local files stay for
    the run's own check."""
    found = []
    init_from, bb = cfg.init_from, cfg.model.backbone
    if is_zoo_source(init_from):
        weights = detection_weights(init_from, cfg.model)
        found.append(Fetched("init_from", init_from, fetch(weights, "init_from"), weights))
    elif init_from and Path(init_from).expanduser().is_file():
        found.append(Fetched("init_from", init_from, Path(init_from).expanduser()))
    if bb.weights:
        from frcnn_train.models.backbones import classifier_name

        path, weights = backbone_weights(classifier_name(bb.name), bb.weights)
        if path.is_file():
            found.append(Fetched("model.backbone.weights", bb.weights, path, weights))
    return found


def pretrained_defaults(model_cfg: DictConfig) -> list[str]:
    """torchvision's defaults for a detector initialised from its COCO weights, where the config leaves them
    open: frozen BatchNorm in the backbone and its top 3 stages trainable. Returns what was set."""
    bb, changed = model_cfg.backbone, []
    if bb.norm == "auto":
        bb.norm = "frozen_bn"
        changed.append("model.backbone.norm=frozen_bn")
    if bb.trainable_layers is None:
        bb.trainable_layers = 3
        changed.append("model.backbone.trainable_layers=3")
    return changed


def from_torchvision(source: str, overrides: Sequence[str] = ()) -> tuple[nn.Module, list[str], DictConfig]:
    """`torchvision:<builder>[.<ENUM>]` as a model ready for inference: (our detector built from the builder's
    preset, eval mode on the CPU, with torchvision's weights loaded in full; the class names in label order,
    background excluded, COCO's unused ids as "N/A"; the train config it was built from).

    `overrides` are train-config overrides applied on top of `model=<builder>` (e.g. `model.min_size=512`,
    `model.box_score_thresh=0.3`); the weights are fetched into torch's hub cache when missing.
    """
    from frcnn_train.config import compose_config
    from frcnn_train.models import build_model
    from frcnn_train.weights import load_init_weights

    builder, _ = parse_source(source, "source")
    weights = detection_weights(source, None, "source")
    names = classes(weights)
    cfg = compose_config([f"model={builder}", f"model.num_classes={len(names)}", *overrides])
    path = fetch(weights, source)
    model = build_model(cfg.model, read_backbone_weights=False)
    report = load_init_weights(model, path, remap=[], strict=False, trust=False)
    if report.missing or report.unexpected or report.reshaped:
        raise CheckpointError(
            f"{path} does not fit torchvision's {builder} ({report.counts()}); delete it and "
            f"run again to download {weights.url} anew"
        )
    return model.eval(), names, cfg
