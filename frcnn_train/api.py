"""The Python API: `frcnn_train.load(source)` gives a Detector, `frcnn_train.train(overrides)` runs a training.

    import frcnn_train
    det = frcnn_train.load("outputs/run1")              # a run directory, a .pth, or "torchvision:<builder>"
    det.predict("photo.jpg")                            # {"boxes", "scores", "labels", "names"(, "masks")}
    det.predict(["a.jpg", pil_image, numpy_rgb])        # one dict per image, batched inside
    run_dir, metrics = frcnn_train.train(["model=mask_rcnn", "trainer.epochs=12"])

Both go through the code the commands use (predict's model loading, launch.run), so a detection here is
the one `frcnn-predict` writes, and a run trained here is the one `frcnn-train` would have made. A user
error raises the one-sentence UserError the command would print; nothing calls sys.exit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor, nn

from frcnn_train.data.decode import UINT16_MAX, _gray_to_rgb, from_pil, pixel_interleaved
from frcnn_train.errors import DataError
from frcnn_train.zoo import UNUSED_CLASS

ImageLike = str | Path | Image.Image | np.ndarray | Tensor
# COCO's evaluation and frcnn-predict's RLE masks binarise Mask R-CNN's mask probabilities here.
MASK_THRESHOLD = 0.5


@dataclass
class Detector:
    """A model ready for inference, with the class names its labels index (label i is classes[i - 1])."""

    model: nn.Module
    classes: list[str]
    config: DictConfig
    device: torch.device
    source: str
    weights: str  # which weights run: "ema", "raw" (a checkpoint's), or the torchvision weights' name

    @property
    def with_masks(self) -> bool:
        return self.config.model.arch == "mask_rcnn"

    @torch.no_grad()
    def forward(self, images: Sequence[Tensor], *, batch_size: int = 4) -> list[dict[str, Tensor]]:
        """The model's outputs for decoded images as CPU tensors (masks as probabilities), `batch_size` images
        per forward pass; a zoo model's placeholder classes (COCO's unused ids, never trained) left out."""
        if batch_size < 1:
            raise DataError(f"batch_size {batch_size} must be at least 1")
        unused = torch.tensor([False] + [name == UNUSED_CLASS for name in self.classes])
        outputs: list[dict[str, Tensor]] = []
        for start in range(0, len(images), batch_size):
            for output in self.model([image.to(self.device) for image in images[start : start + batch_size]]):
                output = {k: v.cpu() for k, v in output.items()}
                real = ~unused[output["labels"]]
                outputs.append({k: v[real] for k, v in output.items()})
        return outputs

    def detect(
        self, images: Sequence[Tensor], *, score_threshold: float = 0.5, batch_size: int = 4
    ) -> list[dict[str, Tensor]]:
        """forward(), keeping the detections that score at least `score_threshold`."""
        return [
            {k: v[output["scores"] >= score_threshold] for k, v in output.items()}
            for output in self.forward(images, batch_size=batch_size)
        ]

    def predict(
        self, images: ImageLike | Sequence[ImageLike], *, score_threshold: float = 0.5, batch_size: int = 4
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Detections for one image (a dict) or a list of images (a list of dicts, in order).

        An image is a file path, a PIL image, a numpy array (H x W x 3 RGB or H x W gray; uint8, uint16,
        or float in [0, 1]) or a tensor ([3, H, W] or [1, H, W]; uint8 or float in [0, 1]). Each dict
        holds `boxes` (float [N, 4], x1 y1 x2 y2 in the image's pixels), `scores`, `labels` (1-based
        indices into `classes`), `names` (the class names) and, for Mask R-CNN, `masks` (bool [N, H, W]).
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        outputs = self.detect(
            [as_image(item) for item in items], score_threshold=score_threshold, batch_size=batch_size
        )
        results = [self._result(output) for output in outputs]
        return results[0] if single else results

    def _result(self, output: dict[str, Tensor]) -> dict[str, Any]:
        labels = output["labels"]
        result: dict[str, Any] = {
            "boxes": output["boxes"],
            "scores": output["scores"],
            "labels": labels,
            "names": [self.classes[int(label) - 1] for label in labels],
        }
        if "masks" in output:
            result["masks"] = output["masks"][:, 0] > MASK_THRESHOLD
        return result


def as_image(item: ImageLike) -> Tensor:
    """Any accepted image as the datasets give it: uint8 [3, H, W] RGB, or float32 in [0, 1] for deeper ones."""
    from frcnn_train.predict import load_image  # the command's reader: the same decoding and the same errors

    if isinstance(item, (str, Path)):
        if not Path(item).is_file():
            raise DataError(
                f"image {item} does not exist or is not a file; give an image file's path "
                "(for a directory, pass the list of its images)"
            )
        return load_image(Path(item))
    if isinstance(item, Image.Image):
        return from_pil(item).image
    if isinstance(item, np.ndarray):
        return _from_array(item)
    if isinstance(item, Tensor):
        return _from_tensor(item)
    raise DataError(
        f"an image of type {type(item).__name__} cannot be read; give a file path, a PIL image, "
        "a numpy array or a tensor"
    )


def _from_array(array: np.ndarray) -> Tensor:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise DataError(
            f"a numpy image of shape {list(array.shape)} is neither H x W x 3 (RGB) nor H x W (gray); "
            "give one of those (convert BGR or RGBA first)"
        )
    if array.dtype == np.uint8:
        rgb = array if array.ndim == 3 else np.repeat(array[:, :, None], 3, axis=2)
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    if array.dtype == np.uint16:
        array = array.astype(np.float32) / np.float32(UINT16_MAX)
    elif array.dtype.kind == "f":
        array = array.astype(np.float32)
        if not np.isfinite(array).all() or array.size and (array.min() < 0 or array.max() > 1):
            raise DataError("a float numpy image must hold finite values in [0, 1]; divide 0-255 values by 255")
    else:
        raise DataError(
            f"a numpy image of dtype {array.dtype} has no known scale; give uint8, uint16 or float in [0, 1]"
        )
    if array.ndim == 2:
        return _gray_to_rgb(array)
    return pixel_interleaved(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))


def _from_tensor(image: Tensor) -> Tensor:
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise DataError(
            f"a tensor image of shape {list(image.shape)} is not [3, H, W] or [1, H, W]; permute an "
            "H x W x C tensor with .permute(2, 0, 1)"
        )
    if image.dtype == torch.uint8:
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image
    if not image.is_floating_point():
        raise DataError(f"a tensor image of dtype {image.dtype} has no known scale; give uint8 or float in [0, 1]")
    finite = bool(torch.isfinite(image).all())
    if not finite or image.numel() and (image.min() < 0 or image.max() > 1):
        raise DataError("a float tensor image must hold finite values in [0, 1]; divide 0-255 values by 255")
    image = image.float()
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def load(source: str | Path, device: str | torch.device | None = None, *, raw: bool = False) -> Detector:
    """A Detector from a checkpoint file, a run directory (its best.pth, else last.pth) or, where the model
    zoo is available, `torchvision:<builder>[.<WEIGHTS>]`. `device`: None or "auto" takes CUDA when there is
    one. A checkpoint runs its EMA weights when it has them, unless `raw` (as frcnn-predict --raw)."""
    from frcnn_train import checkpoint
    from frcnn_train.evaluate import load_model
    from frcnn_train.resume import saved_config
    from frcnn_train.runtime import resolve_device

    dev = resolve_device("auto" if device is None else str(device))
    text = str(source)
    if text.startswith("torchvision:"):
        from frcnn_train.zoo import from_torchvision

        model, classes, cfg = from_torchvision(text)
        return Detector(model.to(dev).eval(), list(classes), cfg, dev, text, text.split(":", 1)[1])
    path = checkpoint.checkpoint_in(text)
    ckpt = checkpoint.load_checkpoint(path)
    cfg = saved_config(ckpt["config"], str(path), ckpt.get("versions"))
    model = load_model(ckpt, cfg, str(path), raw=raw).to(dev)
    return Detector(model, list(ckpt["classes"]), cfg, dev, str(path), checkpoint.inference_weights(ckpt, raw=raw)[1])


def train(overrides: Sequence[str] = ()) -> tuple[Path, dict[str, float]]:
    """Run what `frcnn-train <overrides>` runs, in this process; returns the run directory and the metrics of
    its last evaluation (empty when it never evaluated). Raises the command's one-sentence UserError (a
    ConfigError for an override Hydra or the schema refuses) instead of printing it and exiting."""
    from frcnn_train.composition import resolved_overrides
    from frcnn_train.config import register_schema
    from frcnn_train.evaluate import compose_overrides
    from frcnn_train.launch import run
    from frcnn_train.runtime import EXIT_OK, exit_code_for

    if isinstance(overrides, str):
        overrides = [overrides]
    register_schema()
    cfg = compose_overrides(list(overrides))
    summary = run(cfg, overrides=resolved_overrides(cfg, overrides))
    if exit_code_for(summary) != EXIT_OK:  # a Ctrl-C or SIGTERM: saved, and the caller's code must stop too
        raise KeyboardInterrupt(
            f"{summary['stop_reason']}: stopped after saving {summary['run_dir']}/last.pth; "
            f"continue with frcnn_train.train(['resume={summary['run_dir']}'])"
        )
    return Path(summary["run_dir"]), dict(summary.get("metrics") or {})
