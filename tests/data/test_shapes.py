"""The synthetic shapes generator: deterministic, atomic, and a valid COCO dataset."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from frcnn_train.data import shapes
from frcnn_train.data.shapes import SHAPE_CLASSES, ensure_shapes_dataset
from frcnn_train.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PARAMS = dict(num_train=12, num_val=4, image_size=64, max_objects=4, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_shapes_dataset(tmp_path_factory.mktemp("shapes"), **PARAMS)


def _quiet_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_layout(generated: Path) -> None:
    for split, count in (("train", PARAMS["num_train"]), ("val", PARAMS["num_val"])):
        assert len(list((generated / split).glob("*.png"))) == count
        data = json.loads((generated / f"instances_{split}.json").read_text())
        assert [c["name"] for c in data["categories"]] == SHAPE_CLASSES
        assert len(data["images"]) == count


def test_same_parameters_give_identical_bytes(generated: Path, tmp_path: Path) -> None:
    again = ensure_shapes_dataset(tmp_path / "other", **PARAMS)
    assert again.name == generated.name
    assert _files(again) == _files(generated)


def test_different_seed_differs(generated: Path, tmp_path: Path) -> None:
    other = ensure_shapes_dataset(tmp_path, **{**PARAMS, "seed": 4})
    assert other.name != generated.name
    assert (other / "instances_train.json").read_bytes() != (generated / "instances_train.json").read_bytes()


def test_cache_is_reused_and_keyed_by_every_parameter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_shapes_dataset(tmp_path, **PARAMS)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(shapes, "_write_dataset", fail)
    assert ensure_shapes_dataset(tmp_path, **PARAMS) == first
    for key, value in (("num_train", 13), ("num_val", 5), ("image_size", 65), ("max_objects", 3)):
        with pytest.raises(AssertionError, match="regenerated"):
            ensure_shapes_dataset(tmp_path, **{**PARAMS, key: value})


def test_interrupted_generation_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shapes._write_dataset

    def interrupted(out: Path, params: dict) -> None:
        (out / "train").mkdir()
        (out / "instances_train.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "_write_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes_dataset(tmp_path, **PARAMS)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shapes, "_write_dataset", real)
    assert (ensure_shapes_dataset(tmp_path, **PARAMS) / "instances_val.json").is_file()


@pytest.mark.parametrize("key", ["num_train", "num_val", "image_size", "max_objects"])
def test_bad_parameters_are_config_errors(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=f"data.shapes.{key}"):
        ensure_shapes_dataset(tmp_path, **{**PARAMS, key: 0})


def test_annotations_are_consistent(generated: Path) -> None:
    coco = _quiet_coco(generated / "instances_train.json")
    kinds = set()
    for image_id in coco.imgs:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert 1 <= len(anns) <= PARAMS["max_objects"]
        for ann in anns:
            kinds.add(type(ann["segmentation"]).__name__)
            mask = coco.annToMask(ann)
            # The segmentation decodes to the visible region the bbox and area describe.
            assert mask.sum() == ann["area"] > 0
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            assert ann["iscrowd"] == 0
    assert kinds == {"list", "dict"}, "both polygon and RLE segmentations must occur"


def _evaluate_gt_as_predictions(path: Path, iou_type: str) -> float:
    gt = _quiet_coco(path)
    dets = []
    for ann in gt.dataset["annotations"]:
        det = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0}
        if iou_type == "bbox":
            det["bbox"] = ann["bbox"]
        else:
            rle = gt.annToRLE(ann)
            det["segmentation"] = {"size": rle["size"], "counts": rle["counts"]}
        dets.append(det)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(dets), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ground_truth_scores_perfect_ap(generated: Path, iou_type: str) -> None:
    assert _evaluate_gt_as_predictions(generated / "instances_train.json", iou_type) == pytest.approx(1.0)


def test_rle_counts_are_valid(generated: Path) -> None:
    data = json.loads((generated / "instances_val.json").read_text())
    for ann in data["annotations"]:
        if isinstance(ann["segmentation"], dict):
            assert mask_utils.area(ann["segmentation"]) == ann["area"]
