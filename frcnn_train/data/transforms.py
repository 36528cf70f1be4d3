"""Detection transforms that move boxes and masks with the image.

Every transform draws its randomness from the `generator` it is given (seeded
per sample by the loader), never from a global RNG: that is what makes
augmentation reproducible across resumes and worker counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Target = dict[str, Tensor]
Transform = Callable[[Tensor, Target, torch.Generator], tuple[Tensor, Target]]


class Compose:
    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target, generator: torch.Generator) -> tuple[Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target, generator)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: Tensor, target: Target, generator: torch.Generator) -> tuple[Tensor, Target]:
        # Always draw, even for p in {0, 1}, so later transforms see the same stream whatever p is.
        flip = torch.rand((), generator=generator).item() < self.p
        if not flip:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        if "boxes" in target:
            boxes = target["boxes"].clone()
            # Pixel-edge coordinates: a box [x1, x2) maps to [W - x2, W - x1).
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ScaleJitter:
    """Rescale by a factor drawn uniformly from [min_scale, max_scale].

    Applied before the model's own resize (which restores the configured
    size range), so in effect it jitters object scale and the aspect of crops.
    """

    def __init__(self, min_scale: float, max_scale: float) -> None:
        if not 0.0 < min_scale <= max_scale:
            raise ValueError(f"scale jitter needs 0 < min_scale <= max_scale, got [{min_scale}, {max_scale}]")
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)

    def __call__(self, image: Tensor, target: Target, generator: torch.Generator) -> tuple[Tensor, Target]:
        u = torch.rand((), generator=generator).item()
        scale = self.min_scale + (self.max_scale - self.min_scale) * u
        height, width = image.shape[-2:]
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        if (new_h, new_w) == (height, width):
            return image, target
        if image.dtype == torch.uint8:
            # Resampled in float on the 0-255 scale and rounded back: the sample stays uint8 (a quarter of the
            # bytes to the device), within half a grey level of resampling the [0, 1] floats.
            image = F.interpolate(
                image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
            )[0]
            image = image.round_().clamp_(0.0, 255.0).to(torch.uint8)
        else:
            image = F.interpolate(
                image[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
            )[0]
            image = image.clamp_(0.0, 1.0)
        # The realised factors, after rounding to whole pixels, so boxes match the pixels.
        sx, sy = new_w / width, new_h / height
        target = dict(target)
        if "boxes" in target:
            target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
        if "area" in target:
            target["area"] = target["area"] * (sx * sy)
        if "masks" in target:
            masks = target["masks"]
            if masks.shape[0]:
                masks = F.interpolate(masks[None].float(), size=(new_h, new_w), mode="nearest-exact")[0].to(masks.dtype)
            else:
                masks = masks.new_zeros((0, new_h, new_w))
            target["masks"] = masks
        return image, target

    def __repr__(self) -> str:
        return f"ScaleJitter(min_scale={self.min_scale}, max_scale={self.max_scale})"
