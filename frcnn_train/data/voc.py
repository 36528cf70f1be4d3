"""Pascal VOC, converted in memory to a COCO dict so one dataset class and one
evaluator (pycocotools) serve every format.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from PIL import Image

from frcnn_train.data.problems import Problems, report
from frcnn_train.errors import DataError

VOC_CLASSES: list[str] = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


def load_voc(root: str | Path, split: str, *, classes: list[str] | None, problems: Problems | None = None) -> dict:
    """Read `ImageSets/Main/{split}.txt` and its XML files into a COCO instances dict.

    Image ids enumerate the split file (1-based), so they are stable for a given
    file. `difficult` objects become `iscrowd=1`: never trained on and ignored
    by COCOeval, as mmdetection ignores them.

    `problems` (frcnn-data check): record each problem there and leave the image or object out,
    instead of raising at the first one.
    """
    root = Path(root).expanduser()
    classes = list(VOC_CLASSES if classes is None else classes)
    if not root.is_dir():
        raise DataError(
            f"data.root: VOC directory {root} does not exist; point data.root at the VOCdevkit/VOC20xx folder"
        )
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise DataError(
            f"VOC split file {split_file} does not exist; check data.root or set data.train_split/data.val_split "
            f"to one of the files in {split_file.parent}"
        )
    voc_ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    duplicates = sorted({v for v in voc_ids if voc_ids.count(v) > 1}) if len(set(voc_ids)) != len(voc_ids) else []
    if duplicates:
        error = DataError(f"VOC split file {split_file} lists {duplicates[:3]} more than once; remove the repeats")
        for voc_id in duplicates:
            report(problems, "duplicate image id", voc_id, error)
        voc_ids = list(dict.fromkeys(voc_ids))

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, voc_id in enumerate(voc_ids, start=1):
        xml_path = root / "Annotations" / f"{voc_id}.xml"
        if not xml_path.is_file():
            report(
                problems,
                "missing annotation file",
                voc_id,
                DataError(
                    f"{split_file} lists {voc_id!r} but {xml_path} does not exist; add the annotation or remove the id"
                ),
            )
            continue
        try:
            image, objects = _parse_xml(xml_path, voc_id, root, classes, problems)
        except DataError as err:
            report(
                problems, "missing image file" if "does not exist" in str(err) else "malformed annotation", voc_id, err
            )
            continue
        image["id"] = image_id
        images.append(image)
        for obj in objects:
            obj.update(id=len(annotations) + 1, image_id=image_id)
            annotations.append(obj)
    return {
        "info": {"description": f"Pascal VOC {root.name} {split}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
    }


def _parse_xml(
    path: Path, voc_id: str, root: Path, classes: list[str], problems: Problems | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        tree = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(f"{path} is not valid XML ({e}); fix or remove the file") from None

    def number(node: ET.Element | None, tag: str) -> float:
        child = node.find(tag) if node is not None else None
        try:
            return float(child.text)  # type: ignore[union-attr, arg-type]
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"{path} has no numeric <{tag}>; fix the file") from None

    # mmdetection and detectron2 load JPEGImages/<id>.jpg whatever <filename> says.
    file_name = f"{voc_id}.jpg"
    size = tree.find("size")
    if size is not None and size.find("width") is not None:
        width, height = int(number(size, "width")), int(number(size, "height"))
    else:
        image_path = root / "JPEGImages" / file_name
        if not image_path.is_file():
            raise DataError(f"{path} has no <size> and {image_path} does not exist; add the image")
        with Image.open(image_path) as im:
            width, height = im.size
    if width <= 0 or height <= 0:
        # Some VOC-style exports write 0x0; the real size is in the image.
        with Image.open(root / "JPEGImages" / file_name) as im:
            width, height = im.size

    objects = []
    for obj in tree.iter("object"):
        name_node = obj.find("name")
        name = (name_node.text or "").strip() if name_node is not None else ""
        if name not in classes:
            report(
                problems,
                "unknown class name",
                f"{voc_id} ({name})",
                DataError(
                    f"{path} has an object of class {name!r}, which is not among the {len(classes)} classes; "
                    f"add it to data.classes or fix the file"
                ),
            )
            continue
        difficult_node = obj.find("difficult")
        difficult = int(float(difficult_node.text or 0)) if difficult_node is not None else 0
        box = obj.find("bndbox")
        xmin, ymin, xmax, ymax = (number(box, t) for t in ("xmin", "ymin", "xmax", "ymax"))
        # VOC boxes are 1-based inclusive pixel indices: pixel columns xmin..xmax
        # span [xmin - 1, xmax) in 0-based edge coordinates (detectron2's reading).
        x, y = xmin - 1.0, ymin - 1.0
        w, h = xmax - x, ymax - y
        objects.append(
            {
                "category_id": classes.index(name) + 1,
                "bbox": [x, y, w, h],
                "area": max(w, 0.0) * max(h, 0.0),
                "iscrowd": 1 if difficult else 0,
            }
        )
    return {"file_name": file_name, "width": width, "height": height, "voc_id": voc_id}, objects
