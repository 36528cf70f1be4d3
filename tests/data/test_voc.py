"""Pascal VOC: XML to COCO conversion, difficult objects, bad trees."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig
from PIL import Image

from frcnn_train.data import build_datasets
from frcnn_train.data.coco import CocoDetection
from frcnn_train.data.voc import VOC_CLASSES, load_voc
from frcnn_train.errors import ConfigError, DataError


def voc_xml(objects: list[tuple[str, int, tuple[int, int, int, int]]], width: int = 48, height: int = 32) -> str:
    body = "".join(
        f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, difficult, b in objects
    )
    return (
        f"<annotation><folder>VOC2012</folder><filename>x.jpg</filename>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>{body}</annotation>"
    )


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2012"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    xml = {
        "2008_000001": voc_xml([("dog", 0, (10, 5, 30, 20)), ("person", 1, (1, 1, 48, 32))]),
        "2008_000002": voc_xml([("cat", 0, (1, 1, 16, 16))]),
        "2008_000003": voc_xml([("person", 1, (5, 5, 10, 10))]),  # only a difficult object
    }
    rng = np.random.default_rng(0)
    for voc_id, text in xml.items():
        (root / "Annotations" / f"{voc_id}.xml").write_text(text)
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{voc_id}.jpg")
    (root / "ImageSets/Main/train.txt").write_text("2008_000001\n2008_000002\n2008_000003\n")
    (root / "ImageSets/Main/val.txt").write_text("2008_000003\n2008_000001\n")
    return root


def test_conversion(voc_root: Path) -> None:
    data = load_voc(voc_root, "train", classes=None)
    assert [c["name"] for c in data["categories"]] == VOC_CLASSES
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in data["images"]] == [
        (1, "2008_000001.jpg", 48, 32),
        (2, "2008_000002.jpg", 48, 32),
        (3, "2008_000003.jpg", 48, 32),
    ]
    dog = data["annotations"][0]
    # 1-based inclusive pixels 10..30 cover [9, 30) in 0-based edge coordinates.
    assert dog["bbox"] == [9.0, 4.0, 21.0, 16.0]
    assert dog["category_id"] == VOC_CLASSES.index("dog") + 1 and dog["iscrowd"] == 0
    assert [a["iscrowd"] for a in data["annotations"]] == [0, 1, 0, 1]
    # Ids enumerate the split file, so they are stable.
    assert load_voc(voc_root, "train", classes=None) == data


def test_dataset_boxes_and_difficult(voc_root: Path) -> None:
    images_dir = voc_root / "JPEGImages"
    train = CocoDetection(images_dir, load_voc(voc_root, "train", classes=None), with_masks=False, train=True)
    # Image 3 has only a difficult object, which is not trained on.
    assert train.image_ids == [1, 2]
    image, target = train[0]
    assert image.shape == (3, 32, 48)
    assert target["boxes"].tolist() == [[9.0, 4.0, 30.0, 20.0]]
    assert [train.classes[i - 1] for i in target["labels"].tolist()] == ["dog"]
    val = CocoDetection(
        images_dir, load_voc(voc_root, "val", classes=None), with_masks=False, train=False, classes=train.classes
    )
    assert val.image_ids == [1, 2]
    _, target = val[1]  # 2008_000001 is the val file's second line
    assert target["iscrowd"].tolist() == [0, 1]
    assert val.coco.loadAnns(val.coco.getAnnIds(imgIds=[1]))[0]["iscrowd"] == 1


def test_custom_classes(voc_root: Path) -> None:
    data = load_voc(voc_root, "train", classes=["cat", "dog", "person"])
    assert [a["category_id"] for a in data["annotations"]] == [2, 3, 1, 3]
    with pytest.raises(DataError, match=r"2008_000001\.xml has an object of class 'dog'"):
        load_voc(voc_root, "train", classes=["cat", "person"])


def test_build_datasets_voc(voc_root: Path, compose_tiny: Callable[..., DictConfig]) -> None:
    cfg = compose_tiny("data=voc", f"data.root={voc_root}", "data.classes=[cat,dog,person]")
    bundle = build_datasets(cfg.data, with_masks=False)
    assert bundle.classes == ["cat", "dog", "person"]
    assert len(bundle.train) == 2 and len(bundle.val) == 2
    with pytest.raises(ConfigError, match="Mask R-CNN needs a dataset with masks"):
        build_datasets(cfg.data, with_masks=True)
    with pytest.raises(ConfigError, match="data.root is not set"):
        build_datasets(compose_tiny("data=voc").data, with_masks=False)


def test_bad_trees(voc_root: Path) -> None:
    bad = voc_root / "Annotations" / "2008_000002.xml"
    bad.write_text("<annotation><size>")
    with pytest.raises(DataError, match=r"2008_000002\.xml is not valid XML"):
        load_voc(voc_root, "train", classes=None)
    bad.unlink()
    with pytest.raises(DataError, match=r"train\.txt lists '2008_000002' but .*2008_000002\.xml does not exist"):
        load_voc(voc_root, "train", classes=None)
    with pytest.raises(DataError, match=r"ImageSets/Main/test\.txt does not exist"):
        load_voc(voc_root, "test", classes=None)
    with pytest.raises(DataError, match="nowhere does not exist"):
        load_voc(voc_root.parent / "nowhere", "train", classes=None)


def test_missing_coordinate_and_missing_image(voc_root: Path) -> None:
    (voc_root / "Annotations" / "2008_000002.xml").write_text(
        "<annotation><size><width>48</width><height>32</height></size>"
        "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox></object></annotation>"
    )
    with pytest.raises(DataError, match=r"2008_000002\.xml has no numeric <ymax>"):
        load_voc(voc_root, "train", classes=None)
    (voc_root / "JPEGImages" / "2008_000003.jpg").unlink()
    with pytest.raises(DataError, match=r"missing.*2008_000003\.jpg"):
        CocoDetection(voc_root / "JPEGImages", load_voc(voc_root, "val", classes=None), with_masks=False, train=False)
