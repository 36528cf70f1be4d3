"""The Trainer: fit(), one readable training step, evaluation, and its own state_dict.

It takes built objects and plain settings; only `launch.py` reads the config.
"""
from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from frcnn_train import checkpoint, distributed
from frcnn_train.checkpointer import Checkpointer, gather_rng, restore_rng
from frcnn_train.data import DataBundle, TrainLoader, batches_per_epoch, build_eval_loader
from frcnn_train.errors import DataError, UserError
from frcnn_train.evaluation import evaluate, format_table
from frcnn_train.logs import RunLogger, log
from frcnn_train.runtime import seed_for
from frcnn_train.visualize import draw_detections


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss); the message says what to change."""


@dataclass
class TrainerSettings:
    epochs: int
    batch_size: int
    seed: int
    num_workers: int
    amp_dtype: torch.dtype | None = None  # None: fp32
    grad_clip: float | None = None
    accumulate: int = 1
    eval_every: int = 1
    checkpoint_every_steps: int = 0
    max_steps: int | None = None
    log_every: int = 20
    vis_images: int = 4
    progress: bool = True
    best_metric: str = "bbox/AP"


def steps_per_epoch(num_images: int, batch_size: int, accumulate: int) -> int:
    """Optimizer steps in one epoch: whole global batches (processes x batch_size x accumulate) only."""
    steps = batches_per_epoch(num_images, batch_size, distributed.world_size(), accumulate) // accumulate
    if steps < 1:
        raise TrainingError(
            f"the training split has {num_images} images, fewer than one optimizer step needs "
            f"(trainer.batch_size={batch_size} x trainer.accumulate={accumulate} "
            f"x {distributed.world_size()} processes); lower them or add images"
        )
    return steps


class Trainer:
    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        data: DataBundle,
        settings: TrainerSettings,
        device: torch.device,
        run_dir: Path,
        logger: RunLogger,
        with_masks: bool,
        checkpointer: Checkpointer,
    ) -> None:
        self.model = model  # possibly DDP-wrapped; `bare` is what gets saved
        self.bare = checkpoint.unwrap_model(model)
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.data, self.s, self.device = data, settings, device
        self.run_dir, self.logger, self.with_masks = run_dir, logger, with_masks
        self.checkpointer = checkpointer
        self.steps_per_epoch = steps_per_epoch(len(data.train), settings.batch_size, settings.accumulate)
        self.train_loader = TrainLoader(  # one for the run: its workers persist across epochs
            data.train, batch_size=settings.batch_size, num_workers=settings.num_workers, seed=settings.seed,
            accumulate=settings.accumulate, rank=distributed.rank(), world_size=distributed.world_size(),
            pin_memory=device.type == "cuda")
        # Counters: epochs completed, optimizer steps done, steps done inside the current epoch.
        self.epoch = 0
        self.global_step = 0
        self.step_in_epoch = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None  # the step best.pth was saved at
        self.history: list[dict[str, Any]] = []
        self.last_metrics: dict[str, float] = {}
        self._stop_reason: str | None = None
        # Loss sums on the device since the last log line (read every trainer.log_every steps).
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._loss_steps = 0
        self._saved_step = 0  # global_step of the newest last.pth (step 0: nothing to lose yet)
        self._signals = distributed.StopRequest()
        self._signalled_anywhere = False  # a stop signal reached some rank by this step's check

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.bare.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "trainer": {
                "epoch": self.epoch, "global_step": self.global_step, "step_in_epoch": self.step_in_epoch,
                "best_metric": self.best_metric, "best_step": self.best_step,
                "best_metric_name": self.s.best_metric,
                "last_metrics": dict(self.last_metrics), "history": list(self.history),
                # What a resume on another number of processes needs to keep the global batch.
                "world_size": distributed.world_size(), "batch_size": self.s.batch_size,
                "accumulate": self.s.accumulate,
            },
            "rng": gather_rng({"seed": self.s.seed, "epoch": self.epoch, "consumed": self._consumed()}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bare.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            if self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])
            else:
                log.warning("The checkpoint carries an fp16 loss scale (%.0f) that has no use without CUDA AMP; "
                            "continuing without loss scaling.", state["scaler"].get("scale", float("nan")))
        counters = state["trainer"]
        self.epoch, self.global_step = counters["epoch"], counters["global_step"]
        self.step_in_epoch = counters["step_in_epoch"]
        self.best_metric = counters["best_metric"]
        self.best_step = counters.get("best_step")  # absent before best.pth repair existed
        self.last_metrics = dict(counters.get("last_metrics", {}))
        self.history = list(counters["history"])
        restore_rng(state["rng"])
        if len(state["rng"].get("ranks", [])) not in (0, distributed.world_size()):
            # Another number of processes: a new stream per rank, the same on every such resume.
            seed = seed_for(self.s.seed, distributed.rank(), self.global_step)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        self._saved_step = self.global_step

    def _consumed(self) -> int:
        """Samples of this epoch's global sequence already trained on (the same for any world size)."""
        return self.step_in_epoch * self.s.batch_size * self.s.accumulate * distributed.world_size()

    def save(self, *, epoch_end: bool = False, best: bool = False) -> Path:
        """last.pth now (on every rank: the state gathers their RNG streams); at an epoch end the epoch file."""
        self._saved_step = self.global_step
        return self.checkpointer.save(self.state_dict(), epoch_end=self.epoch if epoch_end else None, best=best)

    def _save_before_data_error(self) -> None:
        """A bad image stopped training (the DataError names it): save the steps done since the last save,
        so that a resume after fixing the file loses nothing. Single process only: the other ranks of a
        distributed run are not at this point, so they cannot join the save."""
        if self.global_step == self._saved_step or distributed.world_size() > 1:
            return  # nothing new to keep (and every existing file stays as it was)
        if self.step_in_epoch == 0 and self.epoch > 0:
            # The epoch trained to its end and its evaluation failed: saved as "all steps done, epoch not
            # ended", the resume runs that evaluation and the epoch-end saves, as an unbroken run would.
            self.epoch, self.step_in_epoch = self.epoch - 1, self.steps_per_epoch
        path = self.save()
        log.warning("Saved %s at step %d before stopping; once the image is fixed, resume=%s goes on from there.",
                    path, self.global_step, path)

    # ------------------------------------------------------------ training
    def fit(self) -> dict[str, float]:
        """Train until trainer.epochs, trainer.max_steps or a stop signal; returns the last metrics."""
        with self._signals:
            return self._fit()

    def _fit(self) -> dict[str, float]:
        try:
            if self.s.max_steps is not None and self.global_step >= self.s.max_steps:  # a resume already there
                self._stop_reason = f"trainer.max_steps={self.s.max_steps} reached"
                log.warning("Nothing to train: the run is at step %d and trainer.max_steps=%d (kept from the "
                            "checkpoint's config); add trainer.max_steps=null, or a larger value, to go on.",
                            self.global_step, self.s.max_steps)
            while self.epoch < self.s.epochs and self._stop_reason is None:
                if not self._train_epoch():
                    break  # stopped mid-epoch; last.pth already written
                self.epoch += 1
                self.step_in_epoch = 0
                self._end_of_epoch()
                if self.s.max_steps is not None and self.global_step >= self.s.max_steps:
                    self._stop_reason = f"trainer.max_steps={self.s.max_steps} reached"
            self.checkpointer.wait()  # the last save is on disk before fit returns; its failure is raised
        except DataError as err:
            # The traceback's DataLoader frames hold the iterator, whose workers (they ignore SIGTERM)
            # would then outlive the error and hang the exit; the message alone says what to fix.
            err.with_traceback(None)
            self._save_before_data_error()  # written before the `finally` below returns
            raise
        finally:
            try:  # never leave a write behind, not on an error either (a second signal may still cut it)
                self.checkpointer.wait(raise_error=False)
            finally:
                self.train_loader.close()
                self.logger.flush()
        return self.last_metrics

    def _agreed_stop(self, epoch_done: bool) -> bool:
        """Whether every rank stops after this step: asked on every rank at every step, so all agree.

        A stop signal on any rank counts. Under torchrun it travels in _check_finite's
        collective (one per step), so a signal that arrives after that, during the update,
        stops every rank one step later; one process looks at its own flag. max_steps at an
        epoch's last step is left to the epoch end (evaluation and the epoch checkpoint
        happen as in a run never stopped).
        """
        max_hit = self.s.max_steps is not None and self.global_step >= self.s.max_steps and not epoch_done
        alone = distributed.world_size() == 1
        signalled = self._signals.reason is not None if alone else self._signalled_anywhere
        if not (signalled or max_hit):  # the same on every rank: no collective needed here
            return False
        self._stop_reason = (self._signals.reason or (f"trainer.max_steps={self.s.max_steps} reached" if max_hit
                                                      else "another process received a stop signal"))
        return True

    def _seed_micro_batch(self, index: int) -> None:
        """Seed the RNG (RPN / RoI sampling) from the step and the micro-batch's place in the global
        batch, so each micro-batch draws the same numbers whichever rank trains it."""
        chunk = index * distributed.world_size() + distributed.rank()
        torch.manual_seed(seed_for(self.s.seed, self.global_step, chunk))

    def _train_epoch(self) -> bool:
        """One epoch from step_in_epoch on. False when it stopped early (signal / max_steps)."""
        s = self.s
        loader = self.train_loader.at(self.epoch, self._consumed())
        self.model.train()
        progress = self._progress_bar(len(loader) // s.accumulate)
        started, images_seen, micro, first_step = time.perf_counter(), 0, [], self.step_in_epoch
        skipped = 0  # bad images data.bad_images=skip left out (each named in a warning)
        for images, targets in loader:
            skipped += s.batch_size - len(images)
            micro.append((images, targets))
            if len(micro) < s.accumulate:
                continue
            losses = self.train_step(micro)
            self.checkpointer.check()  # a failed background save ends the run here, in one sentence
            images_seen += sum(len(batch[0]) for batch in micro) * distributed.world_size()
            micro = []
            elapsed = time.perf_counter() - started
            self._after_step(losses, images_seen / elapsed, (self.step_in_epoch - first_step) / elapsed, progress)
            epoch_done = self.step_in_epoch == self.steps_per_epoch
            if self._agreed_stop(epoch_done):
                # At an epoch's last step too: the resume then runs an empty rest of the epoch and its end.
                if self._saved_step != self.global_step:  # not already saved by the step cadence
                    self.save()
                return False
            if epoch_done:
                break
        if progress is not None:
            progress.close()
        if skipped:
            log.warning("epoch %d: data.bad_images=skip left out %d bad image(s), named above.",
                        self.epoch + 1, skipped)
        self.logger.scalars({"time/epoch_s": time.perf_counter() - started}, self.global_step)
        return True

    def train_step(self, micro_batches: list[tuple[list, list]]) -> dict[str, torch.Tensor]:
        """One optimizer step over `accumulate` micro-batches: losses, sum, backward, finite check, step.

        The losses stay on the device (detached); the finiteness check is the step's
        one read back to the host, so the host can queue the next step meanwhile.
        """
        totals: dict[str, torch.Tensor] = {}
        for i, (images, targets) in enumerate(micro_batches):
            if not images:  # every image of this batch was bad and skipped (data.bad_images=skip)
                continue
            self._seed_micro_batch(i)
            images = [image.to(self.device, non_blocking=True) for image in images]
            targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients only on the last micro-batch of an accumulation.
            sync = nullcontext() if last or self.model is self.bare else self.model.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.s.amp_dtype or torch.float32,
                                    enabled=self.s.amp_dtype is not None):
                    loss_dict = self.model(images, targets)
                loss = sum(loss_dict.values())
                self.scaler.scale(loss / len(micro_batches)).backward()
            for name, value in loss_dict.items():
                totals[name] = totals.get(name, 0) + value.detach().float() / len(micro_batches)
        # Checked once, after every backward and before the update: a non-finite loss never reaches the weights.
        self._check_finite(totals)
        if totals:  # else every image was skipped (data.bad_images=skip): no gradient, only counters and LR move
            if self.s.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                totals["grad_norm"] = nn.utils.clip_grad_norm_(self.bare.parameters(), self.s.grad_clip).detach()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1
        self.step_in_epoch += 1
        return totals

    def _check_finite(self, losses: dict[str, torch.Tensor]) -> None:
        """The step's one read from the device, and under torchrun its one collective: whether the
        loss is non-finite on any rank (the run ends) and whether a stop signal reached any rank
        (every rank stops after this step, see _agreed_stop)."""
        flags = torch.stack([
            ~torch.isfinite(sum(losses.values())) if losses else torch.zeros((), dtype=torch.bool, device=self.device),
            torch.full((), self._signals.reason is not None, dtype=torch.bool, device=self.device),  # no copy, no sync
        ])
        nonfinite, self._signalled_anywhere = (bool(v) for v in distributed.max_over_ranks(flags).tolist())
        if nonfinite:
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            last = self.run_dir / "last.pth"
            kept = f"the last good checkpoint {last} is untouched" if last.exists() else "no checkpoint was written"
            raise TrainingError(
                f"the loss became non-finite at step {self.global_step + 1} (epoch {self.epoch + 1}: {terms}); "
                f"{kept}; lower optim.lr, lengthen schedule.warmup_steps or set trainer.grad_clip"
            )

    def _after_step(self, losses: dict[str, torch.Tensor], images_per_s: float, steps_per_s: float,
                    progress: Any) -> None:
        """Sum the step's losses on the device; every trainer.log_every steps read them (one sync) and log means."""
        for name, value in losses.items():
            self._loss_sums[name] = self._loss_sums.get(name, 0) + value
        self._loss_steps += bool(losses)  # a step whose images were all skipped has no losses to average
        if progress is not None:
            progress.update(1)
        if self.global_step % self.s.log_every == 0 and self._loss_steps:
            names = list(self._loss_sums)
            values = torch.stack([self._loss_sums[n] for n in names]).div_(self._loss_steps).tolist()
            means = dict(zip(names, values))
            self._loss_sums, self._loss_steps = {}, 0
            lr = self.optimizer.param_groups[0]["lr"]
            total = sum(v for k, v in means.items() if k.startswith("loss"))
            scalars = {f"train/{k}": v for k, v in means.items()}
            scalars["train/loss"] = total
            scalars["train/images_per_s"] = images_per_s
            for group in self.optimizer.param_groups:
                scalars[f"lr/{group.get('name', 'default')}"] = group["lr"]
            self.logger.scalars(scalars, self.global_step)
            if progress is not None:
                progress.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}", refresh=False)
            else:
                log.info("epoch %d step %d/%d  loss %.4f  lr %.3g  %.1f img/s  ETA %s", self.epoch + 1,
                         self.step_in_epoch, self.steps_per_epoch, total, lr, images_per_s,
                         _duration(self._steps_left() / steps_per_s))
        if self.s.checkpoint_every_steps and self.global_step % self.s.checkpoint_every_steps == 0:
            self.save()

    def _steps_left(self) -> int:
        """Optimizer steps until the run ends (trainer.epochs or trainer.max_steps, whichever is first)."""
        last = self.s.epochs * self.steps_per_epoch
        if self.s.max_steps is not None:
            last = min(last, self.s.max_steps)
        return max(last - self.global_step, 0)

    def _progress_bar(self, total: int) -> Any:
        if not (self.s.progress and distributed.is_main()):
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=f"epoch {self.epoch + 1}/{self.s.epochs}", leave=False, dynamic_ncols=True)

    # ------------------------------------------------------------ epoch end
    def _end_of_epoch(self) -> None:
        final = self.epoch == self.s.epochs
        due = final or (self.s.eval_every > 0 and self.epoch % self.s.eval_every == 0)
        is_best = False
        if due:
            metrics = self.evaluate()
            if distributed.is_main():
                value = metrics.get(self.s.best_metric)
                is_best = value is not None and (self.best_metric is None or value > self.best_metric)
                if is_best:
                    self.best_metric, self.best_step = value, self.global_step
        self.save(epoch_end=True, best=is_best)
        distributed.barrier()

    def evaluate(self) -> dict[str, float]:
        """COCO AP on the validation split; logs it and draws a few predictions into TensorBoard."""
        started = time.perf_counter()
        distributed.broadcast_buffers(self.bare)  # rank 0's BatchNorm statistics, which the checkpoint holds
        loader = build_eval_loader(self.data.val, batch_size=self.s.batch_size, num_workers=self.s.num_workers,
                                   rank=distributed.rank(), world_size=distributed.world_size(),
                                   pin_memory=self.device.type == "cuda")
        metrics, _ = evaluate(self.bare, loader, coco_gt=self.data.val.coco,
                              label_to_cat_id=self.data.val.label_to_cat_id, device=self.device,
                              with_masks=self.with_masks, autocast_dtype=self.s.amp_dtype)
        self.last_metrics = metrics
        if not distributed.is_main():
            return metrics
        self.logger.scalars({f"val/{k}": v for k, v in metrics.items()}, self.global_step)
        self.logger.scalars({"time/eval_s": time.perf_counter() - started}, self.global_step)
        self.logger.metrics_line({"epoch": self.epoch, "step": self.global_step, **metrics})
        log.info("epoch %d (step %d) validation:\n%s", self.epoch, self.global_step, format_table(metrics))
        self._draw_samples()
        return metrics

    @torch.no_grad()
    def _draw_samples(self) -> None:
        count = min(self.s.vis_images, len(self.data.val))
        if count == 0:
            return
        images = [sample[0] for sample in (self.data.val[i] for i in range(count)) if sample is not None]
        if not images:  # data.bad_images=skip left every one of them out
            return
        self.bare.eval()
        outputs = self.bare([image.to(self.device) for image in images])
        self.bare.train()
        for i, (image, output) in enumerate(zip(images, outputs)):
            drawn = draw_detections(image, output, self.data.classes, score_threshold=0.5)
            self.logger.image(f"val/predictions/{i}", drawn, self.global_step)

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def completed(self) -> bool:
        return self.epoch >= self.s.epochs


def _duration(seconds: float) -> str:
    """Training time left, as the log shows it: '42s', '7m05s', '2h13m' (evaluation time not included)."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
