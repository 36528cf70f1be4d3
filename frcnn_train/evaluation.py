"""COCO-style evaluation with COCOeval (pycocotools', or faster-coco-eval's with eval.backend), boxes and masks."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from frcnn_train import distributed
from frcnn_train.errors import ConfigError

# COCOeval.stats indices 0..5, in pycocotools' order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# The EMA weights' metrics during training: "ema/bbox/AP" beside the trained weights' "bbox/AP".
EMA_PREFIX = "ema/"
# Metrics are reported to this many decimals: pycocotools divides by tp + fp + np.spacing(1), faster-coco-eval by
# tp + fp, so their precision entries (and a mean of them) can differ in the last bit; rounded, every AP agrees.
METRIC_DECIMALS = 12
# eval.backend: auto takes faster-coco-eval when it is installed (the `eval` extra), else pycocotools.
BACKENDS = ("auto", "pycocotools", "faster_coco_eval")


def coco_api(backend: str = "auto") -> tuple[type, type]:
    """The (COCO, COCOeval) classes of eval.backend. faster-coco-eval's are a C++ port of pycocotools' with
    the same stats, about 6x faster on COCO val2017 (docs/speed-cpu.md); its COCOeval has the same
    `params`, `eval` arrays and `stats`, so what reads an evaluator reads either."""
    if backend not in BACKENDS:
        raise ConfigError(f"eval.backend={backend!r} is not a choice; use {', '.join(BACKENDS)}")
    if backend == "faster_coco_eval" or (backend == "auto" and importlib.util.find_spec("faster_coco_eval")):
        try:
            from faster_coco_eval import COCO as FasterCOCO
            from faster_coco_eval import COCOeval_faster
        except ImportError:
            raise ConfigError(
                "eval.backend=faster_coco_eval needs the faster-coco-eval package, which is not "
                "installed; pip install 'frcnn_train[eval]' or set eval.backend=pycocotools"
            ) from None
        return FasterCOCO, COCOeval_faster
    return COCO, COCOeval


# A dataset's ground truth as the other backend's COCO object, made once per evaluation split.
_GROUND_TRUTHS: weakref.WeakKeyDictionary[Any, dict[type, Any]] = weakref.WeakKeyDictionary()


def ground_truth_for(coco_gt: Any, coco_class: type) -> Any:
    """`coco_gt` as a `coco_class` object, sharing its annotation dict (neither backend changes it)."""
    if isinstance(coco_gt, coco_class):
        return coco_gt
    made = _GROUND_TRUTHS.setdefault(coco_gt, {})
    if coco_class not in made:
        with contextlib.redirect_stdout(io.StringIO()):
            made[coco_class] = coco_class(coco_gt.dataset)
    return made[coco_class]


def detections_to_coco(
    outputs: list[dict[str, torch.Tensor]],
    image_ids: Iterable[int],
    label_to_cat_id: dict[int, int],
    *,
    with_masks: bool,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Turn torchvision detection outputs into COCO results (xywh boxes, RLE masks)."""
    results = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().cpu().float()
        scores = output["scores"].detach().cpu().tolist()
        labels = output["labels"].detach().cpu().tolist()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        rles = []
        if with_masks and "masks" in output:
            binary = (output["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
            rles = [mask_util.encode(np.asfortranarray(m)) for m in binary]
            for rle in rles:
                rle["counts"] = rle["counts"].decode("ascii")  # JSON-serialisable
        for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            result = {
                "image_id": int(image_id),
                "category_id": label_to_cat_id[int(label)],
                "bbox": [round(v, 3) for v in box],
                "score": round(float(score), 5),
            }
            if rles:
                result["segmentation"] = rles[i]
            results.append(result)
    return results


def run_cocoeval(coco_gt: COCO, results: list[dict[str, Any]], iou_type: str, backend: str = "auto") -> Any:
    """An evaluated, accumulated and summarised COCOeval of `results` (not empty) for one IoU type."""
    coco_class, eval_class = coco_api(backend)
    coco_gt = ground_truth_for(coco_gt, coco_class)
    # loadRes adds keys to the dicts it gets, so give it copies. For masks drop the
    # box, or pycocotools takes the size ranges (APs/APm/APl) from box areas (as detectron2 does).
    drop = {"bbox"} if iou_type == "segm" else {"segmentation"}
    results = [{k: v for k, v in r.items() if k not in drop} for r in results]
    # COCOeval prints its own table; we print a shorter one.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = eval_class(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def coco_metrics(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    iou_type: str,
    backend: str = "auto",
    keep: dict[str, Any] | None = None,
) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl and "AP-<class>" per category for one IoU type ("bbox" or "segm").

    `keep`: the accumulated COCOeval is stored there under `iou_type`, for the plots (eval_plots)."""
    if not results:  # loadRes cannot take an empty list; no detection scores zero
        return {**{name: 0.0 for name in METRIC_NAMES}, **_no_detections_per_class(coco_gt)}
    evaluator = run_cocoeval(coco_gt, results, iou_type, backend)
    if keep is not None:
        keep[iou_type] = evaluator
    # -1 (pycocotools' convention) means "no ground truth of that size", e.g. APl on small images.
    return {
        **{name: round(float(v), METRIC_DECIMALS) for name, v in zip(METRIC_NAMES, evaluator.stats[:6])},
        **per_class_ap(evaluator),
    }


# ---------------------------------------------------------------- per-class AP
PER_CLASS_PREFIX = "AP-"  # "bbox/AP-circle", as detectron2 names them


def per_class_ap(evaluator: COCOeval) -> dict[str, float]:
    """{"AP-<name>": AP} per category from an accumulated COCOeval (as detectron2 computes it).

    AP over IoU 0.50:0.95, all areas, 100 detections: the mean of the precision
    array's defined entries for that category; -1 for a category without ground truth.
    """
    precision = evaluator.eval["precision"]  # [IoU thresholds, recall points, categories, areas, max dets]
    names = [c["name"] for c in evaluator.cocoGt.loadCats(evaluator.params.catIds)]
    out = {}
    for k, name in enumerate(names):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        out[f"{PER_CLASS_PREFIX}{name}"] = round(float(np.mean(values)), METRIC_DECIMALS) if values.size else -1.0
    return out


def _no_detections_per_class(coco_gt: COCO) -> dict[str, float]:
    """Per-class AP when nothing was detected: 0 for a category with ground truth, -1 without."""
    return {
        f"{PER_CLASS_PREFIX}{c['name']}": 0.0 if coco_gt.getAnnIds(catIds=[c["id"]]) else -1.0
        for c in coco_gt.loadCats(sorted(coco_gt.getCatIds()))
    }


def metric_problem(name: str, *, with_masks: bool, ema: bool, classes: Sequence[str] | None = None) -> str | None:
    """Why `trainer.best_metric=name` is not a metric this run's evaluations produce (None: it is one).

    Without `classes` (before the data is read) any "AP-<class>" name passes; with them, only the dataset's.
    With `ema` (trainer.ema on) the EMA's metrics count too, as "ema/bbox/AP".
    """
    types = ("bbox", "segm") if with_masks else ("bbox",)
    iou_type, _, metric = str(name).removeprefix(EMA_PREFIX if ema else "").partition("/")
    if iou_type in types and (
        metric in METRIC_NAMES
        or metric.startswith(PER_CLASS_PREFIX)
        and (classes is None or metric[len(PER_CLASS_PREFIX) :] in classes)
    ):
        return None
    shown = "" if classes is None else f" ({', '.join(list(classes)[:8])}{', ...' if len(classes) > 8 else ''})"
    per_class = " or ".join(f"{t}/{PER_CLASS_PREFIX}<class>" for t in types) + f" for a class of the dataset{shown}"
    masks = "" if with_masks else " (segm/... only with model=mask_rcnn)"
    averaged = (
        f"; each also as {EMA_PREFIX}<name> for the EMA weights"
        if ema
        else f" ({EMA_PREFIX}<name> needs trainer.ema.decay)"
    )
    return (
        f"trainer.best_metric={name} is not a metric this run computes, so no best.pth would ever be written; "
        f"choose one of {', '.join(f'{t}/{m}' for t in types for m in METRIC_NAMES)}, or {per_class}{masks}"
        f"{averaged}"
    )


def require_metric(name: str, *, with_masks: bool, ema: bool, classes: Sequence[str]) -> None:
    """metric_problem as a ConfigError, once the dataset's classes are known."""
    if problem := metric_problem(name, with_masks=with_masks, ema=ema, classes=classes):
        raise ConfigError(problem)


def summary_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics without the per-class entries: what fits on one line."""
    return {k: v for k, v in metrics.items() if not k.split("/")[-1].startswith(PER_CLASS_PREFIX)}


def format_per_class(metrics: dict[str, float], columns: int = 3) -> str:
    """Per-class AP under the AP table: "name  AP" pairs, `columns` to a row, per IoU type."""
    lines = []
    for iou_type in sorted({k.split("/")[0] for k in metrics}, key=lambda t: t != "bbox"):
        pairs = [
            (k.split("/", 1)[1][len(PER_CLASS_PREFIX) :], v)
            for k, v in metrics.items()
            if k.startswith(f"{iou_type}/{PER_CLASS_PREFIX}")
        ]
        if not pairs:
            continue
        width = max(len(name) for name, _ in pairs)
        cells = [f"{name:<{width}} {100 * v:5.1f}" if v >= 0 else f"{name:<{width}} {'-':>5}" for name, v in pairs]
        lines.append(f"per-class {iou_type} AP:")
        lines += ["  " + "    ".join(cells[i : i + columns]) for i in range(0, len(cells), columns)]
    if any(v < 0 for k, v in metrics.items() if PER_CLASS_PREFIX in k):
        lines.append("(- : the split has no objects of that class)")
    return "\n".join(lines)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    coco_gt: COCO | None,
    label_to_cat_id: dict[int, int],
    device: torch.device,
    with_masks: bool,
    autocast_dtype: torch.dtype | None = None,
    evaluators: dict[str, Any] | None = None,
    backend: str = "auto",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run the model over `loader` and score it with eval.backend's COCOeval; returns ("bbox/AP"-style
    metrics, COCO results).

    Under torchrun each rank predicts its shard and turns it into COCO results (masks as RLE, a few
    hundred bytes each instead of a dense image); only rank 0 receives them, through the CPU
    (distributed.gather_lists), and runs COCOeval (the other ranks may pass coco_gt=None); every rank gets
    the metrics, and the results on rank 0 only (others get []). `evaluators` (rank 0): receives each IoU
    type's accumulated COCOeval (none where there was no detection), for the plots.
    """
    coco_api(backend)  # a backend that is not installed fails before the predictions, not after
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    for images, targets in loader:
        if not images:  # every image of the batch was skipped (data.bad_images=skip)
            continue
        images = [image.to(device) for image in images]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            outputs = model(images)
        image_ids = [int(t["image_id"]) for t in targets]
        results += detections_to_coco(outputs, image_ids, label_to_cat_id, with_masks=with_masks)
    model.train(was_training)
    # One order for any world size: by image, each image's detections as the model gave them.
    results = sorted(distributed.gather_lists(results), key=lambda r: r["image_id"])
    metrics = {}
    if distributed.is_main():
        for iou_type in ("bbox", "segm") if with_masks else ("bbox",):
            for name, value in coco_metrics(coco_gt, results, iou_type, backend, keep=evaluators).items():
                metrics[f"{iou_type}/{name}"] = value
    return distributed.broadcast_from_main(metrics), results


def format_table(metrics: dict[str, float]) -> str:
    """A short aligned AP table, one row per IoU type, and AP per class under it."""
    per_class = format_per_class(metrics)
    metrics = summary_metrics(metrics)
    types = sorted({key.split("/")[0] for key in metrics}, key=lambda t: t != "bbox")
    lines = ["       " + "".join(f"{name:>8}" for name in METRIC_NAMES)]
    for iou_type in types:
        values = [metrics.get(f"{iou_type}/{name}", -1.0) for name in METRIC_NAMES]
        row = "".join(f"{100 * v:8.1f}" if v >= 0 else f"{'-':>8}" for v in values)
        lines.append(f"{iou_type:<7}{row}")
    if any(v < 0 for v in metrics.values()):
        lines.append("(- : the split has no objects of that size)")
    if per_class:
        lines.append(per_class)
    return "\n".join(lines)
