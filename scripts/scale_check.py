"""COCO-sized data: reading, memory and the loader at train2017's size, beside pycocotools.

    python scripts/scale_check.py                              # train2017's and val2017's counts (a few minutes)
    python scripts/scale_check.py --images 30000 --workers 2 --steps 100 --json scale.json
    python scripts/scale_check.py --images 50 --val-images 20 --steps 4   # a smoke run (the test suite's)

Writes a COCO-shaped dataset into --dir (default a temporary directory, removed at the end): N training and
M validation images as hard links to a few real JPEGs (640x480, a quarter of them portrait 480x640), about
7.3 polygon instances per image with COCO's spread of instance and vertex counts, 1% crowd regions as
uncompressed RLE, COCO's 80 category ids. Then each measurement runs in a fresh process (so its peak RSS is
its own) and the script prints one table per section and, with --json, writes {section: rows}:

  read     the training annotations read by frcnn_train's CocoDetection (Mask R-CNN records) and by
           pycocotools.COCO(file): seconds and peak RSS, and what each keeps (USS after the read)
  memory   private memory (USS, /proc/<pid>/smaps_rollup) of the main process and of each loader worker after
           the first batch and after --steps batches, with gc.collect() forced in the workers
  loader   loader images/s alone (no model) on the first 1,000 images and on all N
  eval     COCOeval bbox seconds per eval.backend (pycocotools, faster-coco-eval) on M val-shaped images x
           --detections, whether every stat agrees, and the gather's bytes per image (RLE against dense masks)
  padding  padded pixels per batch of --batch over the training images' sizes, data.group_by_aspect_ratio off,
           with 2 groups (detectron2, mmdetection) and on (torchvision's 8)

Sections are functions in SECTIONS returning a Section (title, columns, rows); eval and padding take their rows
from scripts/eval_speed.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


# COCO's 80 category ids (1..90 with gaps), so that labels are remapped as on the real file.
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
TRAIN2017, VAL2017 = 118_287, 5_000
LANDSCAPE, PORTRAIT = (640, 480), (480, 640)  # (width, height)


# --------------------------------------------------------------------------- the dataset


def _polygon_pool(rng: np.random.Generator, count: int) -> list[tuple[str, str, float]]:
    """(segmentation JSON, bbox JSON, area) of `count` random objects inside the 480x480 corner that both
    orientations share: 1 polygon, sometimes more; COCO's ~22 vertices per polygon on average, a long tail."""
    pool = []
    for _ in range(count):
        polygons, boxes, area = [], [], 0.0
        for _ in range(int(rng.geometric(0.88))):
            vertices = 4 + int(rng.negative_binomial(2, 2 / 18))
            cx, cy = rng.uniform(20, 460, 2)
            radius = rng.uniform(4, 120) * rng.uniform(0.6, 1.0, vertices)
            angle = np.sort(rng.uniform(0, 2 * np.pi, vertices))
            xs = np.clip(cx + radius * np.cos(angle), 0, 479.99)
            ys = np.clip(cy + radius * np.sin(angle), 0, 479.99)
            polygons.append("[" + ",".join(f"{v:.2f}" for v in np.stack([xs, ys], 1).ravel()) + "]")
            boxes.append((xs.min(), ys.min(), xs.max(), ys.max()))
            area += 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
        x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        pool.append(("[" + ",".join(polygons) + "]", f"[{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f}]", float(area)))
    return pool


def _crowd(rng: np.random.Generator, width: int, height: int) -> tuple[str, str, float]:
    """A crowd region as COCO writes it: uncompressed RLE (column-major run lengths) of a box."""
    x1, y1 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    x2, y2 = int(rng.integers(x1 + 10, width)), int(rng.integers(y1 + 10, height))
    counts, run_start = [], 0
    for x in range(x1, x2):  # per column: background down to y1, object to y2
        start = x * height + y1
        counts += [start - run_start, y2 - y1]
        run_start = start + y2 - y1
    counts.append(width * height - run_start)
    seg = json.dumps({"counts": counts, "size": [height, width]}, separators=(", ", ": "))
    return seg, f"[{x1},{y1},{x2 - x1},{y2 - y1}]", float((x2 - x1) * (y2 - y1))


def write_split(
    root: Path, name: str, count: int, *, seed: int, first_ann_id: int, subset: int | None = None
) -> tuple[Path, Path | None]:
    """instances_<name>.json for `count` images under root/<name>/ (hard links to a few JPEGs); with `subset`,
    also instances_<name>_<subset>.json: the same first `subset` images and their annotations."""
    from data_speed import (
        jpegs,  # here: it imports torch, which a pycocotools measurement must not hold
    )

    rng = np.random.default_rng(seed)
    images_dir = root / name
    images_dir.mkdir(parents=True, exist_ok=True)
    sources = {size: jpegs(root / "_jpegs", 3, *size) for size in (LANDSCAPE, PORTRAIT)}
    pool = _polygon_pool(rng, 4096)
    crowds = {size: [_crowd(rng, *size) for _ in range(16)] for size in (LANDSCAPE, PORTRAIT)}
    ids = np.sort(rng.choice(600_000, size=count, replace=False)) + 1
    portrait = rng.random(count) < 0.25
    # COCO train2017: 7.3 instances per image on average, 1% of the images without any, up to ~90.
    per_image = np.minimum(1 + rng.negative_binomial(1.5, 1.5 / 7.8, count), 90)
    per_image[rng.random(count) < 0.009] = 0
    out = images_dir.parent / f"instances_{name}.json"
    sub = images_dir.parent / f"instances_{name}_{subset}.json" if subset else None
    # Two files written side by side: the subset is the first `subset` images of the full one.
    files = [open(out, "w", encoding="utf-8")] + ([open(sub, "w", encoding="utf-8")] if sub else [])  # noqa: SIM115
    try:

        def write(text: str, i: int) -> None:
            files[0].write(text)
            if sub and i < subset:
                files[1].write(text)

        head = (
            '{"info": {"description": "scale_check", "version": "1.0", "year": 2017}, '
            '"licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "x"}], '
            '"images": ['
        )
        for f in files:
            f.write(head)
        for i, (image_id, tall) in enumerate(zip(ids.tolist(), portrait.tolist())):
            width, height = PORTRAIT if tall else LANDSCAPE
            file_name = f"{image_id:012d}.jpg"
            link = images_dir / file_name
            if not link.exists():
                os.link(sources[(width, height)][i % 3], link)
            write(
                ("" if i == 0 else ", ")
                + json.dumps(
                    {
                        "license": 1,
                        "file_name": file_name,
                        "coco_url": f"http://images.cocodataset.org/{name}/{file_name}",
                        "height": height,
                        "width": width,
                        "date_captured": "2013-11-14 11:18:45",
                        "flickr_url": f"http://farm4.staticflickr.com/3153/{image_id}_1.jpg",
                        "id": image_id,
                    }
                ),
                i,
            )
        for f in files:
            f.write('], "annotations": [')
        ann_id, first = first_ann_id, [True, True]
        for i, (image_id, tall, n) in enumerate(zip(ids.tolist(), portrait.tolist(), per_image.tolist())):
            size = PORTRAIT if tall else LANDSCAPE
            parts = []
            for _ in range(n):
                crowd = rng.random() < 0.01
                seg, bbox, area = crowds[size][int(rng.integers(16))] if crowd else pool[int(rng.integers(4096))]
                parts.append(
                    f'{{"segmentation": {seg}, "area": {area!r}, "iscrowd": {int(crowd)}, '
                    f'"image_id": {image_id}, "bbox": {bbox}, "category_id": '
                    f'{COCO_CATEGORY_IDS[int(rng.integers(80))]}, "id": {ann_id}}}'
                )
                ann_id += 1
            if not parts:
                continue
            text = ", ".join(parts)
            files[0].write(("" if first[0] else ", ") + text)
            first[0] = False
            if sub and i < subset:
                files[1].write(("" if first[1] else ", ") + text)
                first[1] = False
        cats = ", ".join(
            json.dumps({"supercategory": "thing", "id": c, "name": f"class{c}"}) for c in COCO_CATEGORY_IDS
        )
        for f in files:
            f.write(f'], "categories": [{cats}]}}')
    finally:
        for f in files:
            f.close()
    return out, sub


@dataclass
class Dataset:
    root: Path
    train_ann: Path
    train_1k_ann: Path | None
    val_ann: Path
    train_images: int
    val_images: int
    instances: int = 0


def write_dataset(root: Path, train_images: int, val_images: int) -> Dataset:
    """The dataset under `root`, written unless a complete one of these counts is there already (--dir)."""
    done = root / f".complete_{train_images}_{val_images}"
    small = root / "instances_train2017_1000.json" if train_images > 1000 else None
    if not done.exists():
        _, small = write_split(
            root, "train2017", train_images, seed=0, first_ann_id=1, subset=1000 if train_images > 1000 else None
        )
        write_split(root, "val2017", val_images, seed=1, first_ann_id=10_000_000)
        done.touch()
    return Dataset(
        root, root / "instances_train2017.json", small, root / "instances_val2017.json", train_images, val_images
    )


# --------------------------------------------------------------------------- measuring


@dataclass
class Section:
    """One table: `columns` name the keys of each row, in order; the JSON holds the rows as they are."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def uss_mib(pid: int | None = None) -> float:
    """Private memory (USS: private clean + dirty) of a process, from /proc/<pid>/smaps_rollup."""
    total = 0
    with open(f"/proc/{pid or os.getpid()}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """fn(*args) in a new (spawned) process: its peak RSS is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        return fresh.submit(fn, *args).result()


def _quiet() -> None:
    import logging
    import warnings

    # A process started by spawn starts its own children by spawn too; a training run started from a shell
    # forks its loader workers (Linux's default), and their memory is what is measured.
    multiprocessing.set_start_method("fork", force=True)

    warnings.simplefilter("ignore")  # nothing but the table on the screen
    logging.getLogger("frcnn_train").setLevel(logging.WARNING)


def read_ours(images: str, ann: str, with_masks: bool) -> dict[str, Any]:
    _quiet()
    from frcnn_train.data import CocoDetection

    start, cpu = time.perf_counter(), time.process_time()
    dataset = CocoDetection(images, ann, with_masks=with_masks, train=True)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    gc.collect()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mib": peak_rss_mib(),
        "kept_uss_mib": uss_mib(),
        "images": len(dataset),
        "records_mib": dataset.records_nbytes() / 2**20,
    }


def read_pycocotools(ann: str) -> dict[str, Any]:
    import contextlib
    import io

    from pycocotools.coco import COCO

    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(ann)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    gc.collect()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mib": peak_rss_mib(),
        "kept_uss_mib": uss_mib(),
        "images": len(coco.imgs),
    }


def baseline_uss() -> dict[str, Any]:
    """What an interpreter with torch and frcnn_train imported holds before reading anything."""
    import frcnn_train.data  # noqa: F401

    gc.collect()
    return {"uss_mib": uss_mib(), "peak_rss_mib": peak_rss_mib()}


def read_section(data: Dataset, args: argparse.Namespace) -> Section:
    section = Section(
        f"reading {data.train_images:,} training images' annotations "
        f"({data.train_ann.stat().st_size / 2**20:,.0f} MiB JSON)",
        ["reader", "seconds", "cpu_seconds", "peak_rss_mib", "kept_uss_mib"],
    )
    base = in_fresh_process(baseline_uss)
    ours = in_fresh_process(read_ours, str(data.root / "train2017"), str(data.train_ann), True)
    theirs = in_fresh_process(read_pycocotools, str(data.train_ann))
    section.rows = [
        {"reader": "frcnn_train CocoDetection (masks)", **ours},
        {"reader": "pycocotools COCO(file)", **theirs},
        {
            "reader": "(python + torch + frcnn_train imported)",
            "seconds": None,
            "peak_rss_mib": base["peak_rss_mib"],
            "kept_uss_mib": base["uss_mib"],
        },
    ]
    section.notes.append(
        f"frcnn_train's records: {ours['records_mib']:.0f} MiB of numpy arrays, for "
        f"{ours['images']:,} images (those with annotations)"
    )
    return section


class GcForced:
    """The dataset with gc.collect() every `every` samples, in whichever process loads them: a collection touches
    every tracked object, so the copy-on-write growth of a worker shows within a short run."""

    def __init__(self, dataset: Any, every: int) -> None:
        self.dataset, self.every, self.count = dataset, every, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        self.count += 1
        if self.count % self.every == 0:
            gc.collect()
        return self.dataset[key]


def loader_memory(images: str, ann: str, workers: int, steps: int, batch: int, freeze: bool) -> dict[str, Any]:
    """USS of the main process and of each worker after the first batch and at thirds of `steps` batches."""
    _quiet()
    import torch

    from frcnn_train.data import CocoDetection, build_train_loader, loader

    if not freeze:  # the workers as they started before: their collections walk what they inherited
        loader.init_worker = loader.ignore_stop_signals
    torch.set_num_threads(1)
    dataset = CocoDetection(images, ann, with_masks=True, train=True)
    gc.collect()
    batches = iter(
        build_train_loader(GcForced(dataset, every=batch), batch_size=batch, num_workers=workers, seed=0, epoch=0)
    )
    pids = [w.pid for w in getattr(batches, "_workers", [])]
    marks = _marks(steps)
    points = {}
    for step in range(1, steps + 1):
        next(batches)
        if step in marks:
            points[step] = [uss_mib(), *(uss_mib(pid) for pid in pids)]
    _shut_down(batches)
    return {"points": points, "workers": len(pids)}


def _marks(steps: int) -> list[int]:
    return sorted({1, max(1, steps // 3), max(1, 2 * steps // 3), steps})


def _shut_down(batches: Any) -> None:
    # Before this process exits: workers still loading when it ends abort.
    if hasattr(batches, "_shutdown_workers"):
        batches._shutdown_workers()


def memory_section(data: Dataset, args: argparse.Namespace) -> Section:
    marks = _marks(args.steps)
    columns = ["process", *(f"after_{m}" for m in marks), "growth", f"growth_after_{marks[1]}"]
    section = Section(
        f"private memory (USS, MiB) after so many batches: {args.workers} workers, batch {args.batch}, "
        "gc.collect() every batch in the workers",
        columns,
    )
    for freeze, which in ((True, ""), (False, " (no gc.freeze)")):
        r = in_fresh_process(
            loader_memory,
            str(data.root / "train2017"),
            str(data.train_ann),
            args.workers,
            args.steps,
            args.batch,
            freeze,
        )
        points = {int(k): v for k, v in r["points"].items()}
        for i, name in enumerate(["main"] + [f"worker {w}" for w in range(r["workers"])]):
            if name == "main" and not freeze:
                continue
            row = {"process": name + which, **{f"after_{m}": points[m][i] for m in marks}}
            row["growth"] = points[marks[-1]][i] - points[marks[0]][i]
            row[f"growth_after_{marks[1]}"] = points[marks[-1]][i] - points[marks[1]][i]
            section.rows.append(row)
    section.notes += [
        ("main: only the pages it shares with no worker (what it holds alone: the read table's kept_uss_mib)"),
        (
            "no gc.freeze: the workers as they started before, their collections walking (and so "
            "copying) every object inherited from the main process"
        ),
    ]
    return section


def loader_speed(images: str, ann: str, workers: int, steps: int, batch: int) -> dict[str, Any]:
    _quiet()
    import torch

    from frcnn_train.data import CocoDetection, build_train_loader

    torch.set_num_threads(1)
    dataset = CocoDetection(images, ann, with_masks=True, train=True)
    batches = iter(build_train_loader(dataset, batch_size=batch, num_workers=workers, seed=0, epoch=0))
    next(batches)  # the workers' start is not loading
    start, count = time.perf_counter(), 0
    for _ in range(steps):
        count += len(next(batches)[0])
    seconds = time.perf_counter() - start
    _shut_down(batches)
    return {"images": len(dataset), "images_per_s": count / seconds}


def loader_section(data: Dataset, args: argparse.Namespace) -> Section:
    section = Section(
        f"loader alone (no model): {args.workers} workers, batch {args.batch}, masks decoded, {args.steps} batches",
        ["dataset", "images", "images_per_s"],
    )
    sets = ([("first 1,000 images", data.train_1k_ann)] if data.train_1k_ann else []) + [
        (f"all {data.train_images:,} images", data.train_ann)
    ]
    for name, ann in sets:
        r = in_fresh_process(loader_speed, str(data.root / "train2017"), str(ann), args.workers, args.steps, args.batch)
        section.rows.append({"dataset": name, **r})
    return section


def evaluation(num_images: int, dets_per_image: int) -> list[dict[str, Any]]:
    _quiet()
    from eval_speed import eval_rows

    return eval_rows(num_images, dets_per_image)


def eval_table(rows: list[dict[str, Any]], num_images: int, dets_per_image: int) -> Section:
    """eval_speed.eval_rows as a table: seconds per backend, then the gather's bytes per image."""
    return Section(
        f"evaluation: COCOeval bbox on {num_images:,} val-shaped images x {dets_per_image} detections "
        "(loadRes, evaluate, accumulate, summarize) per eval.backend; the gather's bytes per image",
        [
            "what",
            "seconds",
            "speedup",
            "AP",
            "every_stat_and_per_class_ap_equal",
            "bytes_per_image",
            "MiB_per_5000_images",
        ],
        rows,
    )


def eval_section(data: Dataset, args: argparse.Namespace) -> Section:
    return eval_table(in_fresh_process(evaluation, data.val_images, args.detections), data.val_images, args.detections)


def padding(images: str, ann: str, batch: int) -> dict[str, Any]:
    """eval_speed.padding_rows over the training split's image sizes, as the sampler groups them (the images
    with annotations), and the mix of sizes."""
    _quiet()
    from eval_speed import padding_rows
    from frcnn_train.data import CocoDetection
    from frcnn_train.data.grouping import image_sizes

    widths, heights = image_sizes(CocoDetection(images, ann, with_masks=False, train=True))
    shapes, counts = np.unique(np.stack([widths, heights], 1), axis=0, return_counts=True)
    mix = ", ".join(f"{w}x{h} {c / len(widths):.1%}" for (w, h), c in zip(shapes.tolist(), counts.tolist()))
    return {"rows": padding_rows(widths, heights, batch, seed=0), "sizes": f"{len(widths):,} images, {mix}"}


def padding_table(rows: list[dict[str, Any]], sizes: str) -> Section:
    return Section(
        f"padding per micro-batch after the resize to 800/1333 and to a multiple of 32, epoch 0 of the "
        f"training sampler; image sizes: {sizes}",
        ["grouping", "batch_size", "micro_batches", "padded_pixels_per_batch", "padding_share"],
        rows,
    )


def padding_section(data: Dataset, args: argparse.Namespace) -> Section:
    r = in_fresh_process(padding, str(data.root / "train2017"), str(data.train_ann), args.batch)
    section = padding_table(r["rows"], f"the training images with annotations ({r['sizes']})")
    section.notes.append(
        "padding_share: padded pixels / all pixels of the padded batches; "
        "'on' is data.group_by_aspect_ratio=true (the default)"
    )
    return section


# Each entry: (name in the JSON, function(data, args) -> Section).
SECTIONS: list[tuple[str, Callable[[Dataset, argparse.Namespace], Section]]] = [
    ("read", read_section),
    ("memory", memory_section),
    ("loader", loader_section),
    ("eval", eval_section),
    ("padding", padding_section),
]


# --------------------------------------------------------------------------- printing


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_section(section: Section) -> None:
    cells = [[_cell(row.get(c)) for c in section.columns] for row in section.rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(section.columns)]
    print(f"\n{section.title}")
    print(
        "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(section.columns, widths)))
    )
    for row in cells:
        print("  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    for note in section.notes:
        print(f"  {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=TRAIN2017, help="training images (train2017: 118,287)")
    parser.add_argument("--val-images", type=int, default=VAL2017, help="validation images (val2017: 5,000)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--steps", type=int, default=150, help="batches per loader measurement")
    parser.add_argument("--batch", type=int, default=2, help="images per batch (loader, memory and padding)")
    parser.add_argument("--detections", type=int, default=100, help="detections per validation image (eval)")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="write (or reuse) the dataset here and keep it (default: a temporary directory)",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=[name for name, _ in SECTIONS],
        choices=[name for name, _ in SECTIONS],
        help="which measurements to run",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="scale_check_"))
    try:
        start = time.perf_counter()
        data = write_dataset(root, args.images, args.val_images)
        print(
            f"COCO-shaped dataset in {root}: {args.images:,} train / {args.val_images:,} val images, "
            f"{data.train_ann.stat().st_size / 2**20:,.0f} MiB train JSON (written in "
            f"{time.perf_counter() - start:.0f} s); {os.cpu_count()} CPUs",
            flush=True,
        )
        results: dict[str, Any] = {
            "images": args.images,
            "val_images": args.val_images,
            "workers": args.workers,
            "steps": args.steps,
            "batch": args.batch,
        }
        for name, measure in SECTIONS:
            if name in args.sections:
                section = measure(data, args)
                print_section(section)
                sys.stdout.flush()
                results[name] = {"title": section.title, "rows": section.rows, "notes": section.notes}
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
