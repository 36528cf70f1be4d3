"""`python -m frcnn_train.predict CKPT INPUTS... --out DIR`: draw a checkpoint's detections on images.

Inputs are image files or directories of them. Each image is written to DIR
under its own name with boxes, "class score" labels and masks drawn, and every
detection above the threshold goes into DIR/predictions.json (COCO results
format, plus file_name and category_name).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from frcnn_train import checkpoint
from frcnn_train.config import with_schema
from frcnn_train.data.decode import ImageDecodeError, ImageRangeError, read_image
from frcnn_train.errors import DataError
from frcnn_train.evaluate import load_model
from frcnn_train.evaluation import detections_to_coco
from frcnn_train.runtime import cli, prog_name, resolve_device
from frcnn_train.visualize import draw_detections

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def collect_images(inputs: list[str]) -> list[Path]:
    """Files in the order given; a directory contributes its images sorted by name (not recursive)."""
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"input {path} does not exist; "
                            f"give image files ({', '.join(IMAGE_SUFFIXES)}) or directories")
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise DataError(f"directory {path} holds no {', '.join(IMAGE_SUFFIXES)} images; give one that does")
            found += images
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"input {path} is not an image ({', '.join(IMAGE_SUFFIXES)}); remove it or convert it")
        else:
            found.append(path)
    return found


def load_image(path: Path) -> torch.Tensor:
    """The image as the datasets give it: uint8 RGB [3, H, W] (float32 in [0, 1] for 16-bit files)."""
    try:
        return read_image(path).image
    except (ImageDecodeError, OSError) as err:
        raise DataError(f"{path} could not be decoded as an image ({err}); "
                        "replace it with a valid jpg/png/bmp or leave it out") from None
    except ImageRangeError as err:
        raise DataError(f"{path} {err}") from None


def _output_dir(out_dir: str | Path, files: list[Path]) -> Path:
    """--out, refused before any work when it cannot hold the drawn images: a file (or a path through
    one), or the folder of an input image, whose drawn copy would replace it under the same name."""
    out = Path(out_dir).expanduser()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == out else f"passes through the file {existing}"
        raise DataError(f"--out {out} {what}; give a directory for the drawn images and predictions.json "
                        "(it is made if missing)")
    if out.is_dir() and any(f.parent.resolve() == out.resolve() for f in files):
        raise DataError(f"--out {out} holds input images, which the drawn images (same names) would replace; "
                        "give another directory")
    return out


def _batches(items: list[Path], size: int) -> Iterator[tuple[int, list[Path]]]:
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def _output_names(files: list[Path]) -> list[str]:
    """Each input's own file name, with _1, _2 ... when two inputs share one."""
    seen: dict[str, int] = {}
    names = []
    for file in files:
        count = seen.get(file.name.lower(), 0)
        seen[file.name.lower()] = count + 1
        names.append(file.name if count == 0 else f"{file.stem}_{count}{file.suffix}")
    return names


@torch.no_grad()
def predict(ckpt_path: str | Path, inputs: list[str], out_dir: str | Path, *, score_threshold: float = 0.5,
            device: str = "auto", batch_size: int = 4, raw: bool = False) -> tuple[list[dict[str, Any]], float | None]:
    """Run the checkpoint over the inputs, write drawn images and predictions.json. The checkpoint's
    EMA weights when it has them, unless `raw` (checkpoint.inference_weights).

    Returns the results kept and the highest score among those dropped by `score_threshold` (None: none).
    """
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be at least 1")
    files = collect_images(inputs)
    out = _output_dir(out_dir, files)
    ckpt_path = checkpoint.checkpoint_in(ckpt_path)
    ckpt = checkpoint.load_checkpoint(ckpt_path)
    cfg = with_schema(ckpt["config"])
    classes = list(ckpt["classes"])
    dev = resolve_device(device)
    model = load_model(ckpt, cfg, str(ckpt_path), raw=raw).to(dev)
    with_masks = cfg.model.arch == "mask_rcnn"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"--out {out} cannot be created ({err.strerror}); give a directory you can write") from None
    names = _output_names(files)
    # Labels are 1-based indices into the checkpoint's classes; category ids are those labels.
    label_ids = {i: i for i in range(1, len(classes) + 1)}
    results: list[dict[str, Any]] = []
    highest_dropped: float | None = None
    for start, chunk in _batches(files, batch_size):
        images = [load_image(p) for p in chunk]
        outputs = model([image.to(dev) for image in images])
        for offset, (image, output) in enumerate(zip(images, outputs)):
            index = start + offset
            keep = output["scores"] >= score_threshold
            if not keep.all():
                highest_dropped = max(highest_dropped or 0.0, output["scores"][~keep].max().item())
            kept = {k: v[keep].cpu() for k, v in output.items()}
            drawn = draw_detections(image, kept, classes, score_threshold=score_threshold)
            target = out / names[index]
            extra = {"quality": 95} if target.suffix.lower() in (".jpg", ".jpeg") else {}
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(target, **extra)
            for result in detections_to_coco([kept], [index], label_ids, with_masks=with_masks):
                label = result["category_id"]
                results.append({"file_name": str(files[index]), **result, "category_name": classes[label - 1]})
    # One detection per line: valid JSON that still reads (and diffs) well.
    (out / "predictions.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in results) + "\n]\n")
    return results, highest_dropped


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name("frcnn_train.predict"), description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint file (or run directory: best.pth, else last.pth)")
    parser.add_argument("inputs", nargs="+", help="image files or directories (jpg, jpeg, png, bmp)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="draw and keep detections scoring at least this")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--raw", action="store_true",
                        help="use the trained weights, not the EMA's (for checkpoints of runs with trainer.ema)")
    args = parser.parse_args(argv)
    results, highest_dropped = predict(args.checkpoint, args.inputs, args.out, score_threshold=args.score_threshold,
                                       device=args.device, batch_size=args.batch_size, raw=args.raw)
    print(f"{len(results)} detections; drawn images and predictions.json in {args.out}")
    if not results and highest_dropped is not None:
        print(f"every detection scored below --score-threshold {args.score_threshold} (highest "
              f"{highest_dropped:.3f}); lower it to see them, or train longer")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
