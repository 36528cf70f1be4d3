"""data.group_by_aspect_ratio: one-group micro-batches, still a pure function of (seed, epoch), resumable on any
world size, every image once per epoch, and today's order for a set of one image shape."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from frcnn_train.data import ResumableSampler, build_datasets
from frcnn_train.data.grouping import aspect_ratio_groups, grouped_order

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def mixed_groups(n: int, count: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, count, n)


def ids(sampler: ResumableSampler) -> list[int]:
    return [i for i, _ in sampler]


def chunks(sequence: list[int], size: int) -> list[list[int]]:
    return [sequence[k : k + size] for k in range(0, len(sequence), size)]


def test_the_bins_are_torchvisions() -> None:
    """Edges 2 ** linspace(-1, 1, 7) = 0.5 .. 2, bisect_right: 8 groups, as references/detection with factor 3."""
    widths = np.array([100, 50, 480, 500, 640, 1000, 301])
    heights = np.array([300, 100, 640, 500, 480, 500, 100])
    assert aspect_ratio_groups(widths, heights).tolist() == [0, 1, 2, 4, 5, 7, 7]
    assert aspect_ratio_groups(widths, heights, factor=0).tolist() == [0, 0, 0, 1, 1, 1, 1]  # detectron2's 2


@pytest.mark.parametrize("n, batch, world, accumulate", [(8, 2, 1, 1), (53, 2, 2, 2), (100, 4, 1, 3), (31, 1, 3, 1)])
def test_one_image_shape_keeps_the_ungrouped_order(n: int, batch: int, world: int, accumulate: int) -> None:
    for epoch in (0, 1):
        for rank in range(world):
            common = {
                "batch_size": batch,
                "seed": 3,
                "epoch": epoch,
                "accumulate": accumulate,
                "rank": rank,
                "world_size": world,
            }
            grouped = ResumableSampler(n, groups=np.full(n, 4), **common)
            assert list(grouped) == list(ResumableSampler(n, **common))


def test_the_default_shapes_data_is_one_group_and_keeps_todays_order(compose_tiny: Callable[..., DictConfig]) -> None:
    bundle = build_datasets(compose_tiny().data, with_masks=False)
    assert bundle.train_groups is not None and len(set(bundle.train_groups.tolist())) == 1
    assert list(ResumableSampler(8, batch_size=2, seed=42, epoch=0, groups=bundle.train_groups)) == list(
        ResumableSampler(8, batch_size=2, seed=42, epoch=0)
    )
    assert build_datasets(compose_tiny("data.group_by_aspect_ratio=false").data, with_masks=False).train_groups is None


def test_micro_batches_hold_one_group_and_every_image_comes_once() -> None:
    n, batch, groups = 103, 4, mixed_groups(103)
    perm = np.random.default_rng(0).permutation(n)
    order = grouped_order(perm, groups, batch).tolist()
    assert sorted(order) == list(range(n))  # nothing dropped or repeated before the cut to whole global batches
    runs = chunks(order, batch)
    mixed = [k for k, run in enumerate(runs) if len(set(groups[run].tolist())) > 1]
    leftovers = sum(int((groups == g).sum()) % batch for g in range(3))
    assert len(runs) - (leftovers + batch - 1) // batch <= min(mixed, default=len(runs))  # mixed ones only at the end
    assert len([i for k in mixed for i in runs[k]]) <= leftovers
    # The sampler cuts whole global batches of 2 x 4 x 2 = 16: 96 of 103, every one once, the rest the tail.
    sampled = ids(ResumableSampler(n, batch_size=batch, seed=0, epoch=0, accumulate=2, groups=groups))
    assert len(sampled) == len(set(sampled)) == 96
    sampled_chunks = chunks(sampled, batch)
    assert sum(len(set(groups[c].tolist())) > 1 for c in sampled_chunks) <= 3
    assert (
        sum(
            len(set(groups[c].tolist())) > 1
            for c in chunks(ids(ResumableSampler(n, batch_size=batch, seed=0, epoch=0)), batch)
        )
        > 10
    )  # without groups most micro-batches are mixed


def test_a_function_of_seed_and_epoch() -> None:
    groups = mixed_groups(60)

    def order(seed: int, epoch: int) -> list:
        return list(ResumableSampler(60, batch_size=2, seed=seed, epoch=epoch, groups=groups))

    assert order(1, 0) == order(1, 0) and order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    # A sample's augmentation seed is the ungrouped one: it follows the image, not its position.
    assert dict(order(1, 0)) == dict(list(ResumableSampler(60, batch_size=2, seed=1, epoch=0)))


def test_a_resume_mid_epoch_gives_the_remaining_samples() -> None:
    groups = mixed_groups(57, count=5)
    whole = list(ResumableSampler(57, batch_size=3, seed=9, epoch=2, groups=groups))
    for consumed in (0, 3, 27, len(whole)):
        assert (
            list(ResumableSampler(57, batch_size=3, seed=9, epoch=2, consumed=consumed, groups=groups))
            == whole[consumed:]
        )


def test_world_sizes_share_one_global_sequence_and_resume_across_them() -> None:
    """2 processes for 3 steps, then 1 process (accumulate 2), then 4: the micro-batches an unbroken 2-process
    run trains, each image once, as for the ungrouped sampler."""
    n, batch, global_batch, groups = 61, 2, 8, mixed_groups(61)

    def shard(world: int, consumed: int = 0) -> list[list[list[int]]]:
        return [
            chunks(
                ids(
                    ResumableSampler(
                        n,
                        batch_size=batch,
                        seed=5,
                        epoch=1,
                        consumed=consumed,
                        accumulate=global_batch // (world * batch),
                        rank=r,
                        world_size=world,
                        groups=groups,
                    )
                ),
                batch,
            )
            for r in range(world)
        ]

    def global_sequence(ranks: list[list[list[int]]]) -> list[list[int]]:
        return [ranks[k % len(ranks)][k // len(ranks)] for k in range(sum(map(len, ranks)))]

    one, two, four = global_sequence(shard(1)), global_sequence(shard(2)), global_sequence(shard(4))
    assert one == two == four  # the same micro-batches in the same global order
    resumed = (
        global_sequence(shard(2))[:12]
        + global_sequence(shard(1, 3 * global_batch))[:4]
        + global_sequence(shard(4, 4 * global_batch))
    )
    assert resumed == one
    seen = [i for c in resumed for i in c]
    assert len(seen) == len(set(seen)) == (n // global_batch) * global_batch


def test_old_checkpoints_resume_ungrouped_and_may_not_switch_it(compose_tiny: Callable[..., DictConfig]) -> None:
    """A checkpoint from before the key trained on the plain permutation: it resumes so; the key sets the data
    order, so a resume that asks to change it is refused like any other non-mutable key."""
    from frcnn_train.resume import ResumeConflict, merge_for_resume

    saved = OmegaConf.to_container(compose_tiny(), resolve=True)
    del saved["data"]["group_by_aspect_ratio"]
    merged, _ = merge_for_resume(saved, compose_tiny(), [], "old.pth")
    assert merged.data.group_by_aspect_ratio is False
    with pytest.raises(ResumeConflict, match=r"data.group_by_aspect_ratio \(checkpoint False, requested True\)"):
        merge_for_resume(
            saved, compose_tiny("data.group_by_aspect_ratio=true"), ["data.group_by_aspect_ratio=true"], "old.pth"
        )


def test_the_trainer_samples_with_the_datasets_groups(
    compose_tiny: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    from frcnn_train import trainer
    from frcnn_train.launch import run

    seen = []

    class Spy(trainer.TrainLoader):
        def __init__(self, *args, **kwargs) -> None:
            seen.append(kwargs.get("groups"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trainer, "TrainLoader", Spy)
    run(compose_tiny("trainer.max_steps=1"))
    assert len(seen) == 1 and seen[0] is not None and seen[0].tolist() == [4] * 8  # 64 x 64: ratio 1, group 4
