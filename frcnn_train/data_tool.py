"""`frcnn-data check|stats|show [overrides]`: see a dataset as training will, before training.

The config is composed as training composes it (`data=coco data.root=...`, any model key), and the
datasets are built by the same builder (frcnn_train.data.build_datasets), so what this reports is
what a run would read:

  check    every problem of the files at once, grouped by kind, with what training does about each,
           and the anchor fit; exit 0 clean, 1 warnings only, 2 errors
  stats    images, objects, classes, sizes after the model's resize: a table and PNG plots (--out)
  show N   N training samples after the training transforms, ground truth drawn (--out)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from frcnn_train.anchors import TARGET, Boxes, fit_anchors, setup_from_config
from frcnn_train.config import check_values
from frcnn_train.data import DataBundle, build_datasets
from frcnn_train.data.problems import ERROR, Problems
from frcnn_train.errors import ConfigError, DataError
from frcnn_train.evaluate import compose_overrides
from frcnn_train.runtime import cli, prog_name

SPLITS = ("train", "val")


def load(overrides: Sequence[str], problems: dict[str, Problems] | None = None) -> tuple[DictConfig, DataBundle]:
    """The composed config and its datasets, built as training builds them."""
    cfg = compose_overrides(overrides)
    check_values(cfg, keys=("data", "model"))
    data = build_datasets(cfg.data, with_masks=cfg.model.arch == "mask_rcnn", problems=problems)
    return cfg, data


# ---------------------------------------------------------------- check
def check(overrides: Sequence[str], *, decode: bool = True, keep: int = 5) -> tuple[str, int]:
    """The check's report and its exit code."""
    problems = {split: Problems(keep) for split in SPLITS}
    lines = []
    try:
        cfg, data = load(overrides, problems)
    except DataError as err:  # a file that cannot be read at all: nothing after it can be checked
        lines += [f"{split}:\n{p.format()}" for split, p in problems.items() if p.groups]
        lines.append(f"  ERROR  reading stopped: {err}")
        return "\n".join(lines), 2
    lines.append(
        f"data={cfg.data.name}, model={cfg.model.arch}: {len(data.classes)} classes "
        f"({', '.join(data.classes[:10])}{', ...' if len(data.classes) > 10 else ''})"
    )
    for split, dataset in (("train", data.train), ("val", data.val)):
        if decode:
            _decode_all(dataset)
        objects = sum(int((dataset.record(i)["iscrowd"] == 0).sum()) for i in range(len(dataset)))
        lines.append(
            f"{split}: {dataset.source}: {len(dataset)} images, {objects} objects"
            f"{'' if decode else ' (images not decoded: --no-decode)'}"
        )
        lines.append(problems[split].format())
    fit = fit_anchors(Boxes.from_dataset(data.train), setup_from_config(cfg.model))
    lines.append(fit.format())
    code = max(p.exit_code() for p in problems.values())
    if fit.boxes and fit.recall < TARGET:
        code = max(code, 1)
    errors = sum(p.count(ERROR) for p in problems.values())
    if code == 2:
        verdict = f"{errors} error(s): training stops at the first"
    elif code == 1:
        repairs = max(p.exit_code() for p in problems.values()) == 1
        anchors = fit.recall < TARGET
        verdict = (
            "warnings only: training runs"
            + (", repairing or leaving out what is listed" if repairs else "")
            + (
                f"{' and' if repairs else ','} with anchors that miss boxes (best possible recall under {TARGET})"
                if anchors
                else ""
            )
        )
    else:
        verdict = "clean"
    lines.append(f"result: {verdict} (exit {code})")
    return "\n".join(lines), code


def _decode_all(dataset: Any) -> None:
    """Decode every image as training would (threads: the decoders release the GIL)."""
    workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(dataset.check_image, range(len(dataset))))


# ---------------------------------------------------------------- stats
def stats(overrides: Sequence[str], out: Path | None) -> tuple[str, list[Path]]:
    from frcnn_train.data_stats import format_stats, split_stats, write_stats

    problems = {split: Problems() for split in SPLITS}  # counts what the reader leaves out by design
    cfg, data = load(overrides, problems)
    setup = setup_from_config(cfg.model)
    train = problems["train"].groups
    rows = [
        split_stats(
            "train",
            data.train,
            len(data.classes),
            setup,
            left_out=train["image without training targets"].count if "image without training targets" in train else 0,
            crowd_left_out=train["crowd region"].count if "crowd region" in train else 0,
        ),
        split_stats("val", data.val, len(data.classes), setup),
    ]
    table = format_stats(rows, data.classes, setup)
    errors = sum(p.count(ERROR) for p in problems.values())
    if errors:
        table += (
            f"\n({errors} problem(s) of the files would stop training and are left out of these numbers; "
            "`frcnn-data check` lists them)"
        )
    written = write_stats(out, rows, data.classes, setup) if out is not None else []
    return table, written


# ---------------------------------------------------------------- show
def show(count: int, overrides: Sequence[str], out: Path, *, model_input: bool = True) -> list[Path]:
    """The first `count` samples of the first training epoch, as the loader gives them (same order and
    augmentation seeds), with the ground truth drawn; at the model's input size unless `model_input` is off."""
    from PIL import Image
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from frcnn_train.data.loader import ResumableSampler
    from frcnn_train.outputs import png_bytes, write_owned
    from frcnn_train.visualize import draw_detections

    cfg, data = load(overrides)
    m = cfg.model
    resize = GeneralizedRCNNTransform(int(m.min_size), int(m.max_size), list(m.image_mean), list(m.image_std))
    order = ResumableSampler(len(data.train), batch_size=1, seed=int(cfg.seed), epoch=0).global_order()
    written = []
    for k, key in enumerate(order[:count]):
        sample = data.train[key]
        if sample is None:  # data.bad_images=skip left it out
            continue
        image, target = sample
        if model_input:  # what the model's transform makes of it (the resize; normalisation is not drawn)
            scaled = image.float() / 255 if image.dtype == torch.uint8 else image
            scaled, target = resize.resize(scaled, dict(target))
            image = (scaled.clamp(0, 1) * 255).round().to(torch.uint8)
        drawn = draw_detections(image, target, data.classes)
        path = out / f"sample_{k:03d}_image_{int(target['image_id'])}.png"
        write_owned(
            path, png_bytes(Image.fromarray(drawn.permute(1, 2, 0).numpy())), kind="picture", command="frcnn-data show"
        )
        written.append(path)
    return written


# ---------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The command's arguments; docs/ generates the command-line reference from it."""
    parser = argparse.ArgumentParser(
        prog=prog_name("frcnn_train.data_tool"),
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[6:]),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    overrides_help = "config overrides as for training, e.g. data=coco data.root=/data/coco"
    p = sub.add_parser("check", help="every problem of the files, and the anchor fit (exit 0 / 1 / 2)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--no-decode", action="store_true", help="do not decode the images (faster; misses bad files)")
    p.add_argument("--first", type=int, default=5, metavar="N", help="ids listed per kind of problem (default 5)")
    p = sub.add_parser("stats", help="a table of the data and PNG plots (--out)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--out", help="directory for stats.txt and the plots (needs matplotlib)")
    p = sub.add_parser("show", help="N training samples after the training transforms, drawn (--out)")
    p.add_argument("count", type=int, help="how many samples")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("--as-loaded", action="store_true", help="draw at the dataset's size, before the model's resize")
    return parser


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        report, code = check(args.overrides, decode=not args.no_decode, keep=max(1, args.first))
        print(report)
        return code
    if args.command == "stats":
        from frcnn_train.eval_plots import PLOTS_HINT, matplotlib_or_none

        out = Path(args.out).expanduser() if args.out else None
        if out is not None and matplotlib_or_none() is None:
            raise ConfigError(f"stats --out writes plots with matplotlib, which is not installed; {PLOTS_HINT}")
        table, written = stats(args.overrides, out)
        print(table)
        if written:
            print(f"written: {', '.join(str(p) for p in written)}")
        return 0
    if args.count < 1:
        raise ConfigError(f"show {args.count}: give a number of samples >= 1")
    written = show(args.count, args.overrides, Path(args.out).expanduser(), model_input=not args.as_loaded)
    print(f"{len(written)} samples drawn: {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
