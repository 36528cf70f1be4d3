"""`python scripts/benchmark.py --vs-torchvision`: frcnn_train against the loop a torchvision user writes.

In one process, alternating rounds of
  (a) torchvision: the model from torchvision's own builder (or, for sizes its
      builders do not take, its own classes: ResNet, BackboneWithFPN, FasterRCNN),
      trained by a loop written like references/detection/engine.py's
      train_one_epoch (loss dict, sum, .item() of every loss, backward, step,
      warmup LR), on a plain shuffled DataLoader whose every visit of an image
      draws fresh augmentation (as torchvision's references do);
  (b) frcnn_train: the Trainer's own step (`Trainer.train_step` and
      `_after_step`) on the Trainer's loader, with the model, optimizer and
      options our builders make from the same config.
Both sides start from the same weights (theirs loads our state dict, which also
proves the architectures are the same), see the same dataset, batch size, AMP
setting and SGD settings. Printed: images/s per side (median over rounds), peak
memory (CUDA max_memory_allocated; CPU: the peak resident set of a fresh process
running only that side for the same steps), the checkpoint blocking time (ours, and a plain
synchronous torch.save of the same state), and last the median of the per-round
ratios of images/s.

`--accuracy` instead trains each side the config's whole schedule and prints each
side's AP (see `accuracy`): the same accuracy is the other half of the comparison.
"""
from __future__ import annotations

import gc
import math
import multiprocessing
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from frcnn_train import checkpoint
from frcnn_train.config import compose_config
from frcnn_train.data import build_datasets, resolve_num_workers
from frcnn_train.checkpointer import Checkpointer
from frcnn_train.runtime import amp_dtype as _amp_dtype
from frcnn_train.runtime import seed_everything
from frcnn_train.logs import RunLogger
from frcnn_train.models import architecture_spec, build_model, fingerprint, prepare_for_training
from frcnn_train.optim import build_optimizer, build_scheduler
from frcnn_train.trainer import Trainer, TrainerSettings, steps_per_epoch

# Faster R-CNN ResNet-50 FPN at torchvision's sizes, batch 8, AMP: the GPU comparison of issue 14.
CUDA_DEFAULTS = [
    "model/backbone=resnet50_fpn", "model.backbone.fpn_channels=256", "model.min_size=800", "model.max_size=1333",
    "model.anchor_sizes=[32,64,128,256,512]", "model.rpn_pre_nms_top_n_train=2000", "model.rpn_pre_nms_top_n_test=1000",
    "model.rpn_post_nms_top_n_train=2000", "model.rpn_post_nms_top_n_test=1000", "model.rpn_batch_size_per_image=256",
    "model.box_batch_size_per_image=512", "model.box_head_dim=1024", "model.box_detections_per_img=100",
    "model.mask_head_dim=256", "trainer.batch_size=8", "trainer.amp=true",
    "data.shapes.image_size=640", "data.shapes.max_objects=7", "data.shapes.num_train=96", "data.shapes.num_val=8",
]
RESNET_STAGE_CHANNELS = {"resnet18": [64, 128, 256, 512], "resnet34": [64, 128, 256, 512],
                         "resnet50": [256, 512, 1024, 2048], "resnet101": [256, 512, 1024, 2048]}


def torchvision_model(model_cfg: DictConfig, num_classes: int) -> nn.Module:
    """The same detector made by torchvision alone: its builder when the sizes are its own, else its classes."""
    from torchvision.models.detection import (FasterRCNN, MaskRCNN, fasterrcnn_resnet50_fpn,
                                              maskrcnn_resnet50_fpn)
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    bb, arch = model_cfg.backbone, model_cfg.arch
    resnet = bb.name.removesuffix("_fpn")
    if resnet not in RESNET_STAGE_CHANNELS or model_cfg.attention.sites or bb.returned_layers is not None:
        raise SystemExit("--vs-torchvision compares ResNet FPN backbones with every stage returned and no attention")
    sizes = dict(
        min_size=model_cfg.min_size, max_size=model_cfg.max_size,
        image_mean=list(model_cfg.image_mean), image_std=list(model_cfg.image_std),
        rpn_pre_nms_top_n_train=model_cfg.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=model_cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=model_cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=model_cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=model_cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=model_cfg.box_batch_size_per_image, box_score_thresh=model_cfg.box_score_thresh,
        box_nms_thresh=model_cfg.box_nms_thresh, box_detections_per_img=model_cfg.box_detections_per_img,
    )
    own_sizes = (resnet == "resnet50" and bb.fpn_channels == 256 and list(model_cfg.anchor_sizes) == [32, 64, 128, 256, 512]
                 and list(model_cfg.aspect_ratios) == [0.5, 1.0, 2.0] and model_cfg.box_head_dim == 1024
                 and (arch == "faster_rcnn" or (model_cfg.mask_head_layers, model_cfg.mask_head_dim) == (4, 256)))
    if own_sizes:  # exactly what a torchvision user calls
        builder = maskrcnn_resnet50_fpn if arch == "mask_rcnn" else fasterrcnn_resnet50_fpn
        return builder(weights=None, weights_backbone=None, num_classes=num_classes + 1, **sizes)
    body = getattr(torchvision.models, resnet)(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, RESNET_STAGE_CHANNELS[resnet],
                               bb.fpn_channels, extra_blocks=LastLevelMaxPool())
    levels = ["0", "1", "2", "3"]
    anchors = AnchorGenerator(tuple((int(s),) for s in model_cfg.anchor_sizes),
                              (tuple(float(r) for r in model_cfg.aspect_ratios),) * 5)
    c, dim = bb.fpn_channels, model_cfg.box_head_dim
    parts: dict[str, Any] = dict(rpn_anchor_generator=anchors, box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
                                 box_head=TwoMLPHead(c * 49, dim), box_predictor=FastRCNNPredictor(dim, num_classes + 1))
    if arch == "mask_rcnn":
        mdim, layers = model_cfg.mask_head_dim, model_cfg.mask_head_layers
        parts.update(mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
                     mask_head=MaskRCNNHeads(c, [mdim] * layers, 1),
                     mask_predictor=MaskRCNNPredictor(mdim if layers else c, mdim, num_classes + 1))
        return MaskRCNN(backbone, num_classes=None, **parts, **sizes)
    return FasterRCNN(backbone, num_classes=None, **parts, **sizes)


def amp_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    return _amp_dtype(cfg.trainer.amp, cfg.trainer.amp_dtype, device, warn=False)


def _tuple_collate(batch: list) -> tuple:
    """references/detection/utils.collate_fn, the images made float in the worker as the references' presets
    do (ToDtype(torch.float, scale=True)); our datasets give uint8, which torchvision's model refuses."""
    images, targets = zip(*batch)
    return tuple(_their_float(image) for image in images), targets


def _their_float(image: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.v2.functional import to_dtype

    return to_dtype(image, torch.float32, scale=True) if image.dtype == torch.uint8 else image


class _ShuffleWithFreshAugmentation(torch.utils.data.Sampler):
    """A shuffled epoch whose every visit draws new augmentation, from torch's global RNG, as
    torchvision's references/detection/transforms.py does. (Our datasets take (index, seed):
    a bare index would give each image the same flip in every epoch.)"""

    def __init__(self, length: int) -> None:
        self.length = length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in torch.randperm(self.length).tolist():
            yield index, int(torch.randint(2**62, ()))

    def __len__(self) -> int:
        return self.length


class TheirLoop:
    """references/detection/engine.py train_one_epoch, one optimizer step at a time."""

    def __init__(self, model: nn.Module, cfg: DictConfig, dataset: Any, device: torch.device,
                 dtype: torch.dtype | None, lr_factor: Callable[[int], float] | None = None) -> None:
        self.model, self.device, self.dtype = model.to(device).train(), device, dtype
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay)
        # engine.py's first-epoch warmup: LinearLR from 1/1000 over min(1000, len(loader) - 1) iterations;
        # `lr_factor` (per step, as LambdaLR takes it) replaces it with a whole schedule.
        self.loader = DataLoader(dataset, batch_size=cfg.trainer.batch_size, drop_last=True,
                                 sampler=_ShuffleWithFreshAugmentation(len(dataset)),
                                 num_workers=resolve_num_workers(cfg.data.num_workers, device),
                                 collate_fn=_tuple_collate)
        self.warmup = (torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor) if lr_factor else
                       torch.optim.lr_scheduler.LinearLR(self.optimizer, start_factor=1.0 / 1000,
                                                         total_iters=min(1000, len(self.loader) - 1)))
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        self.batches: Iterator = iter(())

    def step(self) -> None:
        try:
            images, targets = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            images, targets = next(self.batches)
        images = list(image.to(self.device) for image in images)
        targets = [{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss_dict = self.model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
        loss_value = losses.item()
        if not math.isfinite(loss_value):
            raise SystemExit(f"torchvision side: loss is {loss_value}")
        self.optimizer.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(losses).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            losses.backward()
            self.optimizer.step()
        self.warmup.step()
        # MetricLogger.update(loss=..., **loss_dict): every value read back with .item().
        _ = [v.item() for v in loss_dict.values()], self.optimizer.param_groups[0]["lr"]


class OurLoop:
    """The Trainer as launch.run builds it, driven step by step (its loader, train_step, _after_step)."""

    def __init__(self, cfg: DictConfig, data: Any, device: torch.device, run_dir: Path) -> None:
        model = build_model(cfg.model)
        self.initial_state = {k: v.clone() for k, v in model.state_dict().items()}
        model = prepare_for_training(model.to(device), channels_last=cfg.trainer.channels_last,
                                     compile=cfg.trainer.compile)
        optimizer = build_optimizer(model, cfg.optim)
        per_epoch = steps_per_epoch(len(data.train), cfg.trainer.batch_size, cfg.trainer.accumulate)
        scheduler = build_scheduler(optimizer, cfg.schedule, steps_per_epoch=per_epoch,
                                    total_steps=per_epoch * cfg.trainer.epochs)
        dtype = amp_dtype(cfg, device)
        logger = RunLogger(run_dir, enabled=True)
        extras = {"config": OmegaConf.to_container(cfg, resolve=True),
                  "architecture": {"fingerprint": fingerprint(architecture_spec(cfg.model), model),
                                   "spec": architecture_spec(cfg.model)},
                  "classes": list(data.classes)}
        self.trainer = Trainer(
            model=model, optimizer=optimizer, scheduler=scheduler,
            scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), data=data,
            settings=TrainerSettings(epochs=cfg.trainer.epochs, batch_size=cfg.trainer.batch_size, seed=cfg.seed,
                                     num_workers=resolve_num_workers(cfg.data.num_workers, device), amp_dtype=dtype,
                                     accumulate=cfg.trainer.accumulate, log_every=cfg.trainer.log_every,
                                     progress=False),
            device=device, run_dir=run_dir, logger=logger, with_masks=cfg.model.arch == "mask_rcnn",
            checkpointer=Checkpointer(run_dir, extras=extras, keep_last=1, logger=logger),
        )
        self.cfg, self.data, self.epoch = cfg, data, 0
        self.batches: Iterator = iter(())

    def step(self) -> None:
        t, s = self.trainer, self.trainer.s
        micro = []
        while len(micro) < s.accumulate:
            try:
                micro.append(next(self.batches))
            except StopIteration:  # a new epoch, as Trainer._train_epoch starts it
                self.batches = iter(t.train_loader.at(self.epoch))
                self.epoch += 1
        t._after_step(t.train_step(micro), 0.0, 1.0, None)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def compare(*, device_name: str, steps: int, rounds: int, warmup: int, overrides: list[str]) -> None:
    device = torch.device(device_name)
    defaults = CUDA_DEFAULTS if device.type == "cuda" else []
    cfg_overrides = [*defaults, f"device={device}", "trainer.progress=false", *overrides]
    cfg = compose_config(cfg_overrides)
    torch.manual_seed(cfg.seed)
    data = build_datasets(cfg.data, with_masks=cfg.model.arch == "mask_rcnn")
    cfg.model.num_classes = len(data.classes)
    batch = cfg.trainer.batch_size * cfg.trainer.accumulate
    with tempfile.TemporaryDirectory() as tmp:
        sides = build_sides(cfg, data, device, Path(tmp))
        ours = sides["frcnn_train"]
        print(f"{cfg.model.arch} {cfg.model.backbone.name} (FPN {cfg.model.backbone.fpn_channels}), "
              f"{cfg.model.min_size}-{cfg.model.max_size} px, batch {batch}, "
              f"AMP {amp_dtype(cfg, device) or 'off'}, {device}; {rounds} rounds of {steps} steps per side, "
              f"interleaved; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
        speed: dict[str, list[float]] = {name: [] for name in sides}
        memory = {name: 0.0 for name in sides}
        for name, side in sides.items():
            for _ in range(warmup):
                side.step()
        for r in range(rounds):
            for name, side in (sides.items() if r % 2 == 0 else reversed(sides.items())):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = _timed(lambda: [side.step() for _ in range(steps)], device)
                speed[name].append(steps * batch / seconds)
                if device.type == "cuda":
                    memory[name] = max(memory[name], torch.cuda.max_memory_allocated(device) / 2**20)
            print(f"  round {r + 1}: " + "  ".join(f"{n} {speed[n][-1]:.2f} img/s" for n in sides), flush=True)
        kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS of a process running only it"
        if device.type == "cpu":
            for name in sides:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
                    memory[name] = fresh.submit(side_peak_rss, name, cfg_overrides, warmup + steps).result()
        for name in sides:
            print(f"{name:<12} {statistics.median(speed[name]):8.2f} images/s (median)   peak memory "
                  f"{memory[name]:8.0f} MB ({kind})")
        ours_ms, plain_ms = checkpoint_blocking(ours.trainer, Path(tmp))
        print(f"checkpoint blocking the training thread: frcnn_train {ours_ms:.0f} ms, "
              f"plain synchronous torch.save of the same state {plain_ms:.0f} ms")
        ours.trainer.logger.close()
    # Each round runs both sides back to back, so a host that slows down for a while slows
    # both: the median of the per-round ratios is steadier than the ratio of the medians.
    ratios = sorted(ours / theirs for ours, theirs in zip(speed["frcnn_train"], speed["torchvision"]))
    print(f"per-round ratios: {' '.join(f'{r:.2f}' for r in ratios)}")
    print(f"ratio frcnn_train/torchvision = {statistics.median(ratios):.2f}")


def accuracy(*, device_name: str, overrides: list[str]) -> None:
    """Train each side the config's whole schedule from the same weights, then score both with pycocotools.

    Ours: launch.run, what `python -m frcnn_train.train` does. Theirs: the same model from
    torchvision's classes, TheirLoop's steps over a plain shuffled DataLoader, with our LR
    schedule (warmup and steps, as a torchvision user would set for this length), so the two
    differ in implementation, not recipe. Evaluated by the same pycocotools code on the val split.
    """
    from frcnn_train.data import build_eval_loader
    from frcnn_train.evaluation import evaluate
    from frcnn_train.launch import run
    from frcnn_train.optim import lr_factor_fn

    device = torch.device(device_name)
    cfg_overrides = [*(CUDA_DEFAULTS if device.type == "cuda" else []), f"device={device}", "trainer.progress=false",
                     *overrides]
    cfg = compose_config(cfg_overrides)
    data = build_datasets(cfg.data, with_masks=cfg.model.arch == "mask_rcnn")
    cfg.model.num_classes = len(data.classes)
    per_epoch = steps_per_epoch(len(data.train), cfg.trainer.batch_size, cfg.trainer.accumulate)
    total = per_epoch * cfg.trainer.epochs
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        ours = run(compose_config([*cfg_overrides, f"output_dir={tmp}", "run_name=ours"]))
        ours_s = time.perf_counter() - started
        seed_everything(cfg.seed, cfg.trainer.deterministic, device)  # as launch.run seeds before build_model
        theirs_model = torchvision_model(cfg.model, cfg.model.num_classes)
        theirs_model.load_state_dict(build_model(cfg.model).state_dict())
        theirs = TheirLoop(theirs_model, cfg, data.train, device, amp_dtype(cfg, device),
                           lr_factor=lr_factor_fn(cfg.schedule, steps_per_epoch=per_epoch, total_steps=total))
        started = time.perf_counter()
        for _ in range(total):
            theirs.step()
        loader = build_eval_loader(data.val, batch_size=cfg.trainer.batch_size,
                                   num_workers=resolve_num_workers(cfg.data.num_workers, device))
        loader = (([_their_float(image) for image in images], targets) for images, targets in loader)
        metrics, _ = evaluate(theirs.model, loader, coco_gt=data.val.coco, label_to_cat_id=data.val.label_to_cat_id,
                              device=device, with_masks=cfg.model.arch == "mask_rcnn")
        theirs_s = time.perf_counter() - started
    print(f"{cfg.model.arch} {cfg.model.backbone.name}, {total} steps of {cfg.trainer.batch_size} images, "
          f"{cfg.model.min_size} px, {device}; AP / AP50 on the {len(data.val)} val images:")
    for name, m, seconds in (("torchvision", metrics, theirs_s), ("frcnn_train", ours["metrics"], ours_s)):
        print(f"{name:<12} AP {100 * m['bbox/AP']:5.1f}  AP50 {100 * m['bbox/AP50']:5.1f}  ({seconds:.0f} s)")


def build_sides(cfg: DictConfig, data: Any, device: torch.device, tmp: Path) -> dict[str, Any]:
    ours = OurLoop(cfg, data, device, tmp / "run")
    theirs_model = torchvision_model(cfg.model, cfg.model.num_classes)
    theirs_model.load_state_dict(ours.initial_state)  # same weights; fails loudly if the architectures differ
    return {"torchvision": TheirLoop(theirs_model, cfg, data.train, device, amp_dtype(cfg, device)),
            "frcnn_train": ours}


def side_peak_rss(name: str, cfg_overrides: list[str], steps: int) -> float:
    """Peak resident set (MB) of this fresh process after `steps` steps of one side alone."""
    cfg = compose_config(cfg_overrides)
    torch.manual_seed(cfg.seed)
    data = build_datasets(cfg.data, with_masks=cfg.model.arch == "mask_rcnn")
    cfg.model.num_classes = len(data.classes)
    with tempfile.TemporaryDirectory() as tmp:
        sides = build_sides(cfg, data, torch.device("cpu"), Path(tmp))
        del sides["frcnn_train" if name == "torchvision" else "torchvision"]
        gc.collect()
        for _ in range(steps):
            sides[name].step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def checkpoint_blocking(trainer: Trainer, tmp: Path, repeats: int = 3) -> tuple[float, float]:
    """Median ms the training thread waits: our save of last.pth (the write itself runs in the
    Checkpointer's background thread), and a plain torch.save of that state."""
    ours, plain = [], []

    def plain_save(i: int) -> None:
        torch.save(checkpoint.make_checkpoint(**trainer.checkpointer.extras, **trainer.state_dict()),
                   tmp / f"plain_{i}.pth")

    for i in range(repeats):
        ours.append(_timed(trainer.save, trainer.device) * 1000)
        trainer.checkpointer.wait()  # saves in training are far apart: the previous write is done
        plain.append(_timed(lambda: plain_save(i), trainer.device) * 1000)
    return statistics.median(ours), statistics.median(plain)
