"""Aspect-ratio grouping (data.group_by_aspect_ratio): micro-batches of images of similar shape.

The model pads every image of a micro-batch to the batch's largest height and width,
so a landscape photo beside a portrait one trains on a canvas nearly twice the size of
either. Grouping is torchvision's (references/detection/group_by_aspect_ratio.py with
train.py's default --aspect-ratio-group-factor 3): width / height quantised at the bin
edges 2 ** linspace(-1, 1, 7), i.e. 8 groups from "taller than 1:2" to "wider than 2:1".
detectron2 and mmdetection use 2 buckets (portrait, landscape); 8 also keep 4:3 apart
from 16:9, and cost nothing more here, where no image is repeated or dropped for it.

The grouped order is a pure function of the shuffled permutation (itself a function of
seed and epoch), so the sampler stays resumable and independent of the world size: the
permutation is walked once, each image joins its group's bucket, and a bucket that
holds `batch_size` images becomes the next micro-batch of the global sequence. What is
left in the buckets at the end (fewer than `batch_size` per group) follows in mixed
micro-batches, in permutation order: torchvision instead repeats images of a group to
fill its last batch. A set of one shape is one group, and its order is the permutation's.
"""

from __future__ import annotations

import logging

import numpy as np
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

# torchvision references' default --aspect-ratio-group-factor: 2k + 1 bin edges, 2k + 2 groups.
GROUP_FACTOR = 3


def aspect_ratio_groups(widths: np.ndarray, heights: np.ndarray, factor: int = GROUP_FACTOR) -> np.ndarray:
    """Each image's group: how many bin edges 2 ** linspace(-1, 1, 2 * factor + 1) its width / height
    reaches (torchvision's `_quantize`, a bisect_right); factor 0 is portrait (0) and landscape-or-square (1)."""
    ratios = np.asarray(widths, dtype=np.float64) / np.asarray(heights, dtype=np.float64)
    edges = 2.0 ** np.linspace(-1, 1, 2 * factor + 1) if factor > 0 else np.array([1.0])
    return np.searchsorted(edges, ratios, side="right").astype(np.int64)


def grouped_order(perm: np.ndarray, groups: np.ndarray, batch_size: int) -> np.ndarray:
    """`perm` rearranged into runs of `batch_size` images of one group each, then the leftovers (see above).

    Every index of `perm` appears once. A run comes as soon as its group has `batch_size` images in
    permutation order, so the epoch's early batches are drawn from its early permutation, as unshuffled.
    """
    buckets: dict[int, list[int]] = {}
    out: list[int] = []
    for index in perm.tolist():
        bucket = buckets.setdefault(int(groups[index]), [])
        bucket.append(index)
        if len(bucket) == batch_size:
            out += bucket
            bucket.clear()
    position = np.empty(len(groups), dtype=np.int64)
    position[perm] = np.arange(len(perm))
    out += sorted((i for bucket in buckets.values() for i in bucket), key=lambda i: position[i])
    return np.asarray(out, dtype=perm.dtype)


def image_sizes(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Widths and heights of the dataset's images in index order, from its records (no image is opened)."""
    widths, heights = dataset.image_sizes()  # type: ignore[attr-defined]
    return np.asarray(widths), np.asarray(heights)


def dataset_groups(dataset: Dataset, factor: int = GROUP_FACTOR) -> np.ndarray:
    """aspect_ratio_groups of a dataset's images, with the group sizes in the log."""
    groups = aspect_ratio_groups(*image_sizes(dataset), factor=factor)
    counts = np.bincount(groups, minlength=2 * factor + 2)
    log.info(
        "data: grouping by aspect ratio, images per group (tallest first): %s", " ".join(str(int(c)) for c in counts)
    )
    return groups
