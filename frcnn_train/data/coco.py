"""COCO instances datasets: validated up front, remapped to contiguous labels.

Everything that can be wrong with the files is found here, in the main process
at construction, and reported as one `DataError` sentence naming the file; a
worker process only ever opens images that are known to exist.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

from frcnn_train.data.coco_json import check_coco_dict, finite_numbers, fix_hint, key_prefix, load_annotation_file
from frcnn_train.data.decode import (
    EXIF_APPLIED,
    NOTES,
    ImageDecodeError,
    ImageRangeError,
    SaidOnce,
    orient_to,
    read_image,
)
from frcnn_train.errors import DataError

_log = logging.getLogger("frcnn_train")


class DataWarning(UserWarning):
    """Boxes were repaired or dropped while loading a dataset."""


# data.bad_images: what a truncated or undecodable image does. `error` stops (naming the file);
# `skip` leaves it out of its batch with a warning (batches with it are one image short).
BAD_IMAGES = ("error", "skip")


class CocoDetection(torch.utils.data.Dataset):
    """A COCO instances split as (image, target dict) pairs; the image is uint8 [3,H,W] RGB (float32 in [0,1]
    for images of more than 8 bits), made float on the device by the model's own transform.

    `__getitem__` takes an index or an `(index, sample_seed)` pair; the seed
    drives every random transform, so augmentation is a pure function of the
    key and does not depend on which worker loads the sample.

    `ann_key` / `images_key` name the config keys the files came from, so that
    errors can say which key to change; they are optional.
    """

    coco: COCO
    classes: list[str]
    label_to_cat_id: dict[int, int]
    image_ids: list[int]

    def __init__(
        self,
        images_dir: str | Path,
        annotations: str | Path | dict,
        *,
        with_masks: bool,
        train: bool,
        skip_empty: bool = True,
        transforms: Callable | None = None,
        classes: list[str] | None = None,
        ann_key: str | None = None,
        images_key: str | None = None,
        bad_images: str = "error",
    ) -> None:
        self.images_dir = Path(images_dir).expanduser()
        self.with_masks = with_masks
        self.train = train
        self.transforms = transforms
        if bad_images not in BAD_IMAGES:
            raise DataError(f"data.bad_images={bad_images!r} is not a choice; use {' or '.join(BAD_IMAGES)}")
        self.bad_images = bad_images
        self._images_key = images_key
        self._unreadable: set[int] = set()  # images data.bad_images=skip left out at construction
        self._said = SaidOnce()  # notes (16-bit scaled, EXIF applied) logged once for the dataset and its workers
        if not self.images_dir.is_dir():
            raise DataError(
                f"{key_prefix(images_key)}image directory {self.images_dir} does not exist; "
                f"check the path or {fix_hint(images_key, 'directory')}"
            )
        if isinstance(annotations, dict):
            source = f"the annotations for {self.images_dir}"
            check_coco_dict(annotations, source, key=ann_key)
            data = annotations
        else:
            source = str(Path(annotations).expanduser())
            data = load_annotation_file(annotations, key=ann_key)
        self.source = source
        self._key = ann_key

        self.classes, cat_to_label = self._categories(data["categories"], classes)
        self.label_to_cat_id = {label: cat for cat, label in cat_to_label.items()}
        # Labels this split has no category for (a val file lacking a training
        # class) get ids absent from the ground truth, which COCOeval ignores.
        spare = max([c for c in cat_to_label] + [0]) + 1
        for label in range(1, len(self.classes) + 1):
            if label not in self.label_to_cat_id:
                self.label_to_cat_id[label] = spare
                spare += 1

        images = self._images(data["images"], images_key)
        self._records, self.image_ids = self._annotations(data["annotations"], images, cat_to_label, skip_empty)
        if not self.image_ids:
            if images:
                raise self._error(
                    "gives an empty training split: no image has a usable annotation",
                    f"set data.skip_empty=false or {fix_hint(ann_key, 'file')}",
                )
            raise self._error("gives an empty split: it lists no images", fix_hint(ann_key, "file"))
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
            self.coco.createIndex()

    def _error(self, problem: str, fix: str) -> DataError:
        return DataError(f"{key_prefix(self._key)}{self.source} {problem}; {fix}")

    def _categories(self, categories: list[dict], classes: list[str] | None) -> tuple[list[str], dict[int, int]]:
        try:
            cats = sorted(((int(c["id"]), str(c["name"])) for c in categories), key=lambda c: c[0])
        except (KeyError, TypeError, ValueError):
            raise self._error(
                "has a category without an integer 'id' and a 'name'", "fix the 'categories' list"
            ) from None
        if not cats:
            raise self._error("lists no categories", "add the 'categories' list")
        ids, names = [c[0] for c in cats], [c[1] for c in cats]
        for seq, what in ((ids, "id"), (names, "name")):
            dup = sorted({v for v in seq if seq.count(v) > 1}, key=str)
            if dup:
                raise self._error(f"has duplicate category {what}s {dup}", f"give every category a unique {what}")
        if classes is None:
            return names, {cat_id: i + 1 for i, cat_id in enumerate(ids)}
        classes = [str(c) for c in classes]
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise self._error(
                f"has categories {unknown} that are not among the {len(classes)} classes {classes}",
                "use the same class names in every split (and in data.classes)",
            )
        if self.train and len(classes) != len(names):
            raise self._error(
                f"has {len(names)} categories but {len(classes)} class names were given ({classes})",
                "give exactly one name per category in data.classes, or leave it null",
            )
        return classes, {cat_id: classes.index(name) + 1 for cat_id, name in zip(ids, names)}

    def _images(self, images: list[dict], images_key: str | None) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for img in images:
            try:
                image_id, file_name = int(img["id"]), str(img["file_name"])
            except (KeyError, TypeError, ValueError):
                raise self._error(
                    f"has an image entry without 'id' and 'file_name' ({img!r:.80})", "fix the 'images' list"
                ) from None
            if image_id in out:
                raise self._error(f"lists image id {image_id} twice", "give every image a unique id")
            out[image_id] = {"file_name": file_name, "width": img.get("width"), "height": img.get("height")}
        # One directory listing instead of a stat per image: COCO train has 118k files.
        try:
            present = set(os.listdir(self.images_dir))
        except OSError as e:
            raise DataError(
                f"{key_prefix(images_key)}cannot list {self.images_dir} ({e.strerror}); check its permissions"
            ) from None

        def exists(name: str) -> bool:
            if "/" in name or os.sep in name:  # a file in a subdirectory: not in the listing
                return (self.images_dir / name).is_file()
            return name in present

        missing = [info["file_name"] for info in out.values() if not exists(info["file_name"])]
        if missing:
            raise DataError(
                f"{key_prefix(images_key)}{len(missing)} image file(s) listed in {self.source} are missing from "
                f"{self.images_dir} (first: {missing[0]}); restore them or "
                f"{fix_hint(images_key, 'directory')}"
            )
        for image_id, info in list(out.items()):
            if not info["width"] or not info["height"]:
                # Old or hand-made files omit the size; reading the header is cheap.
                try:
                    with Image.open(self.images_dir / info["file_name"]) as im:
                        info["width"], info["height"] = im.size
                except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
                    self._bad_image(self.images_dir / info["file_name"], err)
                    self._unreadable.add(image_id)  # skipped, with its annotations
                    del out[image_id]
                    continue
            info["width"], info["height"] = int(info["width"]), int(info["height"])
        return out

    def _bad_image(self, path: Path, err: Exception) -> None:
        """A file that does not decode: one DataError sentence, or (data.bad_images=skip) a warning."""
        if isinstance(err, MemoryError):
            raise err
        where = f"{self._images_key}=" if self._images_key else ""
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        if self.bad_images == "skip":
            # Logged, not warnings.warn: it may happen in a DataLoader worker, where warnings are not collected.
            _log.warning("data.bad_images=skip: skipped %s, which does not decode (%s).", path, cause)
            return
        raise DataError(
            f"image {path} ({where}{self.images_dir}, listed in {self.source}) is truncated or corrupt "
            f"({cause}); replace the file, remove it from the annotations, or set data.bad_images=skip to "
            "train without it"
        )

    def _annotations(
        self, annotations: list[dict], images: dict[int, dict], cat_to_label: dict[int, int], skip_empty: bool
    ) -> tuple[dict[int, dict[str, Any]], list[int]]:
        per_image: dict[int, list[tuple]] = {i: [] for i in images}
        clipped = dropped = 0
        degenerate: list[Any] = []  # ids of annotations with polygons of fewer than 3 points
        no_polygon = 0  # objects dropped because no polygon of 3 or more points was left
        seen_ids: set[Any] = set()
        for ann in annotations:
            if not isinstance(ann, dict) or "id" not in ann:
                raise self._error(
                    f"has an annotation without an 'id' ({ann!r:.80})", "give every annotation a unique id"
                )
            if ann["id"] in seen_ids:
                raise self._error(f"lists annotation id {ann['id']} twice", "give every annotation a unique id")
            seen_ids.add(ann["id"])
            image_id, cat_id = ann.get("image_id"), ann.get("category_id")
            if image_id in self._unreadable:
                continue
            if image_id not in images:
                raise self._error(
                    f"has annotation id {ann.get('id')} for image_id {image_id}, which is not in 'images'",
                    "add the image or remove the annotation",
                )
            if cat_id not in cat_to_label:
                raise self._error(
                    f"has annotation id {ann.get('id')} with category_id {cat_id}, which is not in 'categories'",
                    "add the category or remove the annotation",
                )
            if not finite_numbers(ann.get("bbox")):
                raise self._error(
                    f"has annotation id {ann['id']} whose 'bbox' {ann['bbox']} holds a value that is not a finite "
                    "number", "fix or remove the annotation (a NaN or infinite box makes the loss non-finite)"
                )
            # COCOeval reads these from the ground truth; fill them in as COCO would.
            crowd = int(ann.setdefault("iscrowd", 0))
            if "area" not in ann and isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4:
                ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
            if crowd and self.train:
                continue  # crowd regions only mark areas COCOeval ignores; they are no training targets
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                raise self._error(
                    f"has annotation id {ann.get('id')} without a 4-number 'bbox'", "fix the annotation"
                ) from None
            info = images[image_id]
            width, height = info["width"], info["height"]
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
            if x2 <= x1 or y2 <= y1:
                dropped += 1
                continue
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                clipped += 1
            segmentation = None
            if self.with_masks:
                segmentation, short = self._check_segmentation(ann, width, height)
                if short:
                    degenerate.append(ann["id"])
                if segmentation == []:
                    no_polygon += 1
                    continue
            area = float(ann.get("area") or (x2 - x1) * (y2 - y1))
            per_image[image_id].append(((x1, y1, x2, y2), cat_to_label[cat_id], area, crowd, segmentation))
        if clipped or dropped:
            warnings.warn(
                f"{self.source}: clipped {clipped} box(es) that extended outside their image and dropped "
                f"{dropped} box(es) with zero or negative area after clipping",
                DataWarning,
                stacklevel=3,
            )
        if degenerate or no_polygon:
            # pycocotools would read a 4-number polygon as a box and train a rectangle; an object without
            # a polygon would teach the mask head an empty mask. Both are left out, as detectron2 does.
            first = f" (first: annotation id {degenerate[0]})" if degenerate else ""
            warnings.warn(
                f"{self.source}: left out {sum(1 for _ in degenerate)} annotation(s)' polygons of fewer than 3 "
                f"points{first}, and dropped {no_polygon} object(s) left without a polygon of 3 or more points",
                DataWarning,
                stacklevel=3,
            )
        records: dict[int, dict[str, Any]] = {}
        for image_id in sorted(images):
            anns = per_image[image_id]
            if self.train and skip_empty and not anns:
                continue
            info = images[image_id]
            records[image_id] = {
                "file_name": info["file_name"],
                "size": (info["height"], info["width"]),
                # Compact arrays: these records are copied into every worker.
                "boxes": np.array([a[0] for a in anns], dtype=np.float32).reshape(-1, 4),
                "labels": np.array([a[1] for a in anns], dtype=np.int64),
                "area": np.array([a[2] for a in anns], dtype=np.float32),
                "iscrowd": np.array([a[3] for a in anns], dtype=np.int64),
                "segmentations": [a[4] for a in anns] if self.with_masks else None,
            }
        return records, list(records)

    def _check_segmentation(self, ann: dict, width: int, height: int) -> tuple[Any, bool]:
        """The segmentation to decode later, and whether polygons of fewer than 3 points were left out of it."""
        seg = ann.get("segmentation")
        where = f"annotation id {ann.get('id')}"
        if isinstance(seg, list):
            if all(isinstance(p, list) and all(isinstance(v, (int, float)) for v in p) for p in seg):
                # COCO has a few degenerate polygons (fewer than 3 points); they add nothing to a mask.
                kept = [[float(v) for v in p] for p in seg if len(p) >= 6 and len(p) % 2 == 0]
                return kept, len(kept) < len(seg)
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if [int(v) for v in seg["size"]] != [height, width]:
                raise self._error(
                    f"has {where} whose RLE size {seg['size']} differs from its image size [{height}, {width}]",
                    "fix the annotation",
                )
            if isinstance(seg["counts"], list):
                # Uncompressed RLE: convert once here rather than in every epoch.
                rle = mask_utils.frPyObjects(seg, height, width)
                return {"size": rle["size"], "counts": rle["counts"]}, False
            if isinstance(seg["counts"], (str, bytes)):
                return {"size": [height, width], "counts": seg["counts"]}, False
        elif seg is None:
            raise self._error(
                f"has {where} without a 'segmentation'",
                "Mask R-CNN needs masks for every object: add them or train model=faster_rcnn",
            )
        raise self._error(f"has {where} with a malformed 'segmentation'", "use polygons or RLE as COCO does")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(key, tuple):
            index, sample_seed = key
        else:
            # A plain index (evaluation, notebooks) still gets deterministic augmentation.
            index, sample_seed = key, key
        image_id = self.image_ids[index]
        rec = self._records[image_id]
        path = self.images_dir / rec["file_name"]
        image = self._read(path, image_id, rec["size"])
        if image is None:
            return None  # type: ignore[return-value]  # skipped; `collate` drops it from the batch
        height, width = rec["size"]
        target: dict[str, Tensor] = {
            "boxes": torch.from_numpy(rec["boxes"].copy()),
            "labels": torch.from_numpy(rec["labels"].copy()),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.from_numpy(rec["area"].copy()),
            "iscrowd": torch.from_numpy(rec["iscrowd"].copy()),
        }
        if self.with_masks:
            target["masks"] = self._masks(rec["segmentations"], height, width)
        if self.transforms is not None:
            generator = torch.Generator().manual_seed(int(sample_seed))
            image, target = self.transforms(image, target, generator)
        return image, target

    def _read(self, path: Path, image_id: int, size: tuple[int, int]) -> Tensor | None:
        """The image as the model takes it: uint8 [3, H, W] (float32 in [0, 1] for deeper images), turned by its
        EXIF orientation where only that matches the annotations' size. None: a bad image data.bad_images=skip
        leaves out."""
        try:
            decoded = read_image(path)
        except ImageRangeError as err:
            raise DataError(f"image {path} (listed in {self.source}) {err}") from None
        except (ImageDecodeError, OSError) as err:
            self._bad_image(path, err)
            return None
        image, orientation = orient_to(decoded.image, path, size)
        if image is None:
            height, width = decoded.image.shape[-2:]
            turned = f" ({height}x{width} after its EXIF orientation {orientation})" if orientation != 1 else ""
            raise DataError(
                f"{path} is {width}x{height} pixels{turned} but {self.source} says {size[1]}x{size[0]}; "
                f"fix the 'width'/'height' of image id {image_id}"
            )
        if orientation != 1:
            self._say(EXIF_APPLIED, path, orientation=orientation)
        if decoded.note is not None:
            self._say(decoded.note, path)
        return image

    def _say(self, note: int, path: Path, **fields: Any) -> None:
        # Logged, not warnings.warn: it happens in DataLoader workers too; SaidOnce spans them.
        if self._said.first(note):
            _log.info("data: %s: %s.", self.source, NOTES[note].format(path=path, **fields))

    @staticmethod
    def _masks(segmentations: list[Any], height: int, width: int) -> Tensor:
        rles = []
        for seg in segmentations:
            if isinstance(seg, list):  # polygons of 3 or more points (objects without one were dropped)
                seg = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
            rles.append(seg)
        if not rles:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        # One decode call for all objects: [H, W, N] -> [N, H, W].
        masks = mask_utils.decode(rles)
        return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))
