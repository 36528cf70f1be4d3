"""Builders for datasets and loaders, the only code here that reads the config.

Exact resume is the point: the training order and every augmentation are a
pure function of (seed, epoch, sample index). Nothing depends on worker RNG
state or the global torch RNG, so a run resumed mid-epoch, with any number of
workers, sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from frcnn_train.config import worker_count
from frcnn_train.data.coco import CocoDetection
from frcnn_train.data.grouping import dataset_groups, grouped_order
from frcnn_train.data.problems import Problems
from frcnn_train.data.shapes import ensure_shapes_dataset
from frcnn_train.data.transforms import Compose, RandomHorizontalFlip, ScaleJitter
from frcnn_train.data.voc import load_voc
from frcnn_train.errors import ConfigError
from frcnn_train.runtime import seed_for, seed_sequence

log = logging.getLogger(__name__)

DATASET_NAMES = ("coco", "shapes", "voc")
Splits = tuple[CocoDetection, CocoDetection]


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    classes: list[str]  # label i (1-based; 0 is background) is classes[i - 1]
    # Each training image's aspect-ratio group (data.group_by_aspect_ratio); None: no grouping.
    train_groups: np.ndarray | None = None


# --------------------------------------------------------------------------- datasets


def build_datasets(
    data_cfg: DictConfig, *, with_masks: bool, problems: dict[str, Problems] | None = None
) -> DataBundle:
    """Build the train split (with augmentation) and the val split (without) named by `data.name`.

    `problems` ({"train": Problems(), "val": Problems()}, frcnn-data check): every problem of the files is
    recorded there, and what is wrong left out, instead of raising at the first."""
    name = _get(data_cfg, "name")
    builders = {"coco": _coco_datasets, "shapes": _shapes_datasets, "voc": _voc_datasets}
    if name not in builders:
        raise ConfigError(f"data.name={name!r} is not a known dataset; valid names: {', '.join(DATASET_NAMES)}")
    train, val = builders[name](
        data_cfg, with_masks=with_masks, transforms=_train_transforms(data_cfg), problems=problems or {}
    )
    log.info("data: %s, %d train / %d val images, %d classes", name, len(train), len(val), len(train.classes))
    groups = dataset_groups(train) if _get(data_cfg, "group_by_aspect_ratio") else None
    return DataBundle(train=train, val=val, classes=list(train.classes), train_groups=groups)


def _get(cfg: Any, key: str) -> Any:
    # `???` (mandatory, unset) must become our own error, not omegaconf's.
    if isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, key):
        return None
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


def _train_transforms(data_cfg: DictConfig) -> Compose:
    hflip = float(_get(data_cfg, "hflip_prob") or 0.0)
    if not 0.0 <= hflip <= 1.0:
        raise ConfigError(f"data.hflip_prob={hflip} is not a probability; set it between 0 and 1")
    transforms: list[Any] = [RandomHorizontalFlip(hflip)]
    jitter = _get(data_cfg, "scale_jitter")
    if jitter is not None:
        jitter = list(jitter)
        if len(jitter) != 2 or not 0 < float(jitter[0]) <= float(jitter[1]):
            raise ConfigError(
                f"data.scale_jitter={jitter} must be [min, max] with 0 < min <= max, e.g. [0.8, 1.25], or null"
            )
        transforms.append(ScaleJitter(float(jitter[0]), float(jitter[1])))
    return Compose(transforms)


def _bad_images(data_cfg: DictConfig) -> str:
    return str(_get(data_cfg, "bad_images") or "error")


def shapes_cache_dir(data_cfg: DictConfig) -> Path:
    base = _get(data_cfg, "cache_dir") or os.environ.get("FRCNN_DATA_CACHE") or "~/.cache/frcnn_train"
    return Path(base).expanduser() / "shapes"


def _shapes_datasets(
    data_cfg: DictConfig, *, with_masks: bool, transforms: Compose, problems: dict[str, Problems]
) -> Splits:
    shapes = data_cfg.shapes
    root = ensure_shapes_dataset(
        shapes_cache_dir(data_cfg),
        num_train=int(shapes.num_train),
        num_val=int(shapes.num_val),
        image_size=int(shapes.image_size),
        max_objects=int(shapes.max_objects),
        seed=int(shapes.seed),
    )
    log.info("data: synthetic shapes in %s", root)
    skip_empty = bool(_get(data_cfg, "skip_empty"))
    train = CocoDetection(
        root / "train",
        root / "instances_train.json",
        with_masks=with_masks,
        train=True,
        skip_empty=skip_empty,
        transforms=transforms,
        bad_images=_bad_images(data_cfg),
        problems=problems.get("train"),
    )
    val = CocoDetection(
        root / "val",
        root / "instances_val.json",
        with_masks=with_masks,
        train=False,
        classes=train.classes,
        bad_images=_bad_images(data_cfg),
        problems=problems.get("val"),
    )
    return train, val


def _path(data_cfg: DictConfig, key: str) -> Path:
    value = _get(data_cfg, key)
    if value is None:
        raise ConfigError(f"data.{key} is not set; pass data.{key}=<path> (relative paths are under data.root)")
    path = Path(str(value)).expanduser()
    if path.is_absolute():
        return path
    root = _get(data_cfg, "root")
    if root is None:
        raise ConfigError(
            f"data.root is not set and data.{key}={value} is relative to it; pass data.root=/path/to/dataset"
        )
    return Path(str(root)).expanduser() / path


def _coco_datasets(
    data_cfg: DictConfig, *, with_masks: bool, transforms: Compose, problems: dict[str, Problems]
) -> Splits:
    classes = _get(data_cfg, "classes")
    train = CocoDetection(
        _path(data_cfg, "train_images"),
        _path(data_cfg, "train_ann"),
        with_masks=with_masks,
        train=True,
        skip_empty=bool(_get(data_cfg, "skip_empty")),
        transforms=transforms,
        classes=list(classes) if classes is not None else None,
        ann_key="data.train_ann",
        images_key="data.train_images",
        bad_images=_bad_images(data_cfg),
        problems=problems.get("train"),
    )
    val = CocoDetection(
        _path(data_cfg, "val_images"),
        _path(data_cfg, "val_ann"),
        with_masks=with_masks,
        train=False,
        classes=train.classes,
        ann_key="data.val_ann",
        images_key="data.val_images",
        bad_images=_bad_images(data_cfg),
        problems=problems.get("val"),
    )
    return train, val


def _voc_datasets(
    data_cfg: DictConfig, *, with_masks: bool, transforms: Compose, problems: dict[str, Problems]
) -> Splits:
    if with_masks:
        raise ConfigError(
            "data=voc has no instance masks, and Mask R-CNN needs a dataset with masks (coco or shapes); "
            "use model=faster_rcnn or another dataset"
        )
    root = _get(data_cfg, "root")
    if root is None:
        raise ConfigError(
            "data.root is not set; pass data.root=/path/to/VOCdevkit/VOC2012 (the folder with Annotations/)"
        )
    root = Path(str(root)).expanduser()
    classes = _get(data_cfg, "classes")
    classes = list(classes) if classes is not None else None
    train_dict = load_voc(root, str(_get(data_cfg, "train_split")), classes=classes, problems=problems.get("train"))
    val_dict = load_voc(root, str(_get(data_cfg, "val_split")), classes=classes, problems=problems.get("val"))
    train = CocoDetection(
        root / "JPEGImages",
        train_dict,
        with_masks=False,
        train=True,
        skip_empty=bool(_get(data_cfg, "skip_empty")),
        transforms=transforms,
        images_key="data.root",
        bad_images=_bad_images(data_cfg),
        problems=problems.get("train"),
    )
    val = CocoDetection(
        root / "JPEGImages",
        val_dict,
        with_masks=False,
        train=False,
        classes=train.classes,
        images_key="data.root",
        bad_images=_bad_images(data_cfg),
        problems=problems.get("val"),
    )
    return train, val


# --------------------------------------------------------------------------- loaders


MAX_AUTO_WORKERS = 8


def resolve_num_workers(value: int | str, device: torch.device | str) -> int:
    """data.num_workers as a number. `auto`: on CUDA min(8, usable CPUs // processes on this node), so that
    decoding keeps ahead of the GPU without oversubscribing the host; on the CPU 0, because there the
    training step itself uses every core, and workers only compete with it (measured on 2 cores)."""
    if (count := worker_count(value)) is not None:
        return count
    if value != "auto":
        raise ConfigError(
            f"data.num_workers={value!r} must be a whole number >= 0 (0: load in the main process) or auto"
        )
    if torch.device(device).type != "cuda":
        log.info("data.num_workers=auto: 0 loader workers (training on the CPU: the step uses every core)")
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = min(MAX_AUTO_WORKERS, cpus // max(processes, 1))
    log.info(
        "data.num_workers=auto: %d loader workers per process (%d usable CPUs, %d process(es) on this node)",
        workers,
        cpus,
        processes,
    )
    return workers


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields `(index, sample_seed)` for one rank's share of one epoch, optionally from mid-epoch.

    An epoch is one global sequence: a permutation that depends on (seed, epoch)
    only, cut to whole optimizer steps of the global batch (batch_size x accumulate
    x world_size) and then into chunks of batch_size images; each chunk is one
    micro-batch of one rank, dealt out to the ranks in turn. Neither the chunks nor
    the images in them depend on the world size, so a resume with another number of
    processes goes on with exactly the chunks not yet consumed, and every rank gets
    the same number of them (ranks never wait for each other at an epoch's end).
    A sample's seed depends on (seed, epoch, index) only. With `groups` (one per image) the
    permutation is first rearranged so that each chunk holds one aspect-ratio group
    (data/grouping.py), which depends on the permutation and batch_size only.
    """

    def __init__(
        self,
        dataset_len: int,
        *,
        batch_size: int,
        seed: int,
        epoch: int,
        consumed: int = 0,
        accumulate: int = 1,
        rank: int = 0,
        world_size: int = 1,
        groups: np.ndarray | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or accumulate < 1:
            raise ValueError(f"batch_size and accumulate must be >= 1, got {batch_size} and {accumulate}")
        self.total = batches_per_epoch(dataset_len, batch_size, world_size, accumulate) * batch_size * world_size
        self.dataset_len, self.batch_size, self.seed = dataset_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        if groups is not None and len(groups) != dataset_len:
            raise ValueError(f"{len(groups)} aspect-ratio groups for {dataset_len} images")
        self.groups = groups
        self.set_position(epoch, consumed)

    def set_position(self, epoch: int, consumed: int = 0) -> None:
        """Where the next iteration starts: `consumed` samples into `epoch`'s global sequence."""
        if not 0 <= consumed <= self.total or consumed % (self.batch_size * self.world_size):
            raise ValueError(
                f"consumed={consumed} is not a whole number of global batches of this epoch's {self.total} samples"
            )
        self.epoch, self.consumed = epoch, consumed

    def global_order(self) -> list[tuple[int, int]]:
        """The whole epoch's global sequence, every rank's samples, before any is consumed."""
        n = self.dataset_len
        perm = np.random.default_rng(seed_sequence(self.seed, self.epoch, 0)).permutation(n)
        if self.groups is not None:
            perm = grouped_order(perm, self.groups, self.batch_size)
        perm = perm[: self.total]  # whole global batches: the mixed leftovers of the groups come last
        seeds = seed_sequence(self.seed, self.epoch, 1).generate_state(max(n, 1), dtype=np.uint64)
        return [(int(i), int(seeds[i])) for i in perm]

    def order(self) -> list[tuple[int, int]]:
        """This rank's share of the whole epoch, before `consumed` samples are skipped."""
        return self._share(self.global_order())

    def _share(self, sequence: list[tuple[int, int]]) -> list[tuple[int, int]]:
        b, w = self.batch_size, self.world_size
        chunks = [sequence[start : start + b] for start in range(self.rank * b, len(sequence), b * w)]
        return [sample for chunk in chunks for sample in chunk]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._share(self.global_order()[self.consumed :]))

    def __len__(self) -> int:
        return (self.total - self.consumed) // self.world_size


class ShardSampler(Sampler[list[int]]):
    """Evaluation batches [0..b), [b..2b), ... dealt out to the ranks in turn (a batch sampler).

    Each image is predicted in the same batch as on one process, so the detections,
    and the AP, do not depend on the world size (batch padding can change the numbers).
    """

    def __init__(self, dataset_len: int, *, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        starts = range(rank * batch_size, dataset_len, batch_size * world_size)
        self.batches = [list(range(start, min(start + batch_size, dataset_len))) for start in starts]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def batches_per_epoch(dataset_len: int, batch_size: int, world_size: int = 1, accumulate: int = 1) -> int:
    """Batches each rank's train loader yields in a full epoch (whole optimizer steps only)."""
    return dataset_len // (batch_size * accumulate * world_size) * accumulate


def collate(batch: Sequence[tuple[Tensor, dict] | None]) -> tuple[list[Tensor], list[dict]]:
    """Images differ in size, so keep lists; the model batches them itself.

    None is an image that data.bad_images=skip left out: the batch is one image short.
    """
    batch = [sample for sample in batch if sample is not None]
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def build_train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    epoch: int,
    consumed: int = 0,
    accumulate: int = 1,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    groups: np.ndarray | None = None,
) -> DataLoader:
    """This rank's batches of the epoch's global sequence after `consumed` samples (see ResumableSampler),
    from a DataLoader of its own (its workers end with it); the Trainer keeps one TrainLoader instead."""
    sampler = _train_sampler(
        dataset,
        batch_size=batch_size,
        seed=seed,
        epoch=epoch,
        consumed=consumed,
        accumulate=accumulate,
        rank=rank,
        world_size=world_size,
        groups=groups,
    )
    # Worker base seeds come from this generator instead of the global RNG, so
    # starting an iterator leaves the global torch RNG (saved in checkpoints) alone.
    return _loader(
        dataset,
        BatchSampler(sampler, batch_size=batch_size, drop_last=True),
        num_workers=num_workers,
        seed=seed_for(seed, epoch, 2),
        pin_memory=pin_memory,
    )


def _train_sampler(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    consumed: int,
    accumulate: int,
    rank: int,
    world_size: int,
    groups: np.ndarray | None,
) -> ResumableSampler:
    if batches_per_epoch(len(dataset), batch_size, world_size) == 0:
        raise ConfigError(
            f"trainer.batch_size={batch_size} is larger than the {len(dataset) // world_size} training images "
            f"per process, so an epoch has no batch; lower trainer.batch_size or use more data"
        )
    return ResumableSampler(
        len(dataset),
        batch_size=batch_size,
        seed=seed,
        epoch=epoch,
        consumed=consumed,
        accumulate=accumulate,
        rank=rank,
        world_size=world_size,
        groups=groups,
    )


class TrainLoader:
    """A run's training batches from one DataLoader, whose workers (num_workers > 0) live for the whole run.

    `at(epoch, consumed)` moves the sampler to that position and returns the DataLoader: iterating
    it yields exactly what `build_train_loader(..., epoch=epoch, consumed=consumed)` yields, since
    the batches are a function of (seed, epoch, index) and the sampler runs in this process. Workers
    are started once instead of every epoch, and each keeps `prefetch_factor` batches loading ahead.
    `close()` ends them (the Trainer calls it when fit ends; an exit calls it too, because workers
    ignore SIGTERM and Python's exit would otherwise wait for them forever).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        num_workers: int,
        seed: int,
        accumulate: int = 1,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        groups: np.ndarray | None = None,
    ) -> None:
        self.sampler = _train_sampler(
            dataset,
            batch_size=batch_size,
            seed=seed,
            epoch=0,
            consumed=0,
            accumulate=accumulate,
            rank=rank,
            world_size=world_size,
            groups=groups,
        )
        self.loader = _loader(
            dataset,
            BatchSampler(self.sampler, batch_size=batch_size, drop_last=True),
            num_workers=num_workers,
            seed=seed_for(seed, 0, 2),
            pin_memory=pin_memory,
            persistent=num_workers > 0,
            prefetch_factor=prefetch_factor,
        )
        _OPEN_LOADERS.add(self)

    def at(self, epoch: int, consumed: int = 0) -> DataLoader:
        self.sampler.set_position(epoch, consumed)
        return self.loader

    def close(self) -> None:
        """End the workers (a later `at` starts new ones)."""
        _end_workers(self.loader)


class EvalLoader:
    """The evaluation batches of a run (build_eval_loader's) from one DataLoader whose workers live across
    evaluations, as TrainLoader's do across epochs: iterate `loader` for each evaluation; `close()` ends them."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        num_workers: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        self.loader = build_eval_loader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            rank=rank,
            world_size=world_size,
            pin_memory=pin_memory,
            persistent=num_workers > 0,
        )
        _OPEN_LOADERS.add(self)

    def close(self) -> None:
        _end_workers(self.loader)


def _end_workers(loader: DataLoader) -> None:
    iterator, loader._iterator = loader._iterator, None
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


_OPEN_LOADERS: weakref.WeakSet[TrainLoader | EvalLoader] = weakref.WeakSet()


@atexit.register  # registered after torch's own exit hook, so it runs first, while torch can still shut workers down
def _close_open_loaders() -> None:
    for loader in list(_OPEN_LOADERS):
        loader.close()


def _loader(
    dataset: Dataset,
    batch_sampler: Any,
    *,
    num_workers: int,
    seed: int,
    pin_memory: bool,
    persistent: bool = False,
    prefetch_factor: int = 2,
) -> DataLoader:
    """The one DataLoader every builder makes: our collate, workers that ignore stop signals, a seeded generator.

    `pin_memory` (on CUDA) lets the step's non_blocking copies overlap the previous step's kernels.
    """
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=init_worker,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
        persistent_workers=persistent,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )


def init_worker(worker_id: int) -> None:
    """A loader worker's start: it ignores stop signals, and its garbage collector leaves alone what it inherited."""
    ignore_stop_signals(worker_id)
    # A forked worker shares the main process's memory until it writes to it, and a collection writes to
    # every object it walks: the first full collection would copy every page holding one of the hundreds of
    # thousands of objects torch and the run made before the fork (some 350 MiB per worker, measured by
    # scripts/scale_check.py). Frozen objects are never walked; freezing only moves the generation lists.
    gc.freeze()


def ignore_stop_signals(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group; only the main process decides when to stop
    (it finishes the step and saves), so workers must neither die nor run its handler."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_eval_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    persistent: bool = False,
) -> DataLoader:
    return _loader(
        dataset,
        ShardSampler(len(dataset), batch_size=batch_size, rank=rank, world_size=world_size),
        num_workers=num_workers,
        seed=0,
        pin_memory=pin_memory,
        persistent=persistent,
    )
