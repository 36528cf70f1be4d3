"""frcnn-data: check lists every problem at once (training stops at the first), stats, show, and the anchor fit."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_overrides
from frcnn_train import data_tool
from frcnn_train.anchors import TARGET, AnchorSetup, Boxes, fit_anchors, measure, start_warning
from frcnn_train.config import compose_config
from frcnn_train.data import build_datasets, load_voc
from frcnn_train.data.problems import Problems
from frcnn_train.errors import DataError, UserError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
DEFAULT_ANCHORS = (32, 64, 128, 256, 512)
RESNET_STRIDES = (4, 8, 16, 32, 64)


def _ann(i: int, image: int, cat: int, bbox: list, crowd: int = 0) -> dict:
    return {"id": i, "image_id": image, "category_id": cat, "bbox": bbox, "iscrowd": crowd}


@pytest.fixture
def broken_coco(tmp_path: Path) -> list[str]:
    """A COCO dataset with one of each problem; returns the overrides that point data=coco at it."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(images / name)
    (images / "d.png").write_bytes((images / "d.png").read_bytes()[:60])  # truncated
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "missing.png", "width": 40, "height": 30},
            {"id": 4, "file_name": "d.png", "width": 40, "height": 30},
            {"id": 5, "file_name": "c.png", "width": 41, "height": 30},  # the file is 40 wide
            {"id": 6, "file_name": "a.png", "width": 40, "height": 30},
        ],  # no annotation
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            _ann(1, 1, 1, [2, 2, 10, 10]),
            _ann(2, 1, 2, [30, 20, 20, 20]),  # partly outside: clipped
            _ann(3, 1, 1, [50, 0, 5, 5]),  # wholly outside: dropped
            _ann(4, 2, 1, [1, float("nan"), 4, 4]),
            _ann(5, 2, 9, [1, 1, 4, 4]),  # unknown category
            _ann(6, 2, 1, [1, 1, 8, 8]),
            _ann(7, 99, 1, [1, 1, 4, 4]),  # unknown image
            _ann(8, 3, 1, [1, 1, 4, 4]),  # of the missing file: left out with it
            _ann(9, 2, 2, [0, 0, 20, 20], crowd=1),
            _ann(6, 2, 1, [1, 1, 8, 8]),  # duplicate id
            _ann(11, 4, 1, [1, 1, 8, 8]),
            _ann(12, 5, 1, [1, 1, 8, 8]),
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return [
        "data=coco",
        f"data.root={tmp_path}",
        "data.train_images=images",
        "data.val_images=images",
        "data.train_ann=ann.json",
        "data.val_ann=ann.json",
    ]


EXPECTED_TRAIN = {  # kind: (count, first ids)
    "missing image file": (1, ["missing.png"]),
    "non-finite box": (1, [4]),
    "unknown category id": (1, [5]),
    "annotation of an unknown image": (1, [7]),
    "duplicate annotation id": (1, [6]),
    "undecodable image": (1, ["d.png"]),
    "image size differs from the annotations": (1, [5]),
    "box partly outside its image": (1, [2]),
    "box empty after clipping": (1, [3]),
    "crowd region": (1, [9]),
    "image without training targets": (1, [6]),
}


def test_check_finds_every_problem_where_training_stops_at_the_first(broken_coco: list[str]) -> None:
    cfg = compose_config(broken_coco)
    with pytest.raises(DataError, match="missing.png"):  # training: the first problem only
        build_datasets(cfg.data, with_masks=False)
    problems = {"train": Problems(), "val": Problems()}
    data = build_datasets(cfg.data, with_masks=False, problems=problems)
    for i in range(len(data.train)):
        data.train.check_image(i)
    found = {g.kind: (g.count, g.first) for g in problems["train"].groups.values()}
    assert found == EXPECTED_TRAIN
    assert problems["train"].exit_code() == 2
    assert data.train.image_ids == [1, 2, 4, 5]  # what was wrong is left out, the rest read on


def test_check_command_groups_by_kind_and_exits_by_severity(broken_coco: list[str], capsys) -> None:
    assert data_tool.main(["check", *broken_coco]) == 2
    out = capsys.readouterr().out
    assert "  ERROR        1 x non-finite box (first: 4)\n          training stops with this error" in out
    assert "  WARNING      1 x box empty after clipping (first: 3)\n          training drops the annotation" in out
    assert "NOTE         1 x crowd region (first: 9)" in out
    assert "result: 14 error(s): training stops at the first (exit 2)" in out  # 7 kinds, train and val


def test_check_with_warnings_only_exits_1(tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(images / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [_ann(1, 1, 1, [10, 10, 40, 40]), _ann(2, 1, 1, [50, 50, 30, 30])],
    }  # the 2nd clipped
    (tmp_path / "ann.json").write_text(json.dumps(data))
    overrides = [
        "data=coco",
        f"data.root={tmp_path}",
        "data.train_images=images",
        "data.val_images=images",
        "data.train_ann=ann.json",
        "data.val_ann=ann.json",
        "model.min_size=64",
        "model.max_size=64",
    ]
    assert data_tool.main(["check", *overrides]) == 1
    assert "WARNING      1 x box partly outside its image (first: 2)" in capsys.readouterr().out


def test_default_shapes_check_is_clean_and_its_anchors_need_no_suggestion(shapes_cache: Path, capsys) -> None:
    overrides = [f"data.cache_dir={shapes_cache}"]  # the default data and model
    assert data_tool.main(["check", *overrides]) == 0
    out = capsys.readouterr().out
    assert "anchor fit: best possible recall 1.000" in out and "suggested" not in out
    cfg, data = data_tool.load(overrides)
    assert start_warning(cfg.model, data.train) is None


def _small_boxes(n: int = 3000, image: int = 64) -> Boxes:
    """Objects of 6-16 px at random places in 64 px images, aspect 0.7-1.4."""
    rng = np.random.default_rng(0)
    w = rng.uniform(6, 16, n)
    h = np.clip(w * rng.uniform(0.7, 1.4, n), 6, 16)
    x, y = rng.uniform(0, image - w), rng.uniform(0, image - h)
    return Boxes(np.stack([x, y, x + w, y + h], axis=1), w * h, np.full((n, 2), float(image)))


def test_small_objects_get_anchor_sizes_that_reach_the_target() -> None:
    boxes = _small_boxes()
    setup = AnchorSetup(DEFAULT_ANCHORS, (0.5, 1.0, 2.0), RESNET_STRIDES, 64, 64)
    fit = fit_anchors(boxes, setup)
    assert fit.recall < 0.1 and fit.suggestion is not None
    suggested = fit.suggestion.setup
    assert fit.suggestion.recall >= TARGET
    assert measure(boxes, suggested).recall == fit.suggestion.recall  # the printed recall is the setting's own
    assert len(suggested.sizes) == len(RESNET_STRIDES) and max(suggested.sizes) < max(DEFAULT_ANCHORS)
    assert (suggested.min_size, suggested.max_size) == (64, 64)  # anchors alone do it: no larger images
    assert f"model.anchor_sizes=[{','.join(map(str, suggested.sizes))}]" in fit.format()


def test_the_grid_counts_not_only_the_shape() -> None:
    """A 6 px box centred between stride-4 anchor centres: no anchor reaches IoU 0.3 (a shape-only IoU says 1)."""
    box = Boxes(np.array([[3.0, 3.0, 9.0, 9.0]]), np.array([36.0]), np.array([[64.0, 64.0]]))
    assert measure(box, AnchorSetup((6, 12, 24, 48, 96), (1.0,), RESNET_STRIDES, 64, 64)).recall == 0.0
    on_grid = Boxes(np.array([[1.0, 1.0, 7.0, 7.0]]), np.array([36.0]), np.array([[64.0, 64.0]]))
    assert measure(on_grid, AnchorSetup((6, 12, 24, 48, 96), (1.0,), RESNET_STRIDES, 64, 64)).recall == 1.0


def test_training_warns_once_at_start_when_the_anchors_miss(shapes_cache: Path, tmp_path: Path, caplog) -> None:
    from frcnn_train.launch import run

    overrides = tiny_overrides(shapes_cache, tmp_path / "outputs") + [
        "trainer.max_steps=1",
        "trainer.eval_every=0",
        "model.anchor_sizes=[256,512,1024,2048,4096]",
    ]
    with caplog.at_level(logging.WARNING, logger="frcnn_train"):
        run(compose_config(overrides))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Anchor fit:")]
    assert len(lines) == 1 and "model.anchor_sizes=[256, 512, 1024, 2048, 4096]" in lines[0]


def test_stats_table_and_plots(broken_coco: list[str], tmp_path: Path) -> None:
    overrides = [o for o in broken_coco if not o.startswith("data.val_ann")] + ["data.val_ann=val.json"]
    (tmp_path / "val.json").write_text(
        json.dumps(
            {
                "images": [
                    {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                    {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
                ],
                "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
                "annotations": [
                    _ann(1, 1, 1, [2, 2, 10, 10]),
                    _ann(2, 1, 2, [20, 5, 10, 20]),
                    _ann(3, 1, 2, [0, 0, 40, 30], crowd=1),
                ],
            }
        )
    )
    table, written = data_tool.stats(overrides + ["model.min_size=60", "model.max_size=80"], tmp_path / "stats")
    # Resize 40x30 -> scale min(60/30, 80/40) = 2: the val cat box 10x10 becomes 20x20, the dog 10x20 20x40.
    assert "val:\n  images               2 read, 1 without objects, 1 crowd regions" in table
    assert "box sqrt(w*h)        20.0 / 20.8 / 24.1 / 27.5 / 28.3 px after resize" in table
    assert "box aspect w/h       0.50 / 0.55 / 0.75 / 0.95 / 1.00" in table
    assert "  class     train       val\n  cat         4         1\n  dog         1         1" in table
    assert sorted(p.name for p in written) == [
        "box_shapes.png",
        "images_and_sizes.png",
        "instances_per_class.png",
        "stats.txt",
    ]
    # Again into the same directory: its own earlier files are replaced; a file of the user's there is not.
    assert len(data_tool.stats(overrides, tmp_path / "stats")[1]) == 4
    (tmp_path / "stats" / "box_shapes.png").write_bytes(b"the user's own picture")
    with pytest.raises(UserError, match=r"already holds box_shapes.png, which is .*never writes over a file"):
        data_tool.stats(overrides, tmp_path / "stats")
    assert (tmp_path / "stats" / "box_shapes.png").read_bytes() == b"the user's own picture"


def test_show_draws_training_samples_at_the_model_input_size(shapes_cache: Path, tmp_path: Path, capsys) -> None:
    overrides = tiny_overrides(shapes_cache, tmp_path / "outputs") + ["model.min_size=128", "model.max_size=128"]
    assert data_tool.main(["show", "3", *overrides, "--out", str(tmp_path / "show")]) == 0
    files = sorted((tmp_path / "show").iterdir())
    assert len(files) == 3 and "3 samples drawn" in capsys.readouterr().out
    assert all(Image.open(f).size == (128, 128) for f in files)  # 64 px images at the model's 128
    assert data_tool.main(["show", "3", *overrides, "--out", str(tmp_path / "show")]) == 0  # its own: replaced
    files[0].write_bytes(b"not a picture of ours")
    assert data_tool.main(["show", "3", *overrides, "--out", str(tmp_path / "show")]) == 2
    assert files[0].read_bytes() == b"not a picture of ours"


def test_voc_problems_are_collected(tmp_path: Path) -> None:
    root = tmp_path / "VOC"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nc\n")
    xml = (
        "<annotation><size><width>10</width><height>10</height></size><object><name>{}</name>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>"
    )
    (root / "Annotations" / "a.xml").write_text(xml.format("cat"))
    (root / "Annotations" / "b.xml").write_text(xml.format("zebra"))
    problems = Problems()
    coco = load_voc(root, "train", classes=["cat"], problems=problems)
    assert {g.kind: g.first for g in problems.groups.values()} == {
        "unknown class name": ["b (zebra)"],
        "missing annotation file": ["c"],
    }
    assert len(coco["images"]) == 2 and len(coco["annotations"]) == 1
    with pytest.raises(DataError, match="zebra"):
        load_voc(root, "train", classes=["cat"])


def test_an_empty_training_split_is_reported_with_its_causes(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(images / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [_ann(1, 1, 1, [40, 40, 5, 5]), _ann(2, 1, 7, [1, 1, 5, 5])],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    cfg = compose_config(
        [
            "data=coco",
            f"data.root={tmp_path}",
            "data.train_images=images",
            "data.val_images=images",
            "data.train_ann=ann.json",
            "data.val_ann=ann.json",
        ]
    )
    problems = {"train": Problems(), "val": Problems()}
    build_datasets(cfg.data, with_masks=False, problems=problems)
    found = {g.kind: g.first for g in problems["train"].groups.values()}
    assert found == {
        "box empty after clipping": [1],
        "unknown category id": [2],
        "image without training targets": [1],
        "empty split": [str(tmp_path / "ann.json")],
    }
    assert "empty training split" in problems["train"].groups["empty split"].example
