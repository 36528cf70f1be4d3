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
import pickle
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

from frcnn_train.data.coco_json import (
    check_coco_dict,
    finite_numbers,
    fix_hint,
    gc_paused,
    key_prefix,
    read_annotation_file,
)
from frcnn_train.data.decode import (
    EXIF_APPLIED,
    IMAGE_SUFFIXES,
    NOTES,
    ImageDecodeError,
    ImageRangeError,
    SaidOnce,
    orient_to,
    read_image,
)
from frcnn_train.data.problems import Problems, report
from frcnn_train.data.records import CocoRecords, Polygons, PolygonStore, RecordsBuilder
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

    `problems` (frcnn-data check): record every problem there and read on, leaving out what is
    wrong, instead of raising at the first one as training does (None).

    What it keeps is compact (see data/records.py): the images and their annotations as numpy arrays, which
    loader workers read without copying them. An evaluation split (train=False) also keeps its ground truth,
    pickled, and makes the pycocotools index of it (`coco`) where COCOeval runs, on first use.
    """

    classes: list[str]
    label_to_cat_id: dict[int, int]

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
        problems: Problems | None = None,
    ) -> None:
        self.images_dir = Path(images_dir).expanduser()
        self.with_masks = with_masks
        self.train = train
        self.transforms = transforms
        if bad_images not in BAD_IMAGES:
            raise DataError(f"data.bad_images={bad_images!r} is not a choice; use {' or '.join(BAD_IMAGES)}")
        self.bad_images = bad_images
        self._problems = problems
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
            data, polygons = annotations, PolygonStore()
        else:
            source = str(Path(annotations).expanduser())
            data, polygons = read_annotation_file(annotations, key=ann_key)
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

        with gc_paused():  # a million annotations are no garbage: collections would only walk them
            images = self._images(data["images"], images_key)
            self._records = self._annotations(data["annotations"], images, cat_to_label, skip_empty, polygons)
        if not len(self._records):
            if images:
                empty = self._error(*self._why_empty(len(data["annotations"]), ann_key))
            else:
                empty = self._error("gives an empty split: it lists no images", fix_hint(ann_key, "file"))
            report(self._problems, "empty split", self.source, empty)
        # A training split keeps no ground truth: nothing evaluates against it.
        self._ground_truth = None if train else _ground_truth(data, polygons)
        self._coco: COCO | None = None

    @property
    def image_ids(self) -> list[int]:
        """The split's image ids, in sample order."""
        return self._records.image_ids.tolist()

    def records_nbytes(self) -> int:
        """Bytes of the records' arrays: what this dataset holds per image and annotation."""
        return self._records.nbytes()

    @property
    def coco(self) -> COCO:
        """The pycocotools index of the ground truth (an evaluation split's), made on first use."""
        if self._ground_truth is None:
            raise AttributeError(
                "a training split (train=True) keeps no COCO ground truth; "
                "build the split with train=False to evaluate on it"
            )
        if self._coco is None:
            coco = COCO()
            coco.dataset = pickle.loads(self._ground_truth)
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __getstate__(self) -> dict[str, Any]:
        # A loader worker gets the records, not the index: it never evaluates.
        return {**self.__dict__, "_coco": None}

    def _why_empty(self, total: int, ann_key: str | None) -> tuple[str, str]:
        """(problem, fix) for a training split without one usable annotation: the counts by cause, and a fix
        that gives the model objects to learn (data.skip_empty=false would train on none)."""
        if not total:
            return (
                "gives an empty training split: it lists no annotations",
                f"annotate the images or {fix_hint(ann_key, 'file')}",
            )
        causes = {
            "crowd": "crowd regions",
            "no_polygon": "objects without a polygon of 3 or more points",
            "no_area": "boxes of zero or negative area after clipping to their image",
            "unreadable": "on images data.bad_images=skip left out",
        }
        fixes = {
            "crowd": "a crowd region (iscrowd=1) only marks an area evaluation ignores, so annotate the objects "
            "one by one with iscrowd=0",
            "no_polygon": "give the objects polygons of 3 or more points (or train boxes only with model=faster_rcnn)",
            "no_area": "fix the boxes ([x, y, width, height] inside the image)",
            "unreadable": "replace the unreadable images",
        }
        found = [(key, n) for key, n in self._unusable.items() if n]
        counts = ", ".join(f"{n} {causes[key]}" for key, n in found)
        return (
            f"gives an empty training split: all {total} annotations are unusable ({counts})",
            f"{'; '.join(fixes[key] for key, _ in found)}, or {fix_hint(ann_key, 'file')}",
        )

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
                report(
                    self._problems,
                    "malformed image entry",
                    f"{img!r:.40}",
                    self._error(
                        f"has an image entry without 'id' and 'file_name' ({img!r:.80})", "fix the 'images' list"
                    ),
                )
                continue
            if image_id in out:
                report(
                    self._problems,
                    "duplicate image id",
                    image_id,
                    self._error(f"lists image id {image_id} twice", "give every image a unique id"),
                )
                continue
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

        missing = [(image_id, info["file_name"]) for image_id, info in out.items() if not exists(info["file_name"])]
        if missing:
            error = DataError(
                f"{key_prefix(images_key)}{len(missing)} image file(s) listed in {self.source} are missing from "
                f"{self.images_dir} (first: {missing[0][1]}); restore them or "
                f"{fix_hint(images_key, 'directory')}"
            )
            for image_id, name in missing:
                report(self._problems, "missing image file", name, error)
                self._unreadable.add(image_id)  # left out, with its annotations
                del out[image_id]
        for image_id, info in list(out.items()):
            if not info["width"] or not info["height"]:
                # Old or hand-made files omit the size; reading the header is cheap.
                try:
                    with Image.open(self.images_dir / info["file_name"]) as im:
                        info["width"], info["height"] = im.size
                except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
                    self._bad_image(self.images_dir / info["file_name"], err, image_id)
                    self._unreadable.add(image_id)  # skipped, with its annotations
                    del out[image_id]
                    continue
            info["width"], info["height"] = int(info["width"]), int(info["height"])
        return out

    def _bad_image(self, path: Path, err: Exception, image_id: int | None = None) -> None:
        """A file that does not decode: one DataError sentence, or (data.bad_images=skip) a warning."""
        if isinstance(err, MemoryError):
            raise err
        where = f"{self._images_key}=" if self._images_key else ""
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        error = DataError(
            f"image {path} ({where}{self.images_dir}, listed in {self.source}) is truncated or corrupt "
            f"({cause}); replace the file with a valid image ({', '.join(IMAGE_SUFFIXES)}), remove it from the "
            "annotations, or set data.bad_images=skip to train without it"
        )
        if self._problems is not None:
            kind = "undecodable image (data.bad_images=skip)" if self.bad_images == "skip" else "undecodable image"
            self._problems.add(kind, path.name, str(error))
            return
        if self.bad_images == "skip":
            # Logged, not warnings.warn: it may happen in a DataLoader worker, where warnings are not collected.
            _log.warning("data.bad_images=skip: skipped %s, which does not decode (%s).", path, cause)
            return
        raise error

    def _annotations(
        self,
        annotations: list[dict],
        images: dict[int, dict],
        cat_to_label: dict[int, int],
        skip_empty: bool,
        polygons: PolygonStore,
    ) -> CocoRecords:
        records = RecordsBuilder(sorted(images), with_masks=self.with_masks, polygons=polygons)
        degenerate: list[Any] = []  # ids of annotations with polygons of fewer than 3 points
        seen_ids: set[Any] = set()
        problems = self._problems
        clipped_ids: list[Any] = []  # the clipped and the dropped boxes: counted in the warning, listed by check
        dropped_ids: list[Any] = []
        # Annotations that give no training target, by cause: named when none is left (_why_empty).
        self._unusable = unusable = {"crowd": 0, "no_polygon": 0, "no_area": 0, "unreadable": 0}
        for ann in annotations:
            if not isinstance(ann, dict) or "id" not in ann:
                report(
                    problems,
                    "malformed annotation",
                    f"{ann!r:.40}",
                    self._error(
                        f"has an annotation without an 'id' ({ann!r:.80})", "give every annotation a unique id"
                    ),
                )
                continue
            if ann["id"] in seen_ids:
                report(
                    problems,
                    "duplicate annotation id",
                    ann["id"],
                    self._error(f"lists annotation id {ann['id']} twice", "give every annotation a unique id"),
                )
                continue
            seen_ids.add(ann["id"])
            image_id, cat_id = ann.get("image_id"), ann.get("category_id")
            if image_id in self._unreadable:
                unusable["unreadable"] += 1
                continue
            if image_id not in images:
                report(
                    problems,
                    "annotation of an unknown image",
                    ann["id"],
                    self._error(
                        f"has annotation id {ann.get('id')} for image_id {image_id}, which is not in 'images'",
                        "add the image or remove the annotation",
                    ),
                )
                continue
            if cat_id not in cat_to_label:
                report(
                    problems,
                    "unknown category id",
                    ann["id"],
                    self._error(
                        f"has annotation id {ann.get('id')} with category_id {cat_id}, which is not in 'categories'",
                        "add the category or remove the annotation",
                    ),
                )
                continue
            if not finite_numbers(ann.get("bbox")):
                report(
                    problems,
                    "non-finite box",
                    ann["id"],
                    self._error(
                        f"has annotation id {ann['id']} whose 'bbox' {ann['bbox']} holds a value that is not a finite "
                        "number",
                        "fix or remove the annotation (a NaN or infinite box makes the loss non-finite)",
                    ),
                )
                continue
            # COCOeval reads these from the ground truth; fill them in as COCO would.
            crowd = int(ann.setdefault("iscrowd", 0))
            if "area" not in ann and isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4:
                ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
            if crowd and self.train:
                if problems is not None:
                    problems.add("crowd region", ann["id"])
                unusable["crowd"] += 1
                continue  # crowd regions only mark areas COCOeval ignores; they are no training targets
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                report(
                    problems,
                    "malformed annotation",
                    ann["id"],
                    self._error(f"has annotation id {ann.get('id')} without a 4-number 'bbox'", "fix the annotation"),
                )
                continue
            info = images[image_id]
            width, height = info["width"], info["height"]
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
            if x2 <= x1 or y2 <= y1:
                dropped_ids.append(ann["id"])
                unusable["no_area"] += 1
                continue
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                clipped_ids.append(ann["id"])
            segmentation = None
            if self.with_masks:
                try:
                    segmentation, short = self._check_segmentation(ann, width, height, polygons)
                except DataError as err:
                    missing = "without a 'segmentation'" in str(err)
                    report(problems, "missing segmentation" if missing else "malformed segmentation", ann["id"], err)
                    continue
                if short:
                    degenerate.append(ann["id"])
                if segmentation == []:
                    if problems is not None:
                        problems.add("object without a usable polygon", ann["id"])
                    unusable["no_polygon"] += 1
                    continue
            area = float(ann.get("area") or (x2 - x1) * (y2 - y1))
            records.add(image_id, (x1, y1, x2, y2), cat_to_label[cat_id], area, crowd, segmentation)
        if problems is not None:
            for kind, ids in (
                ("box partly outside its image", clipped_ids),
                ("box empty after clipping", dropped_ids),
                ("polygon of fewer than 3 points", degenerate),
            ):
                for ann_id in ids:
                    problems.add(kind, ann_id)
        elif clipped_ids or dropped_ids:
            warnings.warn(
                f"{self.source}: clipped {len(clipped_ids)} box(es) that extended outside their image and dropped "
                f"{len(dropped_ids)} box(es) with zero or negative area after clipping",
                DataWarning,
                stacklevel=3,
            )
        if (degenerate or unusable["no_polygon"]) and problems is None:
            # pycocotools would read a 4-number polygon as a box and train a rectangle; an object without
            # a polygon would teach the mask head an empty mask. Both are left out, as detectron2 does.
            first = f" (first: annotation id {degenerate[0]})" if degenerate else ""
            warnings.warn(
                f"{self.source}: left out {sum(1 for _ in degenerate)} annotation(s)' polygons of fewer than 3 "
                f"points{first}, and dropped {unusable['no_polygon']} object(s) left without a polygon of 3 or more points",
                DataWarning,
                stacklevel=3,
            )
        built = records.build(images, keep_empty=not (self.train and skip_empty))
        if problems is not None and self.train and skip_empty:
            kept = set(built.image_ids.tolist())
            for image_id in sorted(set(images) - kept):
                problems.add("image without training targets", image_id)
        return built

    def _check_segmentation(self, ann: dict, width: int, height: int, polygons: PolygonStore) -> tuple[Any, bool]:
        """The segmentation to decode later (polygons: (start, length) of each in `polygons`), and whether
        polygons of fewer than 3 points were left out of it."""
        seg = ann.get("segmentation")
        where = f"annotation id {ann.get('id')}"
        if isinstance(seg, list):  # given as a dict (a file's polygons are stored as it is read)
            seg = polygons.add(seg) or seg  # not a list of lists of numbers: stays a list, and is malformed below
        if isinstance(seg, Polygons):
            # COCO has a few degenerate polygons (fewer than 3 points); they add nothing to a mask.
            kept = seg.kept()
            return kept, len(kept) < len(seg.lengths)
        if isinstance(seg, dict) and "counts" in seg and "size" in seg:
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
        return len(self._records)

    def record(self, index: int) -> dict[str, Any]:
        """Image `index`'s stored annotations: size (h, w), boxes (xyxy, its pixels), labels, area, iscrowd."""
        return self._records[index]

    def image_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Widths and heights of the images in index order, from the records (aspect-ratio grouping)."""
        sizes = self._records.columns["sizes"]
        return sizes[:, 1], sizes[:, 0]

    def check_image(self, index: int) -> None:
        """Decode image `index` as training does; with a `problems` collector, what is wrong is recorded."""
        rec = self.record(index)
        self._read(self.images_dir / rec["file_name"], int(self._records.image_ids[index]), rec["size"])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(key, tuple):
            index, sample_seed = key
        else:
            # A plain index (evaluation, notebooks) still gets deterministic augmentation.
            index, sample_seed = key, key
        rec = self._records[index]
        image_id = int(self._records.image_ids[index])
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
            report(
                self._problems,
                "image values without a scale",
                path.name,
                DataError(f"image {path} (listed in {self.source}) {err}"),
            )
            return None
        except (ImageDecodeError, OSError) as err:
            self._bad_image(path, err)
            return None
        image, orientation = orient_to(decoded.image, path, size)
        if image is None:
            height, width = decoded.image.shape[-2:]
            turned = f" ({height}x{width} after its EXIF orientation {orientation})" if orientation != 1 else ""
            report(
                self._problems,
                "image size differs from the annotations",
                image_id,
                DataError(
                    f"{path} is {width}x{height} pixels{turned} but {self.source} says {size[1]}x{size[0]}; "
                    f"fix the 'width'/'height' of image id {image_id}"
                ),
            )
            return None
        if orientation != 1 and self._problems is not None:
            self._problems.add("EXIF orientation applied", image_id)
        elif orientation != 1:
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
            if isinstance(seg, list):  # float64 arrays: polygons of 3 or more points (objects without one were dropped)
                seg = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
            rles.append(seg)
        if not rles:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        # One decode call for all objects: [H, W, N] -> [N, H, W].
        masks = mask_utils.decode(rles)
        return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))


def _ground_truth(data: dict[str, Any], polygons: PolygonStore) -> bytes:
    """What COCOeval reads, pickled (a fraction of the memory of the dicts): the file's every image and
    annotation (with the 'iscrowd' and 'area' filled in), polygons as lists again."""
    annotations = [
        dict(ann, segmentation=polygons.lists(ann["segmentation"]))
        if isinstance(ann.get("segmentation"), Polygons)
        else ann
        for ann in data["annotations"]
    ]
    return pickle.dumps({**data, "annotations": annotations}, protocol=pickle.HIGHEST_PROTOCOL)
