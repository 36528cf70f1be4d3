"""Every bad input a user can give ends in one sentence, a non-zero exit, and no file touched.

Each case prepares its own files, runs a CLI, and checks: a non-zero exit; no traceback; the
file or config key named in the message; and the same bytes in every file that existed before
(the shared trained run, the dataset, the case's own files). Most cases run in this process
through the CLIs' own code (seconds each); a few run as real subprocesses, for what only a
process shows (Hydra's own errors, DataLoader workers, a clean exit).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import python_path, tiny_overrides
from frcnn_train import evaluate, export, inspect, predict
from frcnn_train.config import compose_config
from frcnn_train.errors import UserError
from frcnn_train.launch import run


@dataclass
class Ctx:
    tmp: Path  # the case's own directory
    run_dir: Path  # the shared tiny run: every case must leave it as it was
    shapes: Path  # the shared shapes cache
    coco_source: Path  # a COCO-layout dataset (the tiny shapes), copied per case on demand

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pth"

    def train_args(self, *extra: str) -> list[str]:
        return tiny_overrides(self.shapes, self.tmp / "outputs") + ["trainer.max_steps=2", *extra]

    def coco(self) -> Path:
        """The case's own copy of the COCO dataset (made on first call)."""
        root = self.tmp / "coco"
        if not root.exists():
            shutil.copytree(self.coco_source, root)
        return root

    def coco_args(self, *extra: str) -> list[str]:
        root = self.coco()
        return self.train_args(
            "data=coco",
            f"data.root={root}",
            "data.train_images=train",
            "data.val_images=val",
            "data.train_ann=instances_train.json",
            "data.val_ann=instances_val.json",
            *extra,
        )

    def evil_pickle(self) -> Path:
        """A weights file whose unpickling would call os.system (harmless command, never run)."""
        path = self.tmp / "evil.pth"
        torch.save({"model": {"w": torch.zeros(1)}, "x": _RunsACommand(self.tmp / "it_ran")}, path)
        return path

    def truncated_copy(self, source: Path, name: str = "truncated.pth") -> Path:
        path = self.tmp / name
        path.write_bytes(source.read_bytes()[:20_000])
        return path


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _image(ctx: Ctx, name: str = "photo.png") -> Path:
    """A small valid image in its own folder of the case's directory."""
    path = ctx.tmp / "images" / name
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(np.full((48, 64, 3), 127, dtype=np.uint8)).save(path)
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _voc(ctx: Ctx) -> Path:
    """A two-image Pascal VOC tree whose second image has a class outside data.classes."""
    root = ctx.tmp / "VOC"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for voc_id, name in (("a", "dog"), ("b", "zebra")):
        (root / "Annotations" / f"{voc_id}.xml").write_text(
            f"<annotation><size><width>48</width><height>32</height></size><object><name>{name}</name>"
            "<difficult>0</difficult><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax><ymax>20</ymax></bndbox>"
            "</object></annotation>"
        )
        Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{voc_id}.jpg")
    for split in ("train", "val"):
        (root / "ImageSets/Main" / f"{split}.txt").write_text("a\nb\n")
    return root


def _edited_checkpoint(ctx: Ctx, edit: Callable[[dict], None], run_name: str = "tiny") -> Path:
    """A copy of the shared last.pth, changed by `edit`, alone in <tmp>/<run_name>/ (a resume with the cases'
    run_name=tiny continues it there)."""
    path = ctx.tmp / run_name / "last.pth"
    path.parent.mkdir(parents=True)
    ckpt = torch.load(ctx.last, map_location="cpu", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)
    return path


def _backbone_edited(ckpt: dict) -> None:  # resnet34 in the config over resnet18 weights, as by hand
    ckpt["config"]["model"]["backbone"]["name"] = "resnet34_fpn"


def _ema_never_updated(ckpt: dict) -> None:
    """An EMA that trainer.ema.every > the steps trained left at the initial weights (here: visibly other)."""
    ckpt["config"]["trainer"]["ema"].update(decay=0.9, every=1000)
    ckpt["ema"] = {"model": {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["model"].items()}, "updates": 0}


def _export(ctx: Ctx, fmt: str, name: str) -> Path:
    from frcnn_train.export import export

    return export(ctx.last, fmt, ctx.tmp / name, check_images=0).path


def _images_of_sizes(ctx: Ctx, files: dict[str, tuple[int, int]]) -> list[Path]:
    """relative path -> (height, width): one flat-grey image each, told apart by size."""
    paths = []
    for name, (height, width) in files.items():
        path = ctx.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((height, width, 3), 127, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _convert_train_images(ctx: Ctx, convert: Callable[[Image.Image], tuple[Image.Image, str, dict]]) -> None:
    """Every training image through `convert(image) -> (new image, suffix, save options)`; the JSON follows."""
    root, renamed = ctx.coco(), {}
    for path in sorted((root / "train").iterdir()):
        with Image.open(path) as im:
            new, suffix, options = convert(im.convert("RGB"))
        path.unlink()
        new.save(path.with_suffix(suffix), **options)
        renamed[path.name] = path.with_suffix(suffix).name

    def follow(data: dict) -> None:
        for image in data["images"]:
            image["file_name"] = renamed[image["file_name"]]

    _edit_json(root / "instances_train.json", follow)


def _exif_rotated_train_images(ctx: Ctx, json_says_displayed: bool) -> None:
    """Photos stored 48x64 (WxH) with EXIF orientation 6, displayed 64x48, as a phone writes them; the JSON
    gives the displayed size (as annotation tools do) or the square size of neither."""

    def turn(im: Image.Image) -> tuple[Image.Image, str, dict]:
        displayed = np.asarray(im)[:48]  # 64x48 as displayed
        stored = Image.fromarray(np.ascontiguousarray(np.rot90(displayed, k=1)))  # orientation 6 turns it back
        exif = stored.getexif()
        exif[0x0112] = 6
        return stored, ".jpg", {"exif": exif.tobytes(), "quality": 95}

    _convert_train_images(ctx, turn)
    if json_says_displayed:
        _edit_json(
            ctx.coco() / "instances_train.json",
            lambda data: [image.update(width=64, height=48) for image in data["images"]],
        )


# ---------------------------------------------------------------- the cases
# name -> (CLI, prepare(ctx) -> (argv, strings the message must contain)).
# CLI: train (in process: compose + launch.run, as train.py does), train-process (the real
# `python -m frcnn_train.train`), evaluate / predict / inspect / export (their main(argv) in process).
# An expected string "!text" must not appear.
Case = Callable[[Ctx], tuple[list[str], list[str]]]
CASES: dict[str, tuple[str, Case]] = {}


def case(cli: str) -> Callable[[Case], Case]:
    def register(prepare: Case) -> Case:
        CASES[prepare.__name__] = (cli, prepare)
        return prepare

    return register


# -- config values that cannot work (refused before any data or model work)
for _override, _shown, _allowed in [
    ("trainer.batch_size=0", "trainer.batch_size=0", ">= 1"),
    ("trainer.accumulate=0", "trainer.accumulate=0", ">= 1"),
    ("optim.lr=-1", "optim.lr=-1.0", ">= 0"),
    ("model.min_size=0", "model.min_size=0", ">= 1"),
    ("trainer.epochs=0", "trainer.epochs=0", ">= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0", ">= 1"),
    ("trainer.keep_last=-1", "trainer.keep_last=-1", ">= 0"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps=-1", ">= 0"),
    ("trainer.log_every=0", "trainer.log_every=0", ">= 1"),
    ("data.bad_images=maybe", "data.bad_images=maybe", "error or skip"),
]:

    def _bad_value(ctx: Ctx, override: str = _override, shown: str = _shown, allowed: str = _allowed):
        return ctx.train_args(override), [shown, allowed]

    _bad_value.__name__ = f"value_{_override.split('=')[0]}"
    case("train")(_bad_value)


@case("train")
def value_max_size_below_min_size(ctx: Ctx):
    return ctx.train_args("model.min_size=96", "model.max_size=64"), ["model.max_size=64", "model.min_size=96"]


@case("train-process")
def unknown_key(ctx: Ctx):
    return ctx.train_args("model.box_head_dm=3"), ["model.box_head_dm"]


@case("train-process")
def unknown_group_option(ctx: Ctx):
    return ctx.train_args("model/backbone=resnet19_fpn"), ["model/backbone/resnet19_fpn"]


# -- the command line and the config (issue 18): Hydra's errors, values, names, output paths
def _experiment(ctx: Ctx, text: str, name: str = "broken") -> tuple[Path, Path]:
    """my_configs/experiment/<name>.yaml holding `text`; returns (the config dir, the file)."""
    path = ctx.tmp / "my_configs" / "experiment" / f"{name}.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path.parents[1], path


@case("train-process")
def experiment_with_a_yaml_syntax_error(ctx: Ctx):
    config_dir, path = _experiment(ctx, "# @package _global_\ntrainer:\n  epochs: [1, 2\n")
    return (
        ["--config-dir", str(config_dir), "+experiment=broken", *ctx.train_args()],
        [str(path), "not valid YAML", "line 3, column 11"],
    )


@case("train-process")
def experiment_with_a_tab(ctx: Ctx):
    config_dir, path = _experiment(ctx, "# @package _global_\ntrainer:\n\tepochs: 2\n")
    return ["--config-dir", str(config_dir), "+experiment=broken", *ctx.train_args()], [str(path), "line 3, column 1"]


@case("train-process")
def config_dir_missing(ctx: Ctx):
    return (
        ["--config-dir", str(ctx.tmp / "my_configs"), "+experiment=trees", *ctx.train_args()],
        ["--config-dir", str(ctx.tmp / "my_configs"), "not found"],
    )


@case("train-process")
def experiment_missing(ctx: Ctx):
    return ctx.train_args("+experiment=tres"), ["experiment/tres", "shapes_mask_cbam"]


@case("train-process")
def value_of_the_wrong_type(ctx: Ctx):
    return ctx.train_args("trainer.epochs=abc"), ["trainer.epochs=abc", "Integer"]


@case("train-process")
def value_a_fraction_for_a_whole_number(ctx: Ctx):
    return ctx.train_args("trainer.epochs=1.5"), ["trainer.epochs=1.5", "Integer"]


@case("train-process")
def value_null_for_the_seed(ctx: Ctx):
    return ctx.train_args("seed=null"), ["seed=null", "not Optional"]


@case("train-process")
def value_that_does_not_resolve(ctx: Ctx):
    return ctx.train_args("run_name=run_${optim.lrr}"), ["run_name", "optim.lrr"]


@case("train-process")
def override_with_an_unquoted_unicode_path(ctx: Ctx):
    return ctx.train_args(f"output_dir={ctx.tmp / 'läufe'}"), [f"output_dir={ctx.tmp / 'läufe'}", "quote"]


@case("train-process")
def override_with_a_comma_outside_a_sweep(ctx: Ctx):
    return ctx.train_args("run_name=a,b"), ["run_name=a,b", "key=[a,b]", "-m"]


@case("train-process")
def sweep_function_with_a_missing_argument(ctx: Ctx):
    return ["-m", *ctx.train_args("optim.lr=interval(0.1)")], ["optim.lr=interval(0.1)", "'end'", "interval(0.001,0.1)"]


@case("train")
def unknown_key_added_with_plus(ctx: Ctx):
    return ctx.train_args("+trainer.epoch=3"), ["+trainer.epoch=", "trainer.epochs"]


for _override, _shown in [
    ("optim.lr=inf", "optim.lr=inf"),
    ("trainer.grad_clip=inf", "trainer.grad_clip=inf"),
    ("schedule.gamma=inf", "schedule.gamma=inf"),
    ("optim.weight_decay=nan", "optim.weight_decay=nan"),
    ("model.image_mean=[0.4,nan,0.4]", "model.image_mean=[0.4, nan, 0.4]"),
]:

    def _not_finite(ctx: Ctx, override: str = _override, shown: str = _shown):
        return ctx.train_args(override), [shown, "finite"]

    _not_finite.__name__ = f"value_not_finite_{_override.split('=')[0]}"
    case("train")(_not_finite)


@case("train")
def best_metric_that_no_evaluation_computes(ctx: Ctx):
    return ctx.train_args("trainer.best_metric=bbox/NOPE"), [
        "trainer.best_metric=bbox/NOPE",
        "bbox/AP50",
        "bbox/AP-<class>",
    ]


@case("train")
def best_metric_of_masks_for_faster_rcnn(ctx: Ctx):
    return ctx.train_args("trainer.best_metric=segm/AP"), ["trainer.best_metric=segm/AP", "model=mask_rcnn"]


@case("train")
def best_metric_of_a_class_the_data_does_not_have(ctx: Ctx):
    return ctx.train_args("trainer.best_metric=bbox/AP-hexagon"), ["bbox/AP-hexagon", "circle"]


@case("train")
def run_name_with_a_slash(ctx: Ctx):
    return ctx.train_args("run_name=a/b"), ["run_name='a/b'", "output_dir="]


@case("train")
def run_name_dot_dot(ctx: Ctx):
    return ctx.train_args("run_name=.."), ["run_name='..'"]


@case("train")
def device_that_is_not_one(ctx: Ctx):
    return ctx.train_args("device=gpu"), ["device='gpu'", "cuda:N"]


@case("train")
def device_cuda_without_cuda(ctx: Ctx):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    return ctx.train_args("device=cuda"), ["device=cuda", "device=cpu"]


@case("train")
def resume_a_directory_without_checkpoints(ctx: Ctx):
    (ctx.tmp / "empty_run").mkdir()
    return ctx.train_args(f"resume={ctx.tmp / 'empty_run'}"), [f"resume={ctx.tmp / 'empty_run'}", "no .pth file"]


@case("train")
def resume_and_overwrite_together(ctx: Ctx):
    return ctx.train_args(f"resume={ctx.run_dir}", "overwrite=true"), ["overwrite=true", "drop resume="]


@case("train")
def init_from_a_run_directory(ctx: Ctx):
    return ctx.train_args(f"init_from={ctx.run_dir}"), [f"init_from={ctx.run_dir}", str(ctx.last)]


@case("train")
def run_directory_locked_by_a_live_process(ctx: Ctx):
    from frcnn_train import rundir

    run_dir = ctx.tmp / "outputs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / rundir.LOCK_NAME).write_text(
        json.dumps(
            {  # this process: alive
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": rundir._process_start(os.getpid()),
            }
        )
    )
    return ctx.train_args(), [f"pid {os.getpid()}", str(run_dir)]


@case("predict")
def predict_out_is_an_existing_file(ctx: Ctx):
    image, out = _image(ctx), ctx.tmp / "config.yaml"
    out.write_text("keep me\n")
    return [str(ctx.last), str(image), "--out", str(out)], [f"--out {out} is a file"]


@case("predict")
def predict_out_through_a_file(ctx: Ctx):
    image, out = _image(ctx), ctx.tmp / "config.yaml"
    out.write_text("keep me\n")
    return [str(ctx.last), str(image), "--out", str(out / "preds")], [str(out / "preds"), f"the file {out}"]


@case("predict")
def predict_out_is_the_folder_of_the_images(ctx: Ctx):
    image = _image(ctx)  # its drawn copy, under the same name, would replace it
    return [str(ctx.last), str(image.parent), "--out", str(image.parent)], [f"--out {image.parent}", "replace"]


@case("predict")
def predict_a_directory_without_checkpoints(ctx: Ctx):
    (ctx.tmp / "empty_run").mkdir()
    return (
        [str(ctx.tmp / "empty_run"), str(_image(ctx)), "--out", str(ctx.tmp / "p")],
        [str(ctx.tmp / "empty_run"), "best.pth or last.pth"],
    )


@case("predict")
def predict_batch_size_zero(ctx: Ctx):
    return [str(ctx.last), str(_image(ctx)), "--out", str(ctx.tmp / "p"), "--batch-size", "0"], ["--batch-size 0"]


@case("evaluate")
def evaluate_out_through_a_file(ctx: Ctx):
    (ctx.tmp / "notes.txt").write_text("keep me\n")
    return [str(ctx.last), "--out", str(ctx.tmp / "notes.txt" / "d.json")], [f"the file {ctx.tmp / 'notes.txt'}"]


@case("evaluate")
def evaluate_a_directory_without_checkpoints(ctx: Ctx):
    (ctx.tmp / "empty_run").mkdir()
    return [str(ctx.tmp / "empty_run")], [str(ctx.tmp / "empty_run"), "best.pth or last.pth"]


@case("evaluate")
def evaluate_an_override_that_does_not_compose(ctx: Ctx):
    return [str(ctx.last), "trainer.batch_size=abc"], ["trainer.batch_size=abc", "Integer"]


@case("inspect")
def inspect_with_an_unknown_group_option(ctx: Ctx):
    return [str(ctx.last), "model=retinanet"], ["model/retinanet", "mask_rcnn"]


# -- issue 22: values argparse refuses, a renamed resume, edited checkpoints, export without data
for _threshold in ("-1", "nan", "inf", "2"):

    def _bad_threshold(ctx: Ctx, threshold: str = _threshold):
        return (
            [str(ctx.last), str(_image(ctx)), "--out", str(ctx.tmp / "p"), "--score-threshold", threshold],
            [f"argument --score-threshold: {threshold} is not a score", "from 0 to 1"],
        )

    _bad_threshold.__name__ = f"predict_score_threshold_{_threshold.lstrip('-')}"
    case("predict")(_bad_threshold)


@case("train")
def resume_with_another_run_name(ctx: Ctx):  # run_name=tiny (train_args) over the run in .../shared
    return ctx.train_args(f"resume={ctx.last}"), [
        f"continues the run in its own directory {ctx.run_dir}",
        "run_name=tiny cannot rename it",
        f"run_name=tiny init_from={ctx.last}",
    ]


@case("evaluate")
def evaluate_a_checkpoint_whose_config_was_edited(ctx: Ctx):
    path = _edited_checkpoint(ctx, _backbone_edited)
    return [str(path), "--out", str(ctx.tmp / "d.json")], [
        f"the config in {path} does not match its weights (model.backbone.name: resnet18_fpn -> resnet34_fpn;",
        "backbone.body.layer1.2: 12 tensors added",
        "edited after it was saved",
        "put back model.backbone.name=resnet18_fpn",
        "!frcnn_train version",
        "!use that version",
    ]


@case("train")
def resume_a_checkpoint_whose_config_was_edited(ctx: Ctx):
    path = _edited_checkpoint(ctx, _backbone_edited)
    return ctx.train_args(f"resume={path}"), [
        f"the config in {path} does not match its weights (model.backbone.name: resnet18_fpn -> resnet34_fpn;",
        "edited after it was saved",
        "put back model.backbone.name=resnet18_fpn",
        f"init_from={path}",
        "!use that version",
    ]


@case("train")
def resume_a_checkpoint_whose_config_holds_an_edited_bad_value(ctx: Ctx):
    path = _edited_checkpoint(ctx, lambda ckpt: ckpt["config"]["trainer"].update(epochs="many"))
    return ctx.train_args(f"resume={path}"), [
        f"{path} holds a config this version cannot read (trainer.epochs: Value 'many'",
        "the same frcnn_train 0.1.0 wrote it, so the config was edited since: fix that value in it",
        "!use the frcnn_train version",
    ]


@case("evaluate")
def evaluate_a_checkpoint_whose_config_holds_an_edited_bad_value(ctx: Ctx):  # before: an OmegaConf traceback
    path = _edited_checkpoint(ctx, lambda ckpt: ckpt["config"]["trainer"].update(epochs="many"))
    return [str(path), "--out", str(ctx.tmp / "d.json")], [
        f"{path} holds a config this version cannot read (trainer.epochs: Value 'many'",
        "fix that value in it",
    ]


@case("evaluate")
def evaluate_a_checkpoint_of_another_version_that_built_other_tensors(ctx: Ctx):
    def renamed_by_that_version(ckpt: dict) -> None:
        ckpt["versions"]["frcnn_train"] = "0.0.1"
        ckpt["model"]["roi_heads.box_head.fc6_renamed.weight"] = ckpt["model"].pop("roi_heads.box_head.fc6.weight")

    path = _edited_checkpoint(ctx, renamed_by_that_version)
    return [str(path)], [
        "does not match its weights",
        "roi_heads.box_head",
        "it was written by frcnn_train 0.0.1 (here: frcnn_train 0.1.0); use that version",
    ]


@case("export")
def export_with_an_override_it_does_not_take(ctx: Ctx):
    return [str(ctx.last), "device=cpu", "--format", "torchscript", "--out", str(ctx.tmp / "m.pt")], [
        "export cannot override device",
        "data= and data.*",
    ]


@case("export")
def export_checked_on_images_that_are_gone(ctx: Ctx):
    """A run trained on a dataset since moved: the message names overrides export takes, and the way without."""
    args = ctx.coco_args("trainer.max_steps=1", "run_name=gone")
    run(compose_config(args), overrides=args)
    root = ctx.coco()
    shutil.rmtree(root)  # (ctx.coco() would copy it again)
    last = ctx.tmp / "outputs" / "gone" / "last.pth"
    return [str(last), "--format", "torchscript", "--out", str(ctx.tmp / "m.pt"), "--check-images", "1"], [
        f"data.train_images: image directory {root / 'train'} does not exist",
        "data overrides",
        "--check-images 0 to export from the checkpoint alone",
    ]


@case("train")
def coco_every_training_annotation_a_crowd(ctx: Ctx):
    args, ann = ctx.coco_args(), ctx.coco() / "instances_train.json"
    _edit_json(ann, lambda data: [a.update(iscrowd=1) for a in data["annotations"]])
    total = len(json.loads(ann.read_text())["annotations"])
    return args, [
        f"data.train_ann: {ann} gives an empty training split: all {total} annotations are unusable "
        f"({total} crowd regions)",
        "crowd region (iscrowd=1) only marks an area evaluation ignores, so "
        "annotate the objects one by one with iscrowd=0",
        "!skip_empty",
    ]


@case("train")
def coco_every_training_object_a_crowd_or_a_short_polygon(ctx: Ctx):
    args, ann = ctx.coco_args("model=mask_rcnn"), ctx.coco() / "instances_train.json"

    def spoil(data: dict) -> None:
        for i, annotation in enumerate(data["annotations"]):
            if i < 3:
                annotation["segmentation"] = [[1.0, 1.0, 10.0, 10.0]]  # 2 points
            else:
                annotation["iscrowd"] = 1

    _edit_json(ann, spoil)
    total = len(json.loads(ann.read_text())["annotations"])
    return args, [
        f"all {total} annotations are unusable ({total - 3} crowd regions",
        "3 objects without a polygon of 3 or more points)",
        "iscrowd=0",
        "give the objects polygons of 3 or more points",
        "!skip_empty",
    ]


# -- datasets
@case("train")
def coco_root_missing(ctx: Ctx):
    return ctx.train_args("data=coco", f"data.root={ctx.tmp / 'nowhere'}"), [str(ctx.tmp / "nowhere"), "data."]


@case("train")
def coco_invalid_json(ctx: Ctx):
    args = ctx.coco_args()
    (ctx.coco() / "instances_train.json").write_text('{"images": [')
    return args, ["data.train_ann", str(ctx.coco() / "instances_train.json"), "not valid JSON"]


@case("train")
def coco_unknown_category_id(ctx: Ctx):
    args, ann = ctx.coco_args(), ctx.coco() / "instances_val.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 99
    ann.write_text(json.dumps(data))
    return args, ["data.val_ann", str(ann), "category_id 99"]


@case("train")
def coco_annotation_file_missing(ctx: Ctx):
    args = ctx.coco_args()
    (ctx.coco() / "instances_train.json").unlink()
    return args, ["data.train_ann", str(ctx.coco() / "instances_train.json"), "does not exist"]


@case("train")
def coco_image_missing(ctx: Ctx):
    args = ctx.coco_args()
    (ctx.coco() / "val" / "000002.png").unlink()
    return args, ["data.val_images", "000002.png", "missing"]


@case("train")
def coco_truncated_train_image(ctx: Ctx):
    args = ctx.coco_args("trainer.max_steps=1", "data.num_workers=0")
    for image in (ctx.coco() / "train").iterdir():  # whichever comes first in the shuffled order
        _truncate(image)
    return args, ["data.train_images=", str(ctx.coco() / "train"), "truncated or corrupt", "data.bad_images=skip"]


@case("train-process")
def coco_truncated_image_in_a_worker(ctx: Ctx):
    """Raised in a DataLoader worker: still one sentence, and the process exits (workers included)."""
    args = ctx.coco_args("trainer.max_steps=1", "data.num_workers=2")
    for image in (ctx.coco() / "train").iterdir():
        _truncate(image)
    return args, ["data.train_images=", str(ctx.coco() / "train"), "truncated or corrupt"]


@case("train")
def coco_corrupt_val_image(ctx: Ctx):
    # The val split is read at the end of the epoch: after the 4 steps (saved first, see test_resume).
    args = ctx.coco_args("trainer.max_steps=null", "trainer.epochs=1", "trainer.batch_size=4")
    for image in (ctx.coco() / "val").iterdir():
        image.write_bytes(os.urandom(300))
    return args, ["data.val_images=", str(ctx.coco() / "val"), "truncated or corrupt"]


@case("train")
def coco_nan_in_a_bbox(ctx: Ctx):
    """Before: training stopped at step 1-2 blaming the learning rate (issue 18, item 8)."""
    args, ann = ctx.coco_args(), ctx.coco() / "instances_train.json"
    _edit_json(ann, lambda data: data["annotations"][2].update(bbox=[3.0, float("nan"), 10.0, 12.0]))
    return args, ["data.train_ann", str(ann), "annotation id 3", "not a finite number"]


@case("train")
def coco_32_bit_float_images_outside_0_1(ctx: Ctx):
    """No scale to assume (issue 18, item 4): before, convert("RGB") clipped them without a word."""
    args = ctx.coco_args()
    _convert_train_images(ctx, lambda im: (Image.fromarray(np.asarray(im.convert("L"), np.float32)), ".tif", {}))
    return args, [str(ctx.coco() / "train"), "32-bit float values", "outside [0, 1]", "convert the images"]


@case("train")
def coco_exif_photo_whose_size_matches_neither_way(ctx: Ctx):
    """Before, the message named the JSON's width/height alone (issue 18, item 10)."""
    args = ctx.coco_args()
    _exif_rotated_train_images(ctx, json_says_displayed=False)
    return args, ["is 48x64 pixels (64x48 after its EXIF orientation 6)", "says 64x64", "'width'/'height'"]


@case("train")
def voc_class_not_in_data_classes(ctx: Ctx):
    root = _voc(ctx)
    return (
        ctx.train_args("data=voc", f"data.root={root}", "data.classes=[dog,cat]"),
        [str(root / "Annotations" / "b.xml"), "'zebra'", "data.classes"],
    )


@case("train")
def voc_root_missing(ctx: Ctx):
    return ctx.train_args("data=voc", f"data.root={ctx.tmp / 'VOCdevkit'}"), [str(ctx.tmp / "VOCdevkit")]


# -- resume, init_from, weights
@case("train")
def resume_with_a_changed_key(ctx: Ctx):
    return ctx.train_args(f"resume={ctx.run_dir}", "model.box_head_dim=64"), [
        "model.box_head_dim (checkpoint 32, requested 64)",
        "init_from=",
    ]


@case("train")
def resume_truncated_checkpoint(ctx: Ctx):
    path = ctx.truncated_copy(ctx.last)
    return ctx.train_args(f"resume={path}"), [str(path), "truncated"]


@case("train")
def resume_missing_file(ctx: Ctx):
    return ctx.train_args(f"resume={ctx.tmp / 'lsat.pth'}"), [str(ctx.tmp / "lsat.pth"), "does not exist"]


@case("train")
def resume_a_pickle_that_runs_code(ctx: Ctx):
    path = ctx.evil_pickle()
    return ctx.train_args(f"resume={path}"), [
        str(path),
        "posix.system" if os.name == "posix" else ".system",
        "code that would run",
    ]


@case("train")
def init_from_missing_file(ctx: Ctx):
    return ctx.train_args(f"init_from={ctx.tmp / 'w.pth'}"), [f"init_from={ctx.tmp / 'w.pth'}", "does not exist"]


@case("train-process")
def init_from_a_pickle_that_runs_code(ctx: Ctx):
    path = ctx.evil_pickle()
    return ctx.train_args(f"init_from={path}"), [str(path), ".system", "init.trust=true loads it and runs that code"]


@case("train")
def init_from_a_truncated_file(ctx: Ctx):
    path = ctx.truncated_copy(ctx.last)
    return ctx.train_args(f"init_from={path}"), [str(path), "truncated"]


@case("train")
def backbone_weights_missing(ctx: Ctx):
    path = ctx.tmp / "r18.pth"
    return ctx.train_args(f"model.backbone.weights={path}"), [f"model.backbone.weights={path}", "does not exist"]


@case("train")
def backbone_weights_of_another_network(ctx: Ctx):
    from torchvision.models import mobilenet_v2

    path = ctx.tmp / "mobilenet.pth"
    torch.save(mobilenet_v2(weights=None).state_dict(), path)
    return ctx.train_args(f"model.backbone.weights={path}"), ["model.backbone.weights", str(path), "resnet18"]


@case("train")
def device_without_cuda(ctx: Ctx):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    return ctx.train_args("device=cuda:7"), ["device=cuda:7", "device=cpu"]


# -- evaluate, predict, inspect
@case("evaluate")
def evaluate_truncated_checkpoint(ctx: Ctx):
    path = ctx.truncated_copy(ctx.last)
    return [str(path)], [str(path), "truncated"]


@case("evaluate")
def evaluate_overrides_the_model(ctx: Ctx):
    return [str(ctx.last), "model.box_head_dim=64"], ["model.box_head_dim", "cannot be overridden"]


@case("evaluate")
def evaluate_batch_size_zero(ctx: Ctx):
    return [str(ctx.last), "trainer.batch_size=0"], ["trainer.batch_size=0", ">= 1"]


@case("evaluate")
def evaluate_on_a_missing_dataset(ctx: Ctx):
    return [str(ctx.last), "data=coco", f"data.root={ctx.tmp / 'nowhere'}"], [str(ctx.tmp / "nowhere")]


@case("predict")
def predict_a_corrupt_image(ctx: Ctx):
    image = ctx.tmp / "photo.jpg"
    image.write_bytes(b"\xff\xd8\xff" + os.urandom(200))
    return [str(ctx.last), str(image), "--out", str(ctx.tmp / "preds")], [str(image), "could not be decoded"]


@case("predict")
def predict_a_missing_input(ctx: Ctx):
    return [str(ctx.last), str(ctx.tmp / "nope.jpg"), "--out", str(ctx.tmp / "p")], [str(ctx.tmp / "nope.jpg")]


@case("inspect")
def inspect_missing_file(ctx: Ctx):
    return [str(ctx.tmp / "x.pth")], [str(ctx.tmp / "x.pth"), "does not exist"]


@case("inspect")
def inspect_truncated_checkpoint(ctx: Ctx):
    path = ctx.truncated_copy(ctx.last)
    return [str(path)], [str(path), "truncated"]


@case("inspect")
def inspect_a_pickle_that_runs_code(ctx: Ctx):
    path = ctx.evil_pickle()
    return [str(path)], [str(path), ".system", "code that would run"]


# ---------------------------------------------------------------- odd but valid inputs
# name -> (CLI, prepare(ctx) -> (argv, strings the output or log must contain)). Inputs that look wrong
# but are valid: the command must succeed (exit 0, no traceback), say what it did where it did
# something, and leave the shared run and dataset as they were.
ACCEPTED: dict[str, tuple[str, Case]] = {}


def accepted(cli: str) -> Callable[[Case], Case]:
    def register(prepare: Case) -> Case:
        ACCEPTED[prepare.__name__] = (cli, prepare)
        return prepare

    return register


# -- the command line and the config (issue 18)
@accepted("train")
def seed_negative(ctx: Ctx):  # any integer is a fixed seed (detectron2 reads a negative one as "random")
    return ctx.train_args("seed=-1"), []


@accepted("train")
def seed_beyond_32_bits(ctx: Ctx):  # numpy's global generator takes 32 bits only
    return ctx.train_args(f"seed={2**40}"), []


@accepted("train")
def numbers_written_as_strings_and_floats(ctx: Ctx):
    return ctx.train_args("trainer.epochs='1'", "optim.lr=1e-2", "schedule.gamma=1", "trainer.max_steps=null"), []


@accepted("train")
def unicode_and_spaces_in_quoted_paths(ctx: Ctx):
    return ctx.train_args(f"output_dir='{ctx.tmp / 'läufe mit leerzeichen'}/'", "run_name='lauf ü 1'"), [
        str(ctx.tmp / "läufe mit leerzeichen" / "lauf ü 1")
    ]


@accepted("train")
def overwrite_true_twice(ctx: Ctx):
    args = ctx.train_args("trainer.max_steps=1", "overwrite=true")
    run(compose_config(args), overrides=args)  # the first: nothing to move aside yet
    return args, ["overwrite=true: moved the previous run"]


@accepted("train")
def a_stale_lock(ctx: Ctx):
    from frcnn_train import rundir

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run_dir = ctx.tmp / "outputs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / rundir.LOCK_NAME).write_text(
        json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(), "started": "1"})
    )
    return ctx.train_args("trainer.max_steps=1"), ["Took over the stale lock"]


@accepted("train")
def resume_auto_with_nothing_to_resume(ctx: Ctx):
    return ctx.train_args("trainer.max_steps=1", "resume=auto"), ["resume=auto: no checkpoint in"]


@accepted("train")
def best_metric_of_one_class(ctx: Ctx):
    return ctx.train_args("trainer.best_metric=bbox/AP-circle", "trainer.max_steps=null"), ["best bbox/AP-circle = "]


@accepted("train")
def resume_repeating_the_command_that_started_the_run(ctx: Ctx):
    args = ctx.train_args("trainer.max_steps=1", "model/attention=se")
    summary = run(compose_config(args), overrides=args)
    return [*args, f"resume={summary['run_dir']}", "trainer.max_steps=2"], ["trainer.max_steps: 1 -> 2"]


@accepted("train")
def output_dir_through_a_symlink(ctx: Ctx):
    (ctx.tmp / "real").mkdir()
    (ctx.tmp / "linked").symlink_to(ctx.tmp / "real")
    return ctx.train_args("trainer.max_steps=1", f"output_dir={ctx.tmp / 'linked'}"), [str(ctx.tmp / "linked")]


@accepted("evaluate")
def evaluate_with_the_overrides_it_allows(ctx: Ctx):
    return [
        str(ctx.last),
        "device=cpu",
        "trainer.batch_size=1",
        "data.num_workers=0",
        "--out",
        str(ctx.tmp / "d.json"),
    ], [str(ctx.tmp / "d.json")]


@accepted("predict")
def predict_a_run_directory(ctx: Ctx):  # as evaluate takes one: best.pth, else last.pth
    return [str(ctx.run_dir), str(_image(ctx)), "--out", str(ctx.tmp / "preds")], ["predictions.json"]


@accepted("predict")
def predict_unicode_names_and_capital_suffixes(ctx: Ctx):
    _image(ctx, "bild ü 1.PNG"), _image(ctx, "zweites bild.png")
    (ctx.tmp / "images" / "notes.txt").write_text("not an image, left alone\n")
    return [str(ctx.last), str(ctx.tmp / "images"), "--out", str(ctx.tmp / "vorhersagen ü")], ["predictions.json"]


@accepted("evaluate")
def evaluate_a_run_directory(ctx: Ctx):  # and --out an existing directory: the results get their default name
    (ctx.tmp / "results").mkdir()
    return [str(ctx.run_dir), "--out", str(ctx.tmp / "results")], [str(ctx.tmp / "results" / "detections_last.json")]


@accepted("inspect")
def inspect_a_run_directory(ctx: Ctx):
    return [str(ctx.run_dir)], ["last.pth"]


@accepted("train")
def coco_grayscale_training_image(ctx: Ctx):
    image = sorted((ctx.coco() / "train").iterdir())[0]
    Image.open(image).convert("L").save(image)
    return ctx.coco_args(), []


@accepted("train")
def coco_16_bit_png_training_images(ctx: Ctx):
    """Microscopy's 16-bit PNGs: scaled, not clipped to white, and said once (issue 18, item 4)."""
    args = ctx.coco_args()
    _convert_train_images(ctx, lambda im: (Image.fromarray(np.asarray(im.convert("L"), np.uint16) * 150), ".png", {}))
    return args, ["16-bit images (first: ", "scaled to [0, 1] by dividing by 65535 (not clipped)"]


@accepted("train")
def coco_polygon_of_two_points_under_mask_rcnn(ctx: Ctx):
    """pycocotools would read [x1, y1, x2, y2] as a box and train a rectangle mask (issue 18, item 6)."""
    args = ctx.coco_args("model=mask_rcnn")
    _edit_json(
        ctx.coco() / "instances_train.json",
        lambda data: data["annotations"][1].update(segmentation=[[1.0, 1.0, 10.0, 10.0]]),
    )
    return args, [
        "left out 1 annotation(s)' polygons of fewer than 3 points (first: annotation id 2)",
        "dropped 1 object(s) left without a polygon",
    ]


@accepted("train")
def coco_exif_rotated_photos_annotated_as_displayed(ctx: Ctx):
    """Phone photos whose JSON gives the displayed size: turned as annotation tools show them (issue 18, item 10)."""
    args = ctx.coco_args()
    _exif_rotated_train_images(ctx, json_says_displayed=True)
    return args, ["whose EXIF orientation turns them to the width/height the annotations give", "orientation 6"]


@accepted("train")
def coco_rgba_training_images(ctx: Ctx):
    args = ctx.coco_args()
    _convert_train_images(ctx, lambda im: (im.convert("RGBA"), ".png", {}))
    return args, []


@accepted("train")
def coco_palette_training_images(ctx: Ctx):
    args = ctx.coco_args()
    _convert_train_images(ctx, lambda im: (im.convert("P", palette=Image.Palette.ADAPTIVE), ".png", {}))
    return args, []


@accepted("train")
def coco_cmyk_jpeg_training_images(ctx: Ctx):
    args = ctx.coco_args()
    _convert_train_images(ctx, lambda im: (im.convert("CMYK"), ".jpg", {"quality": 95}))
    return args, []


@accepted("train")
def coco_non_contiguous_category_ids(ctx: Ctx):
    args = ctx.coco_args()

    def spread(data: dict) -> None:  # ids 1..5 become 10, 20, ..., 50 (labels stay contiguous inside)
        for category in data["categories"]:
            category["id"] *= 10
        for annotation in data["annotations"]:
            annotation["category_id"] *= 10

    for split in ("train", "val"):
        _edit_json(ctx.coco() / f"instances_{split}.json", spread)
    return args, []


@accepted("train")
def coco_boxes_outside_the_image(ctx: Ctx):
    args, ann = ctx.coco_args(), ctx.coco() / "instances_train.json"
    _edit_json(ann, lambda data: data["annotations"][0].update(bbox=[-5.0, 50.0, 30.0, 40.0]))
    return args, [f"{ann}: clipped 1 box(es) that extended outside their image"]


@accepted("train")
def coco_crowd_regions_as_rle_under_mask_rcnn(ctx: Ctx):
    from pycocotools import mask as mask_utils

    args = ctx.coco_args("model=mask_rcnn")

    def crowd(data: dict) -> None:
        region = np.zeros((64, 64), dtype=np.uint8, order="F")
        region[40:60, 2:30] = 1
        rle = mask_utils.encode(region)
        data["annotations"].append(
            {
                "id": 999,
                "image_id": data["images"][0]["id"],
                "category_id": 1,
                "iscrowd": 1,
                "bbox": [2.0, 40.0, 28.0, 20.0],
                "area": float(region.sum()),
                "segmentation": {"size": [64, 64], "counts": rle["counts"].decode("ascii")},
            }
        )

    for split in ("train", "val"):
        _edit_json(ctx.coco() / f"instances_{split}.json", crowd)
    return args, []


@accepted("train")
def coco_unicode_and_space_file_names(ctx: Ctx):
    args, root = ctx.coco_args(), ctx.coco()
    for split in ("train", "val"):

        def rename(data: dict, split: str = split) -> None:
            for image in data["images"]:
                new = f"Bild {image['id']} – Zürich ü.png"
                (root / split / image["file_name"]).rename(root / split / new)
                image["file_name"] = new

        _edit_json(root / f"instances_{split}.json", rename)
    return args, []


@accepted("train")
def coco_symlinked_image_folders(ctx: Ctx):
    args, root = ctx.coco_args(), ctx.coco()
    for split in ("train", "val"):
        (root / split).rename(ctx.tmp / f"elsewhere_{split}")
        (root / split).symlink_to(ctx.tmp / f"elsewhere_{split}", target_is_directory=True)
    return args, []


# -- issue 22
@accepted("train-process")
def num_workers_as_a_quoted_number(ctx: Ctx):  # Hydra leaves '2' a string: read as 2 workers
    return ctx.train_args("data.num_workers='2'", "trainer.max_steps=1"), []


@accepted("train")
def ema_every_beyond_the_runs_steps(ctx: Ctx):
    return ctx.train_args("trainer.ema.decay=0.9", "trainer.ema.every=5"), [
        "trainer.ema.every=5 is larger than this run's last step (2), so the EMA would never update",
        "set trainer.ema.every to at most 2 or trainer.ema.decay=null",
    ]


@accepted("evaluate")
def evaluate_a_checkpoint_whose_ema_never_updated(ctx: Ctx):
    path = _edited_checkpoint(ctx, _ema_never_updated)
    return [str(path), "--out", str(ctx.tmp / "d.json")], [
        "the trained weights are used: the checkpoint's EMA was never updated (trainer.ema.every=1000, 1 steps "
        "trained)",
        "weights: the trained weights",
    ]


@accepted("predict")
def predict_with_a_checkpoint_whose_ema_never_updated(ctx: Ctx):
    path = _edited_checkpoint(ctx, _ema_never_updated)
    return [str(path), str(_image(ctx)), "--out", str(ctx.tmp / "p")], ["the checkpoint's EMA was never updated"]


@accepted("export")
def export_with_a_checkpoint_whose_ema_never_updated(ctx: Ctx):
    path = _edited_checkpoint(ctx, _ema_never_updated)
    return [str(path), "--format", "torchscript", "--out", str(ctx.tmp / "m.pt"), "--check-images", "0"], [
        "the checkpoint's EMA was never updated",
        "the trained (raw) weights",
    ]


@accepted("export")
def export_from_the_checkpoint_alone(ctx: Ctx):
    """--check-images 0: no data read, so a run whose dataset has gone still exports (issue 22, item 19)."""
    args = ctx.coco_args("trainer.max_steps=1", "run_name=gone")
    run(compose_config(args), overrides=args)
    shutil.rmtree(ctx.coco())
    return [
        str(ctx.tmp / "outputs" / "gone" / "last.pth"),
        "--format",
        "onnx",
        "--out",
        str(ctx.tmp / "m.onnx"),
        "--check-images",
        "0",
    ], ["not checked (--check-images 0): traced on a synthetic 64x64 image, no data read"]


@accepted("export")
def export_checked_on_moved_images_named_by_an_override(ctx: Ctx):
    args = ctx.coco_args("trainer.max_steps=1", "run_name=moved")
    run(compose_config(args), overrides=args)
    moved = ctx.coco().rename(ctx.tmp / "moved_coco")
    return [
        str(ctx.tmp / "outputs" / "moved" / "last.pth"),
        f"data.root={moved}",
        "--format",
        "torchscript",
        "--out",
        str(ctx.tmp / "m.pt"),
        "--check-images",
        "1",
    ], ["check against the PyTorch model", "passed"]


@accepted("predict")
def predict_tiff_and_webp_images(ctx: Ctx):  # what training reads (data.decode.IMAGE_SUFFIXES)
    folder = ctx.tmp / "scans"
    folder.mkdir()
    grey = np.full((48, 64), 30000, dtype=np.uint16)
    Image.fromarray(grey).save(folder / "deep.tif")  # 16-bit, as microscopes write them
    Image.fromarray(np.full((48, 64, 3), 127, dtype=np.uint8)).save(folder / "flat.TIFF")
    Image.fromarray(np.full((48, 64, 3), 90, dtype=np.uint8)).save(folder / "web.webp")
    return [str(ctx.last), str(folder), "--out", str(ctx.tmp / "p")], ["drawn images and predictions.json"]


@accepted("inspect")
def inspect_a_checkpoint_whose_config_was_edited(ctx: Ctx):
    path = _edited_checkpoint(ctx, _backbone_edited)
    return [str(path)], [
        "config does not match the weights (model.backbone.name: resnet18_fpn -> resnet34_fpn; "
        "backbone.body.layer1.2: 12 tensors added",
        "!complete",
    ]


@accepted("inspect")
def inspect_our_onnx_export(ctx: Ctx):
    if importlib.util.find_spec("onnx") is None:
        pytest.skip("onnx (the export extra) is not installed")
    return [str(_export(ctx, "onnx", "model.onnx"))], [
        "(ONNX, written by frcnn-export)",
        "classes       5: circle, square, triangle, star, ellipse",
        "fingerprint   " + torch.load(ctx.last, weights_only=True)["architecture"]["fingerprint"],
        "weights       the trained (raw) weights",
        "version       0.1.0",
        "opset         ai.onnx 17",
    ]


@accepted("inspect")
def inspect_our_torchscript_export(ctx: Ctx):
    return [str(_export(ctx, "torchscript", "model.torchscript.pt"))], [
        "(TorchScript, written by frcnn-export)",
        "classes       5: circle",
        "weights       the trained (raw) weights",
        "input_size    64x64",
        "extra files   frcnn_train.json",
    ]


@accepted("inspect")
def inspect_a_foreign_onnx_file(ctx: Ctx):
    if importlib.util.find_spec("onnx") is None:
        pytest.skip("onnx (the export extra) is not installed")
    path = ctx.tmp / "linear.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated, and what many files came from
        torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), str(path), dynamo=False)
    return [str(path)], ["(ONNX, not written by frcnn-export)", "none from frcnn_train", "producer      pytorch"]


@accepted("inspect")
def inspect_a_foreign_torchscript_file(ctx: Ctx):
    path = ctx.tmp / "linear.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, and still what people have
        torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(path))
    return [str(path)], ["(TorchScript, not written by frcnn-export)", "none from frcnn_train"]


# ---------------------------------------------------------------- running them
@pytest.fixture(scope="module")
def shared(tiny_runs, shapes_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny trained run (1 step) and a COCO-layout dataset, shared by every case."""
    from frcnn_train.data import build_datasets

    run_dir = tiny_runs("shared", "trainer.max_steps=1")
    data_cfg = compose_config(tiny_overrides(shapes_cache, tmp_path_factory.mktemp("unused"))).data
    source = build_datasets(data_cfg, with_masks=False).train.images_dir.parent
    coco = tmp_path_factory.mktemp("coco_source") / "coco"
    shutil.copytree(source, coco)
    return {"run_dir": run_dir, "shapes": shapes_cache, "coco": coco}


def _snapshot(*roots: Path) -> dict[Path, str]:
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        if root.exists()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run_cli(cli: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    if cli == "train-process":
        proc = subprocess.run(
            [sys.executable, "-m", "frcnn_train.train", *argv],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "PYTHONPATH": python_path()},
        )
        return proc.returncode, proc.stdout + proc.stderr
    if cli == "train":  # what train.py's main does, without Hydra's command-line parsing
        try:
            run(compose_config(argv), overrides=argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            code = 2
        else:
            code = 0
    else:
        main = {"evaluate": evaluate.main, "predict": predict.main, "inspect": inspect.main, "export": export.main}[cli]
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's refusal: usage, then "<prog>: error: ..."
            code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_sentence_and_touches_nothing(name: str, shared, tmp_path: Path, capsys) -> None:
    cli, prepare = CASES[name]
    ctx = Ctx(tmp=tmp_path, run_dir=shared["run_dir"], shapes=shared["shapes"], coco_source=shared["coco"])
    argv, expected = prepare(ctx)
    roots = (tmp_path, shared["run_dir"], shared["coco"])
    before = _snapshot(*roots)
    code, output = _run_cli(cli, argv, capsys)
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error") or ": error: " in line]
    assert len(errors) == 1, output
    message = errors[0]
    for text in expected:  # "!text": must not be said
        if text.startswith("!"):
            assert text[1:] not in message, f"{text[1:]!r} in {message!r}"
        else:
            assert text in message, f"{text!r} not in {message!r}"
    after = _snapshot(*roots)
    changed = [str(p) for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"files changed or removed: {changed}"
    assert not (tmp_path / "it_ran").exists(), "a pickled command was executed"


def test_inspect_into_a_closed_pipe_exits_quietly(shared, tmp_path: Path) -> None:
    """`inspect x.pth | head`: the reader goes away before the output is written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "frcnn_train.inspect", str(shared["run_dir"] / "last.pth"), "--keys"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": python_path()},
    )
    proc.stdout.close()  # as `head` does after its lines; here before the first one, so every write fails
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr, stderr


def test_bad_images_skip_trains_on_and_counts_them(shared, tmp_path: Path, caplog) -> None:
    """data.bad_images=skip: the damaged image is left out of its batch, named, and counted per epoch."""
    ctx = Ctx(tmp=tmp_path, run_dir=shared["run_dir"], shapes=shared["shapes"], coco_source=shared["coco"])
    args = ctx.coco_args("trainer.max_steps=null", "trainer.epochs=1", "data.bad_images=skip", "trainer.eval_every=0")
    bad = sorted((ctx.coco() / "train").iterdir())[0]
    _truncate(bad)
    caplog.set_level("WARNING", logger="frcnn_train")
    summary = run(compose_config(args), overrides=args)
    assert summary["completed"] and summary["global_step"] == 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith(f"data.bad_images=skip: skipped {bad}, which does not decode") for m in messages) == 1
    assert "epoch 1: data.bad_images=skip left out 1 bad image(s), named above." in messages


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_odd_but_valid_input_is_handled(name: str, shared, tmp_path: Path, capsys, caplog) -> None:
    cli, prepare = ACCEPTED[name]
    ctx = Ctx(tmp=tmp_path, run_dir=shared["run_dir"], shapes=shared["shapes"], coco_source=shared["coco"])
    argv, expected = prepare(ctx)
    roots = (shared["run_dir"], shared["coco"])
    before = _snapshot(*roots)
    caplog.set_level("INFO", logger="frcnn_train")
    code, output = _run_cli(cli, argv, capsys)
    output += "\n".join(r.getMessage() for r in caplog.records)
    assert code == 0, output
    assert "Traceback" not in output, output
    for text in expected:  # "!text": must not be said
        if text.startswith("!"):
            assert text[1:] not in output, f"{text[1:]!r} in the output"
        else:
            assert text in output, f"{text!r} not in the output"
    after = _snapshot(*roots)
    assert before == after, "the shared run or dataset changed"


def test_predict_gives_every_drawn_image_its_own_name(shared, tmp_path: Path, capsys) -> None:
    """Two folders with a.png, one also with a real a_1.png: the second a.png may not land on a_1.png (issue 22,
    item 8). Told apart by size, every drawn image is its input's, and predictions.json maps each to it."""
    ctx = Ctx(tmp=tmp_path, run_dir=shared["run_dir"], shapes=shared["shapes"], coco_source=shared["coco"])
    sizes = {"one/a.png": (40, 56), "two/a.png": (48, 64), "two/a_1.png": (32, 48), "two/A.png": (56, 40)}
    inputs = _images_of_sizes(ctx, sizes)
    before = _snapshot(tmp_path, shared["run_dir"])
    out = tmp_path / "preds"
    code, output = _run_cli(
        "predict",
        [str(ctx.last), str(tmp_path / "one"), str(tmp_path / "two"), "--out", str(out), "--score-threshold", "0"],
        capsys,
    )
    assert code == 0, output
    assert before == {p: d for p, d in _snapshot(tmp_path, shared["run_dir"]).items() if out not in p.parents}
    drawn = {p.name: Image.open(p).size for p in out.iterdir() if p.suffix == ".png"}
    assert len(drawn) == len(inputs), drawn  # none lost
    results = json.loads((out / "predictions.json").read_text())
    mapping = {r["file_name"]: r["drawn"] for r in results}
    assert set(mapping) == {str(p) for p in inputs}  # --score-threshold 0: every image has detections
    assert len(set(mapping.values())) == len(inputs)
    for path in inputs:
        height, width = sizes[str(path.relative_to(tmp_path))]
        assert drawn[mapping[str(path)]] == (width, height), path
    assert mapping[str(tmp_path / "two" / "a_1.png")] == "a_1.png"  # a real name is never given away
    assert "drawn under a free name" in output
