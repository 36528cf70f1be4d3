"""Compact records of a COCO split: a few numpy arrays with offsets, no Python object per image or annotation.

DataLoader workers are forked from the main process, and every Python object a worker reads gets its
refcount written, which copies the object's memory page into the worker (pytorch issue 13246): a list of
118k record dicts grows each worker by gigabytes over an epoch. A handful of numpy arrays holding every
image's boxes, labels and polygons is read without such copies (detectron2's serialised list and mmengine's
serialize_data do the same with pickled bytes), and takes a fraction of the memory of the JSON's dicts and
Python floats: polygons are one float64 array (float64, not float32: rasterised masks stay bit-identical).
"""

from __future__ import annotations

from array import array
from typing import Any, NamedTuple

import numpy as np

POLYGONS, RLE = 0, 1  # how an annotation's segmentation is stored (CocoRecords.seg_kind)


class Polygons(NamedTuple):
    """A COCO polygon segmentation whose numbers are in a PolygonStore: polygon i has lengths[i] numbers
    (x, y pairs), the polygons one after another from `start`."""

    start: int
    lengths: tuple[int, ...]

    def kept(self, minimum: int = 6) -> list[tuple[int, int]]:
        """(start, length) of the polygons of at least `minimum` numbers, and an even count of them."""
        out, start = [], self.start
        for length in self.lengths:
            if length >= minimum and length % 2 == 0:
                out.append((start, length))
            start += length
        return out


_new_polygons = tuple.__new__  # Polygons(...) without the Python-level __new__ of a NamedTuple: once per object


class PolygonStore:
    """Every polygon number of a split in one growing float64 array."""

    def __init__(self) -> None:
        self.coords = array("d")

    def add(self, segmentation: list) -> Polygons | None:
        """The polygons of a COCO segmentation list stored, or None when it is not a list of lists of numbers."""
        start = len(self.coords)
        try:
            for polygon in segmentation:
                if not isinstance(polygon, list):
                    raise TypeError
                self.coords.extend(polygon)  # any non-number raises; True and 3 become 1.0 and 3.0, as float() does
        except (TypeError, OverflowError):
            del self.coords[start:]
            return None
        return _new_polygons(Polygons, (start, tuple(map(len, segmentation))))

    def lists(self, polygons: Polygons) -> list[list[float]]:
        """The polygons as COCO's lists of floats (for the ground truth that COCOeval reads)."""
        out, start = [], polygons.start
        for length in polygons.lengths:
            out.append(self.coords[start : start + length].tolist())
            start += length
        return out


class RecordsBuilder:
    """Collects the kept annotations (in any image order) and makes CocoRecords of them."""

    def __init__(self, image_ids: list[int], *, with_masks: bool, polygons: PolygonStore) -> None:
        self.position = {image_id: i for i, image_id in enumerate(image_ids)}
        self.with_masks, self.polygons = with_masks, polygons
        self.image, self.labels, self.crowd = array("q"), array("q"), array("b")
        self.boxes, self.area = array("d"), array("d")
        self.kind, self.pieces = array("b"), array("q")  # per annotation: POLYGONS/RLE, how many pieces
        self.piece_start, self.piece_len = array("q"), array("q")  # polygons: into coords; RLE: into rle bytes
        self.rle = bytearray()

    def add(
        self,
        image_id: int,
        box: tuple[float, float, float, float],
        label: int,
        area: float,
        crowd: int,
        segmentation: list[tuple[int, int]] | dict | None,
    ) -> None:
        """One annotation; `segmentation`: (start, length) of its polygons in the store, or an RLE dict whose
        size is its image's, or None without masks."""
        self.image.append(self.position[image_id])
        self.boxes.extend(box)
        self.labels.append(label)
        self.area.append(area)
        self.crowd.append(crowd)
        if not self.with_masks:
            return
        if isinstance(segmentation, dict):
            counts = segmentation["counts"]
            counts = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
            self.kind.append(RLE)
            self.pieces.append(1)
            self.piece_start.append(len(self.rle))
            self.piece_len.append(len(counts))
            self.rle += counts
        else:
            self.kind.append(POLYGONS)
            self.pieces.append(len(segmentation))
            for start, length in segmentation:
                self.piece_start.append(start)
                self.piece_len.append(length)

    def build(self, images: dict[int, dict[str, Any]], keep_empty: bool) -> CocoRecords:
        """The records of the images in `images` (id -> file_name, height, width) in id order, each with its
        annotations in the order they were added; images without any only with `keep_empty`."""
        image = np.frombuffer(self.image, dtype=np.int64) if len(self.image) else np.zeros(0, np.int64)
        order = np.argsort(image, kind="stable")  # by image, each image's annotations in file order
        per_image = np.bincount(image, minlength=len(self.position))
        ids = sorted(self.position, key=self.position.__getitem__)
        kept_images = np.array([keep_empty or per_image[i] > 0 for i in range(len(ids))], dtype=bool)
        kept_anns = kept_images[image] if len(image) else np.zeros(0, bool)
        order = order[kept_anns[order]]
        names = [images[i]["file_name"].encode("utf-8") for i, k in zip(ids, kept_images) if k]
        columns: dict[str, np.ndarray] = {
            "image_ids": np.array(ids, dtype=np.int64)[kept_images],
            "sizes": np.array([(images[i]["height"], images[i]["width"]) for i in ids], dtype=np.int64).reshape(-1, 2)[
                kept_images
            ],
            "names": np.frombuffer(b"".join(names), dtype=np.uint8).copy(),
            "name_offsets": _offsets([len(n) for n in names]),
            "ann_offsets": _offsets(per_image[kept_images]),
            "boxes": _array(self.boxes, np.float64).reshape(-1, 4)[order].astype(np.float32),
            "labels": _array(self.labels, np.int64)[order],
            "area": _array(self.area, np.float64)[order].astype(np.float32),
            "iscrowd": _array(self.crowd, np.int8)[order],
        }
        if self.with_masks:
            pieces = _array(self.pieces, np.int64)
            first = _offsets(pieces)[:-1]
            # The pieces of the annotations in their new order, each annotation's pieces together.
            counts = pieces[order]
            index = np.repeat(first[order] - _offsets(counts)[:-1], counts) + np.arange(counts.sum())
            columns.update(
                seg_kind=_array(self.kind, np.int8)[order],
                piece_offsets=_offsets(counts),
                piece_start=_array(self.piece_start, np.int64)[index],
                piece_len=_array(self.piece_len, np.int64)[index],
                coords=np.frombuffer(self.polygons.coords, dtype=np.float64)
                if len(self.polygons.coords)
                else np.zeros(0, np.float64),
                rle=np.frombuffer(bytes(self.rle), dtype=np.uint8),
            )
        return CocoRecords(columns, with_masks=self.with_masks)


def _array(values: array, dtype: type) -> np.ndarray:
    return np.frombuffer(values, dtype=dtype) if len(values) else np.zeros(0, dtype)


def _offsets(counts: Any) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)


class CocoRecords:
    """A split's images and their annotations as numpy arrays; `records[i]` is image i's record (file name,
    size, boxes xyxy float32, labels, area, iscrowd, segmentations: polygons as float64 arrays or RLE dicts)."""

    def __init__(self, columns: dict[str, np.ndarray], *, with_masks: bool) -> None:
        self.columns, self.with_masks = columns, with_masks

    def __len__(self) -> int:
        return len(self.columns["image_ids"])

    @property
    def image_ids(self) -> np.ndarray:
        return self.columns["image_ids"]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.columns.values())

    def __getitem__(self, i: int) -> dict[str, Any]:
        c = self.columns
        lo, hi = int(c["ann_offsets"][i]), int(c["ann_offsets"][i + 1])
        name = c["names"][c["name_offsets"][i] : c["name_offsets"][i + 1]].tobytes().decode("utf-8")
        height, width = (int(v) for v in c["sizes"][i])
        return {
            "file_name": name,
            "size": (height, width),
            "boxes": c["boxes"][lo:hi],
            "labels": c["labels"][lo:hi],
            "area": c["area"][lo:hi],
            "iscrowd": c["iscrowd"][lo:hi].astype(np.int64),
            "segmentations": [self._segmentation(a, height, width) for a in range(lo, hi)] if self.with_masks else None,
        }

    def _segmentation(self, ann: int, height: int, width: int) -> list[np.ndarray] | dict:
        c = self.columns
        first, last = int(c["piece_offsets"][ann]), int(c["piece_offsets"][ann + 1])
        starts, lengths = c["piece_start"][first:last], c["piece_len"][first:last]
        if c["seg_kind"][ann] == RLE:
            counts = c["rle"][starts[0] : starts[0] + lengths[0]].tobytes()
            return {"size": [height, width], "counts": counts}
        return [c["coords"][s : s + n] for s, n in zip(starts.tolist(), lengths.tolist())]
