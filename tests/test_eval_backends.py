"""eval.backend: faster-coco-eval gives every stat, per-class AP and precision entry of pycocotools; the evaluation
loader's workers persist across evaluations; only RLE masks and plain Python values reach the gather."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from frcnn_train.errors import ConfigError
from frcnn_train.evaluation import coco_api, coco_metrics, run_cocoeval

pytest.importorskip("faster_coco_eval")  # the `eval` extra, part of `.[test]`

# Inference-only knobs: many low-scoring detections, so the comparison has precision to compare.
MANY_BOXES = ("model.box_score_thresh=0.0", "model.rpn_post_nms_top_n_test=100", "model.box_detections_per_img=100")


def crowded_ground_truth(seed: int = 0) -> tuple[dict, list[dict]]:
    """A COCO dict with crowd regions (RLE), images without objects and a category without any, and detections:
    jittered copies of the objects (boxes and masks), false positives, and detections on the empty images."""
    rng = np.random.default_rng(seed)
    size = 64
    images = [{"id": i + 1, "file_name": f"{i}.png", "width": size, "height": size} for i in range(10)]
    categories = [{"id": c, "name": n} for c, n in ((1, "a"), (2, "b"), (5, "never"))]
    annotations, results = [], []

    def rle(mask: np.ndarray) -> dict:
        encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}

    for image in images[:7]:  # images 8-10 have no objects
        for k in range(int(rng.integers(1, 5))):
            x, y = rng.integers(0, 40, 2)
            w, h = rng.integers(4, 24, 2)
            mask = np.zeros((size, size), bool)
            mask[y : y + h, x : x + w] = True
            crowd = int(k == 0 and image["id"] % 3 == 0)
            cat = int(rng.choice([1, 2]))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": cat,
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": crowd,
                    "segmentation": rle(mask),
                }
            )
            dx, dy = rng.integers(-2, 3, 2)
            shifted = np.roll(mask, (dy, dx), axis=(0, 1))
            results.append(
                {
                    "image_id": image["id"],
                    "category_id": cat,
                    "score": float(rng.random()),
                    "bbox": [float(x + dx), float(y + dy), float(w), float(h)],
                    "segmentation": rle(shifted),
                }
            )
    for image in images:  # false positives everywhere, the empty images included
        for _ in range(3):
            x, y = rng.integers(0, 50, 2)
            mask = np.zeros((size, size), bool)
            mask[y : y + 10, x : x + 12] = True
            results.append(
                {
                    "image_id": image["id"],
                    "category_id": int(rng.choice([1, 2, 5])),
                    "score": float(rng.random()) / 2,
                    "bbox": [float(x), float(y), 12.0, 10.0],
                    "segmentation": rle(mask),
                }
            )
    return {"images": images, "annotations": annotations, "categories": categories}, results


def assert_same_evaluation(coco_gt, results: list[dict], iou_type: str) -> None:
    want, got = (run_cocoeval(coco_gt, results, iou_type, backend) for backend in ("pycocotools", "faster_coco_eval"))
    assert type(got).__module__.startswith("faster_coco_eval")
    assert want.stats.tolist() == got.stats[:12].tolist()  # all 12 stats, exactly
    # What per-class AP and PR curves read. Precision is tp / (tp + fp + eps) in pycocotools, tp / (tp + fp) in
    # faster-coco-eval: 1.0 is 1 - 2e-16 in pycocotools; the means (the stats) come out the same.
    for array in ("precision", "recall", "scores"):
        np.testing.assert_allclose(got.eval[array], want.eval[array], rtol=0, atol=1e-12, err_msg=array)
    assert coco_metrics(coco_gt, results, iou_type, "pycocotools") == coco_metrics(
        coco_gt, results, iou_type, "faster_coco_eval"
    )


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_crowd_and_empty_images_score_the_same(iou_type: str) -> None:
    from pycocotools.coco import COCO

    gt_dict, results = crowded_ground_truth()
    coco_gt = COCO()
    coco_gt.dataset = gt_dict
    coco_gt.createIndex()
    assert any(a["iscrowd"] for a in gt_dict["annotations"])
    assert_same_evaluation(coco_gt, results, iou_type)
    metrics = coco_metrics(coco_gt, results, iou_type, "faster_coco_eval")
    assert 0 < metrics["AP"] < 1 and metrics["AP-never"] == -1.0


def test_a_tiny_runs_detections_score_the_same(tiny_runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mask R-CNN's own boxes and RLE masks on the run's val split, through frcnn-evaluate with each backend."""
    from frcnn_train import checkpoint, evaluation
    from frcnn_train.data import build_datasets
    from frcnn_train.evaluate import run_evaluation

    run_dir = tiny_runs("mask_backends", "model=mask_rcnn", "trainer.max_steps=2", *MANY_BOXES)
    metrics, used = {}, []
    run = evaluation.run_cocoeval

    def watched(*args):
        evaluator = run(*args)
        used.append(type(evaluator).__name__)
        return evaluator

    monkeypatch.setattr(evaluation, "run_cocoeval", watched)
    for backend in ("pycocotools", "faster_coco_eval"):
        metrics[backend], out, _ = run_evaluation(
            run_dir / "last.pth", [f"eval.backend={backend}"], tmp_path / f"{backend}.json"
        )
    assert used == ["COCOeval", "COCOeval", "COCOeval_faster", "COCOeval_faster"]  # bbox, segm per backend
    assert metrics["pycocotools"] == metrics["faster_coco_eval"]
    results = json.loads(out.read_text())
    assert len(results) > 50 and all("segmentation" in r for r in results)
    cfg = checkpoint.load_checkpoint(run_dir / "last.pth")["config"]
    from omegaconf import OmegaConf

    val = build_datasets(OmegaConf.create(cfg).data, with_masks=True).val
    for iou_type in ("bbox", "segm"):
        assert_same_evaluation(val.coco, results, iou_type)


def test_auto_takes_faster_coco_eval_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from pycocotools.cocoeval import COCOeval

    assert coco_api("auto")[1].__name__ == "COCOeval_faster"
    assert coco_api("pycocotools")[1] is COCOeval
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # as if not installed
    assert coco_api("auto")[1] is COCOeval
    with pytest.raises(
        ConfigError,
        match=r"eval.backend=faster_coco_eval needs the faster-coco-eval package, "
        r"which is not installed; pip install 'frcnn_train\[eval\]' or set "
        r"eval.backend=pycocotools",
    ):
        coco_api("faster_coco_eval")
    with pytest.raises(ConfigError, match="eval.backend='cocoapi' is not a choice; use auto, pycocotools"):
        coco_api("cocoapi")


def test_the_gather_gets_rle_masks_and_plain_values(compose_tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank turns its masks into RLE before the gather, whose pickles then hold no tensor (gloo, host memory)."""
    import pickle

    from frcnn_train import distributed
    from frcnn_train.data import build_datasets, build_eval_loader
    from frcnn_train.evaluation import evaluate
    from frcnn_train.models import build_model

    cfg = compose_tiny("model=mask_rcnn", *MANY_BOXES)
    data = build_datasets(cfg.data, with_masks=True)
    cfg.model.num_classes = len(data.classes)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    gathered = []
    gather = distributed.gather_lists
    monkeypatch.setattr(distributed, "gather_lists", lambda items: gathered.append(items) or gather(items))
    evaluate(
        model,
        build_eval_loader(data.val, batch_size=2, num_workers=0),
        coco_gt=data.val.coco,
        label_to_cat_id=data.val.label_to_cat_id,
        device=torch.device("cpu"),
        with_masks=True,
    )
    (items,) = gathered
    assert items and all(
        set(r["segmentation"]) == {"size", "counts"} and isinstance(r["segmentation"]["counts"], str) for r in items
    )
    assert b"torch" not in pickle.dumps(items)  # plain Python values only
    dense = len(items) * 64 * 64  # a uint8 mask per detection
    assert len(pickle.dumps(items)) < dense / 4


def test_the_evaluation_loaders_workers_persist_across_evaluations(
    compose_tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    from frcnn_train import validation
    from frcnn_train.data import EvalLoader
    from frcnn_train.launch import run

    made, pids = [], []

    class Spy(EvalLoader):
        def __init__(self, *args, **kwargs) -> None:
            made.append(self)
            super().__init__(*args, **kwargs)

    evaluate = validation.evaluate

    def watched(model, loader, **kwargs):
        out = evaluate(model, loader, **kwargs)
        pids.append(sorted(w.pid for w in loader._iterator._workers))
        return out

    monkeypatch.setattr(validation, "EvalLoader", Spy)
    monkeypatch.setattr(validation, "evaluate", watched)
    run(compose_tiny("trainer.epochs=2", "data.num_workers=1", "data.shapes.num_train=4"))
    assert len(made) == 1 and len(pids) == 2 and pids[0] == pids[1] and os.getpid() not in pids[0]
    assert made[0].loader._iterator is None  # closed when fit ended
