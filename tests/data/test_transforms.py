"""Transforms move boxes and masks with the image and draw only from the given generator."""

from __future__ import annotations

import pytest
import torch

from frcnn_train.data.transforms import Compose, RandomHorizontalFlip, ScaleJitter


def sample() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    image = torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 20, 30, dtype=torch.uint8)
    masks[0, 2:8, 3:12] = 1
    masks[1, 10:19, 20:29] = 1
    target = {
        "boxes": torch.tensor([[3.0, 2.0, 12.0, 8.0], [20.0, 10.0, 29.0, 19.0]]),
        "labels": torch.tensor([1, 2]),
        "area": torch.tensor([54.0, 81.0]),
        "masks": masks,
    }
    return image, target


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return torch.tensor(out, dtype=torch.float32)


def test_flip_moves_boxes_with_masks() -> None:
    image, target = sample()
    flipped, out = RandomHorizontalFlip(1.0)(image, target, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, image.flip(-1))
    assert torch.equal(out["boxes"], mask_boxes(out["masks"]))
    assert out["boxes"].tolist()[0] == [18.0, 2.0, 27.0, 8.0]
    assert torch.equal(target["boxes"], sample()[1]["boxes"]), "the input target must not be modified"


def test_flip_twice_is_identity() -> None:
    image, target = sample()
    flip = RandomHorizontalFlip(1.0)
    g = torch.Generator().manual_seed(0)
    again, out = flip(*flip(image, target, g), g)
    assert torch.equal(again, image)
    for key in target:
        assert torch.equal(out[key], target[key])


def test_flip_probability_zero_keeps_sample() -> None:
    image, target = sample()
    same, out = RandomHorizontalFlip(0.0)(image, target, torch.Generator().manual_seed(0))
    assert same is image and out is target


@pytest.mark.parametrize("scale", [0.5, 0.77, 1.6])
def test_scale_jitter_resizes_everything(scale: float) -> None:
    image, target = sample()
    resized, out = ScaleJitter(scale, scale)(image, target, torch.Generator().manual_seed(0))
    h, w = round(20 * scale), round(30 * scale)
    assert resized.shape == (3, h, w) and out["masks"].shape == (2, h, w)
    assert out["masks"].dtype == torch.uint8
    assert 0.0 <= resized.min() and resized.max() <= 1.0
    sx, sy = w / 30, h / 20
    expected = target["boxes"] * torch.tensor([sx, sy, sx, sy])
    assert torch.allclose(out["boxes"], expected)
    assert torch.allclose(out["area"], target["area"] * sx * sy)
    # Nearest-neighbour masks stay within a pixel of their scaled box.
    assert (mask_boxes(out["masks"]) - out["boxes"]).abs().max() <= 1.0


@pytest.mark.parametrize("scale", [0.5, 0.77, 1.6])
def test_scale_jitter_keeps_uint8_within_half_a_grey_level_of_the_float_result(scale: float) -> None:
    """The datasets' uint8 images stay uint8 (a quarter of the bytes to the device): the float resample,
    rounded to the nearest of the 256 levels; the README names this change."""
    image, target = sample()
    uint8 = (image * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().permute(2, 0, 1)
    generator = torch.Generator().manual_seed(0)
    resized, out = ScaleJitter(scale, scale)(uint8, target, generator)
    as_float, out_float = ScaleJitter(scale, scale)(uint8.float().div_(255.0), target, torch.Generator().manual_seed(0))
    assert resized.dtype == torch.uint8 and resized.shape == as_float.shape
    assert (resized.float().div_(255.0) - as_float).abs().max() <= 0.5 / 255 + 1e-6
    assert all(torch.equal(out[k], out_float[k]) for k in out)


def test_scale_jitter_handles_no_objects() -> None:
    image = torch.rand(3, 10, 10)
    target = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 10, 10, dtype=torch.uint8), "area": torch.zeros(0)}
    resized, out = ScaleJitter(2.0, 2.0)(image, target, torch.Generator())
    assert resized.shape == (3, 20, 20) and out["masks"].shape == (0, 20, 20) and out["boxes"].shape == (0, 4)


def test_randomness_comes_only_from_the_generator() -> None:
    transform = Compose([RandomHorizontalFlip(0.5), ScaleJitter(0.5, 1.5)])
    image, target = sample()
    global_state = torch.get_rng_state()
    results = [transform(image, target, torch.Generator().manual_seed(seed)) for seed in (1, 1, 2, 3, 4, 5)]
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(results[0][0], results[1][0])
    assert len({tuple(r[0].shape) for r in results}) > 1


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="probability"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(ValueError, match="min_scale <= max_scale"):
        ScaleJitter(1.2, 0.8)
