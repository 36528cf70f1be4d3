"""The Checkpointer: how a save reaches disk, best/epoch links, keep_last rotation.

In the spirit of fvcore's Checkpointer/PeriodicCheckpointer: the Trainer hands over the
state of every registered part (state.Registry) and says which kind of save this is;
this object adds the run's fixed facts (config, architecture, classes) and owns
everything about files. `checkpoint.py` owns the file format.
"""

from __future__ import annotations

import errno
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from frcnn_train import checkpoint
from frcnn_train.errors import CheckpointError
from frcnn_train.logs import RunLogger, log

EPOCH_FILE_RE = re.compile(r"^epoch_(\d{4,})\.pth$")


# ---------------------------------------------------------------- files
def epoch_files(run_dir: Path) -> dict[int, Path]:
    """This run's per-epoch checkpoints by epoch number (only names `epoch_NNNN.pth`, nothing else)."""
    found = {}
    for path in run_dir.glob("epoch_*.pth"):
        match = EPOCH_FILE_RE.match(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return found


def _step_of(path: Path) -> int | None:
    counters = checkpoint.peek_counters(path) if path.is_file() else None
    return None if counters is None else counters["global_step"]


class CheckpointWriteError(CheckpointError):
    """A save could not reach the disk (full, read-only, permissions); the message says what survived."""


def snapshot_bytes(state: Any) -> int:
    """Bytes of tensor data in a (nested) state: about what its file will take."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(snapshot_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(snapshot_bytes(v) for v in state)
    return 0


@dataclass
class _Job:
    thread: threading.Thread
    slot: int  # the buffer set it reads
    step: int


class Checkpointer:
    """Writes last.pth in background threads, links best.pth / epoch_NNNN.pth to it, keeps `keep_last`.

    A save costs the training thread only a copy of the state into CPU buffers reused
    between saves (pinned when the state lives on CUDA); serialising, fsync and rename
    happen in a writer thread, one file after the other in the order of the saves. With
    two buffer sets a save never waits for the write before it, only when two are still
    in flight (and the log line says so). A failed write is raised on the training thread
    by the next `check()` (every step) or `wait()`, as one sentence; last.pth is then the
    previous, intact file.

    Only the process with `enabled` (global rank 0) touches files; every rank still
    calls `save`, because building the state gathers all ranks' RNG streams.
    """

    def __init__(
        self, run_dir: Path, *, extras: dict[str, Any], keep_last: int, logger: RunLogger, enabled: bool = True
    ) -> None:
        self.run_dir = run_dir
        self.extras = extras  # config, architecture, classes: fixed for the run
        self.keep_last = keep_last
        self.logger = logger
        self.enabled = enabled
        self._jobs: list[_Job] = []  # writes in flight, oldest first
        self._error: BaseException | None = None
        # Two sets of CPU copies of the state's tensors, by position: a save copies into the set no write
        # in flight is reading, so it waits only when two writes are still in flight.
        self._buffers: list[dict[tuple, torch.Tensor]] = [{}, {}]
        if enabled and run_dir.is_dir():  # temporaries of this run's killed processes
            for tmp in checkpoint.remove_stale_temporaries(run_dir):
                log.info("Removed %s, left by a process killed while writing it.", tmp)

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pth"

    # ------------------------------------------------------------ resuming
    def repair_links(self, source: Path, counters: dict[str, Any]) -> None:
        """Make best.pth and the epoch file agree with what `source` (the resumed last.pth) records.

        A kill after last.pth was renamed into place but before best.pth / epoch_NNNN.pth
        were linked to it leaves them stale or missing; the record says which they should be.
        """
        if not self.enabled or source.name != "last.pth":  # an older file: its future is not its to judge
            return
        step = counters["global_step"]
        best_step = counters.get("best_step")
        best = self.run_dir / "best.pth"
        if best_step is not None and _step_of(best) != best_step:
            origin = (
                source
                if best_step == step
                else next((p for p in epoch_files(self.run_dir).values() if _step_of(p) == best_step), None)
            )
            if origin is not None:
                checkpoint.link_checkpoint(origin, best)
                log.warning(
                    "best.pth did not hold the best recorded in %s (step %d, %s %.4f); linked it to %s.",
                    source,
                    best_step,
                    counters.get("best_metric_name", "metric"),
                    counters["best_metric"],
                    origin.name,
                )
            else:
                log.warning(
                    "best.pth does not hold the best recorded in %s (step %d) and no checkpoint of that "
                    "step is left; best.pth stays as it is until a better evaluation replaces it.",
                    source,
                    best_step,
                )
        epoch = counters["epoch"]
        if counters["step_in_epoch"] == 0 and epoch > 0 and self.keep_last > 0:
            path = self.run_dir / f"epoch_{epoch:04d}.pth"
            if _step_of(path) != step:
                checkpoint.link_checkpoint(source, path)
                log.warning("%s was missing or stale; linked it to %s (step %d).", path.name, source.name, step)
                self._rotate(epoch)

    # ------------------------------------------------------------ saving
    def save(self, state: dict[str, Any], *, epoch_end: int | None = None, best: bool = False) -> Path:
        """Write `state` as last.pth; at an epoch end (its number) also epoch_NNNN.pth; `best`: best.pth.

        Returns once the state is copied; the file is complete after `wait()`.
        """
        if not self.enabled:
            return self.last_path
        started = time.perf_counter()
        self._jobs = [job for job in self._jobs if job.thread.is_alive()]
        waited = None
        if len(self._jobs) == len(self._buffers):
            # Every buffer set is still being written: saves come faster than the disk takes them.
            oldest = self._jobs.pop(0)
            oldest.thread.join()
            waited = (time.perf_counter() - started, oldest.step)
        slot = next(i for i in range(len(self._buffers)) if i not in {job.slot for job in self._jobs})
        copied, synced = self._snapshot(state, self._buffers[slot])
        blocking_s = time.perf_counter() - started
        step = state["trainer"]["global_step"]
        self.logger.scalars({"checkpoint/blocking_ms": blocking_s * 1000}, step)
        job = dict(
            ckpt=checkpoint.make_checkpoint(**self.extras, **copied),
            step=step,
            epoch_end=epoch_end,
            best=best,
            synced=synced,
            blocking_s=blocking_s,
            waited=waited,
            after=self._jobs[-1].thread if self._jobs else None,
        )
        thread = threading.Thread(target=self._write, kwargs=job, name="checkpoint-writer")
        self._jobs.append(_Job(thread, slot, step))
        thread.start()  # not a daemon: the interpreter waits for it even on an unexpected exit
        return self.last_path

    def check(self) -> None:
        """Raise the error of a finished background write, if one failed (cheap: call every step)."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self, *, raise_error: bool = True) -> None:
        """Block until every write in flight is on disk, then raise a failure (or only log it)."""
        for job in self._jobs:
            job.thread.join()
        self._jobs = []
        if raise_error:
            self.check()
        elif self._error is not None:  # another exception is on its way out; do not hide this one
            log.error("%s", self._error)
            self._error = None

    @property
    def busy(self) -> bool:
        return any(job.thread.is_alive() for job in self._jobs)

    def _snapshot(
        self, state: dict[str, Any], buffers: dict[tuple, torch.Tensor]
    ) -> tuple[dict[str, Any], torch.cuda.Event | None]:
        """A deep copy on the CPU, taken before the next optimizer step changes anything in place.

        Each tensor is copied into a CPU buffer kept for later saves (pinned for CUDA
        tensors): saves after the first neither allocate nor page-fault. CUDA copies are
        asynchronous, queued on the stream before the next step's kernels; the returned
        event says when they landed.
        """
        on_cuda = False

        def copy(value: Any, key: tuple) -> Any:
            nonlocal on_cuda
            if isinstance(value, torch.Tensor):
                cuda = value.device.type == "cuda"
                buffer = buffers.get(key)
                if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                    buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=cuda)
                    buffers[key] = buffer
                buffer.copy_(value.detach(), non_blocking=cuda)
                on_cuda = on_cuda or cuda
                return buffer
            if isinstance(value, dict):
                return {k: copy(v, (*key, k)) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(copy(v, (*key, i)) for i, v in enumerate(value))
            return value  # str, int, float, bool, None: immutable (containers, shared with live objects, are rebuilt)

        copied = copy(state, ())
        event = None
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
        return copied, event

    def _write(
        self,
        *,
        ckpt: dict[str, Any],
        step: int,
        epoch_end: int | None,
        best: bool,
        synced: torch.cuda.Event | None,
        blocking_s: float,
        waited: tuple[float, int] | None,
        after: threading.Thread | None,
    ) -> None:
        """A writer thread: after the write before it, last.pth, then the links, then rotation.
        Errors are kept for `check()`."""
        if after is not None:
            after.join()  # files are written in the order of the saves
        started = time.perf_counter()
        target = self.last_path
        try:
            if synced is not None:
                synced.synchronize()
            checkpoint.save_checkpoint(ckpt, target)
            written = ["last.pth"]
            if best:
                target = self.run_dir / "best.pth"
                checkpoint.link_checkpoint(self.last_path, target)
                written.append(target.name)
            if epoch_end is not None and self.keep_last > 0:
                target = self.run_dir / f"epoch_{epoch_end:04d}.pth"
                checkpoint.link_checkpoint(self.last_path, target)
                written.append(target.name)
                self._rotate(epoch_end)
        except OSError as err:
            self._error = self._error or self._write_error(err, target, snapshot_bytes(ckpt))
            return
        except BaseException as err:  # noqa: BLE001 - a bug; raised as it is on the training thread
            self._error = self._error or err
            return
        write_s = time.perf_counter() - started
        self.logger.scalars({"checkpoint/write_s": write_s}, step)
        waiting = (
            f" (of which {waited[0] * 1000:.0f} ms waiting for the write of step {waited[1]}: saves come "
            "faster than the disk writes them)"
            if waited
            else ""
        )
        log.info(
            "Saved %s at step %d: blocked training %.0f ms%s, written in %.2f s.",
            " + ".join(written),
            step,
            blocking_s * 1000,
            waiting,
            write_s,
        )

    def _write_error(self, err: OSError, target: Path, nbytes: int) -> CheckpointWriteError:
        """One sentence: what failed, what is on disk (read back, not assumed), how to go on."""
        counters = checkpoint.peek_counters(self.last_path)
        which = "the previous last.pth" if target == self.last_path else "last.pth"
        kept = (
            f"{which} (step {counters['global_step']}) is intact"
            if counters is not None
            else "no loadable last.pth was written before"
        )
        # resume=DIR needs DIR/last.pth; without one, resume=auto starts the run again in its directory.
        go_on = (
            f"resume with resume={self.run_dir}"
            if counters is not None
            else "run the same command again with resume=auto, which starts the run afresh there as nothing was saved"
        )
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return CheckpointWriteError(
                f"no space left on device while writing {target} (about {max(1, round(nbytes / 2**20))} MB needed); "
                f"{kept}; free space and {go_on}"
            )
        reason = {
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
        }.get(err.errno, err.strerror or str(err))
        return CheckpointWriteError(
            f"cannot write {target}: {reason}; {kept}; make {self.run_dir} writable and {go_on}"
        )

    def _rotate(self, epoch: int) -> None:
        """Delete epoch files older than the newest `keep_last` up to `epoch`, by number.

        Files numbered above `epoch` (left by a run resumed from an older epoch) are not
        this timeline's past; they are overwritten when training reaches them.
        """
        for number, path in epoch_files(self.run_dir).items():
            if number <= epoch - self.keep_last:
                path.unlink(missing_ok=True)
