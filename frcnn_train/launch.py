"""From a composed config to a finished (or cleanly stopped) run, as a short list of phases.

This is the builder layer: the only place, with the `build_*` functions it calls,
that reads the config. Whether and how a run resumes is decided in resume.py; what a
checkpoint holds is the registry built here (state.py).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from frcnn_train import checkpoint, distributed, outputs, rundir, zoo
from frcnn_train.anchors import start_warning
from frcnn_train.checkpointer import Checkpointer
from frcnn_train.config import check_values
from frcnn_train.data import DataBundle, DataWarning, build_datasets, resolve_num_workers
from frcnn_train.ema import ModelEma
from frcnn_train.evaluation import EMA_PREFIX, format_table, require_metric
from frcnn_train.logs import RunLogger, log, setup_console
from frcnn_train.models import architecture_spec, build_model, prepare_for_training
from frcnn_train.models.backbones import resolve_norm
from frcnn_train.optim import apply_current_schedule, build_optimizer, build_scheduler, group_summary, lr_scale
from frcnn_train.progress import StepLog
from frcnn_train.resume import Resume
from frcnn_train.rng import RngStreams
from frcnn_train.runtime import amp_dtype, override_arg, precision_name, resolve_device, seed_everything, seed_for
from frcnn_train.state import Counters, Registry, Scaler, describe_position
from frcnn_train.trainer import Trainer, steps_per_epoch
from frcnn_train.validation import Validator


def run(
    cfg: DictConfig, overrides: Sequence[str] = (), *, interrupted: Callable[[], bool] = lambda: False
) -> dict[str, Any]:
    """Train (or resume) as `cfg` says; returns a summary dict (run_dir, metrics, stop reason).

    `interrupted`: whether a Ctrl-C came during start-up. C code (NumPy, while the dataset is
    generated) can swallow the KeyboardInterrupt it raised; asked once more before anything is
    written, so such a Ctrl-C still ends the start-up instead of training.
    """
    setup_console()
    check_values(cfg)  # before any file, data or model work
    target = rundir.resolve(cfg)
    # torchvision weights named in the config are fetched (downloaded once into torch's hub cache) before the
    # run directory exists: offline, the refusal leaves nothing on disk. A resume reads no weights file.
    fetched = zoo.fetch_for_run(cfg) if target.resume_from is None else []
    # Refusals (another run's directory, read-only, in use) come here, before any data or model work.
    with rundir.claim(target, overwrite=cfg.overwrite) as notes:
        return _run_in(target, cfg, overrides, notes, interrupted, fetched)


def _run_in(
    target: rundir.Target,
    cfg: DictConfig,
    overrides: Sequence[str],
    early: rundir.Notes,
    interrupted: Callable[[], bool],
    fetched: list[zoo.Fetched],
) -> dict[str, Any]:
    """run(), in a run directory this process holds; `early`: notes already shown, for train.log."""
    resume = Resume.open(target.resume_from, cfg, overrides)  # the checkpoint and its config, or a new run
    cfg = resume.cfg
    device = start_processes(cfg, resume)
    data = build_data(cfg, resume, fetched)
    parts = build_parts(cfg, data, resume, device, fetched)
    if interrupted():  # before the first file is written
        raise KeyboardInterrupt
    logger = RunLogger(
        target.run_dir,
        enabled=distributed.is_main(),
        earlier=early + resume.shown,
        resumed_at=_resumed_at(resume, target),
    )
    trainer = build_trainer(cfg, parts, data, device, logger, target.run_dir, resume, overrides)
    for level, note in resume.notes + parts.notes:
        log.log(level, note)
    if distributed.is_main():
        outputs.write_file(target.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode("utf-8"))
        _log_start(cfg, trainer, parts, device, target.run_dir, resume, overrides)
    started = time.perf_counter()
    try:
        metrics = trainer.fit()
    finally:
        logger.close()
    summary = {
        "run_dir": str(target.run_dir),
        "metrics": metrics,
        "stop_reason": trainer.stop_reason,
        "epoch": trainer.counters.epoch,
        "global_step": trainer.counters.global_step,
        "completed": trainer.completed(),
        "best_metric": trainer.counters.best_metric,
        "seconds": time.perf_counter() - started,
    }
    if distributed.is_main():
        _log_summary(summary, trainer, target.run_dir)
    distributed.shutdown()
    return summary


# ---------------------------------------------------------------- phases
def start_processes(cfg: DictConfig, resume: Resume) -> torch.device:
    """The device, the torchrun group (the global batch kept on another number of processes), the seeds."""
    device = resolve_device(cfg.device)
    distributed.init_from_env(device)
    if not distributed.is_main():
        log.setLevel(logging.WARNING)  # one copy of the progress lines, from rank 0
    resume.regroup()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    resume.check_same_start(device)
    seed_everything(cfg.seed, cfg.trainer.deterministic, device)
    return device


def build_data(cfg: DictConfig, resume: Resume, fetched: Sequence[zoo.Fetched] = ()) -> DataBundle:
    """The datasets (the shapes set is generated on first use); their repairs become notes for train.log."""
    if resume.ckpt is None:  # files named by the config are checked before the data is read or generated
        resolved = {f.key for f in fetched}  # weights by name, already in torch's cache
        for key in ("init_from", "model.backbone.weights"):
            if (value := OmegaConf.select(cfg, key)) and key not in resolved:
                checkpoint.require_file(value, key)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        data = build_datasets(cfg.data, with_masks=cfg.model.arch == "mask_rcnn")
    resume.notes += [(logging.WARNING, str(w.message)) for w in caught if issubclass(w.category, DataWarning)]
    resume.check_classes(data.classes)
    require_metric(
        cfg.trainer.best_metric,
        with_masks=cfg.model.arch == "mask_rcnn",
        classes=data.classes,
        ema=cfg.trainer.ema.decay is not None,
    )  # AP-<class> names are known now
    return data


@dataclass
class Parts:
    """What trains: the model (bare and DDP-wrapped), its EMA, optimizer, LR schedule and loss scaler."""

    model: torch.nn.Module
    wrapped: torch.nn.Module
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    steps_per_epoch: int  # optimizer steps: whole global batches of the training split
    digest: str
    spec: dict[str, Any]
    lr_rule: str
    notes: list[tuple[int, str]]
    weights: list[dict[str, Any]]  # the weights files a new run started from (zoo.Fetched.record), for the checkpoint


def build_parts(
    cfg: DictConfig, data: DataBundle, resume: Resume, device: torch.device, fetched: Sequence[zoo.Fetched] = ()
) -> Parts:
    new_run = resume.ckpt is None
    notes: list[tuple[int, str]] = [(logging.INFO, f.line()) for f in fetched if f.weights is not None]
    if new_run and zoo.is_zoo_source(cfg.init_from) and (defaults := zoo.pretrained_defaults(cfg.model)):
        line = (
            f"init_from={cfg.init_from}: {', '.join(defaults)} (torchvision's defaults for a pretrained detector; "
            "set the keys to change them)"
        )
        notes.append((logging.INFO, line))
    if cfg.init_from and new_run and cfg.model.attention.identity_init is None:
        # Attention added to a trained detector should not disturb it at step 0.
        cfg.model.attention.identity_init = True
    # On resume the checkpoint holds every weight: the backbone file need not be here.
    model = build_model(cfg.model, read_backbone_weights=new_run)
    if cfg.init_from and new_run:
        from frcnn_train.weights import load_init_weights

        source = next((f.path for f in fetched if f.key == "init_from"), cfg.init_from)
        report = load_init_weights(
            model,
            source,
            remap=OmegaConf.to_container(cfg.init.remap),
            strict=cfg.init.strict,
            trust=cfg.init.trust,
            raw=cfg.init.raw,
        )
        notes.append((logging.INFO, f"init_from={cfg.init_from}:\n{report.format()}"))
    model.to(device)
    spec = architecture_spec(cfg.model)
    digest = resume.fingerprint(model, spec)
    prepare_for_training(model, channels_last=cfg.trainer.channels_last, compile=False)
    ema = None
    if cfg.trainer.ema.decay is not None:  # a copy of the model before its backbone is compiled
        ema = ModelEma(
            model, decay=cfg.trainer.ema.decay, warmup_steps=cfg.trainer.ema.warmup_steps, every=cfg.trainer.ema.every
        )
    prepare_for_training(model, channels_last=False, compile=cfg.trainer.compile)
    global_batch = distributed.world_size() * cfg.trainer.batch_size * cfg.trainer.accumulate
    scale, lr_rule = lr_scale(cfg.optim, global_batch)
    optimizer = build_optimizer(model, cfg.optim, lr_scale=scale)
    per_epoch = steps_per_epoch(len(data.train), cfg.trainer.batch_size, cfg.trainer.accumulate)
    scheduler = build_scheduler(
        optimizer, cfg.schedule, steps_per_epoch=per_epoch, total_steps=per_epoch * cfg.trainer.epochs
    )
    dtype = amp_dtype(cfg.trainer.amp, cfg.trainer.amp_dtype, device)
    resume.precision_change(precision_name(dtype), device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    wrapped = distributed.wrap_model(model, norm=ddp_norm(cfg, device), device=device)
    return Parts(
        model=model,
        wrapped=wrapped,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        dtype=dtype,
        steps_per_epoch=per_epoch,
        digest=digest,
        spec=spec,
        lr_rule=lr_rule,
        notes=notes,
        weights=[f.record() for f in fetched] if new_run else [],
    )


def build_trainer(
    cfg: DictConfig,
    parts: Parts,
    data: DataBundle,
    device: torch.device,
    logger: RunLogger,
    run_dir: Path,
    resume: Resume,
    overrides: Sequence[str],
) -> Trainer:
    """The Trainer with its registry of checkpointed state, restored from the checkpoint on a resume."""
    settings = OmegaConf.to_object(cfg.trainer)  # a typed config.TrainerConfig
    precision = precision_name(parts.dtype)
    counters = Counters(
        best_metric_name=settings.best_metric,
        world_size=distributed.world_size(),
        batch_size=settings.batch_size,
        accumulate=settings.accumulate,
    )
    registry = Registry(
        model=parts.model,
        ema=parts.ema,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        scaler=Scaler(parts.scaler, warn=log.warning),
        trainer=counters,
        rng=RngStreams(
            data_order=lambda: counters.data_order(cfg.seed),
            reseed=lambda: seed_for(cfg.seed, distributed.rank(), counters.global_step),
        ),
    )
    checkpointer = Checkpointer(
        run_dir,
        keep_last=settings.keep_last,
        logger=logger,
        enabled=distributed.is_main(),
        extras={
            "config": OmegaConf.to_container(cfg, resolve=True),
            "architecture": {"fingerprint": parts.digest, "spec": parts.spec},
            "classes": list(data.classes),
            # How the run was first started; each resume adds its own line to trainer.history.
            "launch": resume.launch(overrides, precision, device, weights=parts.weights),
        },
    )
    with_masks = cfg.model.arch == "mask_rcnn"
    workers = resolve_num_workers(cfg.data.num_workers, device)
    trainer = Trainer(
        model=parts.wrapped,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        scaler=parts.scaler,
        ema=parts.ema,
        data=data,
        settings=settings,
        seed=cfg.seed,
        num_workers=workers,
        amp_dtype=parts.dtype,
        device=device,
        registry=registry,
        checkpointer=checkpointer,
        validator=Validator(
            data=data,
            device=device,
            with_masks=with_masks,
            batch_size=settings.batch_size,
            num_workers=workers,
            amp_dtype=parts.dtype,
            logger=logger,
            vis_images=settings.vis_images,
            best_metric=settings.best_metric,
            plots=settings.plots,
            backend=cfg.eval.backend,
        ),
        step_log=StepLog(
            logger,
            log_every=settings.log_every,
            epochs=settings.epochs,
            steps_per_epoch=parts.steps_per_epoch,
            progress=settings.progress and sys.stderr.isatty(),
        ),
    )
    if resume.ckpt is not None:
        resume.restore(registry, model=parts.model, overrides=overrides, precision=precision, device=device)
        checkpointer.repair_links(resume.source, resume.ckpt["trainer"])
        if moved := apply_current_schedule(parts.scheduler):
            resume.notes.append(
                (
                    logging.WARNING,
                    (
                        f"The LR schedule changed with this resume ({'; '.join(resume.changes)}): the LR at step "
                        f"{counters.global_step + 1} is {moved[1]:.6g}, not {moved[0]:.6g} as on the checkpoint's schedule; "
                        "resume with the checkpoint's value of the key to keep the old curve."
                    ),
                )
            )
    return trainer


def _resumed_at(resume: Resume, target: rundir.Target) -> tuple[int, int] | None:
    """Where TensorBoard and metrics.jsonl continue: later lines are a killed run's."""
    if resume.ckpt is not None:
        return resume.ckpt["trainer"]["global_step"], resume.ckpt["trainer"]["epoch"]
    return (0, 0) if target.restart else None


def ddp_norm(cfg: DictConfig, device: torch.device) -> str:
    """The backbone norm under DDP. From scratch (`auto` without weights) it is SyncBatchNorm on CUDA:
    detection trains on a few images per GPU, too few for BatchNorm statistics of their own, and
    synchronised statistics are the same on every rank, so what rank 0 saves is what was trained.
    torch's SyncBatchNorm has no CPU kernels, so on CPU `auto` stays per-process BatchNorm."""
    bb = cfg.model.backbone
    if bb.norm == "auto" and not bb.weights:
        return "syncbn" if device.type == "cuda" else "bn"
    return resolve_norm(bb.norm, bb.weights)


# ---------------------------------------------------------------- what the console shows
def _log_start(
    cfg: DictConfig,
    trainer: Trainer,
    parts: Parts,
    device: torch.device,
    run_dir: Path,
    resume: Resume,
    overrides: Sequence[str],
) -> None:
    model = parts.model
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if resume.source:
        changes = f" with {'; '.join(resume.changes)}" if resume.changes else ""
        log.info(
            "Resuming %s at %s%s.",
            resume.source,
            describe_position(vars(trainer.counters), trainer.steps_per_epoch),
            changes,
        )
    log.info(
        "Run directory %s on %s: %s/%s, %d classes, %.2fM parameters (%.2fM trainable); "
        "%d train / %d val images, %d steps per epoch.",
        run_dir,
        device,
        cfg.model.arch,
        cfg.model.backbone.name,
        cfg.model.num_classes,
        params / 1e6,
        trainable / 1e6,
        len(trainer.data.train),
        len(trainer.data.val),
        trainer.steps_per_epoch,
    )
    log.info("%s", parts.lr_rule)
    for group in group_summary(trainer.optimizer):
        log.info(
            "  param group %-22s %4d tensors  lr x%g  weight_decay %g",
            group["name"],
            group["params"],
            group["lr_mult"],
            group["weight_decay"],
        )
    if parts.ema is not None:
        log.info(
            "EMA of the weights: decay %g (ramped over %d updates), updated every %d step(s); best.pth follows %s.",
            parts.ema.decay,
            parts.ema.warmup_steps,
            parts.ema.every,
            cfg.trainer.best_metric,
        )
        if never := ema_never_updates(parts.ema, trainer):
            log.warning("%s", never)
    if overrides:
        log.info("Overrides: %s", " ".join(overrides))
    if warning := start_warning(cfg.model, trainer.data.train):  # from the records: no image is read
        log.warning("%s", warning)


def ema_never_updates(ema: ModelEma, trainer: Trainer) -> str | None:
    """The warning for an EMA that this run will never update (trainer.ema.every beyond its last step):
    it would stay the initial weights, which evaluate, predict and export would then skip."""
    c, s = trainer.counters, trainer.s
    last = s.epochs * trainer.steps_per_epoch
    if s.max_steps is not None:
        last = min(last, s.max_steps)
    if ema.updates or last // ema.every > c.global_step // ema.every:
        return None
    return (
        f"trainer.ema.every={ema.every} is larger than this run's last step ({last}), so the EMA would never "
        f"update and stay the weights of step {c.global_step}: its validation shows those weights, and "
        "evaluate, predict and export will use the trained weights instead; set trainer.ema.every to at most "
        f"{max(last, 1)} or trainer.ema.decay=null."
    )


def _log_summary(summary: dict[str, Any], trainer: Trainer, run_dir: Path) -> None:
    c = trainer.counters
    launcher = distributed.launcher()
    # Name only a file that exists: a run that trained nothing may have saved nothing.
    existing = checkpoint.checkpoint_files(run_dir) if run_dir.is_dir() else []
    command = "nothing was saved to resume from"
    if existing:
        command = f"{launcher} frcnn_train.train {override_arg('resume', existing[0])}"
        if summary["completed"]:  # a number that pastes (a placeholder such as <more> is a shell redirection)
            command += f" trainer.epochs={2 * c.epoch}  # or any number above {c.epoch}"
        elif trainer.s.max_steps is not None and c.global_step >= trainer.s.max_steps:
            command += " trainer.max_steps=null"  # the checkpoint keeps max_steps; without it nothing would train
    where = describe_position(vars(c), trainer.steps_per_epoch)
    if summary["completed"]:
        log.info(
            "Finished %d epoch%s (%d steps) in %.0f s.",
            c.epoch,
            "s" * (c.epoch != 1),
            c.global_step,
            summary["seconds"],
        )
    else:
        log.info("Stopped at %s (%s) after %.0f s.", where, summary["stop_reason"], summary["seconds"])
    if summary["metrics"]:
        at = (
            ""
            if c.metrics_step is None
            # metrics of a checkpoint from before their step was kept
            else " at "
            + describe_position({"epoch": c.metrics_epoch, "step_in_epoch": 0, "global_step": c.metrics_step})
        )
        metrics = summary["metrics"]
        log.info(
            "Validation%s:\n%s", at, format_table({k: v for k, v in metrics.items() if not k.startswith(EMA_PREFIX)})
        )
        ema = {k.removeprefix(EMA_PREFIX): v for k, v in metrics.items() if k.startswith(EMA_PREFIX)}
        if ema:
            log.info("Validation of the EMA weights%s:\n%s", at, format_table(ema))
    saved = [p.name for p in sorted(run_dir.glob("*.pth"))]
    best = f" (best {trainer.s.best_metric} = {c.best_metric:.4f})" if c.best_metric is not None else ""
    log.info("Run directory: %s\nCheckpoints:   %s%s\nResume with:   %s", run_dir, ", ".join(saved), best, command)
