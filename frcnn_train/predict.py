"""`python -m frcnn_train.predict CKPT INPUTS... --out DIR`: draw a checkpoint's detections on images.

CKPT may also be a torchvision detector with its COCO weights, `torchvision:<builder>[.<ENUM>]`
(zoo.from_torchvision; fetched once into torch's hub cache): no training needed.

Inputs are image files or directories of them (the formats training reads:
data.decode.IMAGE_SUFFIXES). Each image is written to DIR under its own name with
boxes, "class score" labels and masks drawn (an input whose name another input
already has gets the first free `<stem>_<n>` name), and every detection at or
above the threshold goes into DIR/predictions.json (COCO results format, plus
file_name: the input's path, drawn: its drawn image's name, and category_name).
The model is loaded and run by the Python API's Detector (api.py), so
`frcnn_train.load(CKPT).predict(...)` gives these very detections.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from frcnn_train import zoo
from frcnn_train.data.decode import (
    IMAGE_SUFFIXES,
    ImageDecodeError,
    ImageRangeError,
    read_image,
)
from frcnn_train.errors import DataError
from frcnn_train.evaluation import detections_to_coco
from frcnn_train.outputs import check_directory, write_file
from frcnn_train.runtime import cli, prog_name
from frcnn_train.visualize import draw_detections

PREDICTIONS = "predictions.json"


def collect_images(inputs: list[str]) -> list[Path]:
    """Files in the order given; a directory contributes its images sorted by name (not recursive)."""
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise DataError(
                f"input {path} does not exist; give image files ({', '.join(IMAGE_SUFFIXES)}) or directories"
            )
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
        raise DataError(
            f"{path} could not be decoded as an image ({err}); replace it with a valid image "
            f"({', '.join(IMAGE_SUFFIXES)}) or leave it out"
        ) from None
    except ImageRangeError as err:
        raise DataError(f"{path} {err}") from None


def _output_dir(out_dir: str | Path, files: list[Path]) -> Path:
    """--out, refused before any work when it cannot hold the drawn images: a file (or a path through
    one), or the folder of an input image, whose drawn copy would replace it under the same name."""
    out = Path(out_dir).expanduser()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == out else f"passes through the file {existing}"
        raise DataError(
            f"--out {out} {what}; give a directory for the drawn images and predictions.json (it is made if missing)"
        )
    if out.is_dir() and any(f.parent.resolve() == out.resolve() for f in files):
        raise DataError(
            f"--out {out} holds input images, which the drawn images (same names) would replace; give another directory"
        )
    return out


def _batches(items: list[Path], size: int) -> Iterator[tuple[int, list[Path]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def output_names(files: list[Path]) -> list[str]:
    """Each input's own file name; a name an earlier input already took gets the first `<stem>_<n><suffix>`
    that is neither taken nor any input's own name, so a renamed copy never lands on a real `a_1.png`.
    Compared without case: on macOS and Windows `A.png` and `a.png` are one file."""
    real = {file.name.lower() for file in files}
    taken: set[str] = set()
    names = []
    for file in files:
        name, n = file.name, 0
        while name.lower() in taken or (n and name.lower() in real):
            n += 1
            name = f"{file.stem}_{n}{file.suffix}"
        taken.add(name.lower())
        names.append(name)
    return names


def score_threshold(text: str) -> float:
    """argparse type of --score-threshold: a finite number in [0, 1] (scores are probabilities)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(
            f"{text} is not a score; give a number from 0 to 1 (detections scoring at least it are kept)"
        )
    return value


@torch.no_grad()
def predict(
    ckpt_path: str | Path,
    inputs: list[str],
    out_dir: str | Path,
    *,
    score_threshold: float = 0.5,
    device: str = "auto",
    batch_size: int = 4,
    raw: bool = False,
) -> tuple[list[dict[str, Any]], float | None]:
    """Run the checkpoint (or a torchvision zoo model) over the inputs, write drawn images and predictions.json.
    The checkpoint's EMA weights when it has them, unless `raw` (checkpoint.inference_weights).

    Returns the results kept and the highest score among those dropped by `score_threshold` (None: none).
    """
    from frcnn_train.api import load

    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be at least 1")
    if not (math.isfinite(score_threshold) and 0.0 <= score_threshold <= 1.0):
        raise DataError(f"--score-threshold {score_threshold} must be a number from 0 to 1")
    files = collect_images(inputs)
    out = _output_dir(out_dir, files)
    names = output_names(files)
    check_directory(out, [PREDICTIONS, *names], kind="predictions", command="frcnn-predict", inputs=files)
    detector = load(ckpt_path, device, raw=raw)
    classes, with_masks = detector.classes, detector.with_masks
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"--out {out} cannot be created ({err.strerror}); give a directory you can write") from None
    # Labels are 1-based indices into the classes; category ids are those labels.
    label_ids = {i: i for i in range(1, len(classes) + 1)}
    results: list[dict[str, Any]] = []
    highest_dropped: float | None = None
    for start, chunk in _batches(files, batch_size):
        images = [load_image(p) for p in chunk]
        for offset, (image, output) in enumerate(zip(images, detector.forward(images, batch_size=batch_size))):
            index = start + offset
            keep = output["scores"] >= score_threshold
            if not keep.all():
                highest_dropped = max(highest_dropped or 0.0, output["scores"][~keep].max().item())
            kept = {k: v[keep] for k, v in output.items()}
            drawn = draw_detections(image, kept, classes, score_threshold=score_threshold)
            target = out / names[index]
            extra = {"quality": 95} if target.suffix.lower() in (".jpg", ".jpeg") else {}
            buffer, picture = io.BytesIO(), Image.fromarray(drawn.permute(1, 2, 0).numpy())
            picture.save(buffer, format=Image.registered_extensions()[target.suffix.lower()], **extra)
            write_file(target, buffer.getvalue())
            for result in detections_to_coco([kept], [index], label_ids, with_masks=with_masks):
                label = result["category_id"]
                results.append(
                    {
                        "file_name": str(files[index]),
                        "drawn": names[index],
                        **result,
                        "category_name": classes[label - 1],
                    }
                )
    # One detection per line: valid JSON that still reads (and diffs) well.
    write_file(out / PREDICTIONS, ("[\n" + ",\n".join(json.dumps(r) for r in results) + "\n]\n").encode())
    return results, highest_dropped


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments; docs/ generates the command-line reference from it."""
    parser = argparse.ArgumentParser(prog=prog_name("frcnn_train.predict"), description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help=zoo.SOURCE_HELP)
    parser.add_argument("inputs", nargs="+", help=f"image files or directories ({', '.join(IMAGE_SUFFIXES)})")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--score-threshold",
        type=score_threshold,
        default=0.5,
        help="draw and keep detections scoring at least this (0 to 1)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="use the trained weights, not the EMA's (for checkpoints of runs with trainer.ema)",
    )
    return parser


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results, highest_dropped = predict(
        args.checkpoint,
        args.inputs,
        args.out,
        score_threshold=args.score_threshold,
        device=args.device,
        batch_size=args.batch_size,
        raw=args.raw,
    )
    print(f"{len(results)} detections; drawn images and predictions.json in {args.out}")
    files = collect_images(args.inputs)
    renamed = [(file, name) for file, name in zip(files, output_names(files)) if name != file.name]
    if renamed:
        shown = ", ".join(f"{file} -> {name}" for file, name in renamed[:3]) + (", ..." if len(renamed) > 3 else "")
        print(
            f"{len(renamed)} input(s) share a file name with an earlier one and were drawn under a free name: "
            f"{shown} (predictions.json: file_name -> drawn)"
        )
    if not results and highest_dropped is not None:
        print(
            f"every detection scored below --score-threshold {args.score_threshold} (highest "
            f"{highest_dropped:.3f}); lower it to see them, or train longer"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
