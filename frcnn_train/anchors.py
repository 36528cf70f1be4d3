"""Anchor fit: can the RPN's anchors match the dataset's boxes, and which anchor settings would?

Measured as the RPN sees it: every box resized as GeneralizedRCNNTransform resizes its image
(model.min_size / max_size), against the real anchors, placed as torchvision's AnchorGenerator
places them (its rounded base anchors at every stride position of each level's grid). A
shape-only IoU (an anchor centred on the box) overstates small boxes: on the stride-4 grid a
6 px box sits up to 2 px off every anchor centre, which alone caps its IoU near 0.36.

The best possible recall (BPR) is the share of training boxes whose best anchor reaches IoU
0.3, the RPN's bg_iou_thresh. Why not its positive threshold, fg_iou_thresh 0.7: torchvision's
matcher makes every box's best anchor positive whatever its IoU (allow_low_quality_matches),
and with anchors an octave apart on a stride grid few boxes reach 0.7 even where the anchors
fit well (the default shapes run, which trains to a good AP: 23 %), so a 0.98 target on it
would flag every dataset. A box whose best anchor stays under 0.3 is matched only by that rule,
to an anchor the RPN otherwise trains as background for it: that is where small objects are
lost (6-16 px boxes with the default 32-512 px anchors: 1.5 % reach 0.3). The share at 0.7 is
reported beside it.

Small / medium / large follow COCO's area ranges on the annotations' own pixels (the
'area' field, what COCOeval's APs / APm / APl use), so the split lines up with the AP table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

MATCH_IOU = 0.3  # torchvision RPN's bg_iou_thresh: under it an anchor is background for the box
FG_IOU_THRESH = 0.7  # torchvision RPN's fg_iou_thresh; the builder changes neither
TARGET = 0.98  # below this, a suggestion is printed
WARN_BELOW = 0.9  # training warns once at start below this
AREA_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, math.inf)}
SIZE_DIVISIBLE = 32  # GeneralizedRCNNTransform pads the batch to a multiple of this


@dataclass
class Boxes:
    """A split's training boxes in the annotations' pixels: xyxy [N, 4], COCO area [N], and per box
    the (height, width) of its image."""

    xyxy: np.ndarray
    area: np.ndarray
    image_hw: np.ndarray

    @classmethod
    def from_dataset(cls, dataset: Any) -> Boxes:
        """From a CocoDetection's stored records: no image is decoded."""
        xyxy, area, hw = [], [], []
        for i in range(len(dataset)):
            rec = dataset.record(i)
            keep = rec["iscrowd"] == 0
            xyxy.append(rec["boxes"][keep])
            area.append(rec["area"][keep])
            hw.append(np.tile(np.asarray(rec["size"], dtype=np.float64), (int(keep.sum()), 1)))
        if not xyxy:
            return cls(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 2)))
        return cls(np.concatenate(xyxy).astype(np.float64), np.concatenate(area).astype(np.float64), np.concatenate(hw))


@dataclass(frozen=True)
class AnchorSetup:
    """What decides the anchors a box meets: sizes and ratios (as the config gives them), the levels'
    strides, and the resize."""

    sizes: tuple[int, ...]
    ratios: tuple[float, ...]
    strides: tuple[int, ...]
    min_size: int
    max_size: int

    def per_level(self) -> list[tuple[int, ...]]:
        # As models.builder.build_anchor_generator: one size per level when the counts agree, else all sizes.
        if len(self.sizes) == len(self.strides):
            return [(s,) for s in self.sizes]
        return [tuple(self.sizes)] * len(self.strides)

    def overrides(self) -> list[str]:
        return [
            f"model.anchor_sizes=[{','.join(str(s) for s in self.sizes)}]",
            f"model.aspect_ratios=[{','.join(_short(r) for r in self.ratios)}]",
            f"model.min_size={self.min_size}",
            f"model.max_size={self.max_size}",
        ]


def _short(value: float) -> str:
    return f"{value:.3g}"


def resize_boxes(boxes: Boxes, min_size: int, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The boxes at the model's input size and each image's padded (height, width), as
    GeneralizedRCNNTransform resizes (scale = min(min_size / short side, max_size / long side),
    the size floored) and pads (to a multiple of 32)."""
    h, w = boxes.image_hw[:, 0], boxes.image_hw[:, 1]
    scale = np.minimum(min_size / np.minimum(h, w), max_size / np.maximum(h, w))
    new_h, new_w = np.floor(h * scale), np.floor(w * scale)
    ratios = np.stack([new_w / w, new_h / h, new_w / w, new_h / h], axis=1)
    padded = np.stack([np.ceil(new_h / SIZE_DIVISIBLE), np.ceil(new_w / SIZE_DIVISIBLE)], axis=1) * SIZE_DIVISIBLE
    return boxes.xyxy * ratios, padded


def cell_anchors(sizes: tuple[int, ...], ratios: tuple[float, ...]) -> np.ndarray:
    """torchvision's base anchors for one level (rounded, centred on 0), [K, 4]."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    generator = AnchorGenerator((tuple(sizes),), (tuple(ratios),))
    return generator.generate_anchors(list(sizes), list(ratios), dtype=torch.float64).numpy()


def best_iou(xyxy: np.ndarray, padded_hw: np.ndarray, setup: AnchorSetup) -> np.ndarray:
    """Per box, the highest IoU with any anchor of any level on the real grid, [N].

    IoU with an anchor of fixed shape falls with the distance of the centres in x and in y
    separately, so the best position is the grid point nearest the box centre on each axis.
    """
    best = np.zeros(len(xyxy))
    if not len(xyxy):
        return best
    cx, cy = (xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2
    area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    for stride, sizes in zip(setup.strides, setup.per_level()):
        base = cell_anchors(sizes, setup.ratios)  # [K, 4]
        grid_h, grid_w = np.ceil(padded_hw[:, 0] / stride), np.ceil(padded_hw[:, 1] / stride)
        acx, acy = (base[:, 0] + base[:, 2]) / 2, (base[:, 1] + base[:, 3]) / 2
        ix = np.clip(np.round((cx[:, None] - acx[None]) / stride), 0, grid_w[:, None] - 1)
        iy = np.clip(np.round((cy[:, None] - acy[None]) / stride), 0, grid_h[:, None] - 1)
        ax1, ax2 = base[None, :, 0] + ix * stride, base[None, :, 2] + ix * stride
        ay1, ay2 = base[None, :, 1] + iy * stride, base[None, :, 3] + iy * stride
        iw = np.clip(np.minimum(ax2, xyxy[:, 2:3]) - np.maximum(ax1, xyxy[:, 0:1]), 0, None)
        ih = np.clip(np.minimum(ay2, xyxy[:, 3:4]) - np.maximum(ay1, xyxy[:, 1:2]), 0, None)
        inter = iw * ih
        union = area[:, None] + (ax2 - ax1) * (ay2 - ay1) - inter
        best = np.maximum(best, (inter / np.maximum(union, 1e-9)).max(axis=1))
    return best


@dataclass
class Fit:
    setup: AnchorSetup
    recall: float  # share of boxes with best IoU >= MATCH_IOU; nan without boxes
    by_area: dict[str, tuple[float, int]]  # "small" -> (recall, boxes)
    boxes: int
    positive: float = float("nan")  # share of boxes with best IoU >= FG_IOU_THRESH
    suggestion: Fit | None = None
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        if not self.boxes:
            return "anchor fit: no training boxes to measure"
        parts = ", ".join(f"{name} {r:.3f} of {n}" if n else f"{name} -" for name, (r, n) in self.by_area.items())
        lines = [
            f"anchor fit: best possible recall {self.recall:.3f} of {self.boxes} boxes (best anchor IoU >= "
            f"{MATCH_IOU}; {parts}; {self.positive:.3f} reach {FG_IOU_THRESH}) with "
            f"model.anchor_sizes={list(self.setup.sizes)}, aspect_ratios="
            f"{[float(_short(r)) for r in self.setup.ratios]}, resize {self.setup.min_size}/{self.setup.max_size}"
        ]
        if self.suggestion is not None:
            s = self.suggestion
            changed = [o for o, old in zip(s.setup.overrides(), self.setup.overrides()) if o != old]
            lines.append(f"  suggested (best possible recall {s.recall:.3f}): {' '.join(changed)}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def measure(boxes: Boxes, setup: AnchorSetup) -> Fit:
    xyxy, padded = resize_boxes(boxes, setup.min_size, setup.max_size)
    iou = best_iou(xyxy, padded, setup)
    hit = iou >= MATCH_IOU
    by_area = {}
    for name, (low, high) in AREA_RANGES.items():
        inside = (boxes.area >= low) & (boxes.area < high)
        by_area[name] = (float(hit[inside].mean()) if inside.any() else float("nan"), int(inside.sum()))
    return Fit(
        setup,
        float(hit.mean()) if len(hit) else float("nan"),
        by_area,
        len(hit),
        positive=float((iou >= FG_IOU_THRESH).mean()) if len(iou) else float("nan"),
    )


RATIO_SETS = ((0.5, 1.0, 2.0), (0.33, 0.5, 1.0, 2.0, 3.0), (0.25, 0.5, 1.0, 2.0, 4.0))
SCALES = tuple(2 ** (k / 4) for k in range(-8, 5))  # 0.25 .. 2, a quarter octave apart
UPSCALES = (1.0, 1.5, 2.0, 3.0, 4.0)
SEARCH_BOXES = 20000  # the search measures a fixed sample; the suggestion is then measured on every box


def candidates(setup: AnchorSetup) -> list[AnchorSetup]:
    """Settings to try, cheapest first: the anchors alone (scaled sizes, one per level as now; then sizes a
    half octave apart on every level; then more aspect ratios), before enlarging the images (costlier steps)."""
    out = []
    ratio_sets = [setup.ratios] + [r for r in RATIO_SETS if len(r) > len(setup.ratios)]
    for up in UPSCALES:
        for ratios in ratio_sets:
            for dense in (False, True):
                for scale in sorted(SCALES, key=lambda s: abs(math.log(s))):
                    sizes = [max(1, round(s * scale)) for s in setup.sizes]
                    if dense:  # an extra size between each pair: every level gets them all
                        sizes = sorted({*sizes, *(max(1, round(s * scale * 2**0.5)) for s in setup.sizes)})
                        if len(sizes) == len(setup.strides):
                            continue
                    out.append(
                        AnchorSetup(
                            tuple(sizes),
                            tuple(ratios),
                            setup.strides,
                            round(setup.min_size * up),
                            round(setup.max_size * up),
                        )
                    )
    return list(dict.fromkeys(out))


def fit_anchors(boxes: Boxes, setup: AnchorSetup, *, suggest: bool = True, seed: int = 0) -> Fit:
    """The fit of `setup` and, below TARGET, the first candidate setting that reaches it (or the best one)."""
    fit = measure(boxes, setup)
    if not suggest or not fit.boxes or fit.recall >= TARGET:
        return fit
    sample = boxes
    if len(boxes.xyxy) > SEARCH_BOXES:
        pick = np.random.default_rng(seed).choice(len(boxes.xyxy), SEARCH_BOXES, replace=False)
        sample = Boxes(boxes.xyxy[pick], boxes.area[pick], boxes.image_hw[pick])
    best: tuple[float, AnchorSetup] | None = None
    for candidate in candidates(setup):
        recall = measure(sample, candidate).recall
        if best is None or recall > best[0] + 1e-9:
            best = (recall, candidate)
        if recall >= TARGET:
            break
    if best is not None and best[1] != setup:
        fit.suggestion = measure(boxes, best[1])
        if fit.suggestion.recall <= fit.recall:
            fit.suggestion = None
    if fit.suggestion is not None and fit.suggestion.setup.min_size != setup.min_size:
        fit.notes.append(
            f"no anchor setting alone reaches {TARGET}: the boxes are too small for the stride-"
            f"{min(setup.strides)} grid, so the images must be enlarged (slower steps)"
        )
    return fit


def level_strides(backbone_cfg: Any) -> tuple[int, ...]:
    """The strides of the backbone's FPN levels, from a forward on the meta device (no weights, no compute)."""
    from frcnn_train.models.backbones import build_backbone

    size = 1024
    with torch.device("meta"):
        backbone = build_backbone(
            str(backbone_cfg.name),
            weights=None,
            trainable_layers=None,
            norm="bn",
            returned_layers=None if backbone_cfg.returned_layers is None else list(backbone_cfg.returned_layers),
            fpn_channels=int(backbone_cfg.fpn_channels),
        )
        features = backbone(torch.empty(1, 3, size, size))
    return tuple(size // int(f.shape[-1]) for f in features.values())


def setup_from_config(model_cfg: Any, strides: Sequence[int] | None = None) -> AnchorSetup:
    """The anchor setting a model config describes (builders read the config; the rest takes this)."""
    return AnchorSetup(
        tuple(int(s) for s in model_cfg.anchor_sizes),
        tuple(float(r) for r in model_cfg.aspect_ratios),
        tuple(strides) if strides is not None else level_strides(model_cfg.backbone),
        int(model_cfg.min_size),
        int(model_cfg.max_size),
    )


START_IMAGES = 5000  # the start-of-training check reads at most this many images' records, evenly spaced


def start_warning(model_cfg: Any, dataset: Any) -> str | None:
    """One line for the start of training when the anchors fit the training boxes badly (BPR under
    WARN_BELOW); None otherwise. Reads stored records only (no image is decoded), no search."""
    if not hasattr(dataset, "record"):
        return None
    step = max(1, len(dataset) // START_IMAGES)
    boxes = Boxes.from_dataset(_Every(dataset, step))
    fit = measure(boxes, setup_from_config(model_cfg))
    if not fit.boxes or fit.recall >= WARN_BELOW:
        return None
    small = fit.by_area["small"]
    return (
        f"Anchor fit: only {fit.recall:.0%} of the training boxes have an anchor of IoU >= {MATCH_IOU} "
        f"(small boxes: {small[0]:.0%} of {small[1]}) with model.anchor_sizes={list(fit.setup.sizes)}; the RPN "
        "will miss the others: `frcnn-data check` with this run's overrides suggests settings that fit."
    )


class _Every:
    """Every `step`-th image of a dataset, for Boxes.from_dataset."""

    def __init__(self, dataset: Any, step: int) -> None:
        self.dataset, self.step = dataset, step

    def __len__(self) -> int:
        return (len(self.dataset) + self.step - 1) // self.step

    def record(self, index: int) -> dict[str, Any]:
        return self.dataset.record(index * self.step)
