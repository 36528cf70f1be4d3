"""Checking an exported file against the PyTorch model it was made from, on validation images.

The file is read back as a user would run it (onnxruntime for ONNX, torch.jit.load
for TorchScript) and its detections are paired with the PyTorch model's: same
label, nearest box. Both run fp32, so boxes agree to float rounding (about 1e-5 px);
a missing detection, another label or a box off by more than BOX_TOLERANCE fails.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from frcnn_train.data import build_datasets
from frcnn_train.errors import DataError, UserError

BOX_TOLERANCE = 1e-2  # pixels


def as_float_image(image: Tensor) -> Tensor:
    """[3, H, W] float in [0, 1], also from a uint8 image."""
    return image.float().div(255.0) if image.dtype == torch.uint8 else image.float()


def validation_images(cfg: DictConfig, count: int) -> list[Tensor]:
    """The first `count` images of the checkpoint's validation split, built from its config (with the data
    overrides the command took) as evaluate does."""
    try:
        val = build_datasets(cfg.data, with_masks=cfg.model.arch == "mask_rcnn").val
    except UserError as err:
        raise DataError(
            f"{err} (export traces and checks the model on the checkpoint's validation images: "
            "give data overrides after the checkpoint as evaluate takes them, or --check-images 0 to "
            "export from the checkpoint alone)"
        ) from None
    if len(val) == 0:
        raise DataError("the checkpoint's validation split is empty; export traces and checks the model on its images")
    return [as_float_image(val[i][0]) for i in range(min(count, len(val)))]


def synthetic_image(min_size: int) -> Tensor:
    """The example a trace follows when no image is read (--check-images 0): min_size x min_size, the size the
    model resizes a square image to, of seeded noise (the same file from the same checkpoint)."""
    return torch.rand(3, min_size, min_size, generator=torch.Generator().manual_seed(0))


def resized(image: Tensor, size: list[int]) -> Tensor:
    if list(image.shape[1:]) == list(size):
        return image
    return F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False)[0].clamp(0.0, 1.0)


@dataclass
class CheckReport:
    images: int = 0
    runs: int = 0
    sizes: set[tuple[int, int]] = field(default_factory=set)
    reference: int = 0  # detections of the PyTorch model
    exported: int = 0  # detections of the file
    matched: int = 0  # pairs with the same label
    max_box: float = 0.0
    max_score: float = 0.0
    max_mask: float | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.reference == self.exported == self.matched and self.max_box <= BOX_TOLERANCE

    def summary(self) -> str:
        sizes = ", ".join(f"{h}x{w}" for h, w in sorted(self.sizes))
        mask = "" if self.max_mask is None else f", largest mask difference {self.max_mask:.2g}"
        verdict = (
            "passed"
            if self.passed
            else f"FAILED: the file does not reproduce the model (tolerance {BOX_TOLERANCE} px, every detection "
            "matched); it was written anyway"
        )
        return (
            f"check against the PyTorch model on {_count(self.images, 'validation image')} "
            f"({_count(self.runs, 'run')} at {sizes}, "
            f"{self.seconds:.1f} s): {self.matched} of {self.reference} detections matched with the same label "
            f"({self.exported} from the file), largest box difference {self.max_box:.2g} px, largest score "
            f"difference {self.max_score:.2g}{mask}; {verdict}"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def match(ref_boxes: Tensor, ref_labels: Tensor, boxes: Tensor, labels: Tensor) -> list[tuple[int, int]]:
    """Pairs (i, j) of detections with the same label, nearest boxes first (greedy on the largest coordinate
    difference): order-free, so two near-equal scores that swap places still pair up."""
    if len(ref_boxes) == 0 or len(boxes) == 0:
        return []
    distance = (ref_boxes[:, None, :] - boxes[None, :, :]).abs().amax(dim=-1)
    distance[ref_labels[:, None] != labels[None, :]] = float("inf")
    pairs: list[tuple[int, int]] = []
    used_ref, used = set(), set()
    for flat in torch.argsort(distance.flatten()).tolist():
        i, j = divmod(flat, distance.shape[1])
        if distance[i, j] == float("inf") or len(pairs) == min(distance.shape):
            break
        if i not in used_ref and j not in used:
            pairs.append((i, j))
            used_ref.add(i)
            used.add(j)
    return pairs


def runner(path: Path, fmt: str, device: torch.device) -> Callable[[Tensor], list[Tensor]]:
    """The file loaded as a user would: image [3, H, W] -> its outputs on the CPU."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda image: [torch.from_numpy(o) for o in session.run(None, {name: image.cpu().numpy()})]
    with warnings.catch_warnings():
        # Recent torch calls TorchScript deprecated (a DeprecationWarning in 2.11, FutureWarning in 2.14); it loads.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated")
        loaded = torch.jit.load(str(path), map_location=device)
    return lambda image: [t.cpu() for t in loaded(image.to(device))]


def _compare(report: CheckReport, reference: dict[str, Tensor], outputs: list[Tensor], names: tuple[str, ...]) -> None:
    got = dict(zip(names, outputs))
    ref = {k: v.cpu() for k, v in reference.items()}
    pairs = match(ref["boxes"], ref["labels"], got["boxes"], got["labels"])
    report.reference += len(ref["boxes"])
    report.exported += len(got["boxes"])
    report.matched += len(pairs)
    if not pairs:
        return
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    report.max_box = max(report.max_box, (ref["boxes"][i] - got["boxes"][j]).abs().max().item())
    report.max_score = max(report.max_score, (ref["scores"][i] - got["scores"][j]).abs().max().item())
    if "masks" in got:
        report.max_mask = max(report.max_mask or 0.0, (ref["masks"][i] - got["masks"][j]).abs().max().item())


@torch.no_grad()
def check_export(
    path: Path,
    fmt: str,
    model: nn.Module,
    images: list[Tensor],
    names: tuple[str, ...],
    *,
    input_size: list[int] | None,
    device: torch.device,
) -> CheckReport:
    """Run the file and `model` on `images`. A fixed-size file (`input_size` [H, W]) gets the images resized to
    it; a dynamic one gets each image as it is and once more at another size (3/4 the height, 5/4 the width)."""
    start = time.perf_counter()
    run = runner(path, fmt, device)
    report = CheckReport(images=len(images))
    for image in images:
        if input_size is not None:
            cases = [resized(image, input_size)]
        else:
            h, w = image.shape[1:]
            cases = [image, resized(image, [max(16, h * 3 // 4), max(16, w * 5 // 4)])]
        for case in cases:
            reference = model([case.to(device)])[0]
            _compare(report, reference, run(case), names)
            report.runs += 1
            report.sizes.add((case.shape[1], case.shape[2]))
    report.seconds = time.perf_counter() - start
    return report
