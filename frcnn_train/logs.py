"""Where a run reports: console, train.log, metrics.jsonl and TensorBoard (rank 0 only)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("frcnn_train")


def setup_console(level: int = logging.INFO) -> None:
    """Plain console lines for the `frcnn_train` logger (Hydra's own logging is off)."""
    if not any(getattr(h, "_frcnn_console", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._frcnn_console = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(level)


class RunLogger:
    """Writes the run directory's logs. On ranks other than 0 every method does nothing.

    On resume, TensorBoard is reopened with `purge_step` at the checkpoint's step,
    so events a killed run wrote after its last checkpoint are discarded and the
    curves continue on the same step axis without overlap.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self._writer = None
        self._file_handler: logging.Handler | None = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file_handler = logging.FileHandler(run_dir / "train.log", mode="a", encoding="utf-8")
        self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self._file_handler)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def image(self, tag: str, image_uint8: torch.Tensor, step: int) -> None:
        if self._writer is not None:
            self._writer.add_image(tag, image_uint8, step)

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
