"""Synthetic shapes: a small, real COCO dataset generated on first use and cached.

It is the CPU-friendly default, so it must be quick to make (a few seconds),
identical for identical parameters (byte for byte, so runs are comparable),
learnable by a small Faster R-CNN in minutes, and it must exercise every code
path of the COCO loader: polygon and RLE segmentations, occlusion, varied sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from frcnn_train.errors import ConfigError

SHAPE_CLASSES: list[str] = ["circle", "square", "triangle", "star", "ellipse"]
# Only these are stored as polygons when fully visible; round shapes are always
# RLE, so both segmentation encodings appear in every split.
_POLYGONAL = frozenset({"square", "triangle", "star"})
# Bump when the drawing changes, so old caches are not mistaken for new ones.
GENERATOR_VERSION = 1
# An object keeps at least this share of its pixels when later ones overlap it:
# enough overlap to be realistic, never so much that a label becomes a guess.
_MIN_VISIBLE_FRACTION = 0.55
_MIN_VISIBLE_PIXELS = 12
_PLACEMENT_TRIES = 12
_MIN_COLOUR_DISTANCE = 90.0


def _params(num_train: int, num_val: int, image_size: int, max_objects: int, seed: int) -> dict[str, int]:
    return {
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "max_objects": max_objects,
        "seed": seed,
    }


def dataset_key(params: dict[str, int]) -> str:
    """A readable prefix for humans listing the cache, a hash so every parameter counts."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return f"{params['image_size']}px_{params['num_train']}+{params['num_val']}_seed{params['seed']}_{digest}"


def ensure_shapes_dataset(
    cache_dir: str | Path, *, num_train: int, num_val: int, image_size: int, max_objects: int, seed: int
) -> Path:
    """Return the dataset directory for these parameters, generating it if absent.

    Layout: `<cache_dir>/<key>/{train,val}/*.png` and `instances_{train,val}.json`.
    """
    for key, value, low in (
        ("num_train", num_train, 1),
        ("num_val", num_val, 1),
        ("image_size", image_size, 32),
        ("max_objects", max_objects, 1),
    ):
        if int(value) < low:
            raise ConfigError(f"data.shapes.{key}={value} is too small; set it to at least {low}")
    params = _params(int(num_train), int(num_val), int(image_size), int(max_objects), int(seed))
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / dataset_key(params)
    if final.is_dir():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Generate beside the final place and rename: the rename is atomic, so a
    # directory with the final name is always complete, even after a crash.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_dir))
    try:
        _write_dataset(tmp, params)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process (a DDP rank) finished the same dataset first; theirs is identical.
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_dataset(out: Path, params: dict[str, int]) -> None:
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]
    for split_id, (split, count) in enumerate((("train", params["num_train"]), ("val", params["num_val"]))):
        (out / split).mkdir()
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for index in range(count):
            # One RNG per image: an image depends only on (seed, split, index),
            # not on how many random numbers the images before it used.
            rng = np.random.default_rng([params["seed"] % 2**63, split_id, index])
            pixels, objects = _draw_image(rng, params["image_size"], params["max_objects"])
            image_id = index + 1
            file_name = f"{image_id:06d}.png"
            Image.fromarray(pixels).save(out / split / file_name, compress_level=1)
            size = params["image_size"]
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for obj in objects:
                obj.update(id=len(annotations) + 1, image_id=image_id, iscrowd=0)
                annotations.append(obj)
        coco = {
            "info": {"description": "frcnn_train synthetic shapes", **params},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        with open(out / f"instances_{split}.json", "w") as f:
            json.dump(coco, f, separators=(",", ":"))


def _outline(kind: str, cx: float, cy: float, radius: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices [K, 2] of a shape inscribed in a circle of `radius` (round ones as 40-gons)."""
    if kind in ("circle", "ellipse"):
        t = np.linspace(0.0, 2 * np.pi, 40, endpoint=False)
        minor = radius * (rng.uniform(0.4, 0.65) if kind == "ellipse" else 1.0)
        x, y = radius * np.cos(t), minor * np.sin(t)
    else:
        if kind == "square":
            t = np.arange(4) * (np.pi / 2) + np.pi / 4
            r = np.full(4, radius)
        elif kind == "triangle":
            t = np.arange(3) * (2 * np.pi / 3) - np.pi / 2
            r = np.full(3, radius)
        elif kind == "star":
            t = np.arange(10) * (np.pi / 5) - np.pi / 2
            r = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
        else:
            raise ValueError(f"unknown shape {kind!r}; valid: {', '.join(SHAPE_CLASSES)}")
        x, y = r * np.cos(t), r * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    pts = np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)
    # Rounded so the JSON (which stores these numbers) rasterises to exactly the drawn mask.
    return np.round(pts, 2)


def _rasterise(polygon: list[float], size: int) -> tuple[dict, np.ndarray]:
    # pycocotools draws the masks, so an annotation decodes to exactly the painted pixels.
    rle = mask_utils.frPyObjects([polygon], size, size)[0]
    return rle, mask_utils.decode(rle).astype(bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    c0, c1 = rng.uniform(0, 150, size=3), rng.uniform(0, 150, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    axis = np.arange(size, dtype=np.float32) / (size - 1)
    ramp = np.cos(angle) * axis[None, :] + np.sin(angle) * axis[:, None]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    return (c0 + (c1 - c0) * ramp[..., None]).astype(np.float32)


def _object_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    colour = rng.uniform(0, 255, size=3)
    for _ in range(20):
        if np.linalg.norm(colour - background_mean) >= _MIN_COLOUR_DISTANCE:
            break
        colour = rng.uniform(0, 255, size=3)
    return colour.astype(np.float32)


def _draw_image(rng: np.random.Generator, size: int, max_objects: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    canvas = _background(rng, size)
    wanted = int(rng.integers(1, max_objects + 1))
    min_radius = max(0.05 * size, 3.5)
    max_radius = 0.25 * size
    placed: list[dict[str, Any]] = []  # kind, full mask, visible mask, polygon
    for _ in range(wanted):
        for _ in range(_PLACEMENT_TRIES):
            kind = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
            radius = rng.uniform(min_radius, max_radius)
            cx, cy = rng.uniform(radius, size - radius, size=2)
            pts = _outline(kind, cx, cy, radius, rng.uniform(0, 2 * np.pi), rng)
            polygon = [float(v) for v in pts.reshape(-1)]
            _, full = _rasterise(polygon, size)
            if full.sum() < _MIN_VISIBLE_PIXELS:
                continue
            # Reject placements that would hide too much of an earlier object.
            if all(
                (p["visible"] & ~full).sum() >= max(_MIN_VISIBLE_FRACTION * p["full"].sum(), _MIN_VISIBLE_PIXELS)
                for p in placed
            ):
                for p in placed:
                    p["visible"] &= ~full
                placed.append({"kind": kind, "full": full, "visible": full.copy(), "polygon": polygon})
                region = canvas[full]
                colour = _object_colour(rng, region.mean(axis=0))
                # A little shading inside the shape, so colour alone is not a perfect cue.
                shade = rng.uniform(0.8, 1.1) + rng.normal(0.0, 0.04, size=(region.shape[0], 1))
                canvas[full] = np.clip(colour * shade, 0, 255)
                break
        # else: this image simply gets fewer objects; the first always fits.
    canvas += 6.0 * rng.standard_normal(size=canvas.shape, dtype=np.float32)
    pixels = np.clip(np.round(canvas), 0, 255).astype(np.uint8)

    objects = []
    for p in placed:
        visible_rle = mask_utils.encode(np.asfortranarray(p["visible"].astype(np.uint8)))
        if p["kind"] in _POLYGONAL and p["visible"].sum() == p["full"].sum():
            segmentation: Any = [p["polygon"]]
        else:
            segmentation = {"size": list(visible_rle["size"]), "counts": visible_rle["counts"].decode("ascii")}
        objects.append(
            {
                "category_id": SHAPE_CLASSES.index(p["kind"]) + 1,
                "bbox": [float(v) for v in mask_utils.toBbox(visible_rle)],
                "area": float(mask_utils.area(visible_rle)),
                "segmentation": segmentation,
            }
        )
    return pixels, objects
