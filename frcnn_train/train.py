"""`frcnn-train [overrides]` (or `python -m frcnn_train.train`): compose the config with Hydra, then run it.

`-m` (Hydra multirun) runs one job per combination; each job is a run of its own
(output_dir/run_name, the default run_name ending in _<job number>), a job that
fails with a user error is reported and the next one starts, and each job returns
its best validation metric for sweepers to optimise. Exit codes: docs/exit-codes.md.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import types
from collections.abc import Sequence
from pathlib import Path

STARTUP_INTERRUPTED = "interrupted during start-up: nothing was trained"
CTRL_C_EXIT = 130  # runtime.interrupt_exit_code(), known before torch is imported
USER_ERROR_EXIT = 2  # runtime.EXIT_USER_ERROR, for Hydra's errors, which come before torch is imported

# Python's own Ctrl-C handler, which also remembers that it fired: C code can swallow the
# KeyboardInterrupt it raises and raise something else instead (NumPy's __array__ fallback turns
# it into a TypeError), and that must still read as a Ctrl-C, not as a crash.
_ctrl_c_seen = False


def _on_ctrl_c(signum: int, frame: object) -> None:
    global _ctrl_c_seen
    _ctrl_c_seen = True
    raise KeyboardInterrupt


# Only as the command (python -m, torchrun -m, the frcnn-train script): imported as a library (the Python API,
# frcnn_train.train), the process's own SIGINT handler stays as it was. Not where the shell ignores it (nohup, &).
def _catch_ctrl_c() -> None:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_ctrl_c)


if __name__ == "__main__" or Path(sys.argv[0]).name.startswith("frcnn-train"):
    _catch_ctrl_c()

try:  # a Ctrl-C while Python loads Hydra is start-up too: one line, not an import traceback
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from frcnn_train.config import CONFIG_DIR, register_schema
    from frcnn_train.errors import UserError
except KeyboardInterrupt:
    print(STARTUP_INTERRUPTED, file=sys.stderr)
    raise SystemExit(CTRL_C_EXIT) from None

register_schema()

# Exit codes of the jobs this process ran (a multirun runs several); the worst one is the process's.
_codes: list[int] = []
# What each job returned to the sweeper (None: failed or never evaluated), and where the sweep keeps its record.
_returned: list[float | None] = []
_sweep: dict[str, str] = {}


class Interrupted(BaseException):
    """Ends the process (and a sweep) after a Ctrl-C or a stop signal; Hydra lets BaseExceptions through."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _raised_in(err: BaseException, function: object) -> bool:
    """Whether `function` is among the frames `err` came through."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is function.__code__:  # type: ignore[attr-defined]
            return True
        tb = tb.tb_next
    return False


def _during_training(err: BaseException) -> bool:
    """Whether a KeyboardInterrupt came out of the training loop (a repeated Ctrl-C), not start-up."""
    from frcnn_train.trainer import Trainer

    return _raised_in(err, Trainer.fit)


def _record_job(status: str, run_dir: str | None, best: float | None) -> None:
    """One line per job in the sweep directory: which run directory holds which result.

    A job without a metric (failed, or never evaluated) writes `"best_metric": null`: JSON has no nan.
    """
    hydra_cfg = HydraConfig.get()
    record = {
        "job": hydra_cfg.job.num,
        "overrides": list(hydra_cfg.overrides.task),
        "status": status,
        "run_dir": run_dir,
        "best_metric": best,
    }
    sweep_dir = Path(hydra_cfg.sweep.dir)
    _sweep["dir"] = str(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / "jobs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON: never a bare NaN


def _job(cfg: DictConfig) -> float | None:
    """Train one job; returns its best validation metric (trainer.best_metric), or None when the job
    failed or never evaluated it: Optuna's sweeper records a trial whose value is not a number as
    failed and goes on (nan would end the whole study with a traceback)."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job = f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)}): " if multirun else ""
    try:
        # Imported here, inside the try: a Ctrl-C while torch loads is start-up too.
        from frcnn_train.composition import resolved_overrides
        from frcnn_train.launch import run
        from frcnn_train.runtime import EXIT_OK, exit_code_for

        overrides = resolved_overrides(cfg, hydra_cfg.overrides.task)
        _sweep["metric"] = cfg.trainer.best_metric
        summary = run(cfg, overrides=overrides, interrupted=lambda: _ctrl_c_seen)
    except UserError as err:
        from frcnn_train.runtime import EXIT_USER_ERROR

        print(f"error: {job}{err}", file=sys.stderr)
        _codes.append(EXIT_USER_ERROR)
        _returned.append(None)
        if multirun:
            _record_job("user error", None, None)
        return None  # a failed trial for sweepers; the next job still runs
    except KeyboardInterrupt as err:
        from frcnn_train.runtime import interrupt_exit_code

        if _during_training(err):
            print(
                f"{job}interrupted again: stopped at once without saving; the run directory keeps its last "
                "checkpoint, resume from it",
                file=sys.stderr,
            )
        else:
            print(f"{job}{STARTUP_INTERRUPTED}", file=sys.stderr)
        raise Interrupted(interrupt_exit_code()) from None
    except Exception:
        if not _ctrl_c_seen:
            raise
        print(f"{job}{STARTUP_INTERRUPTED}", file=sys.stderr)  # a Ctrl-C that C code turned into another error
        raise Interrupted(CTRL_C_EXIT) from None
    best = summary.get("best_metric")
    best = float(best) if best is not None and math.isfinite(best) else None
    code = exit_code_for(summary)
    _codes.append(code)
    _returned.append(best)
    if multirun:
        _record_job("finished" if code == EXIT_OK else f"stopped ({summary['stop_reason']})", summary["run_dir"], best)
        if code != EXIT_OK:  # a stop signal ends the sweep, not just this job
            print(f"sweep stopped at job {hydra_cfg.job.num}: {summary['stop_reason']}", file=sys.stderr)
            raise Interrupted(code)
        if best is None:
            print(
                f"{job}no {_sweep['metric']}: the run never evaluated it (a failed trial for a sweeper)",
                file=sys.stderr,
            )
    return best


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")(_job)


def _user_error_exit(err: Exception) -> int | None:
    """The exit code after printing one line, for an error Hydra raised that is the user's; None: not one."""
    from frcnn_train.composition import composition_error

    if _raised_in(err, _job):  # the job's own errors: UserErrors are handled there, anything else is a bug
        return None
    if (user := composition_error(err)) is not None:
        print(f"error: {user}", file=sys.stderr)
        return USER_ERROR_EXIT
    if _returned and all(best is None for best in _returned):  # a sweeper with nothing to choose from
        print(
            f"error: no job of the sweep returned {_sweep.get('metric', 'trainer.best_metric')} (each failed "
            f"or never evaluated; see {Path(_sweep.get('dir', 'the sweep directory')) / 'jobs.jsonl'}), so the "
            f"sweeper has no result ({type(err).__name__}: {str(err).strip()}); fix the failing jobs or let "
            "them evaluate (trainer.eval_every, trainer.max_steps)",
            file=sys.stderr,
        )
        return max(USER_ERROR_EXIT, *_codes)
    return None


def cli() -> None:
    """The `frcnn-train` command: Hydra's main, then the exit code of the worst job."""
    _catch_ctrl_c()
    _codes.clear()
    _returned.clear()
    _sweep.clear()
    # Hydra prints its own errors in several lines and exits 1 unless HYDRA_FULL_ERROR=1, which lets
    # them reach us; a user who set it gets Hydra's full traceback as asked.
    users_choice = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Interrupted as stop:
        sys.exit(stop.code)
    except KeyboardInterrupt:  # while Hydra composed the config, before any job started
        print(STARTUP_INTERRUPTED, file=sys.stderr)
        sys.exit(CTRL_C_EXIT)
    except Exception as err:
        if users_choice == "1" or (code := _user_error_exit(err)) is None:
            raise
        sys.exit(code)
    finally:
        if users_choice is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = users_choice
    sys.exit(max(_codes, default=0))


class _CallableModule(types.ModuleType):
    """`frcnn_train.train` is this module once anything imports it (Python sets a package's attribute to
    its submodule), so the module itself is the API's train(): frcnn_train.train([...]) works either way."""

    def __call__(self, overrides: Sequence[str] = ()) -> tuple[Path, dict[str, float]]:
        from frcnn_train.api import train

        return train(overrides)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    cli()
