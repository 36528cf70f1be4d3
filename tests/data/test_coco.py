"""CocoDetection: label remapping, crowd and empty handling, masks, and every bad input."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from frcnn_train.data.coco import CocoDetection, DataWarning
from frcnn_train.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RLE_MASK = np.zeros((30, 40), dtype=np.uint8)
RLE_MASK[15:25, 20:35] = 1
RLE_MASK[18:20, 25:27] = 0  # a hole, which polygons cannot express
UNCOMPRESSED_MASK = np.zeros((32, 32), dtype=np.uint8)
UNCOMPRESSED_MASK[4:12, 6:20] = 1
CROWD_MASK = np.zeros((32, 32), dtype=np.uint8)
CROWD_MASK[20:30, 2:30] = 1


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def coco_dict() -> dict[str, Any]:
    return {
        "images": [
            {"id": 1, "file_name": "rgb.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "gray.png", "width": 32, "height": 32},
            {"id": 3, "file_name": "empty.png", "width": 20, "height": 20},
            {"id": 4, "file_name": "crowd_only.png", "width": 32, "height": 32},
        ],
        # Unsorted, non-contiguous ids: labels must follow the sorted ids.
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 5, "name": "bird"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 7,
                "bbox": [2, 3, 10, 7],
                "area": 70.0,
                "iscrowd": 0,
                "segmentation": [[2, 3, 12, 3, 12, 10, 2, 10]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 3,
                "bbox": [20, 15, 15, 10],
                "area": float(RLE_MASK.sum()),
                "iscrowd": 0,
                "segmentation": compressed_rle(RLE_MASK),
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 5,
                "bbox": [6, 4, 14, 8],
                "area": 112.0,
                "iscrowd": 0,
                "segmentation": uncompressed_rle(UNCOMPRESSED_MASK),
            },
            {
                "id": 4,
                "image_id": 2,
                "category_id": 3,
                "bbox": [2, 20, 28, 10],
                "area": 280.0,
                "iscrowd": 1,
                "segmentation": uncompressed_rle(CROWD_MASK),
            },
            {
                "id": 5,
                "image_id": 4,
                "category_id": 7,
                "bbox": [0, 0, 10, 10],
                "area": 100.0,
                "iscrowd": 1,
                "segmentation": uncompressed_rle(np.ones((32, 32), dtype=np.uint8)),
            },
        ],
    }


def write_images(images_dir: Path) -> None:
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(images_dir / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), mode="L").save(images_dir / "gray.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), mode="RGBA").save(images_dir / "empty.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images_dir / "crowd_only.png")


@pytest.fixture
def tiny(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """tiny(edit) -> (images_dir, ann_file), after `edit(data)` changes the COCO dict."""
    images_dir = tmp_path / "images"
    write_images(images_dir)

    def make(edit: Callable[[dict], Any] | None = None) -> tuple[Path, Path]:
        data = coco_dict()
        if edit is not None:
            edit(data)
        ann = tmp_path / "instances.json"
        ann.write_text(json.dumps(data))
        return images_dir, ann

    return make


def by_id(dataset: CocoDetection, image_id: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return dataset[dataset.image_ids.index(image_id)]


def test_labels_are_contiguous_and_names_kept(tiny: Callable) -> None:
    ds = CocoDetection(*tiny(), with_masks=False, train=True)
    assert ds.classes == ["cat", "bird", "dog"]
    assert ds.label_to_cat_id == {1: 3, 2: 5, 3: 7}
    _, target = by_id(ds, 1)
    assert target["labels"].tolist() == [3, 1]
    assert target["labels"].dtype == torch.int64


def test_item_types_and_boxes(tiny: Callable) -> None:
    ds = CocoDetection(*tiny(), with_masks=False, train=True)
    for image_id in ds.image_ids:
        image, target = by_id(ds, image_id)
        # uint8 (made float on the device by the model), grayscale converted to RGB, the pixels PIL gives
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert image.permute(1, 2, 0).is_contiguous()  # pixel-interleaved, as the float images were
        with Image.open(ds.images_dir / ds._records[ds.image_ids.index(image_id)]["file_name"]) as im:
            assert torch.equal(image, torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
        assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0
        assert target["image_id"].item() == image_id
        assert target["boxes"].dtype == torch.float32 and target["area"].dtype == torch.float32
    _, target = by_id(ds, 1)
    assert target["boxes"].tolist() == [[2, 3, 12, 10], [20, 15, 35, 25]]
    assert "masks" not in target


def test_crowd_dropped_in_train_kept_in_val(tiny: Callable) -> None:
    train = CocoDetection(*tiny(), with_masks=False, train=True)
    _, target = by_id(train, 2)
    assert target["labels"].tolist() == [2] and target["iscrowd"].tolist() == [0]
    val = CocoDetection(*tiny(), with_masks=False, train=False)
    _, target = by_id(val, 2)
    assert target["iscrowd"].tolist() == [0, 1]
    # The ground truth for COCOeval keeps every annotation; a training split keeps none (nothing evaluates on it).
    assert len(val.coco.getAnnIds()) == 5 and not hasattr(train, "coco")


def test_skip_empty(tiny: Callable) -> None:
    # Image 3 has no annotation and image 4 only a crowd one: neither trains anything.
    assert CocoDetection(*tiny(), with_masks=False, train=True).image_ids == [1, 2]
    kept = CocoDetection(*tiny(), with_masks=True, train=True, skip_empty=False)
    assert kept.image_ids == [1, 2, 3, 4]
    image, target = by_id(kept, 3)
    assert image.shape == (3, 20, 20)  # RGBA converted
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 20, 20)
    assert CocoDetection(*tiny(), with_masks=False, train=False).image_ids == [1, 2, 3, 4]


def test_polygon_and_rle_masks(tiny: Callable) -> None:
    ds = CocoDetection(*tiny(), with_masks=True, train=False)
    _, target = by_id(ds, 1)
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (2, 30, 40)
    ys, xs = torch.nonzero(masks[0], as_tuple=True)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (2, 3, 12, 10)  # polygon
    assert np.array_equal(masks[1].numpy(), RLE_MASK)  # compressed RLE
    _, target = by_id(ds, 2)
    assert np.array_equal(target["masks"][0].numpy(), UNCOMPRESSED_MASK)  # uncompressed RLE
    assert np.array_equal(target["masks"][1].numpy(), CROWD_MASK)


def test_dict_annotations(tiny: Callable) -> None:
    images_dir, _ = tiny()
    ds = CocoDetection(images_dir, coco_dict(), with_masks=True, train=True)
    assert len(ds) == 2


def test_transforms_get_a_seeded_generator(tiny: Callable) -> None:
    draws: list[float] = []

    def record(image: torch.Tensor, target: dict, generator: torch.Generator) -> tuple:
        draws.append(torch.rand((), generator=generator).item())
        return image, target

    ds = CocoDetection(*tiny(), with_masks=False, train=True, transforms=record)
    ds[(0, 11)], ds[(0, 11)], ds[(0, 12)]
    assert draws[0] == draws[1] != draws[2]


def test_classes_override_maps_by_name(tiny: Callable) -> None:
    ds = CocoDetection(*tiny(), with_masks=False, train=True, classes=["dog", "cat", "bird"])
    assert ds.classes == ["dog", "cat", "bird"]
    assert ds.label_to_cat_id == {1: 7, 2: 3, 3: 5}
    # A val split may lack a training class; its label gets an id absent from the ground truth.
    val = CocoDetection(*tiny(), with_masks=False, train=False, classes=["cat", "bird", "dog", "fish"])
    assert val.label_to_cat_id[4] not in val.coco.getCatIds()
    with pytest.raises(DataError, match="instances.json.*'dog'"):
        CocoDetection(*tiny(), with_masks=False, train=False, classes=["cat", "bird"])
    with pytest.raises(DataError, match="instances.json.*4 class names"):
        CocoDetection(*tiny(), with_masks=False, train=True, classes=["cat", "bird", "dog", "fish"])


def test_boxes_outside_are_clipped_or_dropped_with_one_warning(tiny: Callable) -> None:
    def edit(data: dict) -> None:
        data["annotations"][0]["bbox"] = [-3, 3, 10, 40]  # partly outside: clipped
        data["annotations"][1]["bbox"] = [50, 0, 5, 5]  # wholly outside: dropped
        data["annotations"][2]["bbox"] = [6, 4, 0, 8]  # zero width: dropped

    images_dir, ann = tiny(edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(images_dir, ann, with_masks=False, train=True)
    data_warnings = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(data_warnings) == 1
    message = str(data_warnings[0].message)
    assert str(ann) in message and "clipped 1" in message and "dropped 2" in message
    assert ds.image_ids == [1]
    _, target = ds[0]
    assert target["boxes"].tolist() == [[0, 3, 7, 30]]


def _break(path: str, value: Any) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is KeyError:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value

    return edit


@pytest.mark.parametrize(
    "edit, words",
    [
        (_break("annotations.0.image_id", 99), "image_id 99"),
        (_break("annotations.0.category_id", 42), "category_id 42"),
        (_break("images", KeyError), "'images'"),
        (_break("categories", KeyError), "'categories'"),
        (_break("annotations.0.bbox", [1, 2]), "bbox"),
        (_break("images.0.file_name", "nowhere.png"), "nowhere.png"),
        (_break("annotations.1.id", 1), "annotation id 1 twice"),
        (_break("categories.1.name", "dog"), "duplicate category names"),
        (_break("annotations.0.bbox", [2, float("nan"), 10, 7]), "annotation id 1 whose 'bbox' [2, nan, 10, 7]"),
        (_break("annotations.1.bbox", [20, 15, float("inf"), 10]), "annotation id 2 whose 'bbox'"),
        (_break("annotations.3.bbox", [2, 20, "NaN", 10]), "annotation id 4 whose 'bbox'"),  # a crowd region
    ],
)
def test_malformed_annotations_raise_data_error_naming_the_file(tiny: Callable, edit: Callable, words: str) -> None:
    images_dir, ann = tiny(edit)
    with pytest.raises(DataError) as info:
        CocoDetection(images_dir, ann, with_masks=False, train=True)
    message = str(info.value)
    assert str(ann) in message and words in message
    assert message.count(";") == 1 and "\n" not in message  # one sentence: problem; fix


def test_not_json(tiny: Callable) -> None:
    images_dir, ann = tiny()
    ann.write_text('{"images": [1, 2\n  "x"]}')
    expected = r"data\.val_ann: .*instances\.json is not valid JSON \(Expecting ',' delimiter"
    with pytest.raises(DataError, match=expected):
        CocoDetection(images_dir, ann, with_masks=False, train=False, ann_key="data.val_ann")
    ann.write_text("[1, 2]")
    with pytest.raises(DataError, match="instances.json holds a JSON list"):
        CocoDetection(images_dir, ann, with_masks=False, train=False)


def test_missing_paths(tiny: Callable, tmp_path: Path) -> None:
    images_dir, ann = tiny()
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.json'} does not exist"):
        CocoDetection(images_dir, tmp_path / "nope.json", with_masks=False, train=True)
    with pytest.raises(DataError, match=f"data.train_images: image directory {tmp_path / 'nodir'} does not exist"):
        CocoDetection(tmp_path / "nodir", ann, with_masks=False, train=True, images_key="data.train_images")
    (images_dir / "gray.png").unlink()
    with pytest.raises(DataError, match="1 image file.*instances.json.*missing.*gray.png"):
        CocoDetection(images_dir, ann, with_masks=False, train=True)


def test_empty_splits(tiny: Callable) -> None:
    def only_crowds(data: dict) -> None:
        data["annotations"] = [a for a in data["annotations"] if a["iscrowd"]]

    images_dir, ann = tiny(only_crowds)
    # Named by cause, with a fix that gives the model objects (skip_empty=false would train on none: issue 22).
    with pytest.raises(
        DataError,
        match=r"instances.json gives an empty training split: all (\d+) annotations are "
        r"unusable \(\1 crowd regions\); a crowd region .* iscrowd=0, or use another "
        r"file$",
    ):
        CocoDetection(images_dir, ann, with_masks=False, train=True)
    assert len(CocoDetection(images_dir, ann, with_masks=False, train=True, skip_empty=False)) == 4

    def no_images(data: dict) -> None:
        data["images"], data["annotations"] = [], []

    images_dir, ann = tiny(no_images)
    with pytest.raises(DataError, match="instances.json gives an empty split"):
        CocoDetection(images_dir, ann, with_masks=False, train=False)


def test_masks_required_for_mask_rcnn(tiny: Callable) -> None:
    images_dir, ann = tiny(_break("annotations.0.segmentation", KeyError))
    CocoDetection(images_dir, ann, with_masks=False, train=True)
    with pytest.raises(DataError, match="instances.json has annotation id 1 without a 'segmentation'"):
        CocoDetection(images_dir, ann, with_masks=True, train=True)
    images_dir, ann = tiny(_break("annotations.1.segmentation", {"size": [3, 3], "counts": "abc"}))
    with pytest.raises(DataError, match="RLE size"):
        CocoDetection(images_dir, ann, with_masks=True, train=True)


def test_image_size_mismatch_is_named(tiny: Callable) -> None:
    images_dir, ann = tiny(_break("images.0.width", 41))
    ds = CocoDetection(images_dir, ann, with_masks=False, train=True)
    with pytest.raises(DataError, match="rgb.png is 40x30 pixels but .*instances.json says 41x30"):
        ds[0]


def test_dict_input_is_not_mutated_beyond_defaults(tiny: Callable) -> None:
    images_dir, _ = tiny()
    data = coco_dict()
    before = copy.deepcopy(data)
    CocoDetection(images_dir, data, with_masks=True, train=True)
    assert data == before


def test_build_datasets_coco_paths_under_root(tiny: Callable, compose_tiny: Callable) -> None:
    from frcnn_train.data import build_datasets

    images_dir, ann = tiny()
    root = images_dir.parent
    paths = [f"data.root={root}", "data.train_images=images", "data.train_ann=instances.json", "data.val_images=images"]
    bundle = build_datasets(compose_tiny("data=coco", *paths, "data.val_ann=instances.json").data, with_masks=True)
    assert bundle.classes == ["cat", "bird", "dog"]
    assert len(bundle.train) == 2 and len(bundle.val) == 4
    with pytest.raises(DataError, match=f"data.val_ann: annotation file {root / 'missing.json'} does not exist"):
        build_datasets(compose_tiny("data=coco", *paths, "data.val_ann=missing.json").data, with_masks=True)


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_a_bad_image_is_named_or_skipped(tiny: Callable, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    images_dir, ann = tiny()
    rgb = images_dir / "rgb.png"
    data = rgb.read_bytes()
    rgb.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x89PNG garbage")
    strict = CocoDetection(images_dir, ann, with_masks=False, train=True, images_key="data.train_images")
    with pytest.raises(DataError) as info:
        by_id(strict, 1)
    message = str(info.value)
    assert message.startswith(f"image {rgb} (data.train_images={images_dir}, listed in {ann}) is truncated or corrupt")
    assert message.endswith("or set data.bad_images=skip to train without it") and "\n" not in message
    lenient = CocoDetection(images_dir, ann, with_masks=False, train=True, bad_images="skip")
    caplog.set_level("WARNING", logger="frcnn_train")
    assert by_id(lenient, 1) is None and by_id(lenient, 2)[0].shape == (3, 32, 32)  # only the bad one is left out
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"data.bad_images=skip: skipped {rgb}, which does not decode")


def test_a_bad_image_without_a_size_is_named_at_construction(tiny: Callable) -> None:
    def no_size(data: dict) -> None:
        del data["images"][0]["width"], data["images"][0]["height"]

    images_dir, ann = tiny(no_size)
    (images_dir / "rgb.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"image {images_dir / 'rgb.png'} .*truncated or corrupt"):
        CocoDetection(images_dir, ann, with_masks=False, train=True)
    skipped = CocoDetection(images_dir, ann, with_masks=False, train=False, bad_images="skip")
    assert 1 not in skipped.image_ids and 2 in skipped.image_ids


def test_polygons_of_fewer_than_3_points_are_left_out_with_one_warning(tiny: Callable) -> None:
    """pycocotools reads a 4-number polygon as a box: it must not become a rectangle mask, nor pass unsaid."""

    def edit(data: dict) -> None:
        data["annotations"][0]["segmentation"] = [[1, 1, 10, 10]]  # 2 points: the object has no polygon left
        data["annotations"].append(
            {
                "id": 6,
                "image_id": 3,
                "category_id": 5,
                "bbox": [2, 2, 8, 8],
                "iscrowd": 0,
                "segmentation": [[2, 2, 10, 2, 10, 10], [4, 4, 5, 5]],
            }
        )  # one of two left out

    images_dir, ann = tiny(edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(images_dir, ann, with_masks=True, train=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert messages == [
        f"{ann}: left out 2 annotation(s)' polygons of fewer than 3 points (first: annotation id 1), "
        "and dropped 1 object(s) left without a polygon of 3 or more points"
    ]
    _, target = by_id(ds, 1)
    assert target["labels"].tolist() == [1] and target["masks"].shape == (1, 30, 40)  # the polygon object dropped
    _, target = by_id(ds, 3)
    assert target["masks"].shape == (1, 20, 20) and target["masks"].sum() > 0  # the triangle alone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CocoDetection(images_dir, ann, with_masks=False, train=True)  # boxes only: polygons play no part
    assert not [w for w in caught if issubclass(w.category, DataWarning)]


def test_16_bit_images_are_scaled_and_said_once(tiny: Callable, caplog: pytest.LogCaptureFixture) -> None:
    images_dir, ann = tiny()
    deep = np.linspace(9252, 37265, 30 * 40).reshape(30, 40).astype(np.uint16)
    Image.fromarray(deep).save(images_dir / "rgb.png")
    Image.fromarray(deep[:20, :20]).save(images_dir / "empty.png")
    ds = CocoDetection(images_dir, ann, with_masks=False, train=False)
    caplog.set_level("INFO", logger="frcnn_train")
    for image_id in (1, 3, 1):
        image, _ = by_id(ds, image_id)
        assert image.dtype == torch.float32 and 0.14 < image.min() and image.max() < 0.57  # not clipped to white
    notes = [r.getMessage() for r in caplog.records if "16-bit" in r.getMessage()]
    assert notes == [
        f"data: {ann}: 16-bit images (first: {images_dir / 'rgb.png'}) are scaled to [0, 1] by dividing "
        "by 65535 (not clipped), and travel as float32 to keep their precision."
    ]


def test_32_bit_images_without_a_scale_are_refused(tiny: Callable) -> None:
    images_dir, ann = tiny()
    Image.fromarray(np.full((30, 40), 7.5, dtype=np.float32)).save(images_dir / "scan.tif")
    data = json.loads(ann.read_text())
    data["images"][0]["file_name"] = "scan.tif"
    ann.write_text(json.dumps(data))
    ds = CocoDetection(images_dir, ann, with_masks=False, train=True, bad_images="skip")
    with pytest.raises(
        DataError,
        match=rf"image {images_dir / 'scan.tif'} \(listed in {ann}\) holds 32-bit float "
        r"values from 7.5 to 7.5, outside \[0, 1\]",
    ):
        by_id(ds, 1)


def _exif_jpeg(path: Path, height: int, width: int, orientation: int) -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())


def test_exif_rotated_photo_annotated_as_displayed_is_turned(tiny: Callable, caplog: pytest.LogCaptureFixture) -> None:
    images_dir, ann = tiny()
    _exif_jpeg(images_dir / "photo.jpg", 40, 30, orientation=6)  # stored 30x40 (WxH), displayed 40x30: rgb.png's
    data = json.loads(ann.read_text())
    data["images"][0]["file_name"] = "photo.jpg"
    ann.write_text(json.dumps(data))
    ds = CocoDetection(images_dir, ann, with_masks=True, train=True)
    caplog.set_level("INFO", logger="frcnn_train")
    image, target = by_id(ds, 1)
    with Image.open(images_dir / "photo.jpg") as im:
        displayed = torch.from_numpy(np.array(ImageOps.exif_transpose(im).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(image, displayed) and target["masks"].shape[-2:] == image.shape[-2:] == (30, 40)
    by_id(ds, 1)
    notes = [r.getMessage() for r in caplog.records if "EXIF" in r.getMessage()]
    assert len(notes) == 1 and "orientation 6" in notes[0] and "photo.jpg" in notes[0]


def test_exif_is_named_where_no_size_matches(tiny: Callable) -> None:
    images_dir, ann = tiny()
    _exif_jpeg(images_dir / "photo.jpg", 50, 20, orientation=8)
    data = json.loads(ann.read_text())
    data["images"][0]["file_name"] = "photo.jpg"
    ann.write_text(json.dumps(data))
    ds = CocoDetection(images_dir, ann, with_masks=False, train=True)
    with pytest.raises(
        DataError,
        match=r"photo.jpg is 20x50 pixels \(50x20 after its EXIF orientation 8\) but .* "
        r"says 40x30; fix the 'width'/'height' of image id 1",
    ):
        by_id(ds, 1)
