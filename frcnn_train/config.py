"""Structured-config schema for every key of `configs/train.yaml`.

Hydra merges the YAML groups into these dataclasses, so a misspelled key or a
wrong type fails at start with Hydra's own message, before any work is done.
Only builders read these objects; modules and the Trainer take plain arguments.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from frcnn_train.errors import ConfigError


def _find_config_dir() -> str:
    """configs/ inside the installed package (a wheel), else beside it (a source checkout or editable install)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(
        f"frcnn_train's configs/ is missing (looked in {package} and {package.parent}); reinstall frcnn_train"
    )


CONFIG_DIR = _find_config_dir()


@dataclass
class BackboneConfig:
    """The feature extractor and its FPN (group `model/backbone`)."""

    # resnet18_fpn, resnet34_fpn, resnet50_fpn, resnet101_fpn, mobilenet_v2_fpn, mobilenet_v3_fpn
    name: str = "resnet50_fpn"
    # ImageNet weights: a name of the backbone's torchvision weights enum (IMAGENET1K_V1, IMAGENET1K_V2,
    # DEFAULT; fetched once into torch's hub cache, frcnn_train/zoo.py), or a local file in torchvision's naming.
    weights: str | None = None
    # How many stages (counted from the top) train; the rest are frozen. None: all.
    trainable_layers: int | None = None
    # auto: FrozenBatchNorm2d with pretrained weights (as torchvision does), BatchNorm2d from scratch
    # (SyncBatchNorm under DDP on CUDA). syncbn: SyncBatchNorm under DDP, BatchNorm2d on one process.
    norm: str = "auto"  # auto | frozen_bn | bn | syncbn
    # Backbone stages that feed the FPN; None: the torchvision default for the backbone.
    returned_layers: list[int] | None = None
    fpn_channels: int = 256  # channels of every FPN level


@dataclass
class AttentionConfig:
    """Attention blocks added to the detector (group `model/attention`; docs/attention.md)."""

    type: str = "none"  # none | se | cbam | eca | nonlocal
    # Where blocks go: backbone.<stage>, fpn.<level>, roi_heads.box, roi_heads.mask, or a group of
    # them: backbone, fpn, roi_heads, backbone.last.
    sites: list[str] = field(default_factory=list)
    reduction: int = 16  # SE / CBAM channel bottleneck
    kernel_size: int = 7  # CBAM spatial conv
    eca_kernel_size: int | None = None  # None: chosen from the channel count (ECA paper)
    inner_channels: int | None = None  # non-local; None: channels // 2
    heads: int = 1  # non-local
    # Per-site changes, e.g. {"fpn.p3": {"type": "cbam", "reduction": 8}}.
    overrides: dict[str, Any] = field(default_factory=dict)
    # Start every block as an identity mapping; None: on when backbone weights are loaded.
    identity_init: bool | None = None


@dataclass
class ModelConfig:
    """The detector (group `model`: faster_rcnn or mask_rcnn; sizes for a dataset in `preset`)."""

    arch: str = "faster_rcnn"  # faster_rcnn | mask_rcnn
    # Head layout as torchvision's builders name it: v1 (fasterrcnn_resnet50_fpn: one-conv RPN head, two-FC box
    # head, no norms outside the backbone) or v2 (the *_v2 builders: two-conv RPN head, BatchNorm in the FPN,
    # box head of box_head_convs 3x3 convs then one FC, BatchNorm in the mask head).
    version: str = "v1"
    # Object classes, background excluded (as in detectron2 / mmdetection). None: from the dataset.
    num_classes: int | None = None
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    min_size: int = 800  # the shorter image side is resized to this (torchvision's GeneralizedRCNNTransform)
    max_size: int = 1333  # the longer image side is kept at most this, which may shrink the shorter one
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # RGB, on the [0, 1] scale
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # RGB, on the [0, 1] scale
    # One base size per FPN level; if the count differs, every level gets all sizes.
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # anchor height / width
    rpn_pre_nms_top_n_train: int = 2000  # RPN proposals per level kept before NMS, training
    rpn_pre_nms_top_n_test: int = 1000  # RPN proposals per level kept before NMS, evaluation and prediction
    rpn_post_nms_top_n_train: int = 2000  # RPN proposals per image kept after NMS, training
    rpn_post_nms_top_n_test: int = 1000  # RPN proposals per image kept after NMS, evaluation and prediction
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    rpn_score_thresh: float = 0.0  # proposals scoring less are dropped (torchvision's MobileNet builders: 0.05)
    box_batch_size_per_image: int = 512  # proposals sampled per image for the box head's loss
    box_head_dim: int = 1024  # the box head's FC width (v1: both FC layers; v2: its one FC layer)
    box_head_convs: int = 4  # version v2 only: 3x3 conv layers before the FC layer
    box_head_conv_dim: int = 256  # version v2 only: their width
    box_score_thresh: float = 0.05  # detections scoring below this are dropped
    box_nms_thresh: float = 0.5  # IoU above which NMS suppresses a detection of the same class
    box_detections_per_img: int = 100  # at most this many detections per image
    mask_head_layers: int = 4  # mask_rcnn only: conv layers of the mask head
    mask_head_dim: int = 256  # mask_rcnn only: channels of the mask head's conv layers


@dataclass
class ShapesConfig:
    """The synthetic shapes dataset (data=shapes), generated once per setting and cached."""

    num_train: int = 400  # training images
    num_val: int = 60  # validation images
    image_size: int = 96  # square images of this many pixels
    max_objects: int = 4  # at most this many shapes per image
    seed: int = 0  # the generator's seed (not the training seed)


@dataclass
class DataConfig:
    """The dataset (group `data`: shapes, coco, voc; docs/data.md)."""

    name: str = "shapes"  # shapes | coco | voc
    root: str | None = None  # the dataset's directory (coco, voc); relative paths below are under it
    train_images: str | None = None  # coco: the training images' folder
    train_ann: str | None = None  # coco: the training instances JSON
    val_images: str | None = None  # coco: the validation images' folder
    val_ann: str | None = None  # coco: the validation instances JSON
    train_split: str = "train"  # voc: ImageSets/Main/<split>.txt of the training images
    val_split: str = "val"  # voc: the same for the validation images
    classes: list[str] | None = None  # voc: class names in label order; None: the 20 Pascal VOC classes
    skip_empty: bool = True  # drop training images without annotations
    # A truncated or undecodable image: error (stop, naming the file; last.pth saved first) or
    # skip (leave it out of its batch, with a warning naming it).
    bad_images: str = "error"
    # Micro-batches of images of similar width / height (torchvision's 8 aspect-ratio groups), so that less
    # padding is trained on; a set of one image shape keeps the ungrouped order. It sets the data order, so a
    # resume keeps the checkpoint's (runs from before this key resume with false).
    group_by_aspect_ratio: bool = True
    hflip_prob: float = 0.5  # probability of a horizontal flip of a training image
    # [min, max] random rescale factor applied before the model's own resize; None: off.
    scale_jitter: list[float] | None = None
    # Loader worker processes: a number, or auto (on CUDA min(8, usable CPUs // processes on the node), on the
    # CPU 0); frcnn_train.data.resolve_num_workers says why.
    num_workers: Any = "auto"
    # shapes: generated once into cache_dir and reused; None: $FRCNN_DATA_CACHE or ~/.cache/frcnn_train.
    cache_dir: str | None = None
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass
class ParamGroupRule:
    """One rule of optim.param_groups: the first rule whose match is found in a parameter's name decides."""

    # Regular expression searched in the parameter name, or one of the
    # shorthands backbone, fpn, rpn, roi_heads, attention.
    match: str = ""
    lr_mult: float = 1.0  # the group's LR is optim.lr times this
    weight_decay: float | None = None  # None: optim.weight_decay
    freeze: bool = False  # true: the parameters never train (and never reach the optimizer)


@dataclass
class OptimConfig:
    """The optimizer (group `optim`: sgd, adamw) and its parameter groups (docs/fine-tuning.md)."""

    name: str = "sgd"  # sgd | adamw
    lr: float = 0.01  # base learning rate, for a global batch of reference_batch images
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    weight_decay: float = 1e-4  # L2 penalty (adamw: decoupled weight decay)
    # optim.lr is the LR of a global batch (processes x trainer.batch_size x trainer.accumulate) of this
    # many images; another global batch scales it linearly (Goyal et al.; detectron2's REFERENCE_WORLD_SIZE).
    # null: optim.lr is used as it is, whatever the batch.
    reference_batch: int | None = 4
    # Norm weights and all biases get no weight decay (detectron2 / mmdetection default).
    no_decay_norm_and_bias: bool = True
    # Ordered rules giving parts of the model their own LR multiplier, weight decay, or freezing them.
    param_groups: list[ParamGroupRule] = field(default_factory=list)


@dataclass
class ScheduleConfig:
    """The learning-rate schedule (group `schedule`: multistep, cosine), after a linear warmup."""

    name: str = "multistep"  # multistep | cosine
    warmup_steps: int = 100  # optimizer steps of linear warmup; 0: none
    warmup_factor: float = 0.001  # the warmup starts at this fraction of the LR
    # multistep: epochs (fractions allowed) at which the LR is multiplied by gamma.
    milestones: list[float] = field(default_factory=lambda: [10, 13])
    gamma: float = 0.1  # multistep: the factor at each milestone
    # cosine: final LR as a fraction of the base LR.
    min_lr_factor: float = 0.0


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (docs/fine-tuning.md)."""

    # Exponential moving average of the weights (frcnn_train/ema.py); null: off. 0.9998 (Ultralytics) for
    # long runs; shorter runs want less (the default run: see docs/fine-tuning.md, "EMA of the weights").
    decay: float | None = None
    warmup_steps: int = 2000  # the decay ramps up as decay * (1 - exp(-updates / warmup_steps)); 0: no ramp
    every: int = 1  # optimizer steps between updates


@dataclass
class TrainerConfig:
    """The training loop: length, batch, precision, evaluation, checkpoints and logging."""

    epochs: int = 12  # passes over the training set
    batch_size: int = 2  # images per process and step
    amp: bool = False  # autocast: fp16 or bf16 on CUDA, bf16 on CPUs with AVX-512 (runtime.amp_dtype)
    amp_dtype: str = "fp16"  # fp16 | bf16
    grad_clip: float | None = None  # max total gradient norm
    accumulate: int = 1  # batches per optimizer step
    eval_every: int = 1  # epochs; 0: only at the end
    checkpoint_every_steps: int = 0  # 0: only at epoch ends
    keep_last: int = 3  # per-epoch checkpoint files kept; 0 keeps none
    max_steps: int | None = None  # stop (and save) after this many optimizer steps
    log_every: int = 20  # steps between TensorBoard scalar writes
    vis_images: int = 4  # validation images drawn into TensorBoard
    # Per-class PR curves and a confusion matrix at each evaluation: PNG under <run>/plots/ and TensorBoard.
    plots: bool = True
    # auto: on for CPU (bitwise resume), off on CUDA (cudnn.benchmark, TF32). true | false force it.
    # A string, so that old checkpoints' booleans still load (as "True" / "False").
    deterministic: str = "auto"
    progress: bool = True  # a progress bar per epoch on the console
    best_metric: str = "bbox/AP"  # validation metric that picks best.pth (higher is better)
    channels_last: bool = False  # NHWC convolutions (models/options.py)
    compile: bool = False  # torch.compile of backbone + FPN; checkpoints are unaffected
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class EvalConfig:
    # COCOeval's implementation: auto takes faster-coco-eval when installed (pip install 'frcnn_train[eval]'),
    # else pycocotools; both give the same AP (faster-coco-eval about 6x sooner on COCO val2017).
    backend: str = "auto"  # auto | pycocotools | faster_coco_eval


@dataclass
class InitConfig:
    """How init_from loads weights (docs/fine-tuning.md)."""

    # Ordered renames applied to init_from keys: {"from": "prefix or regex", "to": "..."}.
    remap: list[dict[str, str]] = field(default_factory=list)
    strict: bool = False  # any skipped, missing or unexpected tensor is an error
    trust: bool = False  # allow full unpickling of init_from files
    raw: bool = False  # of an frcnn_train checkpoint with EMA weights, take the trained ones instead


@dataclass
class TrainConfig:
    """The keys at the top of the config."""

    run_name: str = "${now:%Y-%m-%d_%H-%M-%S}"  # the run directory is output_dir/run_name
    output_dir: str = "outputs"  # where run directories (and sweeps' records) go
    seed: int = 42  # any integer; the same seed repeats the run
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    resume: str | None = None  # a checkpoint file, a run directory, or auto
    # A new run into a directory that holds a run moves the old one aside (to <run_name>.old-<time>).
    overwrite: bool = False
    init_from: str | None = None  # weights to start from (fine-tuning); never optimizer state or counters
    init: InitConfig = field(default_factory=InitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys a resume may change; any other difference from the checkpoint is refused.
# Data locations are here so a run can move machines; what they hold must not change.
MUTABLE_ON_RESUME = (
    "trainer.epochs",
    "trainer.max_steps",
    "device",
    "data.num_workers",
    "data.bad_images",  # a run stopped by a bad image may go on without it
    "data.root",
    "data.cache_dir",
    "trainer.log_every",
    "trainer.channels_last",
    "trainer.compile",
    "trainer.vis_images",
    "trainer.plots",
    "trainer.progress",
    "trainer.eval_every",
    "trainer.checkpoint_every_steps",
    "trainer.keep_last",
    "eval.backend",  # the same AP either way
    # Precision may change with the machine (a CPU run continued on a GPU); launch warns in one line.
    "trainer.amp",
    "trainer.amp_dtype",
)
# Keys that say how to start, not what to train; never compared on resume.
START_KEYS = ("resume", "run_name", "output_dir", "overwrite", "init_from", "init")


def _job_suffix() -> str:
    """ "_<job number>" inside a Hydra multirun, else "": the default run_name of each job differs."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return ""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return ""
    return f"_{hydra_cfg.job.num}"


def register_schema() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    OmegaConf.register_new_resolver("frcnn_job_suffix", _job_suffix, replace=True)


def with_schema(config: Any) -> DictConfig:
    """Validate a plain config (e.g. from a checkpoint) against the schema."""
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), config)


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose `configs/train.yaml` with overrides, inside or outside a Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=list(overrides))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# ---------------------------------------------------------------- values that cannot work
# inf passes `>= 0` and nan fails every comparison, so each rule asks for a finite number first.
def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


def _non_negative(v: Any) -> bool:
    return _number(v) and v >= 0


def _fraction(v: Any) -> bool:
    return _number(v) and 0 <= v <= 1


def _all(check: Any) -> Any:
    return lambda v: v is not None and len(v) > 0 and all(check(x) for x in v)


def _or_null(check: Any) -> Any:
    return lambda v: v is None or check(v)


def worker_count(value: Any) -> int | None:
    """data.num_workers as a whole number >= 0, or None. The key also takes `auto`, so its type is Any and
    Hydra leaves a quoted `data.num_workers='2'` a string: digits are read as the number they spell."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


# key -> (test, the valid range as the message says it). Types are the schema's job;
# these are values of the right type that would crash later or silently train nothing.
VALUE_RULES: dict[str, tuple[Any, str]] = {
    "trainer.epochs": (_positive, "a whole number >= 1"),
    "trainer.max_steps": (_or_null(_positive), "a whole number >= 1, or null for no limit"),
    "trainer.batch_size": (_positive, "a whole number >= 1 (images per process and step)"),
    "trainer.accumulate": (_positive, "a whole number >= 1 (1: no gradient accumulation)"),
    "trainer.keep_last": (_non_negative, "a whole number >= 0 (0 keeps no epoch files)"),
    "trainer.eval_every": (_non_negative, "a whole number >= 0 (0: evaluate only at the end)"),
    "trainer.checkpoint_every_steps": (_non_negative, "a whole number >= 0 (0: save only at epoch ends)"),
    "trainer.log_every": (_positive, "a whole number >= 1"),
    "trainer.vis_images": (_non_negative, "a whole number >= 0"),
    "trainer.grad_clip": (_or_null(_positive), "a number > 0, or null for no clipping"),
    "trainer.amp_dtype": (lambda v: v in ("fp16", "bf16"), "fp16 or bf16"),
    # 0 is allowed: it freezes every weight (tests and BatchNorm-statistics runs use it).
    "optim.lr": (_non_negative, "a number >= 0, e.g. 0.01"),
    "optim.weight_decay": (_non_negative, "a number >= 0"),
    "optim.momentum": (lambda v: _non_negative(v) and v < 1, "a number in [0, 1)"),
    "optim.betas": (
        lambda v: len(v) == 2 and all(_non_negative(b) and b < 1 for b in v),
        "two numbers in [0, 1), e.g. [0.9, 0.999]",
    ),
    "schedule.warmup_steps": (_non_negative, "a whole number >= 0 (0: no warmup)"),
    "schedule.warmup_factor": (lambda v: _positive(v) and v <= 1, "a number in (0, 1]"),
    "schedule.gamma": (_positive, "a number > 0"),
    "schedule.min_lr_factor": (_fraction, "a number in [0, 1]"),
    "schedule.milestones": (lambda v: all(_positive(m) for m in v), "epochs > 0"),
    "optim.reference_batch": (_or_null(_positive), "a whole number of images >= 1, or null to use optim.lr as it is"),
    "trainer.ema.decay": (
        _or_null(lambda v: _positive(v) and v < 1),
        "a number in (0, 1), e.g. 0.999, or null for no EMA",
    ),
    "trainer.ema.warmup_steps": (_non_negative, "a whole number >= 0 (0: the full decay from the first update)"),
    "trainer.ema.every": (_positive, "a whole number >= 1"),
    "model.num_classes": (_or_null(_positive), "a whole number >= 1 (background excluded), or null"),
    "model.min_size": (_positive, "a whole number of pixels >= 1"),
    "model.max_size": (_positive, "a whole number of pixels >= model.min_size"),
    "model.image_std": (lambda v: len(v) == 3 and all(_positive(s) for s in v), "three numbers > 0"),
    "model.image_mean": (lambda v: len(v) == 3 and all(_number(m) for m in v), "three finite numbers"),
    "model.anchor_sizes": (_all(_positive), "one or more sizes in pixels > 0"),
    "model.aspect_ratios": (_all(_positive), "one or more ratios > 0"),
    "model.rpn_pre_nms_top_n_train": (_positive, "a whole number >= 1"),
    "model.rpn_pre_nms_top_n_test": (_positive, "a whole number >= 1"),
    "model.rpn_post_nms_top_n_train": (_positive, "a whole number >= 1"),
    "model.rpn_post_nms_top_n_test": (_positive, "a whole number >= 1"),
    "model.rpn_batch_size_per_image": (_positive, "a whole number >= 1"),
    "model.box_batch_size_per_image": (_positive, "a whole number >= 1"),
    "model.box_head_dim": (_positive, "a whole number >= 1"),
    "model.box_head_convs": (_non_negative, "a whole number >= 0"),
    "model.box_head_conv_dim": (_positive, "a whole number >= 1"),
    "model.version": (lambda v: v in ("v1", "v2"), "v1 or v2 (torchvision's *_v2 builders)"),
    "model.rpn_score_thresh": (_fraction, "a number in [0, 1]"),
    "model.box_score_thresh": (_fraction, "a number in [0, 1]"),
    "model.box_nms_thresh": (_fraction, "a number in [0, 1]"),
    "model.box_detections_per_img": (_positive, "a whole number >= 1"),
    "model.mask_head_layers": (_non_negative, "a whole number >= 0 (0: the predictor reads the pooled features)"),
    "model.mask_head_dim": (_positive, "a whole number >= 1"),
    "model.backbone.fpn_channels": (_positive, "a whole number >= 1"),
    "model.backbone.trainable_layers": (_or_null(_non_negative), "a whole number >= 0, or null for all"),
    "model.attention.reduction": (_positive, "a whole number >= 1"),
    "model.attention.heads": (_positive, "a whole number >= 1"),
    "data.num_workers": (
        lambda v: v == "auto" or worker_count(v) is not None,
        "a whole number >= 0 (0: load in the main process), or auto",
    ),
    "data.hflip_prob": (_fraction, "a probability in [0, 1]"),
    "data.bad_images": (lambda v: v in ("error", "skip"), "error or skip"),
    "eval.backend": (
        lambda v: v in ("auto", "pycocotools", "faster_coco_eval"),
        "auto, pycocotools or faster_coco_eval",
    ),
    "data.shapes.num_train": (_positive, "a whole number >= 1"),
    "data.shapes.num_val": (_positive, "a whole number >= 1"),
    "data.shapes.image_size": (_positive, "a whole number of pixels >= 1"),
    "data.shapes.max_objects": (_positive, "a whole number >= 1"),
}


def unknown_keys(given: dict, schema: DictConfig, prefix: str = "") -> list[str]:
    """Keys that `+key=value` added beyond the schema, each as a sentence: nothing reads them, so a typo
    (`+trainer.epoch=3`) would pass in silence. Free-form dicts of the schema (attention overrides) take any key."""
    problems = []
    for key, value in given.items():
        if key not in schema:
            close = difflib.get_close_matches(str(key), [str(k) for k in schema.keys()], n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            problems.append(f"+{prefix}{key}= adds a key the config does not have{hint}, so nothing would read it")
        elif isinstance(value, dict) and is_dataclass(OmegaConf.get_type(schema, key)):
            problems += unknown_keys(value, schema[key], f"{prefix}{key}.")
    return problems


def check_values(cfg: DictConfig, keys: Sequence[str] | None = None) -> None:
    """Refuse values that cannot work, before any data or model work, in one ConfigError sentence.

    `keys` limits the check to those keys and the keys under them (evaluate checks
    only what it lets a user change); None checks every rule.
    """

    def wanted(key: str) -> bool:
        return keys is None or any(key == k or key.startswith(k + ".") for k in keys)

    problems = []
    for key, (valid, allowed) in VALUE_RULES.items():
        if not wanted(key) or OmegaConf.is_missing(cfg, key):
            continue
        value = OmegaConf.select(cfg, key)
        try:
            ok = bool(valid(value))
        except TypeError:  # a list where a number belongs, or the reverse
            ok = False
        if not ok:
            value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            finite = "" if not isinstance(value, float) or math.isfinite(value) else "finite, "
            problems.append(f"{key}={value} must be {finite}{allowed}")
    low, high = OmegaConf.select(cfg, "model.min_size"), OmegaConf.select(cfg, "model.max_size")
    if wanted("model.max_size") and _positive(low) and _positive(high) and high < low:
        problems.append(f"model.max_size={high} must be >= model.min_size={low}")
    if keys is None:
        problems += unknown_keys(OmegaConf.to_container(cfg, resolve=False), OmegaConf.structured(TrainConfig))
        if not OmegaConf.is_missing(cfg, "trainer.best_metric"):
            from frcnn_train.evaluation import metric_problem

            if problem := metric_problem(
                cfg.trainer.best_metric,
                with_masks=cfg.model.arch == "mask_rcnn",
                ema=OmegaConf.select(cfg, "trainer.ema.decay") is not None,
            ):
                problems.append(problem)
    if problems:
        raise ConfigError(f"{'; '.join(problems)}; fix {'this value' if len(problems) == 1 else 'these values'}")
