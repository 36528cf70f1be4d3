"""`python scripts/benchmark.py --vs-torchvision`: frcnn_train against the loop a torchvision user writes.

Two modes, both printing images/s per side per round, the per-round ratios (ours / theirs),
peak memory and how long checkpoint saves block training, and last
`ratio frcnn_train/torchvision = X.XX`, the median of the per-round ratios:

- end to end (the default): each side reads the same image files through its own loader, in
  a fresh process of its own (so its peak memory is its own): torchvision's loader and loop as
  references/detection/train.py and engine.py set them up (scripts/torchvision_side.py: 4
  workers, float32 made in the workers, pageable memory, new workers every epoch), and ours as
  `python -m frcnn_train.train` runs: the Trainer built by launch's phases with its defaults
  (data.num_workers=auto, uint8 through pinned memory, persistent workers) running its own loop,
  `Trainer.fit()` with trainer.max_steps, epoch-end saves included. Our rounds are timed by
  wrapping the StepLog's step (a clock read after it, and a CUDA synchronize at round
  boundaries only). The sides run one after the other; round r of one is paired with round r
  of the other.
- `--compute-only`: the same batches, already on the device, for both sides, in one process,
  rounds interleaved (a host whose speed drifts slows both): theirs through TheirLoop.train
  (float32 images), ours through `Trainer.train_step` and the StepLog (uint8 images, which our
  model makes float on the device).

Both sides start from the same weights (theirs loads our state dict, which also proves the
architectures are the same) and train with the same recipe: our LR schedule (linear warmup from
schedule.warmup_factor over schedule.warmup_steps) at our LR (optim.lr scaled by the batch), SGD
with the same momentum and weight decay, AMP as trainer.amp says, and gradients clipped to norm
10 on both sides (trainer.grad_clip=10; from scratch at the plain loop's LR and its short warmup,
torchvision's own side reached NaN in fp32 and inf in bf16 within 30 steps on a GPU). On CUDA the
defaults are torchvision's Faster R-CNN R50-FPN sizes at 800 px, batch 8, fp16, LR 0.01 (0.02 per
16 images, the references' rule). A non-finite loss on either side ends the benchmark with one
line, `error: <side> side: ...`, and exit code 2.

`--accuracy` trains each side a whole schedule and prints each side's AP (see `accuracy`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from frcnn_train import checkpoint
from frcnn_train.config import compose_config
from frcnn_train.data import build_datasets, resolve_num_workers
from frcnn_train.models import build_model
from frcnn_train.optim import lr_factor_fn, lr_scale
from frcnn_train.runtime import amp_dtype as _amp_dtype
from frcnn_train.runtime import seed_everything
from frcnn_train.trainer import Trainer, TrainingError, steps_per_epoch
from torchvision_side import THEIR_WORKERS, NonFiniteLoss, TheirLoop, their_float, their_loader, torchvision_model

# Faster R-CNN ResNet-50 FPN at torchvision's sizes, batch 8, fp16, torchvision's LR rule (0.02 per 16 images).
CUDA_DEFAULTS = [
    "model/backbone=resnet50_fpn",
    "model.backbone.fpn_channels=256",
    "model.min_size=800",
    "model.max_size=1333",
    "model.anchor_sizes=[32,64,128,256,512]",
    "model.rpn_pre_nms_top_n_train=2000",
    "model.rpn_pre_nms_top_n_test=1000",
    "model.rpn_post_nms_top_n_train=2000",
    "model.rpn_post_nms_top_n_test=1000",
    "model.rpn_batch_size_per_image=256",
    "model.box_batch_size_per_image=512",
    "model.box_head_dim=1024",
    "model.box_detections_per_img=100",
    "model.mask_head_dim=256",
    "trainer.batch_size=8",
    "trainer.amp=true",
    "optim.lr=0.02",
    "optim.reference_batch=16",
    "data.shapes.image_size=640",
    "data.shapes.max_objects=7",
    "data.shapes.num_train=400",
    "data.shapes.num_val=16",
]
RECIPE = ["trainer.grad_clip=10.0"]  # both sides; before the command line's overrides, which may change it
# After the command line's: the speed modes stop by trainer.max_steps, never at an epoch count or its evaluation.
SPEED_ONLY = ["trainer.progress=false", "trainer.eval_every=0", "trainer.epochs=100000"]
# --accuracy on CUDA: 400 steps of 8 images at 800 px, about 3 minutes a side on an H100/H200.
ACCURACY_CUDA = ["data.shapes.num_val=50", "trainer.epochs=8", "trainer.eval_every=0", "schedule.milestones=[6,7]"]
SIDES = ("torchvision", "frcnn_train")


def compose(device: torch.device, overrides: list[str], *, speed: bool) -> tuple[list[str], DictConfig]:
    defaults = CUDA_DEFAULTS if device.type == "cuda" else []
    accuracy = ACCURACY_CUDA if device.type == "cuda" and not speed else []
    cfg_overrides = [
        *defaults,
        *accuracy,
        *RECIPE,
        f"device={device}",
        "trainer.progress=false",
        *overrides,
        *(SPEED_ONLY if speed else []),
    ]
    return cfg_overrides, compose_config(cfg_overrides)


def amp_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    return _amp_dtype(cfg.trainer.amp, cfg.trainer.amp_dtype, device, warn=False)


def console_to_stderr() -> None:
    """The Trainer's log lines on stderr, so stdout holds only the benchmark's own lines."""
    from frcnn_train.logs import log

    if not any(getattr(h, "_frcnn_console", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._frcnn_console = True  # type: ignore[attr-defined]  # launch's setup_console then adds none
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def build_our_trainer(cfg: DictConfig, run_dir: Path) -> Trainer:
    """The Trainer as `python -m frcnn_train.train` builds it (launch's phases), for a new run in `run_dir`."""
    from frcnn_train import launch
    from frcnn_train.logs import RunLogger
    from frcnn_train.resume import Resume

    console_to_stderr()
    resume = Resume.open(None, cfg, ())
    device = launch.start_processes(cfg, resume)
    data = launch.build_data(cfg, resume)
    parts = launch.build_parts(cfg, data, resume, device)
    logger = RunLogger(run_dir, enabled=True)
    return launch.build_trainer(cfg, parts, data, device, logger, run_dir, resume, ())


def initial_weights(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The weights both sides start from: our model built after the seeding a run does."""
    seed_everything(cfg.seed, cfg.trainer.deterministic, torch.device(cfg.device))
    return build_model(cfg.model).state_dict()


def their_side(
    cfg: DictConfig, data: Any, device: torch.device, initial: dict[str, torch.Tensor], *, with_loader: bool
) -> TheirLoop:
    model = torchvision_model(cfg.model, cfg.model.num_classes)
    model.load_state_dict(initial)  # fails loudly if the architectures differ
    per_epoch = steps_per_epoch(len(data.train), cfg.trainer.batch_size, cfg.trainer.accumulate)
    scale, _ = lr_scale(cfg.optim, cfg.trainer.batch_size * cfg.trainer.accumulate)
    loader = their_loader(data.train, cfg.trainer.batch_size) if with_loader else None
    return TheirLoop(
        model,
        lr=cfg.optim.lr * scale,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        grad_clip=cfg.trainer.grad_clip,
        device=device,
        dtype=amp_dtype(cfg, device),
        loader=loader,
        lr_factor=lr_factor_fn(cfg.schedule, steps_per_epoch=per_epoch, total_steps=per_epoch * cfg.trainer.epochs),
    )


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain_save_ms(trainer: Trainer, path: Path) -> float:
    """A plain synchronous torch.save of the state our save writes (what a hand-written loop does)."""
    start = _sync(trainer.device)
    torch.save(checkpoint.make_checkpoint(**trainer.checkpointer.extras, **trainer.registry.state_dict()), path)
    return (_sync(trainer.device) - start) * 1000


# ---------------------------------------------------------------- end to end: one fresh process per side
def side_end_to_end(
    side: str, cfg_overrides: list[str], initial_path: str, tmp: str, warmup: int, steps: int, rounds: int
) -> dict[str, Any]:
    """One side's warm-up and timed rounds through its own loader, in this (fresh) process."""
    total = warmup + steps * rounds
    cfg = compose_config([*cfg_overrides, f"trainer.max_steps={total}", f"output_dir={tmp}", f"run_name={side}"])
    device = torch.device(cfg.device)
    initial = torch.load(initial_path, weights_only=True)
    marks: list[float] = []
    if side == "torchvision":
        data = build_datasets(cfg.data, with_masks=cfg.model.arch == "mask_rcnn")
        cfg.model.num_classes = len(data.classes)
        theirs = their_side(cfg, data, device, initial, with_loader=True)
        for i in range(total):
            if i >= warmup and (i - warmup) % steps == 0:
                marks.append(_sync(device))
            theirs.step()
        marks.append(_sync(device))
        return {"seconds": [b - a for a, b in zip(marks, marks[1:])], "memory_mb": _peak_memory_mb(device)}
    trainer = build_our_trainer(cfg, Path(tmp) / side)
    trainer.bare.load_state_dict(initial)
    inner = trainer.step_log.step

    def timed_step(losses: dict[str, torch.Tensor], **kwargs: Any) -> None:
        inner(losses, **kwargs)
        done = kwargs["global_step"] - warmup
        if done >= 0 and done % steps == 0:
            marks.append(_sync(device))

    trainer.step_log.step = timed_step  # type: ignore[method-assign]
    saves = _BlockingRecords()
    try:
        trainer.fit()
    except TrainingError as err:
        raise NonFiniteLoss("frcnn_train", str(err)) from None
    finally:
        saves.close()
        trainer.step_log.step = inner  # type: ignore[method-assign]
    plain = plain_save_ms(trainer, Path(tmp) / "plain.pth")
    trainer.step_log.logger.close()
    return {
        "seconds": [b - a for a, b in zip(marks, marks[1:])],
        "memory_mb": _peak_memory_mb(device),
        "blocking_ms": saves.ms,
        "plain_save_ms": plain,
        "workers": trainer.train_loader.loader.num_workers,
    }


class _BlockingRecords(logging.Handler):
    """The 'blocked training N ms' of every save the Checkpointer logs while it is attached."""

    PATTERN = re.compile(r"blocked training (\d+) ms")

    def __init__(self) -> None:
        from frcnn_train.logs import log

        super().__init__(logging.INFO)
        self.ms: list[float] = []
        self._log = log
        log.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if found := self.PATTERN.search(record.getMessage()):
            self.ms.append(float(found.group(1)))

    def close(self) -> None:
        self._log.removeHandler(self)
        super().close()


def end_to_end(
    device: torch.device,
    cfg_overrides: list[str],
    cfg: DictConfig,
    *,
    steps: int,
    rounds: int,
    warmup: int,
    tmp: Path,
    sides: tuple[str, ...] = SIDES,
) -> dict[str, Any]:
    initial_path = tmp / "initial.pth"
    torch.save(initial_weights(cfg), initial_path)
    ours_workers = resolve_num_workers(cfg.data.num_workers, device)
    print(
        f"end to end: each side in a fresh process reads the files through its own loader (torchvision: "
        f"{THEIR_WORKERS} workers, float32 made in the workers; frcnn_train: {ours_workers} workers "
        f"(data.num_workers={cfg.data.num_workers}), uint8{' pinned' if device.type == 'cuda' else ''}); "
        f"{rounds} rounds of {steps} steps after {warmup} warm-up steps",
        flush=True,
    )
    results = {}
    for side in sides:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
            results[side] = fresh.submit(
                side_end_to_end, side, cfg_overrides, str(initial_path), str(tmp), warmup, steps, rounds
            ).result()
    images = cfg.trainer.batch_size * cfg.trainer.accumulate * steps
    speed = {side: [images / s for s in results[side]["seconds"]] for side in sides}
    memory = {side: results[side]["memory_mb"] for side in sides}
    kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS of its process"
    ours = results.get("frcnn_train", {})
    return dict(
        speed=speed,
        memory=memory,
        memory_kind=kind,
        blocking_ms=ours.get("blocking_ms", []),
        plain_save_ms=ours.get("plain_save_ms", float("nan")),
    )


# ---------------------------------------------------------------- compute only: one process, interleaved
def device_batches(trainer: Trainer, count: int) -> list[tuple[list, list]]:
    """The first `count` batches of our loader's epoch 0, on the device (uint8 images, as our loader gives)."""
    batches = []
    for images, targets in trainer.train_loader.at(0):
        batches.append(
            (
                [image.to(trainer.device) for image in images],
                [{k: v.to(trainer.device) for k, v in t.items()} for t in targets],
            )
        )
        if len(batches) == count:
            break
    trainer.train_loader.close()
    return batches


def our_step(trainer: Trainer, micro: list[tuple[list, list]]) -> None:
    """What Trainer._train_epoch does per step, the loader aside: the step, the save check and the StepLog."""
    c = trainer.counters
    losses = trainer.train_step(micro)
    trainer.checkpointer.check()
    trainer.step_log.step(
        losses,
        images=sum(len(b[0]) for b in micro),
        epoch=c.epoch,
        global_step=c.global_step,
        step_in_epoch=c.step_in_epoch,
        steps_left=1,
        lrs={g.get("name", "default"): g["lr"] for g in trainer.optimizer.param_groups},
        extra={"grad_norm": trainer._grad_norm} if trainer._grad_norm is not None else None,
    )


def compute_only(
    device: torch.device,
    cfg: DictConfig,
    *,
    steps: int,
    rounds: int,
    warmup: int,
    tmp: Path,
    sides: tuple[str, ...] = SIDES,
) -> dict[str, Any]:
    initial = initial_weights(cfg)
    trainer = build_our_trainer(cfg, tmp / "frcnn_train")
    trainer.bare.load_state_dict(initial)
    accumulate = cfg.trainer.accumulate
    batches = device_batches(trainer, min(16, warmup + steps * rounds) * accumulate)
    theirs = their_side(cfg, trainer.data, device, initial, with_loader=False) if "torchvision" in sides else None
    their_batches = [([their_float(im) for im in images], [dict(t) for t in targets]) for images, targets in batches]
    position = {side: 0 for side in sides}

    def one_step(side: str) -> None:
        i = position[side]
        position[side] += 1
        if side == "torchvision":
            theirs.train(*their_batches[i % len(their_batches)])
        else:
            our_step(trainer, [batches[(i * accumulate + k) % len(batches)] for k in range(accumulate)])

    print(
        f"compute only: the same {len(batches)} batches on the {device.type} for both sides (theirs float32, ours "
        f"uint8); {rounds} rounds of {steps} steps after {warmup} warm-up steps, interleaved",
        flush=True,
    )
    speed: dict[str, list[float]] = {side: [] for side in sides}
    memory = {side: 0.0 for side in sides}
    try:
        for side in sides:
            for _ in range(warmup):
                one_step(side)
        for r in range(rounds):
            for side in sides if r % 2 == 0 else tuple(reversed(sides)):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start = _sync(device)
                for _ in range(steps):
                    one_step(side)
                speed[side].append(steps * cfg.trainer.batch_size * accumulate / (_sync(device) - start))
                memory[side] = max(memory[side], _peak_memory_mb(device))
    except TrainingError as err:
        raise NonFiniteLoss("frcnn_train", str(err)) from None
    ours_ms = []
    for _ in range(3):
        start = _sync(device)
        trainer.save()
        ours_ms.append((_sync(device) - start) * 1000)
        trainer.checkpointer.wait()  # saves in training are far apart: the previous write is done
    plain = statistics.median(plain_save_ms(trainer, tmp / f"plain_{i}.pth") for i in range(3))
    trainer.checkpointer.wait()
    trainer.step_log.logger.close()
    kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS of the process running both sides"
    return dict(speed=speed, memory=memory, memory_kind=kind, blocking_ms=ours_ms, plain_save_ms=plain)


# ---------------------------------------------------------------- the command
def compare(
    *,
    device_name: str,
    steps: int,
    rounds: int,
    warmup: int,
    overrides: list[str],
    compute_only_mode: bool = False,
    json_path: Path | None = None,
    sides: tuple[str, ...] = SIDES,
) -> None:
    device = torch.device(device_name)
    cfg_overrides, cfg = compose(device, overrides, speed=True)
    data = build_datasets(cfg.data, with_masks=cfg.model.arch == "mask_rcnn")  # generated here, once, for both sides
    cfg.model.num_classes = len(data.classes)
    batch = cfg.trainer.batch_size * cfg.trainer.accumulate
    mode = "compute-only" if compute_only_mode else "end-to-end"
    print(
        f"{cfg.model.arch} {cfg.model.backbone.name} (FPN {cfg.model.backbone.fpn_channels}), "
        f"{cfg.model.min_size}-{cfg.model.max_size} px, batch {batch}, AMP {amp_dtype(cfg, device) or 'off'}, "
        f"{device}; {mode}; grad clip {cfg.trainer.grad_clip} both sides; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    record: dict[str, Any] = {
        "mode": mode,
        "arch": cfg.model.arch,
        "backbone": cfg.model.backbone.name,
        "min_size": cfg.model.min_size,
        "batch": batch,
        "device": str(device),
        "amp": str(amp_dtype(cfg, device) or "off"),
        "steps": steps,
        "rounds": rounds,
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if compute_only_mode:
                result = compute_only(
                    device, cfg, steps=steps, rounds=rounds, warmup=warmup, tmp=Path(tmp), sides=sides
                )
            else:
                result = end_to_end(
                    device, cfg_overrides, cfg, steps=steps, rounds=rounds, warmup=warmup, tmp=Path(tmp), sides=sides
                )
    except NonFiniteLoss as err:
        record["error"] = str(err)
        _write(json_path, record)
        print(
            f"error: {err}; the benchmark's recipe (optim.lr, schedule.warmup_steps, trainer.grad_clip) "
            "may be changed on its command line",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    speed, names = result["speed"], list(result["speed"])
    for r in range(rounds):
        print(f"  round {r + 1}: " + "  ".join(f"{n} {speed[n][r]:.2f} img/s" for n in names), flush=True)
    for name in names:
        print(
            f"{name:<12} {statistics.median(speed[name]):8.2f} images/s (median)   peak memory "
            f"{result['memory'][name]:8.0f} MB ({result['memory_kind']})"
        )
    blocking = result["blocking_ms"]
    print(
        f"checkpoint blocking the training thread: frcnn_train {statistics.median(blocking) if blocking else 0:.0f} "
        f"ms, plain synchronous torch.save of the same state {result['plain_save_ms']:.0f} ms (median of our "
        f"{len(blocking)} saves, max {max(blocking, default=0):.0f} ms)"
    )
    record.update(
        images_per_s={n: statistics.median(speed[n]) for n in names},
        rounds_images_per_s=speed,
        memory_mb=result["memory"],
        memory_kind=result["memory_kind"],
        blocking_ms=blocking,
        plain_save_ms=result["plain_save_ms"],
    )
    if len(names) == 2:
        # Each round runs both sides back to back (compute-only) or round r of one beside round r of the
        # other: the median of the per-round ratios is steadier than the ratio of the medians.
        ratios = sorted(o / t for o, t in zip(speed["frcnn_train"], speed["torchvision"]))
        record.update(ratios=ratios, ratio=statistics.median(ratios))
        print(f"per-round ratios: {' '.join(f'{r:.2f}' for r in ratios)}")
        print(f"ratio frcnn_train/torchvision = {statistics.median(ratios):.2f}")
    _write(json_path, record)


def _write(path: Path | None, record: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(record, indent=1))


def accuracy(*, device_name: str, overrides: list[str]) -> None:
    """Train each side the config's whole schedule from the same weights, then score both with pycocotools.

    Ours: launch.run, what `python -m frcnn_train.train` does. Theirs: the same model from
    torchvision's classes, TheirLoop's steps over train.py's loader, with our LR schedule (warmup
    and steps, as a torchvision user would set for this length), so the two differ in
    implementation, not recipe. Evaluated by the same pycocotools code on the val split. On CUDA
    the schedule is ACCURACY_CUDA (400 steps at 800 px, about 3 minutes a side).
    """
    from frcnn_train.data import build_eval_loader
    from frcnn_train.evaluation import evaluate
    from frcnn_train.launch import run

    device = torch.device(device_name)
    cfg_overrides, cfg = compose(device, overrides, speed=False)
    data = build_datasets(cfg.data, with_masks=cfg.model.arch == "mask_rcnn")
    cfg.model.num_classes = len(data.classes)
    total = steps_per_epoch(len(data.train), cfg.trainer.batch_size, cfg.trainer.accumulate) * cfg.trainer.epochs
    try:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            try:
                ours = run(compose_config([*cfg_overrides, f"output_dir={tmp}", "run_name=ours"]))
            except TrainingError as err:
                raise NonFiniteLoss("frcnn_train", str(err)) from None
            ours_s = time.perf_counter() - started
            theirs = their_side(cfg, data, device, initial_weights(cfg), with_loader=True)
            started = time.perf_counter()
            for _ in range(total):
                theirs.step()
            loader = build_eval_loader(
                data.val,
                batch_size=cfg.trainer.batch_size,
                num_workers=resolve_num_workers(cfg.data.num_workers, device),
            )
            loader = (([their_float(image) for image in images], targets) for images, targets in loader)
            metrics, _ = evaluate(
                theirs.model,
                loader,
                coco_gt=data.val.coco,
                label_to_cat_id=data.val.label_to_cat_id,
                device=device,
                with_masks=cfg.model.arch == "mask_rcnn",
            )
            theirs_s = time.perf_counter() - started
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"{cfg.model.arch} {cfg.model.backbone.name}, {total} steps of {cfg.trainer.batch_size} images, "
        f"{cfg.model.min_size} px, {device}; AP / AP50 on the {len(data.val)} val images:"
    )
    for name, m, seconds in (("torchvision", metrics, theirs_s), ("frcnn_train", ours["metrics"], ours_s)):
        print(f"{name:<12} AP {100 * m['bbox/AP']:5.1f}  AP50 {100 * m['bbox/AP50']:5.1f}  ({seconds:.0f} s)")
