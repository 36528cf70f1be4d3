"""Validation during training: COCO AP of the trained weights (and of the EMA), logged, drawn, and
whether it is a new best. The Trainer calls `Validator.run` at the epochs trainer.eval_every names.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from frcnn_train import distributed
from frcnn_train.data import DataBundle, build_eval_loader
from frcnn_train.evaluation import evaluate, format_table, summary_metrics
from frcnn_train.logs import RunLogger, log
from frcnn_train.visualize import draw_detections


@dataclass
class Validator:
    data: DataBundle
    device: torch.device
    with_masks: bool
    batch_size: int
    num_workers: int
    amp_dtype: torch.dtype | None
    logger: RunLogger
    vis_images: int
    best_metric: str

    def __post_init__(self) -> None:
        self._said_no_metric = False

    def run(self, models: dict[str, nn.Module], *, epoch: int, step: int) -> dict[str, float]:
        """Score each model (prefix -> model: "" the trained weights, "ema/" the EMA); every rank
        must call it (the predictions are gathered to rank 0). Returns all metrics, prefixed."""
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        for prefix, model in models.items():
            distributed.broadcast_buffers(model)  # rank 0's BatchNorm statistics, which the checkpoint holds
            loader = build_eval_loader(self.data.val, batch_size=self.batch_size, num_workers=self.num_workers,
                                       rank=distributed.rank(), world_size=distributed.world_size(),
                                       pin_memory=self.device.type == "cuda")
            scores, _ = evaluate(model, loader, coco_gt=self.data.val.coco,
                                 label_to_cat_id=self.data.val.label_to_cat_id, device=self.device,
                                 with_masks=self.with_masks, autocast_dtype=self.amp_dtype)
            metrics.update({f"{prefix}{k}": v for k, v in scores.items()})
            if distributed.is_main():
                which = " of the EMA weights" if prefix else ""
                log.info("Validation%s after epoch %d (step %d):\n%s", which, epoch, step, format_table(scores))
        if distributed.is_main():
            self.logger.scalars({f"val/{k}": v for k, v in metrics.items()}, step)
            self.logger.scalars({"time/eval_s": time.perf_counter() - started}, step)
            self.logger.metrics_line({"epoch": epoch, "step": step, **metrics})
            self._draw_samples(models, step)
        return metrics

    def improves(self, metrics: dict[str, float], best: float | None) -> bool:
        """Whether `metrics` beat `best` by trainer.best_metric. COCOeval's -1 (no ground truth to score
        against) is no value: it never makes a best.pth, and the run says so once."""
        value = metrics.get(self.best_metric)
        if value is None or value < 0:
            if not self._said_no_metric:
                self._said_no_metric = True
                log.warning("%s is undefined on the validation split (%s), so no best.pth is written from this "
                            "evaluation; give the split annotated objects to choose a best checkpoint.",
                            self.best_metric, "it has no annotated objects" if _empty(metrics) else "no value")
            return False
        return best is None or value > best

    @torch.no_grad()
    def _draw_samples(self, models: dict[str, nn.Module], step: int) -> None:
        count = min(self.vis_images, len(self.data.val))
        images = [sample[0] for sample in (self.data.val[i] for i in range(count)) if sample is not None]
        if not images:  # none asked for, or data.bad_images=skip left every one of them out
            return
        model = list(models.values())[-1]  # the EMA's when there is one: what evaluate and predict use
        was_training = model.training
        model.eval()
        outputs = model([image.to(self.device) for image in images])
        model.train(was_training)
        for i, (image, output) in enumerate(zip(images, outputs)):
            drawn = draw_detections(image, output, self.data.classes, score_threshold=0.5)
            self.logger.image(f"val/predictions/{i}", drawn, step)


def _empty(metrics: dict[str, float]) -> bool:
    return all(v < 0 for v in summary_metrics(metrics).values())
