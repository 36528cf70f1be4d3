"""Per-class AP: computed from pycocotools' precision array, printed under the AP table, logged per evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from frcnn_train.evaluation import coco_metrics, format_table, summary_metrics


@pytest.fixture(scope="module")
def val(shapes_cache: Path):
    from conftest import tiny_overrides
    from frcnn_train.config import compose_config
    from frcnn_train.data import build_datasets

    cfg = compose_config(tiny_overrides(shapes_cache, Path("unused")))
    return build_datasets(cfg.data, with_masks=False).val


def _ground_truth(val, drop_category: int | None = None) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in val.coco.dataset["annotations"]
        if a["category_id"] != drop_category
    ]


def test_per_class_ap_per_category_and_its_mean_is_the_ap(val) -> None:
    names = {c["id"]: c["name"] for c in val.coco.dataset["categories"]}
    present = {a["category_id"] for a in val.coco.dataset["annotations"]}
    dropped = sorted(present)[0]
    metrics = coco_metrics(val.coco, _ground_truth(val, drop_category=dropped), "bbox")
    for cat_id, name in names.items():
        expected = -1.0 if cat_id not in present else 0.0 if cat_id == dropped else 1.0
        assert metrics[f"AP-{name}"] == pytest.approx(expected), name
    per_class = [v for k, v in metrics.items() if k.startswith("AP-") and v >= 0]
    assert metrics["AP"] == pytest.approx(sum(per_class) / len(per_class))
    empty = coco_metrics(val.coco, [], "bbox")
    assert {k: v for k, v in empty.items() if k.startswith("AP-")} == {
        f"AP-{n}": (0.0 if i in present else -1.0) for i, n in names.items()
    }


def test_the_table_lists_every_class_under_the_summary() -> None:
    metrics = {
        "bbox/AP": 0.5,
        "bbox/AP50": 0.7,
        "bbox/AP-circle": 0.25,
        "bbox/AP-square": 0.75,
        "bbox/AP-star": -1.0,
        "segm/AP": 0.4,
        "segm/AP-circle": 0.125,
    }
    lines = format_table(metrics).splitlines()
    start = lines.index("per-class bbox AP:")
    assert lines[start + 1].split() == ["circle", "25.0", "square", "75.0", "star", "-"]
    assert lines[lines.index("per-class segm AP:") + 1].split() == ["circle", "12.5"]
    assert "(- : the split has no objects of that class)" in lines
    assert summary_metrics(metrics) == {"bbox/AP": 0.5, "bbox/AP50": 0.7, "segm/AP": 0.4}


def test_a_run_logs_per_class_ap_to_metrics_jsonl_and_tensorboard(tiny_runs) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tiny_runs("per_class", "data.shapes.num_train=4", "data.shapes.num_val=2")
    (line,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    classes = ["circle", "square", "triangle", "star", "ellipse"]
    assert all(f"bbox/AP-{name}" in line for name in classes)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {f"val/bbox/AP-{name}" for name in classes} <= set(events.Tags()["scalars"])
    assert "per-class bbox AP:" in (run_dir / "train.log").read_text()
