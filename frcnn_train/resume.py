"""The whole resume decision, in one place.

`Resume.open` reads the checkpoint and merges the command line into its config (only
the keys in config.MUTABLE_ON_RESUME may change; anything else is refused with a
diff); the rest of a run's start asks this object: the world-size rule
(`regroup`), whether every process starts from the same file, the class and
architecture fingerprint checks, restoring the registered state, and the record each
resume adds to the checkpoint's history. A new run gets a `Resume` too, with no
checkpoint, so launch.py reads the same either way.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from frcnn_train import checkpoint, distributed, rundir
from frcnn_train.config import MUTABLE_ON_RESUME, START_KEYS, check_values, with_schema
from frcnn_train.errors import CheckpointError, ConfigError, UserError
from frcnn_train.models import build_model
from frcnn_train.models.fingerprint import (
    config_mismatch,
    diff_layouts,
    fingerprint,
    mismatch_advice,
    tensor_layout,
)
from frcnn_train.overrides import flatten, requested_keys
from frcnn_train.state import Registry

# May change on resume only from off to on (the average then starts at the resumed weights).
EMA_KEYS = ("trainer.ema.decay", "trainer.ema.warmup_steps", "trainer.ema.every")


class ResumeConflict(ConfigError):
    """A resume asked for non-mutable changes; carries both configs so callers can describe the model change."""

    def __init__(
        self, conflicts: list[str], source: str, saved: DictConfig, requested: DictConfig, modules: str = ""
    ) -> None:
        self.conflicts, self.source, self.saved, self.requested = conflicts, source, saved, requested
        super().__init__(
            f"cannot resume {source} with a changed config: {'; '.join(conflicts)}"
            f"{f' (modules that would change: {modules})' if modules else ''}; "
            f"a resume may change only {', '.join(MUTABLE_ON_RESUME)} (and switch trainer.ema on), so drop the "
            f"other overrides to resume, or start a new run from these weights with init_from={source}"
        )

    def with_modules(self, modules: str) -> ResumeConflict:
        return ResumeConflict(self.conflicts, self.source, self.saved, self.requested, modules)


def _upgrade(saved: dict[str, Any]) -> dict[str, Any]:
    """Keys added since a checkpoint was written, set to what that run did (not to today's defaults)."""
    saved = dict(saved)
    optim = dict(saved.get("optim", {}))
    optim.setdefault("reference_batch", None)  # the LR was used as given, whatever the batch
    saved["optim"] = optim
    data = dict(saved.get("data", {}))
    data.setdefault("group_by_aspect_ratio", False)  # the data order was the plain permutation
    saved["data"] = data
    return saved


def saved_config(saved: dict[str, Any], source: str, versions: dict[str, Any] | None = None) -> DictConfig:
    """A checkpoint's config validated against today's schema (keys added since filled in as that run had
    them), or one CheckpointError naming the key; `versions` (the checkpoint's) decide the advice."""
    try:
        return with_schema(_upgrade(saved))
    except Exception as err:  # noqa: BLE001 - OmegaConf validation errors
        written = (versions or {}).get("frcnn_train")
        here = checkpoint.library_versions()["frcnn_train"]
        advice = (
            "use the frcnn_train version that wrote it"
            if written is None
            else f"use frcnn_train {written}, which wrote it"
            if written != here
            else f"the same frcnn_train {here} wrote it, so the config was edited since: fix that value in it"
        )
        key = f"{err.full_key}: " if getattr(err, "full_key", None) else ""  # OmegaConf's errors know the key
        raise CheckpointError(
            f"{source} holds a config this version cannot read ({key}{str(err).splitlines()[0]}); {advice}"
        ) from None


def merge_for_resume(
    saved: dict, cfg: DictConfig, overrides: Sequence[str], source: str, versions: dict[str, Any] | None = None
) -> tuple[DictConfig, list[str]]:
    """The checkpoint's config with the mutable keys the user asked to change.

    Returns the config to resume with and "key: old -> new" lines for the history.
    Any requested non-mutable change is refused, naming each key with both values.
    `versions`: the checkpoint's, for the advice when its config cannot be read.
    """
    merged = saved_config(saved, source, versions)
    saved_flat = flatten(merged)
    # Untyped copy: it may receive values the schema would coerce or reject (lists of rules).
    requested = OmegaConf.create(OmegaConf.to_container(merged))
    wanted = requested_keys(cfg, overrides)
    ema_switched_on = saved_flat["trainer.ema.decay"] is None and wanted.get("trainer.ema.decay") is not None
    changes, conflicts = [], []
    for key, value in wanted.items():
        if key.split(".")[0] in START_KEYS or saved_flat.get(key) == value:
            continue
        OmegaConf.update(requested, key, value, merge=False)
        if key in MUTABLE_ON_RESUME or (ema_switched_on and key in EMA_KEYS):
            OmegaConf.update(merged, key, value, merge=False)
            changes.append(f"{key}: {saved_flat.get(key)!r} -> {value!r}")
        else:
            conflicts.append(f"{key} (checkpoint {saved_flat.get(key)!r}, requested {value!r})")
    renamed = _renamed_run(wanted.get("run_name"), source)
    if conflicts:
        raise ResumeConflict(conflicts + ([renamed] if renamed else []), source, saved=merged, requested=requested)
    if renamed:
        run_dir = Path(source).parent
        raise ConfigError(
            f"resume={source} continues the run in its own directory {run_dir}, so run_name={wanted['run_name']} "
            f"cannot rename it (run_name is not a key a resume may change); drop run_name= to resume, or start a "
            f"new run from these weights with run_name={wanted['run_name']} init_from={source}"
        )
    return merged, changes


def _renamed_run(run_name: Any, source: str) -> str | None:
    """The conflict line when the command line names another run than the checkpoint's directory (None: same
    or not given). resume=auto finds the checkpoint under run_name, so there the two always agree."""
    if run_name is None or str(run_name) == Path(source).parent.name:
        return None
    return f"run_name (the run's directory {Path(source).parent.name!r}, requested {str(run_name)!r})"


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


def describe_precision_change(ckpt: dict[str, Any], precision: str, device: torch.device) -> str:
    """One warning line when a resume trains in another precision than the checkpoint did; "" when the same.

    trainer.amp / amp_dtype are mutable on resume, and the precision follows the device too,
    so a CPU run continued on a GPU may switch from fp32 to autocast without any key changing.
    """
    records = [ckpt.get("launch") or {}] + list(ckpt["trainer"].get("history", []))
    before = next((r["precision"] for r in reversed(records) if r.get("precision")), None)
    if before is None and not ckpt["config"]["trainer"].get("amp"):
        before = "fp32"  # older checkpoints: without trainer.amp it was fp32 on any device
    if before in (None, precision):
        return ""
    return (
        f"Precision changes with this resume: the checkpoint trained in {before}, training continues in "
        f"{precision} on {device}; the loss curve may shift, and the run is no longer bitwise comparable "
        "to one trained in a single precision."
    )


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
    return (
        f"world size {old_world} -> {world}: trainer.accumulate {old_accumulate} -> {cfg.trainer.accumulate} "
        f"keeps the global batch of {global_batch} images ({world} x {batch} x {cfg.trainer.accumulate})"
    )


def launch_record(
    overrides: Sequence[str], precision: str, device: torch.device, weights: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """What the checkpoint keeps of a run's first launch (inspect shows it); `weights`: the files it started
    from (init_from, model.backbone.weights), each by name and sha256."""
    return {
        "started_at": _now("microseconds"),  # names the run (outputs._same_run): two may start in one second
        "overrides": list(overrides),
        "precision": precision,
        "device": str(device),
        "world_size": distributed.world_size(),
        "weights": list(weights),
    }


def _now(timespec: str = "seconds") -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec=timespec)


@dataclass
class Resume:
    """A run's starting point: a checkpoint and the config merged with it, or nothing (a new run)."""

    cfg: DictConfig
    source: Path | None = None
    ckpt: dict[str, Any] | None = None
    changes: list[str] = field(default_factory=list)  # "key: old -> new", for the history and the log
    notes: list[tuple[int, str]] = field(default_factory=list)  # (level, message) to log once train.log is open
    shown: list[tuple[int, str]] = field(default_factory=list)  # already on the console, for train.log

    @classmethod
    def open(cls, source: Path | None, cfg: DictConfig, overrides: Sequence[str]) -> Resume:
        """Read `source` (None: a new run) and merge the command line into its config, or refuse."""
        if source is None:
            return cls(cfg=cfg)
        ckpt = checkpoint.load_for_resume(source)
        try:
            merged, changes = merge_for_resume(ckpt["config"], cfg, overrides, str(source), ckpt.get("versions"))
        except ResumeConflict as conflict:
            raise conflict.with_modules(describe_model_change(conflict.saved, conflict.requested)) from None
        check_values(merged)  # the checkpoint's values with the mutable keys this resume changed
        merged.resume = str(source)
        return cls(cfg=merged, source=source, ckpt=ckpt, changes=changes, shown=rundir.going_back(source, ckpt))

    def regroup(self) -> None:
        """Keep the checkpoint's global batch on this number of processes (changes trainer.accumulate)."""
        if self.ckpt is not None and (line := keep_global_batch(self.cfg, self.ckpt, distributed.world_size())):
            self.changes.append(line)

    def check_same_start(self, device: torch.device) -> None:
        """Every process must resume from the same checkpoint; a node that cannot see rank 0's files
        would otherwise start afresh (resume=auto) and train a different model in silence."""
        if distributed.world_size() <= 1:
            return
        mine = f"{self.source} at step {self.ckpt['trainer']['global_step']}" if self.ckpt else "a new run"
        main = distributed.broadcast_from_main(mine)
        if distributed.any_rank(mine != main, device):
            raise ConfigError(
                f"the processes disagree on where to start (rank 0: {main}; rank {distributed.rank()}: {mine}); "
                f"output_dir={self.cfg.output_dir} must be storage that every node sees at the same path"
            )

    def check_classes(self, classes: list[str]) -> None:
        """The dataset must hold the checkpoint's classes; sets model.num_classes from the data when unset."""
        cfg = self.cfg
        if self.ckpt is not None and list(self.ckpt["classes"]) != list(classes):
            raise ConfigError(
                f"the dataset's classes {classes} differ from the checkpoint's {list(self.ckpt['classes'])}; "
                "point data at the dataset the run was trained on, or fine-tune with init_from="
            )
        if cfg.model.num_classes is None:
            cfg.model.num_classes = len(classes)
        elif cfg.model.num_classes != len(classes):
            listed = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            raise ConfigError(
                f"model.num_classes={cfg.model.num_classes} but the dataset has {len(classes)} classes ({listed}); "
                "remove model.num_classes to take it from the data"
            )

    def fingerprint(self, model: torch.nn.Module, spec: dict[str, Any]) -> str:
        """The model's architecture fingerprint; on a resume it must be the checkpoint's."""
        digest = fingerprint(spec, model)
        if self.ckpt is None or not (lines := config_mismatch(self.ckpt, spec, model)):
            return digest
        raise CheckpointError(
            f"the config in {self.source} does not match its weights ({'; '.join(lines[:6])}); "
            f"{mismatch_advice(self.ckpt, spec)}, or start a new run from its weights with init_from={self.source}"
        )

    def precision_change(self, precision: str, device: torch.device) -> None:
        if self.ckpt is not None and (line := describe_precision_change(self.ckpt, precision, device)):
            self.notes.append((logging.WARNING, line))

    def launch(
        self, overrides: Sequence[str], precision: str, device: torch.device, weights: Sequence[dict[str, Any]] = ()
    ) -> dict[str, Any] | None:
        """How the run was first started: the checkpoint's record on a resume, a new one otherwise."""
        if self.ckpt is not None:
            return self.ckpt.get("launch")  # None in checkpoints written before it was recorded
        return launch_record(overrides, precision, device, weights)

    def restore(
        self,
        registry: Registry,
        *,
        model: torch.nn.Module,
        overrides: Sequence[str],
        precision: str,
        device: torch.device,
    ) -> None:
        """Load every registered part from the checkpoint and add this resume to its history."""
        if self.ckpt is None:
            return
        registry.load_state_dict(self.ckpt)
        counters, ema = registry.parts["trainer"], registry.parts["ema"]
        if ema is not None and self.ckpt.get("ema") is None:
            ema.restart_from(model)
            self.notes.append(
                (
                    logging.WARNING,
                    f"trainer.ema is on from this resume: the average starts at the "
                    f"weights of step {counters.global_step}, not at step 0.",
                )
            )
        counters.history.append(
            {
                "resumed_at": _now(),
                "from": str(self.source),
                "epoch": counters.epoch,
                "global_step": counters.global_step,
                "step_in_epoch": counters.step_in_epoch,
                "changes": list(self.changes),
                "versions": checkpoint.library_versions(),
                "overrides": list(overrides),
                "precision": precision,
                "device": str(device),
            }
        )
