"""What the training loop reports while it trains: losses, learning rates, images/s, time left.

The step's losses stay on the device and are summed there; every `trainer.log_every`
steps they are read once (the only host sync logging costs) and averaged over the
ranks (one all_reduce, as torchvision's `reduce_dict`), so a logged loss is the whole
global batch's, not rank 0's.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from frcnn_train import distributed
from frcnn_train.logs import RunLogger, log


class StepLog:
    def __init__(self, logger: RunLogger, *, log_every: int, progress: bool, epochs: int, steps_per_epoch: int) -> None:
        self.logger, self.log_every, self.progress = logger, log_every, progress and distributed.is_main()
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self._sums: dict[str, torch.Tensor] = {}
        self._summed_steps = 0
        self._bar: Any = None
        self._window_start = time.perf_counter()  # images/s and time left: since the last log line
        self._window_images = 0
        self._window_steps = 0
        self._epoch_start = self._window_start

    def start_epoch(self, epoch: int, step_in_epoch: int) -> None:
        """`epoch`: epochs completed before this one (0-based), as the counters hold it."""
        self._epoch_start = self._window_start = time.perf_counter()
        self._window_images = self._window_steps = 0
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.steps_per_epoch,
                initial=step_in_epoch,
                desc=f"epoch {epoch + 1}/{self.epochs}",
                leave=False,
                dynamic_ncols=True,
            )

    def step(
        self,
        losses: dict[str, torch.Tensor],
        *,
        images: int,
        epoch: int,
        global_step: int,
        step_in_epoch: int,
        steps_left: int,
        lrs: dict[str, float],
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """After an optimizer step: `losses` as the model returned them (detached, on the device),
        `images` trained on by all ranks, `extra` further device scalars to average (grad_norm)."""
        for name, value in {**losses, **(extra or {})}.items():
            self._sums[name] = self._sums.get(name, 0) + value
        self._summed_steps += bool(losses)  # a step whose images were all skipped has no losses to average
        self._window_images += images
        self._window_steps += 1
        if self._bar is not None:
            self._bar.update(1)
        if global_step % self.log_every or not self._summed_steps:
            return
        names = list(self._sums)
        means = dict(
            zip(
                names,
                distributed.mean_over_ranks(torch.stack([self._sums[n] for n in names]) / self._summed_steps).tolist(),
            )
        )
        self._sums, self._summed_steps = {}, 0
        total = sum(means[name] for name in losses)
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        images_per_s, steps_per_s = self._window_images / elapsed, self._window_steps / elapsed
        self._window_start, self._window_images, self._window_steps = time.perf_counter(), 0, 0
        scalars = {f"train/{k}": v for k, v in means.items()}
        scalars.update({"train/loss": total, "train/images_per_s": images_per_s})
        scalars.update({f"lr/{name}": lr for name, lr in lrs.items()})
        self.logger.scalars(scalars, global_step)
        lr = next(iter(lrs.values()))
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}", refresh=False)
        else:
            # %.3g: a slow step (one big image, a small CPU) reads 0.0412 img/s, not 0.0.
            log.info(
                "epoch %d step %d/%d  loss %.4f  lr %.3g  %.3g img/s  ETA %s",
                epoch + 1,
                step_in_epoch,
                self.steps_per_epoch,
                total,
                lr,
                images_per_s,
                duration(steps_left / steps_per_s),
            )

    def end_epoch(self, global_step: int) -> None:
        self.close()
        self.logger.scalars({"time/epoch_s": time.perf_counter() - self._epoch_start}, global_step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def duration(seconds: float) -> str:
    """Training time left, as the log shows it: '42s', '7m05s', '2h13m' (evaluation time not included)."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
