"""Validation during training: COCO AP of the trained weights (and of the EMA), logged, drawn, and
whether it is a new best. The Trainer calls `Validator.run` at the epochs trainer.eval_every names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from frcnn_train import distributed
from frcnn_train.data import DataBundle, EvalLoader
from frcnn_train.eval_plots import evaluation_figures, save_figures
from frcnn_train.evaluation import coco_api, evaluate, format_table, summary_metrics
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
    plots: bool = False  # PR curves and a confusion matrix per evaluation (eval_plots)
    backend: str = "auto"  # eval.backend

    def __post_init__(self) -> None:
        coco_api(self.backend)  # a backend that is not installed stops the run at its start, not at an evaluation
        self._said_no_metric = False
        self._loader: EvalLoader | None = None  # made at the first evaluation; its workers persist until close()

    def close(self) -> None:
        """End the evaluation loader's workers (the Trainer calls it when fit ends)."""
        if self._loader is not None:
            self._loader.close()

    def run(self, models: dict[str, nn.Module], *, epoch: int, step: int) -> dict[str, float]:
        """Score each model (prefix -> model: "" the trained weights, "ema/" the EMA); every rank
        must call it (the predictions are gathered to rank 0). Returns all metrics, prefixed."""
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        evaluators: dict[str, Any] = {}
        results: list[dict[str, Any]] = []
        if self._loader is None:
            self._loader = EvalLoader(
                self.data.val,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                rank=distributed.rank(),
                world_size=distributed.world_size(),
                pin_memory=self.device.type == "cuda",
            )
        for prefix, model in models.items():
            distributed.broadcast_buffers(model)  # rank 0's BatchNorm statistics, which the checkpoint holds
            evaluators = {}  # the last model's (the EMA's when there is one), as _draw_samples draws
            # Only rank 0 runs COCOeval: the other ranks never index the ground truth.
            coco_gt = self.data.val.coco if distributed.is_main() else None
            scores, results = evaluate(
                model,
                self._loader.loader,
                coco_gt=coco_gt,
                label_to_cat_id=self.data.val.label_to_cat_id,
                device=self.device,
                with_masks=self.with_masks,
                autocast_dtype=self.amp_dtype,
                evaluators=evaluators,
                backend=self.backend,
            )
            metrics.update({f"{prefix}{k}": v for k, v in scores.items()})
            if distributed.is_main():
                which = " of the EMA weights" if prefix else ""
                log.info("Validation%s after epoch %d (step %d):\n%s", which, epoch, step, format_table(scores))
        if distributed.is_main():
            self.logger.scalars({f"val/{k}": v for k, v in metrics.items()}, step)
            self.logger.scalars({"time/eval_s": time.perf_counter() - started}, step)
            self.logger.metrics_line({"epoch": epoch, "step": step, **metrics})
            self._draw_samples(models, step)
            if self.plots:
                self._plots(evaluators, results, step, ema=len(models) > 1)
        return metrics

    def improves(self, metrics: dict[str, float], best: float | None) -> bool:
        """Whether `metrics` beat `best` by trainer.best_metric. COCOeval's -1 (no ground truth to score
        against) is no value: it never makes a best.pth, and the run says so once."""
        value = metrics.get(self.best_metric)
        if value is None or value < 0:
            if not self._said_no_metric:
                self._said_no_metric = True
                log.warning(
                    "%s is undefined on the validation split (%s), so no best.pth is written from this "
                    "evaluation; give the split annotated objects to choose a best checkpoint.",
                    self.best_metric,
                    "it has no annotated objects" if _empty(metrics) else "no value",
                )
            return False
        return best is None or value > best

    def _plots(self, evaluators: dict[str, Any], results: list[dict[str, Any]], step: int, *, ema: bool) -> None:
        """PR curves and the confusion matrix: PNG under <run>/plots/step_<step>/ and in TensorBoard."""
        figures = evaluation_figures(self.data.val.coco, evaluators, results)
        for name, figure in figures.items():
            self.logger.figure(f"val/plots/{name}", figure, step)
        if figures:
            written = save_figures(figures, self.logger.run_dir / "plots" / f"step_{step:07d}")
            log.info("Plots%s: %s", " of the EMA weights" if ema else "", written[0].parent)

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
