"""Where a run reports: console, train.log, metrics.jsonl and TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from frcnn_train.checkpoint import atomic_write

log = logging.getLogger("frcnn_train")


def setup_console(level: int = logging.INFO) -> None:
    """Plain console lines for the `frcnn_train` logger (Hydra's own logging is off)."""
    if not any(getattr(h, "_frcnn_console", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._frcnn_console = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(level)


def trim_metrics(path: Path, step: int, epoch: int) -> int:
    """Drop the lines of metrics.jsonl written after the checkpoint at (step, epoch); returns how many.

    An evaluation writes its line before the save that follows it, so a run killed
    in between and resumed would write that line twice. A line at the checkpoint's
    own step is newer only if its epoch is: a save at an epoch's last step (cadence)
    comes before that epoch's evaluation. A line torn by a kill is dropped too.
    """
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line + "\n" for line in lines if _written_by(line, (step, epoch))]
    if len(kept) < len(lines):
        atomic_write(path, lambda f: f.write("".join(kept).encode("utf-8")))
    return len(lines) - len(kept)


def _written_by(line: str, checkpoint: tuple[int, int]) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    if not isinstance(record, dict) or "step" not in record:
        return True  # not an evaluation line of ours: not ours to drop
    return (record["step"], record.get("epoch", 0)) <= checkpoint


class RunLogger:
    """Writes the run directory's logs. On ranks other than 0 every method does nothing.

    `resumed_at` = (global_step, epoch) of the checkpoint a run continues from
    ((0, 0): a new run restarting in its directory). TensorBoard is reopened with
    `purge_step` after that step and metrics.jsonl loses its later lines, so what a
    killed run wrote after its last checkpoint is discarded and both continue
    without overlap. `earlier`: (level, message) shown on the console before
    train.log was open, written to it now.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        resumed_at: tuple[int, int] | None = None,
        earlier: Sequence[tuple[int, str]] = (),
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self._writer = None
        self._file_handler: logging.Handler | None = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file_handler = logging.FileHandler(run_dir / "train.log", mode="a", encoding="utf-8")
        self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        for level, message in earlier:
            self._file_handler.handle(log.makeRecord(log.name, level, __file__, 0, message, None, None))
        log.addHandler(self._file_handler)
        if resumed_at is not None:
            dropped = trim_metrics(run_dir / "metrics.jsonl", *resumed_at)
            if dropped:
                log.info(
                    "Dropped %d line%s of metrics.jsonl written after step %d, the step this run continues from.",
                    dropped,
                    "s" * (dropped != 1),
                    resumed_at[0],
                )
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(run_dir), purge_step=resumed_at[0] + 1 if resumed_at else None)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def image(self, tag: str, image_uint8: torch.Tensor, step: int) -> None:
        if self._writer is not None:
            self._writer.add_image(tag, image_uint8, step)

    def figure(self, tag: str, figure: Any, step: int) -> None:
        """A matplotlib figure as an image in TensorBoard (left open: the caller saves it too)."""
        if self._writer is not None:
            self._writer.add_figure(tag, figure, step, close=False)

    def metrics_line(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file_handler is not None:
            log.removeHandler(self._file_handler)
            self._file_handler.close()
            self._file_handler = None
