"""Plots of an evaluation: per-class precision-recall curves and a confusion matrix with a background class.

The curves come from an accumulated COCOeval (its eval['precision'] array, nothing recomputed).
The confusion matrix needs class-agnostic matching, which COCOeval does not do (it matches
within a category), so it is computed here from the ground truth and the detections, as
Ultralytics does: detections with a score of at least `score_threshold` are matched one to one
to ground-truth boxes of IoU >= 0.5, highest IoU first, whatever the classes. Rows are the true
class, columns the predicted one; the last row and column are background (a missed object: a
row's background column; a detection of nothing: the background row). Crowd regions are no
objects to find: detections on them are left out, as COCOeval ignores them.

Only evaluation calls this (never the training step). Without matplotlib the numbers are
still computed and evaluation goes on; the figures are skipped with one hint how to get them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

_log = logging.getLogger("frcnn_train")
PLOTS_HINT = "install matplotlib for the evaluation plots: pip install 'frcnn_train[plots]'"
_said_missing = False


def matplotlib_or_none() -> Any:
    """pyplot on the Agg backend (files only), or None with the install hint logged once."""
    global _said_missing
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _said_missing:
            _said_missing = True
            _log.warning("No plots: %s.", PLOTS_HINT)
        return None
    return plt


def pr_curves(evaluator: Any) -> dict[str, dict[str, np.ndarray]]:
    """Per category name: recall points and precision at IoU 0.5 and averaged over 0.5:0.95 (all areas,
    the largest maxDets), from an accumulated COCOeval; -1 (no ground truth) becomes NaN."""
    precision = np.asarray(evaluator.eval["precision"], dtype=np.float64)  # [T, R, K, A, M]
    thresholds = np.asarray(evaluator.params.iouThrs)
    at50 = int(np.argmin(np.abs(thresholds - 0.5)))
    names = [c["name"] for c in evaluator.cocoGt.loadCats(evaluator.params.catIds)]
    out = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        p = np.where(p < 0, np.nan, p)
        with np.errstate(all="ignore"):
            mean = np.nanmean(p, axis=0) if np.isfinite(p).any() else np.full(p.shape[1], np.nan)
        out[name] = {"recall": np.asarray(evaluator.params.recThrs), "iou50": p[at50], "iou50_95": mean}
    return out


def confusion_matrix(
    coco_gt: Any, results: Sequence[dict[str, Any]], *, iou_threshold: float = 0.5, score_threshold: float = 0.5
) -> tuple[np.ndarray, list[str]]:
    """[K + 1, K + 1] counts (rows: true class, columns: predicted; index K: background) and the K class names
    in the ground truth's category order."""
    cat_ids = sorted(coco_gt.getCatIds())
    names = [c["name"] for c in coco_gt.loadCats(cat_ids)]
    index = {cat: i for i, cat in enumerate(cat_ids)}
    bg = len(cat_ids)
    matrix = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    per_image: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        if r["score"] >= score_threshold and r["category_id"] in index:
            per_image.setdefault(int(r["image_id"]), []).append(r)
    for image_id in coco_gt.getImgIds():
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
        gts = [a for a in anns if not a.get("iscrowd", 0) and a["category_id"] in index]
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        dets = per_image.get(image_id, [])
        gt_boxes, det_boxes = _xyxy([a["bbox"] for a in gts]), _xyxy([d["bbox"] for d in dets])
        if crowd and dets:  # a detection on a crowd region is neither right nor wrong
            on_crowd = _ioa(det_boxes, _xyxy([a["bbox"] for a in crowd])).max(dim=1).values >= iou_threshold
            dets = [d for d, c in zip(dets, on_crowd.tolist()) if not c]
            det_boxes = det_boxes[~on_crowd]
        matched_gt, matched_det = set(), set()
        if gts and dets:
            iou = box_iou(gt_boxes, det_boxes)
            pairs = (iou >= iou_threshold).nonzero().tolist()
            for g, d in sorted(pairs, key=lambda p: -float(iou[p[0], p[1]])):
                if g in matched_gt or d in matched_det:
                    continue
                matched_gt.add(g)
                matched_det.add(d)
                matrix[index[gts[g]["category_id"]], index[dets[d]["category_id"]]] += 1
        for g, a in enumerate(gts):
            if g not in matched_gt:
                matrix[index[a["category_id"]], bg] += 1
        for d, r in enumerate(dets):
            if d not in matched_det:
                matrix[bg, index[r["category_id"]]] += 1
    return matrix, names


def _xyxy(xywh: list[list[float]]) -> torch.Tensor:
    boxes = torch.tensor(xywh, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def _ioa(boxes: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Intersection over each box's own area, [N, M]."""
    lt = torch.maximum(boxes[:, None, :2], regions[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1).clamp(min=1e-9)
    return inter / area[:, None]


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Each true class's row as shares of its objects (the background row: of all false detections)."""
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=np.float64), where=totals > 0)


# ---------------------------------------------------------------- figures
def pr_figure(curves: dict[str, dict[str, np.ndarray]], title: str) -> Any:
    plt = matplotlib_or_none()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for ax, key, label in ((axes[0], "iou50", "IoU 0.5"), (axes[1], "iou50_95", "IoU 0.5:0.95 (mean)")):
        for name, c in curves.items():
            if np.isfinite(c[key]).any():
                ap = float(np.nanmean(c[key]))
                ax.plot(c["recall"], c[key], label=f"{name} {ap:.3f}", linewidth=1.5)
            else:
                ax.plot([], [], label=f"{name} (no ground truth)")
        ax.set(xlabel="recall", title=f"{title}: {label}", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left", title="AP", title_fontsize=7)
    axes[0].set_ylabel("precision")
    fig.tight_layout()
    return fig


def confusion_figure(matrix: np.ndarray, names: list[str], *, normalised: bool, title: str) -> Any:
    plt = matplotlib_or_none()
    if plt is None:
        return None
    labels = [*names, "background"]
    values = normalise_rows(matrix) if normalised else matrix
    size = max(4.5, 0.55 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalised else max(1, int(values.max())))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if len(labels) <= 30:  # numbers in the cells while they are readable
        high = values.max() if values.size else 0
        for (i, j), v in np.ndenumerate(values):
            if v:
                text = f"{v:.2f}" if normalised else str(int(v))
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if v > high / 2 else "black")
    fig.tight_layout()
    return fig


def evaluation_figures(
    coco_gt: Any, evaluators: dict[str, Any], results: Sequence[dict[str, Any]], *, score_threshold: float = 0.5
) -> dict[str, Any]:
    """{name: matplotlib figure}: PR curves per IoU type (where COCOeval ran: there were detections), the
    box confusion matrix in counts and normalised. Empty without matplotlib."""
    if matplotlib_or_none() is None:
        return {}
    figures = {}
    for iou_type, evaluator in evaluators.items():
        figures[f"pr_{iou_type}"] = pr_figure(pr_curves(evaluator), f"{iou_type} precision-recall")
    matrix, names = confusion_matrix(coco_gt, results, score_threshold=score_threshold)
    where = f"IoU 0.5, score >= {score_threshold}"
    figures["confusion"] = confusion_figure(matrix, names, normalised=False, title=f"confusion ({where})")
    figures["confusion_normalised"] = confusion_figure(
        matrix, names, normalised=True, title=f"confusion, share of each true class ({where})"
    )
    return figures


def save_figures(figures: dict[str, Any], out_dir: Path, command: str = "frcnn_train") -> list[Path]:
    """Each figure as <out_dir>/<name>.png, marked as ours; a file there that is not an earlier picture of
    ours is refused (outputs.write_owned). Returns the files. The figures are closed."""
    import io

    from frcnn_train.outputs import SOFTWARE, write_owned

    plt = matplotlib_or_none()
    written = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, metadata={"Software": SOFTWARE})
        write_owned(path, buffer.getvalue(), kind="picture", command=command)
        written.append(path)
        if plt is not None:
            plt.close(fig)
    return written
