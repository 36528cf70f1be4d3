"""Evaluation plots: the confusion matrix's entries, PR curves from COCOeval, and a run that writes both."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from frcnn_train import eval_plots
from frcnn_train.evaluation import coco_metrics

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

A, B, C = 1, 2, 3  # category ids


def ground_truth() -> COCO:
    """Image 1: an `a` and a `b`; image 2: a `c` and a crowd region; image 3: nothing."""
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2, 3)],
        "categories": [{"id": A, "name": "a"}, {"id": B, "name": "b"}, {"id": C, "name": "c"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": A, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": B, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": C, "bbox": [5, 5, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": B, "bbox": [50, 50, 50, 50], "area": 2500, "iscrowd": 1},
        ],
    }
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# `c` is never predicted; `b` is detected as `a`; one `a` on nothing; a `b` below the score threshold;
# an `a` on the crowd region (neither right nor wrong).
DETECTIONS = [
    {"image_id": 1, "category_id": A, "bbox": [11, 10, 20, 20], "score": 0.9},  # a as a
    {"image_id": 1, "category_id": A, "bbox": [60, 61, 30, 30], "score": 0.8},  # b as a
    {"image_id": 3, "category_id": A, "bbox": [40, 40, 20, 20], "score": 0.7},  # background as a
    {"image_id": 3, "category_id": B, "bbox": [0, 0, 20, 20], "score": 0.3},  # under the score threshold
    {"image_id": 2, "category_id": A, "bbox": [55, 55, 40, 40], "score": 0.95},  # on the crowd region
]


def test_confusion_matrix_counts_confusions_misses_and_false_detections() -> None:
    matrix, names = eval_plots.confusion_matrix(ground_truth(), DETECTIONS, score_threshold=0.5)
    assert names == ["a", "b", "c"]
    #                      a  b  c  background (predicted)
    assert matrix.tolist() == [
        [1, 0, 0, 0],  # true a: found as a
        [1, 0, 0, 0],  # true b: confused with a
        [0, 0, 0, 1],  # true c: never predicted, missed
        [1, 0, 0, 0],
    ]  # background: one a on nothing
    normalised = eval_plots.normalise_rows(matrix)
    assert normalised[1].tolist() == [1.0, 0.0, 0.0, 0.0] and normalised[2, 3] == 1.0
    # With a lower threshold the b on image 3 counts too: another false detection.
    low, _ = eval_plots.confusion_matrix(ground_truth(), DETECTIONS, score_threshold=0.2)
    assert low[3].tolist() == [1, 1, 0, 0]


def test_pr_curves_from_cocoeval() -> None:
    gt, kept = ground_truth(), {}
    coco_metrics(gt, [dict(d) for d in DETECTIONS], "bbox", keep=kept)
    curves = eval_plots.pr_curves(kept["bbox"])
    assert set(curves) == {"a", "b", "c"}
    # a's one object is found by the second-best `a`; the best lies on a crowd region of class b, which
    # COCOeval ignores only for b: precision 1/2 up to recall 1.
    assert np.allclose(curves["a"]["iou50"], 0.5)
    # c is never predicted, b never correctly: zero precision at every recall, not "undefined".
    assert np.allclose(curves["c"]["iou50"], 0.0) and np.allclose(curves["b"]["iou50"], 0.0)
    assert curves["a"]["iou50_95"].shape == curves["a"]["recall"].shape == (101,)


def test_figures_are_written(tmp_path: Path) -> None:
    gt, kept = ground_truth(), {}
    coco_metrics(gt, [dict(d) for d in DETECTIONS], "bbox", keep=kept)
    figures = eval_plots.evaluation_figures(gt, kept, DETECTIONS)
    written = eval_plots.save_figures(figures, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["confusion.png", "confusion_normalised.png", "pr_bbox.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_without_matplotlib_evaluation_says_once_how_to_get_plots(monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(eval_plots, "_said_missing", False)
    with caplog.at_level(logging.WARNING, logger="frcnn_train"):
        assert eval_plots.evaluation_figures(ground_truth(), {}, DETECTIONS) == {}
        assert eval_plots.evaluation_figures(ground_truth(), {}, DETECTIONS) == {}
    hints = [r.getMessage() for r in caplog.records if "frcnn_train[plots]" in r.getMessage()]
    assert len(hints) == 1


def test_a_run_writes_plots_at_each_evaluation(tiny_runs: Callable[..., Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tiny_runs("plots")
    steps = sorted((run_dir / "plots").iterdir())
    assert [p.name for p in steps] == ["step_0000004"]  # 8 images, batch 2, 1 epoch, evaluated once
    assert sorted(p.name for p in steps[0].iterdir()) == ["confusion.png", "confusion_normalised.png", "pr_bbox.png"]
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload()
    assert {"val/plots/confusion", "val/plots/pr_bbox"} <= set(events.Tags()["images"])


def test_evaluate_plots_flag(tiny_runs: Callable[..., Path], tmp_path: Path, capsys) -> None:
    from frcnn_train import evaluate

    run_dir = tiny_runs("plots")
    code = evaluate.main(
        [str(run_dir / "last.pth"), "--out", str(tmp_path / "det.json"), "--plots", str(tmp_path / "plots")]
    )
    assert code == 0 and f"plots: {tmp_path / 'plots'}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "confusion.png",
        "confusion_normalised.png",
        "pr_bbox.png",
    ]
