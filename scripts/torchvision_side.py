"""The torchvision side of `benchmark.py --vs-torchvision`: its model, its loader and its training loop.

What a torchvision user writes after references/detection/train.py and engine.py:
- the model from torchvision's builder (`fasterrcnn_resnet50_fpn` / `maskrcnn_resnet50_fpn`, and for the
  v2 presets `fasterrcnn_resnet50_fpn_v2` / `maskrcnn_resnet50_fpn_v2`), or from its classes (ResNet,
  BackboneWithFPN, FasterRCNN) for v1 sizes its builders do not take;
- the loader of train.py: a shuffled BatchSampler, `--workers 4`, `utils.collate_fn` (tuples), images
  made float32 in [0, 1] in the workers (the presets' `ToDtype(torch.float, scale=True)`), no pinned
  memory, a new set of workers every epoch;
- engine.py's train_one_epoch: loss dict, sum, `.item()` of the sum and of every loss, backward,
  GradScaler under fp16, step.

The benchmark's recipe, the same on both sides so both train stably: our LR schedule (linear
warmup, then its decay) through LambdaLR instead of engine.py's 1000-step first-epoch warmup,
and, with trainer.grad_clip, gradients clipped to that norm after unscaling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torchvision
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

RESNET_STAGE_CHANNELS = {
    "resnet18": [64, 128, 256, 512],
    "resnet34": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
    "resnet101": [256, 512, 1024, 2048],
}
# references/detection/train.py's `-j/--workers` default.
THEIR_WORKERS = 4


class NonFiniteLoss(Exception):
    """A side's loss became NaN or inf: the benchmark ends with this one line."""

    def __init__(self, side: str, detail: str) -> None:
        super().__init__(f"{side} side: {detail}")
        self.side, self.detail = side, detail

    def __reduce__(self) -> tuple:  # crosses from a side's process to the parent
        return NonFiniteLoss, (self.side, self.detail)


def torchvision_model(model_cfg: DictConfig, num_classes: int) -> nn.Module:
    """The same detector made by torchvision alone: its builder when the sizes are its own, else its classes."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN, fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    bb, arch = model_cfg.backbone, model_cfg.arch
    resnet = bb.name.removesuffix("_fpn")
    if resnet not in RESNET_STAGE_CHANNELS or model_cfg.attention.sites or bb.returned_layers is not None:
        raise SystemExit("--vs-torchvision compares ResNet FPN backbones with every stage returned and no attention")
    sizes = dict(
        min_size=model_cfg.min_size,
        max_size=model_cfg.max_size,
        image_mean=list(model_cfg.image_mean),
        image_std=list(model_cfg.image_std),
        rpn_pre_nms_top_n_train=model_cfg.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=model_cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=model_cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=model_cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=model_cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=model_cfg.box_batch_size_per_image,
        box_score_thresh=model_cfg.box_score_thresh,
        box_nms_thresh=model_cfg.box_nms_thresh,
        box_detections_per_img=model_cfg.box_detections_per_img,
    )
    own_sizes = (
        resnet == "resnet50"
        and bb.fpn_channels == 256
        and list(model_cfg.anchor_sizes) == [32, 64, 128, 256, 512]
        and list(model_cfg.aspect_ratios) == [0.5, 1.0, 2.0]
        and model_cfg.box_head_dim == 1024
        and (arch == "faster_rcnn" or (model_cfg.mask_head_layers, model_cfg.mask_head_dim) == (4, 256))
    )
    if str(model_cfg.get("version", "v1")) == "v2":  # the *_v2 builders: their heads only at their own sizes
        if not (own_sizes and (model_cfg.box_head_convs, model_cfg.box_head_conv_dim) == (4, 256)):
            raise SystemExit(
                "--vs-torchvision compares v2 heads at torchvision's own sizes only (FPN 256, box head "
                "of 4 convs of 256 and an FC of 1024, mask head of 4 convs of 256)"
            )
        from frcnn_train.zoo import builder_for

        return torchvision.models.get_model(
            builder_for(model_cfg), weights=None, weights_backbone=None, num_classes=num_classes + 1, **sizes
        )
    if own_sizes:  # exactly what a torchvision user calls
        builder = maskrcnn_resnet50_fpn if arch == "mask_rcnn" else fasterrcnn_resnet50_fpn
        return builder(weights=None, weights_backbone=None, num_classes=num_classes + 1, **sizes)
    body = getattr(torchvision.models, resnet)(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(
        body,
        {f"layer{i}": str(i - 1) for i in range(1, 5)},
        RESNET_STAGE_CHANNELS[resnet],
        bb.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    levels = ["0", "1", "2", "3"]
    anchors = AnchorGenerator(
        tuple((int(s),) for s in model_cfg.anchor_sizes), (tuple(float(r) for r in model_cfg.aspect_ratios),) * 5
    )
    c, dim = bb.fpn_channels, model_cfg.box_head_dim
    parts: dict[str, Any] = dict(
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=TwoMLPHead(c * 49, dim),
        box_predictor=FastRCNNPredictor(dim, num_classes + 1),
    )
    if arch == "mask_rcnn":
        mdim, layers = model_cfg.mask_head_dim, model_cfg.mask_head_layers
        parts.update(
            mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
            mask_head=MaskRCNNHeads(c, [mdim] * layers, 1),
            mask_predictor=MaskRCNNPredictor(mdim if layers else c, mdim, num_classes + 1),
        )
        return MaskRCNN(backbone, num_classes=None, **parts, **sizes)
    return FasterRCNN(backbone, num_classes=None, **parts, **sizes)


def their_float(image: torch.Tensor) -> torch.Tensor:
    """The presets' ToDtype(torch.float, scale=True): our datasets give uint8, which torchvision's model refuses."""
    from torchvision.transforms.v2.functional import to_dtype

    return to_dtype(image, torch.float32, scale=True) if image.dtype == torch.uint8 else image


def tuple_collate(batch: list) -> tuple:
    """references/detection/utils.collate_fn, with the float conversion the presets do in the worker."""
    images, targets = zip(*batch)
    return tuple(their_float(image) for image in images), targets


class ShuffleWithFreshAugmentation(torch.utils.data.Sampler):
    """A shuffled epoch whose every visit draws new augmentation, from torch's global RNG, as
    torchvision's references/detection/transforms.py does. (Our datasets take (index, seed):
    a bare index would give each image the same flip in every epoch.)"""

    def __init__(self, length: int) -> None:
        self.length = length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in torch.randperm(self.length).tolist():
            yield index, int(torch.randint(2**62, ()))

    def __len__(self) -> int:
        return self.length


def their_loader(dataset: Any, batch_size: int, workers: int = THEIR_WORKERS) -> DataLoader:
    """train.py's DataLoader (aspect-ratio grouping aside: every shapes image has the same shape)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        drop_last=True,
        sampler=ShuffleWithFreshAugmentation(len(dataset)),
        num_workers=workers,
        collate_fn=tuple_collate,
    )


class TheirLoop:
    """engine.py's train_one_epoch, one optimizer step at a time, with the benchmark's recipe (module docstring).

    `lr`: the base LR (our side's, after its batch scaling); `lr_factor`: our schedule's factor per step.
    Batches come from `loader` (end to end) or are handed to `train` (compute-only).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        lr_factor: Callable[[int], float],
        grad_clip: float | None,
        device: torch.device,
        dtype: torch.dtype | None,
        loader: DataLoader | None = None,
    ) -> None:
        self.model, self.device, self.dtype, self.grad_clip = model.to(device).train(), device, dtype, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        self.loader, self.batches, self.steps = loader, iter(()), 0

    def step(self) -> int:
        """One step on the loader's next batch (a new epoch, with new workers, when it runs out); its images."""
        try:
            images, targets = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            images, targets = next(self.batches)
        images = list(image.to(self.device) for image in images)
        targets = [{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        self.train(images, targets)
        return len(images)

    def train(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss_dict = self.model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
        loss_value = losses.item()
        self.steps += 1
        if not math.isfinite(loss_value):  # engine.py prints and exits here
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in loss_dict.items())
            raise NonFiniteLoss("torchvision", f"the loss became {loss_value} at step {self.steps} ({terms})")
        self.optimizer.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(losses).backward()
            if self.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            losses.backward()
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()
        self.scheduler.step()
        # MetricLogger.update(loss=..., **loss_dict): every value read back with .item().
        _ = [v.item() for v in loss_dict.values()], self.optimizer.param_groups[0]["lr"]
