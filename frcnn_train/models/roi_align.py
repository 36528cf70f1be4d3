"""RoIAlign on the CPU as two matrix products: the same numbers as torchvision's kernel, faster.

Bilinear sampling is separable: every sample's weight on feature pixel (y, x) is a
weight on row y times a weight on column x, and torchvision's "outside the map" rule
(a sample with y < -1, y > H, x < -1 or x > W counts zero) is a product too. So a bin's
average over its sampling_ratio x sampling_ratio samples is `My[p] @ F @ Mx[q]^T`, with
My (bins x rows) and Mx (bins x columns) made from the box alone. On the CPU,
torchvision's scalar kernel (its backward above all) took about a fifth of a training
step at the shapes sizes; two BLAS products per image and level take a few percent.
The gradient flows through the products (autograd), never into the boxes (as in
torchvision: proposals are detached).

`MatmulMultiScaleRoIAlign` is torchvision's MultiScaleRoIAlign (same level mapping,
same module, no state) that uses it on the CPU, and on CUDA when deterministic algorithms
are on (trainer.deterministic=true): there torchvision's CUDA kernel, whose backward adds
with atomics, is not used at all (torchvision then falls back to a pure-Python RoIAlign
whose backward is a sorted scatter over every sample), while these products are
deterministic by construction. The rois of an image are taken in chunks, so the
intermediate stays under MAX_INTERMEDIATE (CPU) or CUDA_MAX_INTERMEDIATE however large
the map or the roi count; where one chunk holds them all (the shapes sizes) the numbers
are bitwise those of a single product. Everywhere else (CUDA by default, adaptive
sampling, tracing) torchvision's op runs.
tests/models/test_cpu_kernels.py compares values and gradients with torchvision's.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

# Largest intermediate (rois of one chunk x bins x channels x map width) the matrix form
# builds on the CPU, in elements: 16M floats = 64 MB. More rois than fit go in several chunks:
# torchvision's CPU backward, the old fallback, took half of a step at 128 px (docs/speed-cpu.md).
MAX_INTERMEDIATE = 1 << 24
# On CUDA (deterministic mode) the rois of one image and level go in chunks of at most this
# many intermediate elements (256 MB of fp32).
CUDA_MAX_INTERMEDIATE = 1 << 26


def pools_with_matmul(device: torch.device) -> bool:
    """Whether RoIs on `device` are pooled by the matrix form: on the CPU always, on CUDA when
    torch's deterministic algorithms are on."""
    return device.type == "cpu" or (device.type == "cuda" and torch.are_deterministic_algorithms_enabled())


def _axis_weights(start: Tensor, end: Tensor, pooled: int, grid: int, size: int) -> Tensor:
    """(R, pooled, size): how much row (or column) i of the map weighs in bin p, averaged over
    the bin's `grid` samples, with torchvision's rules (aligned=False: boxes at least 1 px,
    samples beyond -1 or size count zero, clamped to the border)."""
    length = (end - start).clamp(min=1.0)
    bin_size = (length / pooled)[:, None, None]
    offsets = (torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5)[None, :] * bin_size / grid
    bins = torch.arange(pooled, dtype=start.dtype, device=start.device)[None, :, None]
    pos = start[:, None, None] + bins * bin_size + offsets  # (R, pooled, grid)
    inside = ((pos >= -1.0) & (pos <= size)).to(start.dtype)
    pos = pos.clamp(min=0.0)
    low = pos.floor()
    edge = low >= size - 1
    low = low.clamp(max=size - 1)
    pos = torch.where(edge, low, pos)
    high = torch.where(edge, low, low + 1)
    frac = pos - low
    index = torch.arange(size, dtype=start.dtype, device=start.device)
    weights = ((1.0 - frac) * inside)[..., None] * (index == low[..., None]) + (frac * inside)[..., None] * (
        index == high[..., None]
    )
    return weights.sum(dim=2) / grid


def roi_align_matmul(
    features: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    *,
    counts: list[int] | None = None,
    chunk: int | None = None,
) -> Tensor:
    """torchvision.ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio,
    aligned=False) for sampling_ratio > 0, computed per image as My @ F @ Mx^T.
    `counts`: rois per image, when the caller has them already; `chunk`: at most this many
    rois per product (None: all of an image's at once)."""
    n, c, height, width = features.shape
    ph, pw = output_size
    with torch.no_grad():
        boxes = rois[:, 1:].float() * spatial_scale
        rows = _axis_weights(boxes[:, 1], boxes[:, 3], ph, sampling_ratio, height)  # (R, ph, H)
        cols = _axis_weights(boxes[:, 0], boxes[:, 2], pw, sampling_ratio, width)  # (R, pw, W)
        image = rois[:, 0].long()
    order = torch.argsort(image, stable=True)
    counts = counts if counts is not None else rois_per_image(rois, n)
    pieces = []
    with torch.autocast(features.device.type, enabled=False):
        maps = features.float()
        start = 0
        for b, count in enumerate(counts):
            if count == 0:
                continue
            flat = maps[b].permute(1, 0, 2).reshape(height, c * width)  # rows x (channels, columns)
            for first in range(0, count, chunk or count):
                r = min(chunk or count, count - first)
                idx = order[start + first : start + first + r]
                by_rows = (rows[idx].reshape(r * ph, height) @ flat).reshape(r, ph * c, width)
                pieces.append(torch.bmm(by_rows, cols[idx].transpose(1, 2)).reshape(r, ph, c, pw))
            start += count
    if not pieces:
        return features.new_zeros((0, c, ph, pw))
    out = torch.cat(pieces).transpose(1, 2)  # rois in image order
    if not bool((order[1:] > order[:-1]).all()):  # rois were not grouped by image: put them back
        out = torch.empty_like(out).index_copy(0, order, out)
    return out.to(features.dtype)


def rois_per_image(rois: Tensor, num_images: int) -> list[int]:
    return torch.bincount(rois[:, 0].long(), minlength=num_images).tolist()


class MatmulMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign, pooling with `roi_align_matmul` where `pools_with_matmul` says so."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        x_filtered = _filter_input(x, self.featmap_names)
        on_cpu = x_filtered[0].device.type == "cpu"
        if not pools_with_matmul(x_filtered[0].device) or self.sampling_ratio <= 0 or torchvision._is_tracing():
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                x_filtered, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        levels = (
            self.map_levels(boxes)
            if len(x_filtered) > 1
            else torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
        )
        first = x_filtered[0]
        cap = MAX_INTERMEDIATE if on_cpu else CUDA_MAX_INTERMEDIATE
        result = first.new_zeros((len(rois), first.shape[1], *self.output_size))
        for level, (features, scale) in enumerate(zip(x_filtered, self.scales)):
            idx = torch.nonzero(levels == level).flatten()
            if len(idx) == 0:
                continue
            level_rois = rois[idx]
            n, c, _, width = features.shape
            # A chunk of at least an image's rois is one product, the same numbers as no chunking.
            chunk = max(1, cap // (self.output_size[0] * c * width))
            pooled = roi_align_matmul(
                features,
                level_rois,
                self.output_size,
                scale,
                self.sampling_ratio,
                counts=rois_per_image(level_rois, n),
                chunk=chunk,
            )
            pooled = pooled.to(result.dtype)
            result = pooled if len(idx) == len(rois) else result.index_copy(0, idx, pooled)  # all on one level
        return result
