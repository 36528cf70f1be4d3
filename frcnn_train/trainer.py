"""The Trainer: fit() and one readable training step.

It takes built objects and typed settings (`config.TrainerConfig`); only launch.py
reads the config. What it reports lives in progress.py, validation in validation.py,
files in checkpointer.py, and what a checkpoint holds in state.py.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from frcnn_train import distributed
from frcnn_train.checkpoint import unwrap_model
from frcnn_train.checkpointer import Checkpointer
from frcnn_train.config import TrainerConfig
from frcnn_train.data import DataBundle, TrainLoader, batches_per_epoch
from frcnn_train.ema import ModelEma
from frcnn_train.errors import DataError, UserError
from frcnn_train.evaluation import EMA_PREFIX
from frcnn_train.logs import log
from frcnn_train.progress import StepLog
from frcnn_train.runtime import seed_for
from frcnn_train.state import Registry
from frcnn_train.validation import Validator


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss); the message says what to change."""


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
        ema: ModelEma | None,
        data: DataBundle,
        settings: TrainerConfig,
        seed: int,
        num_workers: int,
        amp_dtype: torch.dtype | None,
        device: torch.device,
        registry: Registry,
        checkpointer: Checkpointer,
        validator: Validator,
        step_log: StepLog,
    ) -> None:
        self.model = model  # possibly DDP-wrapped; `bare` is what gets saved
        self.bare = unwrap_model(model)
        self.optimizer, self.scheduler, self.scaler, self.ema = optimizer, scheduler, scaler, ema
        self.data, self.s, self.seed = data, settings, seed
        self.amp_dtype, self.device = amp_dtype, device
        self.registry, self.counters = registry, registry.parts["trainer"]  # what a save holds; the counters in it
        self.checkpointer, self.validator, self.step_log = checkpointer, validator, step_log
        self.steps_per_epoch = steps_per_epoch(len(data.train), settings.batch_size, settings.accumulate)
        self.train_loader = TrainLoader(  # one for the run: its workers persist across epochs
            data.train,
            batch_size=settings.batch_size,
            num_workers=num_workers,
            seed=seed,
            accumulate=settings.accumulate,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
            pin_memory=device.type == "cuda",
            groups=data.train_groups,
        )
        self.stop_reason: str | None = None
        self._saved_step = 0  # the step of the newest last.pth (fit starts at the resumed one's)
        self._signals = distributed.StopRequest()
        self._signalled_anywhere = False  # a stop signal reached some rank by this step's check
        self._grad_norm: torch.Tensor | None = None  # the last step's, with trainer.grad_clip

    def save(self, *, epoch_end: bool = False, best: bool = False) -> None:
        """last.pth now (on every rank: the state gathers their RNG streams); at an epoch end the epoch file."""
        self._saved_step = self.counters.global_step
        self.checkpointer.save(
            self.registry.state_dict(), epoch_end=self.counters.epoch if epoch_end else None, best=best
        )

    def completed(self) -> bool:
        return self.counters.epoch >= self.s.epochs

    # ------------------------------------------------------------ the loop
    def fit(self) -> dict[str, float]:
        """Train until trainer.epochs, trainer.max_steps or a stop signal; returns the last metrics."""
        self._saved_step = self.counters.global_step
        with self._signals:
            try:
                self._fit()
                self.checkpointer.wait()  # the last save is on disk before fit returns; its failure is raised
            except DataError as err:
                # The traceback's DataLoader frames hold the iterator, whose workers (they ignore SIGTERM)
                # would then outlive the error and hang the exit; the message alone says what to fix.
                err.with_traceback(None)
                self._save_before_data_error()
                raise
            finally:
                try:  # never leave a write behind, not on an error either (a second signal may still cut it)
                    self.checkpointer.wait(raise_error=False)
                finally:
                    self.train_loader.close()
                    self.validator.close()
                    self.step_log.close()
        return self.counters.last_metrics

    def _fit(self) -> None:
        c = self.counters
        if self._max_steps_reached():  # a resume already there
            log.warning(
                "Nothing to train: the run is at step %d and trainer.max_steps=%d (kept from the "
                "checkpoint's config); add trainer.max_steps=null, or a larger value, to go on.",
                c.global_step,
                self.s.max_steps,
            )
            return
        while c.epoch < self.s.epochs:
            if not self._train_epoch():
                return  # stopped mid-epoch; last.pth already written
            if self._stop_requested():  # came after the last step's check: the evaluation runs after the resume
                if self._saved_step != c.global_step:
                    self.save()
                return
            c.epoch += 1
            c.step_in_epoch = 0
            self._end_of_epoch()
            if self._max_steps_reached():
                return
            if c.epoch < self.s.epochs and self._stop_requested():  # came during the evaluation or the save
                return  # the epoch end saved this step: the run ends with it, not after the next

    def _max_steps_reached(self) -> bool:
        if self.s.max_steps is None or self.counters.global_step < self.s.max_steps:
            return False
        self.stop_reason = f"trainer.max_steps={self.s.max_steps} reached"
        return True

    def _train_epoch(self) -> bool:
        """One epoch from step_in_epoch on. False when it stopped early (signal / max_steps)."""
        c, s, world = self.counters, self.s, distributed.world_size()
        loader = self.train_loader.at(c.epoch, c.consumed())
        self.model.train()
        self.step_log.start_epoch(c.epoch, c.step_in_epoch)
        micro: list[tuple[list, list]] = []
        skipped = 0  # bad images data.bad_images=skip left out (each named in a warning)
        for images, targets in loader:
            skipped += s.batch_size - len(images)
            micro.append((images, targets))
            if len(micro) < s.accumulate:
                continue
            losses = self.train_step(micro)
            self.checkpointer.check()  # a failed background save ends the run here, in one sentence
            epoch_done = c.step_in_epoch == self.steps_per_epoch
            self.step_log.step(
                losses,
                images=sum(len(batch[0]) for batch in micro) * world,
                epoch=c.epoch,
                global_step=c.global_step,
                step_in_epoch=c.step_in_epoch,
                steps_left=self._steps_left(),
                lrs={g.get("name", "default"): g["lr"] for g in self.optimizer.param_groups},
                extra={"grad_norm": self._grad_norm} if self._grad_norm is not None else None,
            )
            micro = []
            # One save per step: the epoch end saves after its evaluation, so the cadence leaves that step to it.
            cadence = s.checkpoint_every_steps and c.global_step % s.checkpoint_every_steps == 0
            if cadence and not epoch_done:
                self.save()
            if self._agreed_stop(epoch_done):
                # At an epoch's last step too: the resume then runs an empty rest of the epoch and its end.
                if self._saved_step != c.global_step:
                    self.save()
                return False
            if epoch_done:
                break
        self.step_log.end_epoch(c.global_step)
        if skipped:
            log.warning("epoch %d: data.bad_images=skip left out %d bad image(s), named above.", c.epoch + 1, skipped)
        return True

    def train_step(self, micro_batches: list[tuple[list, list]]) -> dict[str, torch.Tensor]:
        """One optimizer step over `accumulate` micro-batches: losses, sum, backward, finite check, step.

        Returns the model's losses, averaged over the micro-batches, detached and on the device;
        the finiteness check is the step's one read back to the host, so the host can queue the
        next step meanwhile.
        """
        losses: dict[str, torch.Tensor] = {}
        self._grad_norm = None
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
                with torch.autocast(
                    self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
                ):
                    loss_dict = self.model(images, targets)
                loss = sum(loss_dict.values())
                self.scaler.scale(loss / len(micro_batches)).backward()
            for name, value in loss_dict.items():
                losses[name] = losses.get(name, 0) + value.detach().float() / len(micro_batches)
        # Checked once, after every backward and before the update: a non-finite loss never reaches the weights.
        self._check_finite(losses)
        if losses:  # else every image was skipped (data.bad_images=skip): no gradient, only counters and LR move
            if self.s.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                self._grad_norm = nn.utils.clip_grad_norm_(self.bare.parameters(), self.s.grad_clip).detach()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.counters.global_step += 1
        self.counters.step_in_epoch += 1
        if self.ema is not None:
            self.ema.update(self.bare, self.counters.global_step)
        return losses

    def _seed_micro_batch(self, index: int) -> None:
        """Seed the RNG (RPN / RoI sampling) from the step and the micro-batch's place in the global
        batch, so each micro-batch draws the same numbers whichever rank trains it."""
        chunk = index * distributed.world_size() + distributed.rank()
        torch.manual_seed(seed_for(self.seed, self.counters.global_step, chunk))

    def _check_finite(self, losses: dict[str, torch.Tensor]) -> None:
        """The step's one read from the device, and under torchrun its one collective: whether the
        loss is non-finite on any rank (the run ends) and whether a stop signal reached any rank
        (every rank stops after this step, see _agreed_stop)."""
        flags = torch.stack(
            [
                ~torch.isfinite(sum(losses.values()))
                if losses
                else torch.zeros((), dtype=torch.bool, device=self.device),
                torch.full(
                    (), self._signals.reason is not None, dtype=torch.bool, device=self.device
                ),  # no copy, no sync
            ]
        )
        nonfinite, self._signalled_anywhere = (bool(v) for v in distributed.max_over_ranks(flags).tolist())
        if nonfinite:
            c = self.counters
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            last = self.checkpointer.last_path
            kept = f"the last good checkpoint {last} is untouched" if last.exists() else "no checkpoint was written"
            raise TrainingError(
                f"the loss became non-finite at step {c.global_step + 1} (epoch {c.epoch + 1}: {terms}); "
                f"{kept}; lower optim.lr, lengthen schedule.warmup_steps or set trainer.grad_clip"
            )

    def _agreed_stop(self, epoch_done: bool) -> bool:
        """Whether every rank stops after this step: asked on every rank at every step, so all agree.

        A stop signal on any rank counts. Under torchrun it travels in _check_finite's
        collective (one per step), so a signal that arrives after that, during the update,
        stops every rank one step later; one process looks at its own flag. max_steps at an
        epoch's last step is left to the epoch end (evaluation and the epoch checkpoint
        happen as in a run never stopped).
        """
        max_hit = not epoch_done and self.s.max_steps is not None and self.counters.global_step >= self.s.max_steps
        alone = distributed.world_size() == 1
        signalled = self._signals.reason is not None if alone else self._signalled_anywhere
        if not (signalled or max_hit):  # the same on every rank: no collective needed here
            return False
        self.stop_reason = self._signals.reason or (
            f"trainer.max_steps={self.s.max_steps} reached" if max_hit else "another process received a stop signal"
        )
        return True

    def _stop_requested(self) -> bool:
        """Whether a stop signal reached any rank since the last step's check; at an epoch's end, where no
        step's collective carries it (one collective, so every rank answers the same)."""
        if not distributed.any_rank(self._signals.reason is not None, self.device):
            return False
        self.stop_reason = self._signals.reason or "another process received a stop signal"
        return True

    def _steps_left(self) -> int:
        """Optimizer steps until the run ends (trainer.epochs or trainer.max_steps, whichever is first)."""
        last = self.s.epochs * self.steps_per_epoch
        if self.s.max_steps is not None:
            last = min(last, self.s.max_steps)
        return max(last - self.counters.global_step, 0)

    # ------------------------------------------------------------ epoch end
    def _end_of_epoch(self) -> None:
        c = self.counters
        due = c.epoch == self.s.epochs or (self.s.eval_every > 0 and c.epoch % self.s.eval_every == 0)
        best = False
        if due:
            models = {"": self.bare} if self.ema is None else {"": self.bare, EMA_PREFIX: self.ema.module}
            metrics = self.validator.run(models, epoch=c.epoch, step=c.global_step)
            c.last_metrics, c.metrics_epoch, c.metrics_step = metrics, c.epoch, c.global_step
            if distributed.is_main() and self.validator.improves(metrics, c.best_metric):
                best = True
                c.best_metric, c.best_step = metrics[self.s.best_metric], c.global_step
        self.save(epoch_end=True, best=best)
        distributed.barrier()

    def _save_before_data_error(self) -> None:
        """A bad image stopped training (the DataError names it): save the steps done since the last save,
        so that a resume after fixing the file loses nothing. Single process only: the other ranks of a
        distributed run are not at this point, so they cannot join the save."""
        c = self.counters
        if c.global_step == self._saved_step or distributed.world_size() > 1:
            return  # nothing new to keep (and every existing file stays as it was)
        if c.step_in_epoch == 0 and c.epoch > 0:
            # The epoch trained to its end and its evaluation failed: saved as "all steps done, epoch not
            # ended", the resume runs that evaluation and the epoch-end saves, as an unbroken run would.
            c.epoch, c.step_in_epoch = c.epoch - 1, self.steps_per_epoch
        self.save()
        self.checkpointer.wait(raise_error=False)
        path = self.checkpointer.last_path
        log.warning(
            "Saved %s at step %d before stopping; once the image is fixed, resume=%s goes on from there.",
            path,
            c.global_step,
            path,
        )
