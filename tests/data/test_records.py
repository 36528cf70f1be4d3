"""Compact records: the samples pycocotools' own reading gives, no JSON kept, picklable to workers; the
streaming reader gives json's dict and json's errors; scripts/scale_check.py runs end to end."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image
from pycocotools.coco import COCO
from test_coco import coco_dict, write_images

from conftest import python_path
from frcnn_train.data import CocoDetection, build_datasets, coco_json, collate
from frcnn_train.data.coco_json import load_annotation_file, read_annotation_file
from frcnn_train.data.records import Polygons
from frcnn_train.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def reference_samples(images_dir: Path, ann_file: Path, *, train: bool) -> list[tuple]:
    """(image_id, image, boxes, labels, area, iscrowd, masks) per sample, read by pycocotools' COCO and
    annToMask: boxes clipped to the image, crowd regions and emptied images left out of a training split."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
    labels = {cat: i + 1 for i, cat in enumerate(sorted(coco.getCatIds()))}
    samples = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        height, width = info["height"], info["width"]
        rows = []
        for ann in coco.imgToAnns[image_id]:
            if train and ann["iscrowd"]:
                continue
            x, y, w, h = ann["bbox"]
            box = [max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)]
            if box[2] > box[0] and box[3] > box[1]:
                rows.append((box, labels[ann["category_id"]], ann["area"], ann["iscrowd"], coco.annToMask(ann)))
        if train and not rows:
            continue
        with Image.open(images_dir / info["file_name"]) as im:
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        samples.append(
            (
                image_id,
                image,
                torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(-1, 4),
                torch.tensor([r[1] for r in rows], dtype=torch.int64),
                torch.tensor([r[2] for r in rows], dtype=torch.float32),
                torch.tensor([r[3] for r in rows], dtype=torch.int64),
                torch.from_numpy(np.stack([r[4] for r in rows]) if rows else np.zeros((0, height, width), np.uint8)),
            )
        )
    return samples


def assert_samples(dataset: CocoDetection, expected: list[tuple]) -> None:
    assert len(dataset) == len(expected)
    for i, (image_id, image, boxes, labels, area, iscrowd, masks) in enumerate(expected):
        got_image, target = dataset[i]
        assert target["image_id"].item() == image_id and torch.equal(got_image, image)
        for key, want in (("boxes", boxes), ("labels", labels), ("area", area), ("iscrowd", iscrowd), ("masks", masks)):
            assert target[key].dtype == want.dtype and torch.equal(target[key], want), (image_id, key)


@pytest.fixture
def tiny_files(tmp_path: Path) -> tuple[Path, Path]:
    """The RLE (compressed and not), polygon, crowd and empty images of test_coco, as a file."""
    images_dir = tmp_path / "images"
    write_images(images_dir)
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(coco_dict()))
    return images_dir, ann


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_records_give_pycocotools_samples_for_rle_crowd_and_empty_images(
    tiny_files: tuple[Path, Path], train: bool
) -> None:
    dataset = CocoDetection(*tiny_files, with_masks=True, train=train)
    assert_samples(dataset, reference_samples(*tiny_files, train=train))


def test_records_give_pycocotools_samples_for_the_shapes_data(compose_tiny: Callable[..., DictConfig]) -> None:
    bundle = build_datasets(compose_tiny("data.hflip_prob=0").data, with_masks=True)
    for split, train in ((bundle.train, True), (bundle.val, False)):
        plain = CocoDetection(split.images_dir, split.source, with_masks=True, train=train)  # no augmentation
        assert_samples(plain, reference_samples(split.images_dir, Path(split.source), train=train))


def _reachable(root: object) -> list[object]:
    """Every object reachable from `root`, not through classes, modules or functions."""
    seen, todo, out = set(), [root], []
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(
            obj, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
        ):
            continue
        seen.add(id(obj))
        out.append(obj)
        todo += gc.get_referents(obj)
    return out


def _containers(root: object) -> list[object]:
    return [obj for obj in _reachable(root) if not isinstance(obj, (int, float))]


def _many_images(tmp_path: Path, count: int) -> tuple[Path, Path]:
    """`count` copies of test_coco's four images (hard links) and their annotations, file names marked."""
    base = coco_dict()
    write_images(tmp_path / "src")
    images_dir = tmp_path / f"images{count}"
    images_dir.mkdir()
    data: dict[str, Any] = {"categories": base["categories"], "images": [], "annotations": []}
    for copy in range(count // 4):
        for image in base["images"]:
            name = f"marked_{copy}_{image['file_name']}"
            os.link(tmp_path / "src" / image["file_name"], images_dir / name)
            data["images"].append({**image, "id": image["id"] + 10 * copy, "file_name": name})
        data["annotations"] += [
            {**a, "id": a["id"] + 10 * copy, "image_id": a["image_id"] + 10 * copy} for a in base["annotations"]
        ]
    ann = tmp_path / f"instances{count}.json"
    ann.write_text(json.dumps(data))
    return images_dir, ann


def _marked_dicts() -> int:
    """The image dicts of _many_images' files alive anywhere (found through their lists: a dict of numbers and
    strings is not tracked by the garbage collector)."""
    gc.collect()
    return sum(
        len(o)
        for o in gc.get_objects()
        if type(o) is list and o and type(o[0]) is dict and str(o[0].get("file_name")).startswith("marked_")
    )


def test_a_split_holds_arrays_not_the_json(tmp_path: Path) -> None:
    small = CocoDetection(*_many_images(tmp_path, 8), with_masks=True, train=True)
    large = CocoDetection(*_many_images(tmp_path, 80), with_masks=True, train=True)
    assert len(large) == 10 * len(small)
    # As many Python objects for 80 images as for 8: no dict, list or string per image or annotation. Numbers are
    # left out: a count (of unusable annotations, say) is one object, but a shared small int only below 257.
    assert len(_containers(large)) == len(_containers(small))
    assert not hasattr(large, "coco")  # a training split keeps no ground truth
    assert _marked_dicts() == 0  # nor does anything else keep the file's dicts
    val = CocoDetection(*_many_images(tmp_path, 40), with_masks=True, train=False)
    assert isinstance(val._ground_truth, bytes) and _marked_dicts() == 0
    assert len(val.coco.getImgIds()) == 40 and _marked_dicts() == 40  # made on first use
    assert pickle.loads(pickle.dumps(val))._coco is None  # workers get the records, not the index


def test_records_survive_pickling_to_spawned_workers(tiny_files: tuple[Path, Path]) -> None:
    dataset = CocoDetection(*tiny_files, with_masks=True, train=False)
    dataset.coco  # noqa: B018 - made before the workers start: they must not need it
    here = collate([dataset[i] for i in range(len(dataset))])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=len(dataset), num_workers=2, collate_fn=collate, multiprocessing_context="spawn"
    )  # spawn pickles the dataset
    ((images, targets),) = list(loader)
    assert all(torch.equal(a, b) for a, b in zip(images, here[0]))
    for got, want in zip(targets, here[1]):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def _read(path: Path) -> dict[str, Any]:
    """read_annotation_file's dict with its polygons as lists again: what json.load gives."""
    data, store = read_annotation_file(path)
    for ann in data["annotations"]:
        if isinstance(ann, dict) and isinstance(ann.get("segmentation"), Polygons):
            ann["segmentation"] = store.lists(ann["segmentation"])
    return data


@pytest.mark.parametrize("chunk", [coco_json._CHUNK, 1], ids=["chunks", "a cut at every annotation"])
def test_the_reader_gives_json_s_dict_for_any_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(coco_json, "_CHUNK", chunk)
    data = coco_dict()
    # Between annotations' look-alikes: "}, {" inside a string and inside a nested list of objects.
    data["annotations"][0]["note"] = 'a "}, {" inside a string'
    data["annotations"][1]["attributes"] = [{"a": 1}, {"b": [2, {"c": "}, {"}]}]
    data["annotations"][2]["segmentation"] = [[1, 2, 3, 4, 5, 6], "not a polygon"]  # left as it is
    data["annotations"].append({"id": 9, "segmentation": [[0.1, 1e-3, 2, 3.5, True, 7]]})
    layouts = {
        "COCO's order": json.dumps(
            {"info": {}, "images": data["images"], "annotations": data["annotations"], "categories": data["categories"]}
        ),
        "compact": json.dumps(data, separators=(",", ":")),
        "indented, categories first": json.dumps({"categories": data["categories"], **data}, indent=2),
        "spaces": json.dumps(data, indent="\t", separators=(" ,", " : ")),
        "annotations last": json.dumps({"images": [], "categories": [], "annotations": data["annotations"]}),
        "no annotations": json.dumps({**data, "annotations": []}),
        "duplicate key": '{"annotations": [{"id": 1}], "images": [], "categories": [], "annotations": []}',
    }
    for name, text in layouts.items():
        path = tmp_path / "a.json"
        path.write_text(text)
        assert _read(path) == json.loads(text), name


@pytest.mark.parametrize(
    "text",
    [
        '{"images": [',
        '{"images": [], "annotations": [{"id": 1}, {"id": 2]}',
        '{"images": [] "x": 1}',
        '{"images": [], "annotations": [], "categories": []} trailing',
        "[1, 2]",
        '"a string"',
        "",
        '\ufeff{"images": [], "annotations": [], "categories": []}',
        '{"images": [], "annotations": {}}',
        '{"images": [], "annotations": [{"id": 1},]}',
        '{"annotations": [1 2]}',
    ],
    ids=lambda t: t[:24],
)
def test_the_reader_reports_every_bad_file_as_load_annotation_file_does(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as expected:
        load_annotation_file(path, key="data.train_ann")
    with pytest.raises(DataError) as got:
        read_annotation_file(path, key="data.train_ann")
    assert str(got.value) == str(expected.value)


def test_the_reader_reports_a_missing_and_a_non_utf8_file(tmp_path: Path) -> None:
    (tmp_path / "latin1.json").write_bytes(b'{"images": [{"file_name": "caf\xe9.jpg"}]}')
    for path in (tmp_path / "missing.json", tmp_path / "latin1.json"):
        with pytest.raises(DataError) as expected:
            load_annotation_file(path)
        with pytest.raises(DataError) as got:
            read_annotation_file(path)
        assert str(got.value) == str(expected.value)


def test_scale_check_runs_end_to_end_on_a_small_set(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/scale_check.py",
            "--images",
            "50",
            "--val-images",
            "10",
            "--steps",
            "3",
            "--workers",
            "1",
            "--dir",
            str(tmp_path / "data"),
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": python_path()},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    read = {row["reader"]: row for row in figures["read"]["rows"]}
    ours, theirs = read["frcnn_train CocoDetection (masks)"], read["pycocotools COCO(file)"]
    assert theirs["images"] == 50 and 40 < ours["images"] <= 50  # a training split leaves out empty images
    assert ours["peak_rss_mib"] > 0 and theirs["seconds"] > 0
    memory = figures["memory"]["rows"]
    assert [row["process"] for row in memory] == ["main", "worker 0", "worker 0 (no gc.freeze)"]
    assert all(row["after_3"] > 0 for row in memory)
    assert figures["loader"]["rows"][0]["images_per_s"] > 0
    timed = [row for row in figures["eval"]["rows"] if "backend" in row]
    gathered = {row["form"].split()[0]: row["bytes_per_image"] for row in figures["eval"]["rows"] if "form" in row}
    assert timed[0]["backend"] == "pycocotools" and timed[0]["seconds"] > 0 and gathered["RLE"] < gathered["dense"]
    if importlib.util.find_spec("faster_coco_eval"):
        assert [row["every_stat_and_per_class_ap_equal"] for row in timed] == [True, True]
    off, two, eight = figures["padding"]["rows"]
    # The written set has two shapes (640x480 and 480x640): 2 and 8 groups split it alike, and pad less than none.
    assert off["micro_batches"] == eight["micro_batches"] == ours["images"] // 2 and two == {
        **eight,
        "grouping": two["grouping"],
    }
    assert eight["padded_pixels_per_batch"] < off["padded_pixels_per_batch"]
    for text in ("pycocotools COCO(file)", "loader alone", "COCOeval bbox: pycocotools", "2 groups (detectron2"):
        assert text in result.stdout


class _FreezeCount(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, dict[str, int]]:
        return torch.zeros(1), {"frozen": gc.get_freeze_count()}


def test_loader_workers_freeze_what_they_inherit() -> None:
    """A worker's collections must not walk (and so copy) the main process's objects: they are frozen."""
    from frcnn_train.data.loader import build_eval_loader

    assert gc.get_freeze_count() == 0
    frozen = [
        t["frozen"] for _, targets in build_eval_loader(_FreezeCount(), batch_size=1, num_workers=1) for t in targets
    ]
    assert min(frozen) > 10_000  # torch's and the test run's objects
