"""Drawing detections onto images (TensorBoard samples, predict's output)."""

from __future__ import annotations

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

# Distinct colours cycled by label, so a class keeps its colour across images.
PALETTE = [
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
    "#fabebe",
    "#008080",
    "#e6beff",
    "#9a6324",
    "#800000",
    "#aaffc3",
]


def draw_detections(
    image: torch.Tensor,
    output: dict[str, torch.Tensor],
    classes: list[str],
    *,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
) -> torch.Tensor:
    """uint8 [3,H,W] image with boxes, "name score" labels and (if present) masks drawn.

    `image` is what the datasets give: uint8, or float in [0, 1]. An `output` without "scores" is ground
    truth (a dataset's target, masks [N, H, W]): every box is drawn, labelled with its name alone.
    """
    image = image.detach().cpu()
    canvas = image.clone() if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).to(torch.uint8)
    truth = "scores" not in output
    if truth:
        output = {**output, "scores": torch.ones(len(output["boxes"]))}
        if "masks" in output:
            output["masks"] = output["masks"][:, None].float()
    keep = output["scores"].detach().cpu() >= score_threshold
    if not keep.any():
        return canvas
    labels = output["labels"].detach().cpu()[keep].tolist()
    scores = output["scores"].detach().cpu()[keep].tolist()
    colors = [PALETTE[label % len(PALETTE)] for label in labels]
    if "masks" in output:
        masks = output["masks"].detach().cpu()[keep][:, 0] > mask_threshold
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.4, colors=colors)
    names = [classes[label - 1] if 0 < label <= len(classes) else str(label) for label in labels]
    text = names if truth else [f"{name} {score:.2f}" for name, score in zip(names, scores)]
    return draw_bounding_boxes(canvas, output["boxes"].detach().cpu()[keep], labels=text, colors=colors, width=2)
