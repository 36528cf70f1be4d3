"""Builders and resumable loaders: a resumed epoch sees exactly the batches of an unbroken one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from frcnn_train.data import (
    DataBundle,
    ResumableSampler,
    TrainLoader,
    batches_per_epoch,
    build_datasets,
    build_eval_loader,
    build_train_loader,
    collate,
    resolve_num_workers,
)
from frcnn_train.data.loader import shapes_cache_dir
from frcnn_train.data.shapes import SHAPE_CLASSES
from frcnn_train.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BATCH = 2


@pytest.fixture
def bundle(compose_tiny: Callable[..., DictConfig]) -> DataBundle:
    # Both augmentations on, so a wrong per-sample seed would show in the pixels.
    cfg = compose_tiny("data.scale_jitter=[0.75,1.25]", "data.hflip_prob=0.5")
    return build_datasets(cfg.data, with_masks=True)


def run(loader: torch.utils.data.DataLoader) -> list[tuple[list[torch.Tensor], list[dict]]]:
    return list(loader)


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (images_a, targets_a), (images_b, targets_b) in zip(a, b):
        assert len(images_a) == len(images_b)
        for x, y in zip(images_a, images_b):
            assert torch.equal(x, y)
        for x, y in zip(targets_a, targets_b):
            assert x.keys() == y.keys()
            for key in x:
                assert torch.equal(x[key], y[key]), key


def image_ids(batches: list) -> list[int]:
    return [t["image_id"].item() for _, targets in batches for t in targets]


def test_bundle(bundle: DataBundle, compose_tiny: Callable[..., DictConfig]) -> None:
    assert bundle.classes == SHAPE_CLASSES
    assert len(bundle.train) == 8 and len(bundle.val) == 4
    assert bundle.val.transforms is None and bundle.train.transforms is not None
    assert bundle.val.classes == bundle.train.classes
    cfg = compose_tiny()
    assert shapes_cache_dir(cfg.data) == Path(cfg.data.cache_dir) / "shapes"


def test_cache_dir_from_environment(
    compose_tiny: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = compose_tiny("data.cache_dir=null")
    monkeypatch.setenv("FRCNN_DATA_CACHE", str(tmp_path))
    assert shapes_cache_dir(cfg.data) == tmp_path / "shapes"
    monkeypatch.delenv("FRCNN_DATA_CACHE")
    assert shapes_cache_dir(cfg.data) == Path(os.path.expanduser("~/.cache/frcnn_train/shapes"))


def test_unknown_dataset_and_missing_root(compose_tiny: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigError, match="data.name='kitti'.*coco, shapes, voc"):
        build_datasets(compose_tiny("data.name=kitti").data, with_masks=False)
    with pytest.raises(ConfigError, match="data.root is not set"):
        build_datasets(compose_tiny("data=coco").data, with_masks=False)
    with pytest.raises(ConfigError, match=r"data.scale_jitter"):
        build_datasets(compose_tiny("data.scale_jitter=[1.5,0.5]").data, with_masks=False)


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list:
        return list(ResumableSampler(100, batch_size=4, seed=seed, epoch=epoch))

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert sorted(i for i, _ in order(1, 0)) == list(range(100))
    # A sample's seed depends on (seed, epoch, index), not on its position.
    assert dict(order(1, 0)) != dict(order(1, 1))


def test_sampler_shards_are_disjoint_and_equal() -> None:
    shards = [ResumableSampler(103, batch_size=4, seed=0, epoch=3, rank=r, world_size=2) for r in range(2)]
    indices = [[i for i, _ in s] for s in shards]
    assert len(indices[0]) == len(indices[1]) == len(shards[0]) == batches_per_epoch(103, 4, 2) * 4 == 48
    assert not set(indices[0]) & set(indices[1])
    with pytest.raises(ValueError, match="consumed=4 is not a whole number of global batches"):
        ResumableSampler(103, batch_size=4, seed=0, epoch=0, consumed=4, rank=0, world_size=2)


def micro_batches(sampler: ResumableSampler) -> list[list[int]]:
    ids = [i for i, _ in sampler]
    return [ids[k : k + sampler.batch_size] for k in range(0, len(ids), sampler.batch_size)]


def test_a_resume_on_another_world_size_trains_the_rest_of_the_epoch_in_the_same_micro_batches() -> None:
    """2 processes x 2 images for 3 steps, then 1 process x 2 images x accumulate 2, then 4 x 2 x ...: the images
    of the epoch are seen once each, in the micro-batches a 2-process run never stopped trains."""
    n, batch, global_batch = 53, 2, 8  # 6 whole global batches of 8; 5 images left out

    def shard(world: int, consumed: int) -> list[list[list[int]]]:
        accumulate = global_batch // (world * batch)
        return [
            micro_batches(
                ResumableSampler(
                    n,
                    batch_size=batch,
                    seed=5,
                    epoch=1,
                    consumed=consumed,
                    accumulate=accumulate,
                    rank=r,
                    world_size=world,
                )
            )
            for r in range(world)
        ]

    def steps(ranks: list[list[list[int]]], count: int) -> list[list[int]]:
        """The micro-batches of the first `count` optimizer steps, in global order (micro-step, then rank)."""
        per_step = global_batch // (len(ranks) * batch)
        return [ranks[r][s * per_step + m] for s in range(count) for m in range(per_step) for r in range(len(ranks))]

    straight = steps(shard(2, 0), 6)
    resumed = steps(shard(2, 0), 3) + steps(shard(1, 3 * global_batch), 1) + steps(shard(4, 4 * global_batch), 2)
    assert sorted(map(sorted, resumed)) == sorted(map(sorted, straight))  # the same micro-batches
    seen = [i for chunk in resumed for i in chunk]
    assert len(seen) == len(set(seen)) == 6 * global_batch  # each image once in the epoch
    assert [len(s) for s in shard(4, 4 * global_batch)] == [2, 2, 2, 2]  # every rank the same share


def test_batches_per_epoch() -> None:
    assert batches_per_epoch(8, 2) == 4
    assert batches_per_epoch(9, 2) == 4
    assert batches_per_epoch(9, 2, world_size=2) == 2
    assert batches_per_epoch(1, 2) == 0


def test_batch_larger_than_dataset(bundle: DataBundle) -> None:
    with pytest.raises(ConfigError, match="trainer.batch_size=9 is larger than the 8 training images"):
        build_train_loader(bundle.train, batch_size=9, num_workers=0, seed=0, epoch=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(bundle: DataBundle, num_workers: int) -> None:
    def loader(start_batch: int, workers: int, epoch: int = 1) -> torch.utils.data.DataLoader:
        return build_train_loader(
            bundle.train, batch_size=BATCH, num_workers=workers, seed=7, epoch=epoch, consumed=start_batch * BATCH
        )

    full = run(loader(0, 0))
    total = batches_per_epoch(len(bundle.train), BATCH)
    assert len(full) == len(loader(0, 0)) == total == 4
    # Some sample was actually augmented (flipped or rescaled), so seeds matter.
    assert any(img.shape[-1] != 64 for images, _ in full for img in images)
    for start in (1, 3):
        resumed = loader(start, num_workers)
        assert len(resumed) == total - start
        assert_same_batches(run(resumed), full[start:])
    assert_same_batches(run(loader(0, num_workers)), full)
    assert image_ids(run(loader(0, 0, epoch=2))) != image_ids(full)


def test_loaders_leave_the_global_rng_alone(bundle: DataBundle) -> None:
    state = torch.get_rng_state()
    for workers in (0, 2):
        run(build_train_loader(bundle.train, batch_size=BATCH, num_workers=workers, seed=0, epoch=0))
        run(build_eval_loader(bundle.val, batch_size=BATCH, num_workers=workers))
    assert torch.equal(torch.get_rng_state(), state)


def test_train_shards_for_two_ranks(bundle: DataBundle) -> None:
    ranks = [
        run(build_train_loader(bundle.train, batch_size=BATCH, num_workers=0, seed=3, epoch=0, rank=r, world_size=2))
        for r in range(2)
    ]
    ids = [image_ids(batches) for batches in ranks]
    assert len(ids[0]) == len(ids[1]) == 4
    assert not set(ids[0]) & set(ids[1])


def test_eval_loader_is_sequential_and_sharded(bundle: DataBundle) -> None:
    batches = run(build_eval_loader(bundle.val, batch_size=3, num_workers=0))
    assert [len(images) for images, _ in batches] == [3, 1]  # nothing dropped
    assert image_ids(batches) == bundle.val.image_ids
    shards = [
        image_ids(run(build_eval_loader(bundle.val, batch_size=2, num_workers=0, rank=r, world_size=2)))
        for r in range(2)
    ]
    assert sorted(shards[0] + shards[1]) == sorted(bundle.val.image_ids)
    # Whole batches per rank, so every image is predicted in the batch it has on one process.
    assert shards[0] == bundle.val.image_ids[0:2] and shards[1] == bundle.val.image_ids[2:4]
    image, target = batches[0][0][0], batches[0][1][0]
    assert image.shape == (3, 64, 64) and target["masks"].shape[-2:] == (64, 64)


def test_collate_keeps_lists_and_drops_skipped_images() -> None:
    images, targets = collate([(torch.zeros(1), {"a": 1}), None, (torch.ones(1), {"a": 2})])
    assert isinstance(images, list) and [t["a"] for t in targets] == [1, 2] and float(images[1]) == 1.0
    assert collate([None, None]) == ([], [])  # every image of the batch was skipped (data.bad_images=skip)


def test_train_and_eval_loaders_are_made_alike_and_pin_on_request(bundle: DataBundle) -> None:
    made = [
        build_train_loader(bundle.train, batch_size=2, num_workers=0, seed=0, epoch=0, pin_memory=pin)
        for pin in (False, True)
    ]
    made += [build_eval_loader(bundle.val, batch_size=2, num_workers=0, pin_memory=pin) for pin in (False, True)]
    assert [loader.pin_memory for loader in made] == [False, True, False, True]
    assert all(
        loader.collate_fn is made[0].collate_fn
        and loader.worker_init_fn is made[0].worker_init_fn
        and not loader.persistent_workers
        for loader in made
    )


def test_images_reach_the_batches_as_uint8_and_masks_stay_uint8(bundle: DataBundle) -> None:
    images, targets = next(iter(build_train_loader(bundle.train, batch_size=BATCH, num_workers=0, seed=0, epoch=0)))
    assert {image.dtype for image in images} == {torch.uint8} and targets[0]["masks"].dtype == torch.uint8


def test_persistent_workers_give_the_batches_of_fresh_loaders(bundle: DataBundle) -> None:
    """One TrainLoader for a run: across epochs and from a mid-epoch position, exactly the batches a new
    loader per epoch gives, from the same worker processes."""

    def fresh(epoch: int, consumed: int = 0) -> list:
        return run(
            build_train_loader(bundle.train, batch_size=BATCH, num_workers=0, seed=7, epoch=epoch, consumed=consumed)
        )

    persistent = TrainLoader(bundle.train, batch_size=BATCH, num_workers=2, seed=7)
    try:
        assert persistent.loader.persistent_workers and persistent.loader.prefetch_factor == 2
        workers = None
        for epoch, consumed in ((0, 0), (1, 0), (1, 2 * BATCH), (2, 0)):
            loader = persistent.at(epoch, consumed)
            assert len(loader) == batches_per_epoch(len(bundle.train), BATCH) - consumed // BATCH
            assert_same_batches(run(loader), fresh(epoch, consumed))
            assert workers is None or loader._iterator._workers == workers, "the workers were started again"
            workers = loader._iterator._workers
        # Left in the middle of an epoch (a stop signal), then moved on: the rest of that epoch is not replayed.
        batches = iter(persistent.at(3))
        next(batches)
        assert_same_batches(run(persistent.at(3, BATCH)), fresh(3, BATCH))
    finally:
        persistent.close()
    assert persistent.loader._iterator is None and not any(w.is_alive() for w in workers)
    assert_same_batches(run(persistent.at(4)), fresh(4))  # closed: a later epoch starts new workers
    persistent.close()


def test_a_train_loader_without_workers_loads_in_the_process(bundle: DataBundle) -> None:
    loader = TrainLoader(bundle.train, batch_size=BATCH, num_workers=0, seed=1)
    assert not loader.loader.persistent_workers
    assert_same_batches(
        run(loader.at(1, BATCH)),
        run(build_train_loader(bundle.train, batch_size=BATCH, num_workers=0, seed=1, epoch=1, consumed=BATCH)),
    )
    loader.close()


@pytest.mark.parametrize("cpus, processes, expected", [(16, 1, 8), (16, 2, 8), (16, 4, 4), (2, 1, 2), (3, 4, 0)])
def test_num_workers_auto_on_cuda_follows_the_cpus(
    monkeypatch: pytest.MonkeyPatch, cpus: int, processes: int, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert resolve_num_workers("auto", "cuda") == resolve_num_workers("auto", torch.device("cuda:1")) == expected


def test_num_workers_auto_on_the_cpu_and_numbers_as_given() -> None:
    assert resolve_num_workers("auto", "cpu") == 0
    assert resolve_num_workers(3, "cuda") == resolve_num_workers(3, "cpu") == 3  # older checkpoints hold numbers
    for bad in ("many", -1, True, 1.5):
        with pytest.raises(ConfigError, match="data.num_workers=.* must be a whole number >= 0 .* or auto"):
            resolve_num_workers(bad, "cpu")
