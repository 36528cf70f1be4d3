"""COCO-sized evaluation and batching figures: COCOeval time per eval.backend, the gather's bytes per image,
and the padding that data.group_by_aspect_ratio saves.

    python scripts/eval_speed.py                          # 5000 images x 100 detections (val2017's shape)
    python scripts/eval_speed.py --images 500 --json out.json

`eval_rows` and `padding_rows` return the rows of scripts/scale_check.py's sections `eval` and `padding`
(which pads the sizes of the dataset it writes); this script's own padding table uses COCO_LIKE_SIZES.
The evaluation set is synthetic but shaped like val2017: 640 px images, ~7.3 objects per image over 80
categories (crowd regions among them), 100 scored detections per image (jittered objects and false positives).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import pickle
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from frcnn_train.data.grouping import aspect_ratio_groups
from frcnn_train.data.loader import ResumableSampler
from frcnn_train.errors import ConfigError
from frcnn_train.evaluation import BACKENDS, coco_api, coco_metrics
from scale_check import eval_table, padding_table, print_section

# Image sizes of a COCO-like mix (assumed shares of the common train2017 sizes, not counted from the file).
COCO_LIKE_SIZES = (
    (640, 480, 0.35),
    (640, 427, 0.25),
    (480, 640, 0.12),
    (427, 640, 0.10),
    (640, 360, 0.07),
    (500, 375, 0.05),
    (375, 500, 0.03),
    (640, 640, 0.03),
)


def coco_like_sizes(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Widths and heights of `count` images drawn from COCO_LIKE_SIZES."""
    pick = np.random.default_rng(seed).choice(len(COCO_LIKE_SIZES), size=count, p=[s for *_, s in COCO_LIKE_SIZES])
    table = np.array([(w, h) for w, h, _ in COCO_LIKE_SIZES])
    return table[pick, 0], table[pick, 1]


def synthetic_val(num_images: int, dets_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """A val2017-shaped ground truth (boxes; area from the box) and `dets_per_image` detections per image."""
    rng = np.random.default_rng(seed)
    widths, heights = coco_like_sizes(num_images, seed)
    images = [
        {"id": i + 1, "file_name": f"{i:012d}.jpg", "width": int(w), "height": int(h)}
        for i, (w, h) in enumerate(zip(widths, heights))
    ]
    categories = [{"id": c + 1, "name": f"class{c + 1}"} for c in range(80)]
    annotations, results = [], []
    for image in images:
        w, h = image["width"], image["height"]
        mine = []
        for k in range(int(rng.poisson(7.3))):
            bw, bh = rng.uniform(4, w / 2), rng.uniform(4, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = int(rng.integers(1, 81))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": cat,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": int(k == 0 and rng.random() < 0.1),
                }
            )
            if rng.random() < 0.9:  # found, a little off
                mine.append(
                    {
                        "image_id": image["id"],
                        "category_id": cat,
                        "score": float(rng.random()),
                        "bbox": [
                            x + rng.normal(0, 3),
                            y + rng.normal(0, 3),
                            bw * rng.uniform(0.8, 1.2),
                            bh * rng.uniform(0.8, 1.2),
                        ],
                    }
                )
        while len(mine) < dets_per_image:  # false positives, lower scores
            bw, bh = rng.uniform(4, w / 2), rng.uniform(4, h / 2)
            mine.append(
                {
                    "image_id": image["id"],
                    "category_id": int(rng.integers(1, 81)),
                    "score": float(rng.random()) / 2,
                    "bbox": [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh],
                }
            )
        results += mine[:dets_per_image]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def eval_rows(num_images: int = 5000, dets_per_image: int = 100) -> list[dict[str, Any]]:
    """COCOeval bbox time per installed backend on a val2017-shaped set, and whether every stat agrees;
    then the gather's bytes per image: RLE masks (what evaluation gathers) against dense ones."""
    from pycocotools.coco import COCO

    gt_dict, results = synthetic_val(num_images, dets_per_image)
    rows, stats = [], {}
    for backend in BACKENDS[1:]:
        try:
            coco_api(backend)
        except ConfigError as err:  # a backend that is not installed is left out of the table
            print(f"left out: {err}", file=sys.stderr)
            continue
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines
            coco_gt.createIndex()
        started = time.perf_counter()
        metrics = coco_metrics(coco_gt, results, "bbox", backend)
        seconds = time.perf_counter() - started
        stats[backend] = metrics
        rows.append(
            {
                "what": f"COCOeval bbox: {backend}",
                "backend": backend,
                "seconds": round(seconds, 2),
                "AP": round(metrics["AP"], 6),
            }
        )
    if len(stats) == 2:
        same = stats["pycocotools"] == stats["faster_coco_eval"]
        speedup = rows[0]["seconds"] / max(rows[1]["seconds"], 1e-9)
        for row in rows:
            row["every_stat_and_per_class_ap_equal"] = same
        rows[1]["speedup"] = round(speedup, 1)
    return rows + gather_rows(dets_per_image)


def gather_rows(dets_per_image: int = 100, sample_images: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """Bytes per image that reach the gather: the pickled RLE results (an ellipse in each box, as a Mask R-CNN
    mask pasted into its box) against the same masks as dense uint8 images and as the model's float32 output."""
    rng = np.random.default_rng(seed)
    widths, heights = coco_like_sizes(sample_images, seed)
    rle_bytes = []
    for w, h in zip(widths.tolist(), heights.tolist()):
        yy, xx = np.mgrid[:h, :w]
        image = []
        for _ in range(dets_per_image):
            bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
            cx, cy = rng.uniform(bw / 2, w - bw / 2), rng.uniform(bh / 2, h - bh / 2)
            mask = ((xx - cx) / (bw / 2)) ** 2 + ((yy - cy) / (bh / 2)) ** 2 <= 1
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            image.append(
                {
                    "image_id": 1,
                    "category_id": 1,
                    "score": 0.5,
                    "bbox": [cx, cy, bw, bh],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                }
            )
        rle_bytes.append(len(pickle.dumps(image)))
    pixels = float(np.mean(widths * heights))
    per_image = {
        "RLE (pickled results, what is gathered)": np.mean(rle_bytes),
        "dense uint8 masks": dets_per_image * pixels,
        "dense float32 masks (the model's output)": dets_per_image * pixels * 4,
    }
    return [
        {
            "what": f"gather: {form}",
            "form": form,
            "bytes_per_image": int(value),
            "MiB_per_5000_images": round(value * 5000 / 2**20, 1),
        }
        for form, value in per_image.items()
    ]


def _resized(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The size GeneralizedRCNNTransform resizes an image to (torchvision's scale rule, floor of the product)."""
    scale = min(min_size / min(width, height), max_size / max(width, height))
    return math.floor(width * scale), math.floor(height * scale)


def padding_rows(
    widths: Sequence[int],
    heights: Sequence[int],
    batch_size: int,
    seed: int,
    *,
    min_size: int = 800,
    max_size: int = 1333,
    size_divisible: int = 32,
) -> list[dict[str, Any]]:
    """Padded pixels per micro-batch in epoch 0 of the real sampler, ungrouped, with detectron2's / mmdetection's
    2 groups and with torchvision's 8 (data.group_by_aspect_ratio=true), after the model's resize and padding to
    a multiple of `size_divisible`, as GeneralizedRCNNTransform batches them."""
    widths, heights = np.asarray(widths), np.asarray(heights)
    sizes = [_resized(int(w), int(h), min_size, max_size) for w, h in zip(widths, heights)]
    rows = []
    for name, groups in (
        ("off", None),
        ("2 groups (detectron2, mmdetection)", aspect_ratio_groups(widths, heights, 0)),
        ("on: 8 groups (torchvision)", aspect_ratio_groups(widths, heights)),
    ):
        order = [i for i, _ in ResumableSampler(len(sizes), batch_size=batch_size, seed=seed, epoch=0, groups=groups)]
        padded, canvas_total = [], 0
        for k in range(0, len(order), batch_size):
            batch = [sizes[i] for i in order[k : k + batch_size]]
            canvas_w = math.ceil(max(w for w, _ in batch) / size_divisible) * size_divisible
            canvas_h = math.ceil(max(h for _, h in batch) / size_divisible) * size_divisible
            canvas = canvas_w * canvas_h * len(batch)
            padded.append(canvas - sum(w * h for w, h in batch))
            canvas_total += canvas
        rows.append(
            {
                "grouping": name,
                "batch_size": batch_size,
                "micro_batches": len(padded),
                "padded_pixels_per_batch": int(np.mean(padded)),
                "padding_share": round(float(np.sum(padded)) / canvas_total, 3),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="evaluation images (val2017: 5000)")
    parser.add_argument("--detections", type=int, default=100, help="detections per image")
    parser.add_argument("--padding-images", type=int, default=118287, help="images for the padding table")
    parser.add_argument("--batch-size", type=int, default=2, help="images per micro-batch (trainer.batch_size)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    widths, heights = coco_like_sizes(args.padding_images)
    padding = padding_rows(widths, heights, args.batch_size, seed=42)
    print_section(padding_table(padding, "an assumed mix of COCO's common sizes (COCO_LIKE_SIZES)"))
    sys.stdout.flush()
    evaluation = eval_rows(args.images, args.detections)
    print_section(eval_table(evaluation, args.images, args.detections))
    if args.json:
        args.json.write_text(json.dumps({"padding": padding, "evaluation": evaluation}, indent=1))


if __name__ == "__main__":
    main()
