"""From a composed config to a finished (or cleanly stopped) run.

This is the builder layer: the only place, with the `build_*` functions it calls,
that reads the config. Resume takes the architecture from the checkpoint's own
config (nanoGPT's `model_args` rule), so a flag left off the command line cannot
change the model.
"""
from __future__ import annotations

import datetime
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from frcnn_train import checkpoint, distributed, rundir
from frcnn_train.checkpointer import Checkpointer
from frcnn_train.config import ResumeConflict, check_values, merge_for_resume
from frcnn_train.data import DataWarning, build_datasets, resolve_num_workers
from frcnn_train.errors import CheckpointError, ConfigError, UserError
from frcnn_train.evaluation import format_table
from frcnn_train.logs import RunLogger, log, setup_console
from frcnn_train.models import build_model, prepare_for_training
from frcnn_train.models.backbones import resolve_norm
from frcnn_train.models.fingerprint import architecture_spec, diff_layouts, diff_specs, fingerprint, tensor_layout
from frcnn_train.optim import apply_current_schedule, build_optimizer, build_scheduler, group_summary
from frcnn_train.runtime import amp_dtype, precision_name, resolve_device, seed_everything
from frcnn_train.trainer import Trainer, TrainerSettings, steps_per_epoch


def launch_record(overrides: Sequence[str], precision: str, device: torch.device) -> dict[str, Any]:
    """What the checkpoint keeps of a run's first launch (inspect shows it)."""
    return {"started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "overrides": list(overrides), "precision": precision, "device": str(device),
            "world_size": distributed.world_size()}


def describe_precision_change(ckpt: dict[str, Any], precision: str, device: torch.device) -> str:
    """One warning line when a resume trains in another precision than the checkpoint did; "" when the same.

    trainer.amp / amp_dtype are mutable on resume, and amp applies to CUDA only, so a
    CPU run continued on a GPU may switch from fp32 to autocast without any key changing.
    """
    records = [ckpt.get("launch") or {}] + list(ckpt["trainer"].get("history", []))
    before = next((r["precision"] for r in reversed(records) if r.get("precision")), None)
    if before is None and not ckpt["config"]["trainer"].get("amp"):
        before = "fp32"  # older checkpoints: without trainer.amp it was fp32 on any device
    if before in (None, precision):
        return ""
    return (f"Precision changes with this resume: the checkpoint trained in {before}, training continues in "
            f"{precision} on {device}; the loss curve may shift, and the run is no longer bitwise comparable "
            "to one trained in a single precision.")


def _resolve_classes(cfg: DictConfig, classes: list[str], saved_classes: list[str] | None) -> None:
    if saved_classes is not None and list(saved_classes) != list(classes):
        raise ConfigError(
            f"the dataset's classes {classes} differ from the checkpoint's {list(saved_classes)}; "
            "point data at the dataset the run was trained on, or fine-tune with init_from="
        )
    if cfg.model.num_classes is None:
        cfg.model.num_classes = len(classes)
    elif cfg.model.num_classes != len(classes):
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but the dataset has {len(classes)} classes "
            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); remove model.num_classes to take it from the data"
        )


def _check_fingerprint(ckpt: dict[str, Any], model: torch.nn.Module, spec: dict[str, Any], source: Path) -> str:
    digest = fingerprint(spec, model)
    saved = ckpt["architecture"]
    if saved.get("fingerprint") in (None, digest):
        return digest
    lines = diff_specs(saved.get("spec", {}), spec) + diff_layouts(tensor_layout(ckpt["model"]), tensor_layout(model))
    raise CheckpointError(
        f"the model rebuilt from {source}'s config does not match the one it saved "
        f"({'; '.join(lines[:6]) or 'same config, different tensors'}); resume with the frcnn_train "
        "version that wrote it, or start from its weights with init_from="
    )


def describe_model_change(saved: DictConfig, requested: DictConfig) -> str:
    """What a refused resume would add, remove or reshape, from both models built on the meta device."""
    if saved.model == requested.model:
        return ""
    layouts = []
    for cfg in (saved, requested):
        try:
            with torch.device("meta"):
                layouts.append(tensor_layout(build_model(cfg.model, read_backbone_weights=False)))
        except UserError as err:
            return f"none, the requested model cannot be built: {err}"
    return "; ".join(diff_layouts(*layouts)[:6])


def keep_global_batch(cfg: DictConfig, ckpt: dict[str, Any], world: int) -> str | None:
    """On a resume with another number of processes, set trainer.accumulate so that
    processes x trainer.batch_size x trainer.accumulate stays the checkpoint's global batch
    (the LR schedule and the data order are defined per global batch). Returns the line to log."""
    saved = ckpt["trainer"]
    # Checkpoints written before these keys existed: one RNG state per process, the config's batch.
    old_world = saved.get("world_size") or max(len(ckpt["rng"].get("ranks", [])), 1)
    old_accumulate = saved.get("accumulate", cfg.trainer.accumulate)
    batch = cfg.trainer.batch_size  # not mutable on resume: the checkpoint's
    if old_world == world:
        return None
    global_batch = old_world * saved.get("batch_size", batch) * old_accumulate
    if global_batch % (world * batch):
        raise ConfigError(
            f"cannot resume a run trained with a global batch of {global_batch} images ({old_world} processes x "
            f"trainer.batch_size={batch} x trainer.accumulate={old_accumulate}) on {world} processes, because "
            f"{world} x trainer.batch_size={batch} does not divide it; resume on a number of processes that divides "
            f"{global_batch // batch}"
        )
    cfg.trainer.accumulate = global_batch // (world * batch)
    return (f"world size {old_world} -> {world}: trainer.accumulate {old_accumulate} -> {cfg.trainer.accumulate} "
            f"keeps the global batch of {global_batch} images ({world} x {batch} x {cfg.trainer.accumulate})")


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train (or resume) as `cfg` says; returns a summary dict (run_dir, metrics, stop reason)."""
    setup_console()
    check_values(cfg)  # before any file, data or model work
    target = rundir.resolve(cfg)
    # Refusals (another run's directory, read-only, in use) come here, before any data or model work.
    with rundir.claim(target, overwrite=cfg.overwrite) as notes:
        return _run_in(target, cfg, overrides, notes)


def _run_in(target: rundir.Target, cfg: DictConfig, overrides: Sequence[str], early: rundir.Notes) -> dict[str, Any]:
    """run(), in a run directory this process holds; `early`: notes already shown, for train.log."""
    ckpt, resumed_from, changes, run_dir = None, target.resume_from, [], target.run_dir
    if resumed_from is not None:
        ckpt = checkpoint.load_for_resume(resumed_from)
        try:
            cfg, changes = merge_for_resume(ckpt["config"], cfg, overrides, str(resumed_from))
        except ResumeConflict as conflict:
            raise conflict.with_modules(describe_model_change(conflict.saved, conflict.requested)) from None
        check_values(cfg)  # the checkpoint's values with the mutable keys this resume changed
        cfg.resume = str(resumed_from)
        early += rundir.going_back(resumed_from, ckpt)

    device = resolve_device(cfg.device)
    distributed.init_from_env(device)
    if not distributed.is_main():
        log.setLevel(logging.WARNING)  # one copy of the progress lines, from rank 0
    if ckpt is not None and (regrouped := keep_global_batch(cfg, ckpt, distributed.world_size())):
        changes.append(regrouped)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _check_same_start(cfg, resumed_from, ckpt, device)
    seed_everything(cfg.seed, cfg.trainer.deterministic, device)
    if ckpt is None:  # before the data is read or generated
        for key in ("init_from", "model.backbone.weights"):
            if value := OmegaConf.select(cfg, key):
                checkpoint.require_file(value, key)
    with_masks = cfg.model.arch == "mask_rcnn"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        data = build_datasets(cfg.data, with_masks=with_masks)
    # Logged once train.log is open: (level, message).
    notes = [(logging.WARNING, str(w.message)) for w in caught if issubclass(w.category, DataWarning)]
    _resolve_classes(cfg, data.classes, ckpt["classes"] if ckpt else None)

    if cfg.init_from and ckpt is None and cfg.model.attention.identity_init is None:
        # Attention added to a trained detector should not disturb it at step 0.
        cfg.model.attention.identity_init = True
    # On resume the checkpoint holds every weight: the backbone file need not be here.
    model = build_model(cfg.model, read_backbone_weights=ckpt is None)
    if cfg.init_from and ckpt is None:
        from frcnn_train.weights import load_init_weights

        report = load_init_weights(model, cfg.init_from, remap=OmegaConf.to_container(cfg.init.remap),
                                   strict=cfg.init.strict, trust=cfg.init.trust)
        notes.append((logging.INFO, f"init_from={cfg.init_from}:\n{report.format()}"))
    model.to(device)
    spec = architecture_spec(cfg.model)
    digest = _check_fingerprint(ckpt, model, spec, resumed_from) if ckpt else fingerprint(spec, model)
    prepare_for_training(model, channels_last=cfg.trainer.channels_last, compile=cfg.trainer.compile)
    optimizer = build_optimizer(model, cfg.optim)
    per_epoch = steps_per_epoch(len(data.train), cfg.trainer.batch_size, cfg.trainer.accumulate)
    scheduler = build_scheduler(optimizer, cfg.schedule, steps_per_epoch=per_epoch,
                                total_steps=per_epoch * cfg.trainer.epochs)
    dtype = amp_dtype(cfg.trainer.amp, cfg.trainer.amp_dtype, device)
    precision = precision_name(dtype)
    if ckpt and (change := describe_precision_change(ckpt, precision, device)):
        notes.append((logging.WARNING, change))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    wrapped = distributed.wrap_model(model, norm=ddp_norm(cfg, device), device=device)

    resumed_at = None  # where TensorBoard and metrics.jsonl continue: later lines are a killed run's
    if ckpt:
        resumed_at = (ckpt["trainer"]["global_step"], ckpt["trainer"]["epoch"])
    elif target.restart:
        resumed_at = (0, 0)
    logger = RunLogger(run_dir, enabled=distributed.is_main(), resumed_at=resumed_at, earlier=early)
    for level, note in notes:
        log.log(level, note)
    trainer = Trainer(
        model=wrapped, optimizer=optimizer, scheduler=scheduler, scaler=scaler, data=data,
        settings=TrainerSettings(
            epochs=cfg.trainer.epochs, batch_size=cfg.trainer.batch_size, seed=cfg.seed,
            num_workers=resolve_num_workers(cfg.data.num_workers, device), amp_dtype=dtype, grad_clip=cfg.trainer.grad_clip,
            accumulate=cfg.trainer.accumulate, eval_every=cfg.trainer.eval_every,
            checkpoint_every_steps=cfg.trainer.checkpoint_every_steps,
            max_steps=cfg.trainer.max_steps, log_every=cfg.trainer.log_every, vis_images=cfg.trainer.vis_images,
            progress=cfg.trainer.progress and sys.stderr.isatty(), best_metric=cfg.trainer.best_metric,
        ),
        device=device, run_dir=run_dir, logger=logger, with_masks=with_masks,
        checkpointer=Checkpointer(
            run_dir, keep_last=cfg.trainer.keep_last, logger=logger, enabled=distributed.is_main(),
            extras={
                "config": OmegaConf.to_container(cfg, resolve=True),
                "architecture": {"fingerprint": digest, "spec": spec},
                "classes": list(data.classes),
                # How the run was first started; each resume adds its own line to trainer.history.
                "launch": ckpt.get("launch") if ckpt else launch_record(overrides, precision, device),
            },
        ),
    )
    if ckpt:
        trainer.load_state_dict(ckpt)
        trainer.checkpointer.repair_links(resumed_from, ckpt["trainer"])
        moved = apply_current_schedule(scheduler)
        if moved:
            log.warning("The LR schedule changed with this resume (%s): the LR at step %d is %.6g, not %.6g as on "
                        "the checkpoint's schedule; resume with the checkpoint's value of the key to keep the old "
                        "curve.", "; ".join(changes), trainer.global_step + 1, moved[1], moved[0])
        trainer.history.append({
            "resumed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "from": str(resumed_from), "epoch": trainer.epoch, "global_step": trainer.global_step,
            "changes": changes, "versions": checkpoint.library_versions(),
            "overrides": list(overrides), "precision": precision, "device": str(device),
        })
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    _log_start(cfg, trainer, model, device, run_dir, resumed_from, changes)
    if overrides and distributed.is_main():
        log.info("Overrides: %s", " ".join(overrides))

    started = time.perf_counter()
    try:
        metrics = trainer.fit()
    finally:
        logger.close()
    summary = {"run_dir": str(run_dir), "metrics": metrics, "stop_reason": trainer.stop_reason,
               "epoch": trainer.epoch, "global_step": trainer.global_step, "completed": trainer.completed(),
               "best_metric": trainer.best_metric,
               "seconds": time.perf_counter() - started}
    if distributed.is_main():
        _log_summary(summary, trainer, run_dir)
    distributed.shutdown()
    return summary


def _check_same_start(cfg: DictConfig, resumed_from: Path | None, ckpt: dict[str, Any] | None,
                      device: torch.device) -> None:
    """Every process must resume from the same checkpoint; a node that cannot see rank 0's files
    would otherwise start afresh (resume=auto) and train a different model in silence."""
    if distributed.world_size() <= 1:
        return
    mine = f"{resumed_from} at step {ckpt['trainer']['global_step']}" if ckpt else "a new run"
    main = distributed.broadcast_from_main(mine)
    if distributed.any_rank(mine != main, device):
        raise ConfigError(
            f"the processes disagree on where to start (rank 0: {main}; rank {distributed.rank()}: {mine}); "
            f"output_dir={cfg.output_dir} must be storage that every node sees at the same path"
        )


def ddp_norm(cfg: DictConfig, device: torch.device) -> str:
    """The backbone norm under DDP. From scratch (`auto` without weights) it is SyncBatchNorm on CUDA:
    detection trains on a few images per GPU, too few for BatchNorm statistics of their own, and
    synchronised statistics are the same on every rank, so what rank 0 saves is what was trained.
    torch's SyncBatchNorm has no CPU kernels, so on CPU `auto` stays per-process BatchNorm."""
    bb = cfg.model.backbone
    if bb.norm == "auto" and not bb.weights:
        return "syncbn" if device.type == "cuda" else "bn"
    return resolve_norm(bb.norm, bb.weights)


def _log_start(cfg: DictConfig, trainer: Trainer, model: torch.nn.Module, device: torch.device,
               run_dir: Path, resumed_from: Path | None, changes: list[str]) -> None:
    if not distributed.is_main():
        return
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if resumed_from:
        # Counted as the training log counts: the epoch in progress, 1-based.
        log.info("Resuming %s at step %d (epoch %d, step %d of %d)%s.", resumed_from, trainer.global_step,
                 trainer.epoch + 1, trainer.step_in_epoch, trainer.steps_per_epoch,
                 f" with {'; '.join(changes)}" if changes else "")
    log.info("Run directory %s on %s: %s/%s, %d classes, %.2fM parameters (%.2fM trainable); "
             "%d train / %d val images, %d steps per epoch.", run_dir, device, cfg.model.arch,
             cfg.model.backbone.name, cfg.model.num_classes, params / 1e6, trainable / 1e6,
             len(trainer.data.train), len(trainer.data.val), trainer.steps_per_epoch)
    for group in group_summary(trainer.optimizer):
        log.info("  param group %-22s %4d tensors  lr x%g  weight_decay %g", group["name"], group["params"],
                 group["lr_mult"], group["weight_decay"])


def _log_summary(summary: dict[str, Any], trainer: Trainer, run_dir: Path) -> None:
    launcher = distributed.launcher()
    # Name only a file that exists: a run that trained nothing may have saved nothing.
    existing = checkpoint.checkpoint_files(run_dir) if run_dir.is_dir() else []
    command = "nothing was saved to resume from"
    if existing:
        command = f"{launcher} frcnn_train.train resume={existing[0]}"
        if summary["completed"]:
            command += " trainer.epochs=<more>"
        elif trainer.s.max_steps is not None and trainer.global_step >= trainer.s.max_steps:
            command += " trainer.max_steps=null"  # the checkpoint keeps max_steps; without it nothing would train
    if summary["completed"]:
        log.info("Finished %d epoch%s (%d steps) in %.0f s.", trainer.epoch, "s" * (trainer.epoch != 1),
                 trainer.global_step, summary["seconds"])
    else:
        log.info("Stopped during epoch %d at step %d (%s) after %.0f s.", trainer.epoch + 1, trainer.global_step,
                 summary["stop_reason"], summary["seconds"])
    if summary["metrics"]:
        log.info("Validation (epoch %d):\n%s", trainer.epoch, format_table(summary["metrics"]))
    saved = [p.name for p in sorted(run_dir.glob("*.pth"))]
    log.info("Run directory: %s\nCheckpoints:   %s%s\nResume with:   %s", run_dir, ", ".join(saved),
             f" (best {trainer.s.best_metric} = {trainer.best_metric:.4f})" if trainer.best_metric is not None else "",
             command)
