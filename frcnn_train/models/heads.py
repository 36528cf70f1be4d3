"""Our subclasses of torchvision's detector parts: fp32 box decoding and batched post-processing.

torchvision decodes boxes in the dtype of the regression output, so under
autocast boxes move in 0.5-1 px (fp16) or 4-8 px (bf16) steps, and CUDA NMS
offsets boxes by `class * (max_coord + 1)`, which overflows fp16. Here:

- every box decode runs in fp32 (`Fp32BoxCoder`), in training too, where the
  RPN proposals that train the box head come from it;
- the detector runs inference (eval mode) in fp32 altogether, whatever autocast
  the caller has on, so AP under `trainer.amp=true` is the fp32 AP;
- the RPN proposal filter and the detection post-processing work on the whole
  batch at once (one grouped NMS with the image index folded into the group)
  instead of torchvision's per-image Python loops. Results equal torchvision's
  (tests/models/test_heads.py compares them on random inputs);
- an image already at the model's size is not resampled, and uint8 images (what the
  datasets give) are made float on the model's device (`SameSizeTransform`);
- no per-image host syncs on CUDA where torchvision has them: the normalisation's mean and
  std are made once per device instead of copied from Python lists for every image, a box
  resize scales by ratios computed on the CPU instead of four tensors copied to the device
  per image, and the RPN's image sizes travel to the device without a blocking copy. The
  numbers are bitwise torchvision's (tests/models/test_heads.py).

Only methods change: every module, attribute and state-dict key is torchvision's,
so model-zoo weights and older checkpoints load unchanged.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, _resize_image_and_masks, resize_keypoints
from torchvision.ops import boxes as box_ops

# Boxes per NMS call on CUDA: the coordinate-offset trick keeps a [n, n/64] mask, so the
# groups are chunked; torchvision's own switch to a per-group loop sits at 25,000 boxes.
CUDA_NMS_CHUNK = 25_000


class Fp32BoxCoder(BoxCoder):
    """torchvision's BoxCoder decoding in fp32, whatever dtype autocast gave the deltas."""

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        return super().decode(rel_codes.float(), [b.float() for b in boxes])


def grouped_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, *, chunk: int | None = None
) -> Tensor:
    """Indices kept by NMS done independently per group, in decreasing score order.

    On the CPU this is torchvision's `batched_nms` (its O(n^2) kernel is cheapest
    per group). On CUDA, groups are packed into chunks of at most `chunk` boxes and
    each chunk is one NMS call with the group folded into the coordinates (in fp32),
    instead of one call (and host sync) per group.
    """
    chunk = chunk if chunk is not None else (CUDA_NMS_CHUNK if boxes.is_cuda else 0)
    if not chunk or boxes.shape[0] <= chunk:
        if chunk:
            return _offset_nms(boxes, scores, groups, iou_threshold)
        return box_ops.batched_nms(boxes, scores, groups, iou_threshold)
    order = torch.argsort(groups, stable=True)
    counts = torch.bincount(groups[order]).tolist()  # one host sync for the chunk plan
    kept, start, size = [], 0, 0
    for count in counts + [chunk + 1]:  # the sentinel flushes the last chunk
        if size and size + count > chunk:
            part = order[start : start + size]
            kept.append(part[_offset_nms(boxes[part], scores[part], groups[part], iou_threshold)])
            start, size = start + size, 0
        size += count
    keep = torch.cat(kept)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def _offset_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    boxes = boxes.float()
    offsets = groups.to(boxes) * (boxes.max() + 1)
    return box_ops.nms(boxes + offsets[:, None], scores.float(), iou_threshold)


def _clip(boxes: Tensor, heights: Tensor, widths: Tensor) -> Tensor:
    """clip_boxes_to_image for [..., 4] boxes with one (height, width) per leading row."""
    x = boxes[..., 0::2].clamp(min=0).minimum(widths)
    y = boxes[..., 1::2].clamp(min=0).minimum(heights)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def _split_per_image(keep: Tensor, image: Tensor, num_images: int, top: int) -> list[Tensor]:
    """`keep` (score order) cut into per-image index lists, each its first `top` entries."""
    keep = keep[torch.argsort(image[keep], stable=True)]  # image order, score order inside
    counts = torch.bincount(image[keep], minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keep.numel(), device=keep.device) - starts.repeat_interleave(counts, output_size=keep.numel())
    keep, image_of_kept = keep[rank < top], image[keep][rank < top]
    sizes = torch.bincount(image_of_kept, minlength=num_images).tolist()  # the step's one host sync here
    return list(keep.split(sizes))


class BatchedRPN(RegionProposalNetwork):
    """RegionProposalNetwork whose proposal filter handles the whole batch in fp32 at once."""

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        num_images, device = proposals.shape[0], proposals.device
        objectness = objectness.detach().float().reshape(num_images, -1)  # no backprop, as torchvision
        levels = torch.cat(
            [torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(num_anchors_per_level)]
        )
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # per level, already batched
        batch_idx = torch.arange(num_images, device=device)[:, None]
        scores = torch.sigmoid(objectness[batch_idx, top_n_idx])
        levels = levels[top_n_idx]
        sizes = to_device(torch.tensor(image_shapes, dtype=torch.float32), device)  # (h, w) per image
        boxes = _clip(proposals.float()[batch_idx, top_n_idx], sizes[:, 0, None, None], sizes[:, 1, None, None])
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = (widths >= self.min_size) & (heights >= self.min_size) & (scores >= self.score_thresh)
        image, column = valid.nonzero(as_tuple=True)
        boxes, scores, levels = boxes[image, column], scores[image, column], levels[image, column]
        keep = grouped_nms(boxes, scores, image * len(num_anchors_per_level) + levels, self.nms_thresh)
        per_image = _split_per_image(keep, image, num_images, self.post_nms_top_n())
        return [boxes[k] for k in per_image], [scores[k] for k in per_image]


class BatchedRoIHeads(RoIHeads):
    """RoIHeads whose detection post-processing decodes, scores and suppresses the batch at once in fp32."""

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        device, num_classes, num_images = class_logits.device, class_logits.shape[-1], len(proposals)
        counts = to_device(torch.tensor([p.shape[0] for p in proposals]), device)
        image = torch.repeat_interleave(
            torch.arange(num_images, device=device), counts, output_size=class_logits.shape[0]
        )  # known size: no host sync
        sizes = to_device(torch.tensor(image_shapes, dtype=torch.float32), device)[image]
        boxes = self.box_coder.decode(box_regression.float(), proposals)  # [N, classes, 4]
        boxes = _clip(boxes, sizes[:, 0, None, None], sizes[:, 1, None, None])[:, 1:]  # background out
        scores = torch.softmax(class_logits.float(), -1)[:, 1:]
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = (scores > self.score_thresh) & (widths >= 1e-2) & (heights >= 1e-2)
        row, column = valid.nonzero(as_tuple=True)
        boxes, scores, labels, image = boxes[row, column], scores[row, column], column + 1, image[row]
        keep = grouped_nms(boxes, scores, image * num_classes + labels, self.nms_thresh)
        per_image = _split_per_image(keep, image, num_images, self.detections_per_img)
        return [boxes[k] for k in per_image], [scores[k] for k in per_image], [labels[k] for k in per_image]


def to_device(values: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor made from Python numbers, on `device` without waiting for the device.

    `torch.tensor(..., device="cuda")` copies from pageable memory and synchronises the stream
    (the host waits for every queued kernel); a non-blocking copy stages the bytes and returns.
    """
    return values.to(device, non_blocking=True)


def scale_boxes(boxes: Tensor, original_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """torchvision's resize_boxes, bitwise, with the two ratios computed on the CPU: torchvision makes four
    one-number tensors on the boxes' device per image, each a blocking copy (a host sync) on CUDA. A CPU
    0-dim tensor enters a CUDA multiplication as a float32 scalar, so the products are the same."""
    ratio_height, ratio_width = (
        torch.tensor(s, dtype=torch.float32) / torch.tensor(s_orig, dtype=torch.float32)
        for s, s_orig in zip(new_size, original_size)
    )
    xmin, ymin, xmax, ymax = boxes.unbind(1)
    return torch.stack((xmin * ratio_width, ymin * ratio_height, xmax * ratio_width, ymax * ratio_height), dim=1)


def to_unit_float(image: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1], bitwise the CPU's `.float().div_(255.0)` on any device.

    The divisor is a tensor on the image's device: CUDA divides by a CPU scalar as a
    multiplication by its reciprocal, which differs in the last bit for 126 of the 256 values.
    """
    return image.float().div_(torch.full((), 255.0, device=image.device))


class SameSizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform, taking uint8 images too, without resampling an image already at its target size.

    A uint8 image (the datasets' own) becomes float here, on the model's device, so a
    quarter of the bytes cross from the loader. At scale 1 torchvision's bilinear resize
    returns the image unchanged (every output pixel samples exactly one input pixel), its
    boxes times 1 and its masks as uint8; the shapes images are all such, and the resize
    was a per-image cost in every step.
    """

    def normalize(self, image: Tensor) -> Tensor:
        if image.dtype == torch.uint8:
            image = to_unit_float(image)
        if not image.is_floating_point() or torchvision._is_tracing():
            return super().normalize(image)  # its error for other dtypes; traced graphs keep its constants
        mean, std = self._mean_std(image.dtype, image.device)
        return (image - mean) / std

    def _mean_std(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """torchvision's per-image `torch.as_tensor(self.image_mean, device=...)`, made once per (dtype, device):
        on CUDA each was a blocking copy, two host syncs per image and step. A plain attribute, not a
        buffer: no state-dict key, and a model moved to another device simply makes new ones."""
        key = (dtype, device, tuple(self.image_mean), tuple(self.image_std))
        cache = self.__dict__.setdefault("_mean_std_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = tuple(
                torch.as_tensor(values, dtype=dtype, device=device)[:, None, None]
                for values in (self.image_mean, self.image_std)
            )
        return cache[key]

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, Any]:
        h, w = image.shape[-2:]
        skip = self.training and getattr(self, "_skip_resize", False)
        same = (
            len(self.min_size) == 1
            and self.fixed_size is None
            and not torchvision._is_tracing()
            and not skip
            and min(self.min_size[0] / min(h, w), self.max_size / max(h, w)) == 1.0
        )
        if not same:
            if target is None or skip or torchvision._is_tracing():
                return super().resize(image, target)
            # torchvision's resize, the boxes scaled by scale_boxes (no host syncs on CUDA).
            size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
            image, target = _resize_image_and_masks(image, size, self.max_size, target, self.fixed_size)
            target["boxes"] = scale_boxes(target["boxes"], (h, w), tuple(image.shape[-2:]))
            if "keypoints" in target:
                target["keypoints"] = resize_keypoints(target["keypoints"], (h, w), tuple(image.shape[-2:]))
            return image, target
        if self.training:
            self.torch_choice(self.min_size)  # the random draw torchvision makes, so the RNG moves on alike
        if target is not None and "masks" in target:
            target["masks"] = target["masks"].to(torch.uint8)
        return image, target


M = TypeVar("M", bound=nn.Module)


def specialise(module: nn.Module, cls: type[M]) -> M:
    """`module`, as torchvision built it, given the methods of our subclass `cls`.

    `cls` adds no attributes and no submodules, so the instance keeps every
    attribute and state-dict key; only the overridden methods differ.
    """
    if type(module) not in cls.__bases__:
        raise TypeError(
            f"{cls.__name__} specialises {[b.__name__ for b in cls.__bases__]}, not {type(module).__name__}"
        )
    module.__class__ = cls
    return module


class _Fp32Inference:
    """Inference (eval mode) in fp32 whatever autocast is on; training as torchvision's, fp32 boxes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rpn = specialise(self.rpn, BatchedRPN)
        self.roi_heads = specialise(self.roi_heads, BatchedRoIHeads)
        self.transform = specialise(self.transform, SameSizeTransform)
        for part in (self.rpn, self.roi_heads):
            part.box_coder = Fp32BoxCoder(part.box_coder.weights, part.box_coder.bbox_xform_clip)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if self.training:
            return super().forward(images, targets)
        device_type = images[0].device.type if len(images) else "cpu"
        # Floating images in fp32; uint8 ones stay uint8 until the transform makes them float.
        images = [image.float() if image.is_floating_point() else image for image in images]
        with torch.autocast(device_type, enabled=False):
            return super().forward(images, targets)


class Detector(_Fp32Inference, FasterRCNN):
    """torchvision's FasterRCNN with the parts above."""


class MaskDetector(_Fp32Inference, MaskRCNN):
    """torchvision's MaskRCNN with the parts above."""
