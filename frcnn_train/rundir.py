"""The run directory: which one, whether this run may write it, and that no other process does.

A new run never writes into another run's directory: it is refused unless
`overwrite=true`, which moves the old run aside (never deletes it). A lock file
in the directory keeps two processes from writing one run at once. Every
refusal comes before any data or model work, with nothing on disk changed.
Under torchrun only global rank 0 writes files, so only it checks and locks.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from frcnn_train import checkpoint, outputs
from frcnn_train.errors import ConfigError, RunDirError
from frcnn_train.logs import log
from frcnn_train.outputs import unwritable as _unwritable

LOCK_NAME = ".lock"
# Appended to in place (train.log, metrics.jsonl), so each must itself be writable; config.yaml is replaced
# by a rename but checked too (a read-only one says the run directory is not to be written).
_WRITTEN_IN_PLACE = ("config.yaml", "train.log", "metrics.jsonl")
# (level, message) already shown on the console, for train.log once it is open.
Notes = list[tuple[int, str]]


@dataclass
class Target:
    """Where a run writes, and the checkpoint it resumes (None: a new run)."""

    run_dir: Path
    resume_from: Path | None = None
    # resume=auto found no checkpoint: a new run that may restart in a directory holding no .pth file.
    restart: bool = False


def check_run_name(run_name: Any) -> None:
    name = str(run_name)
    if name in ("", ".", "..") or "/" in name or "\0" in name or (os.altsep and os.altsep in name):
        raise ConfigError(
            f"run_name={name!r} must be a single directory name (not empty, no '/', not '.' or '..') "
            "because the run directory is output_dir/run_name; set output_dir= for the parent directory "
            "and run_name= to a plain name such as run1"
        )


def resolve(cfg: DictConfig) -> Target:
    """The run directory and the checkpoint to resume, from run_name, output_dir, resume and overwrite."""
    check_run_name(cfg.run_name)
    if cfg.overwrite and cfg.resume:
        raise ConfigError(
            f"overwrite=true starts a new run but resume={cfg.resume} continues one; "
            "drop overwrite=true to resume, or drop resume= to start over"
        )
    run_dir = Path(cfg.output_dir) / cfg.run_name
    if not cfg.resume:
        return Target(run_dir)
    found, skipped = checkpoint.resolve_resume(cfg.resume, run_dir)
    for note in skipped:
        log.warning(note)
    if found is None:
        return Target(run_dir, restart=True)
    return Target(found.parent, found)


def writes_files() -> bool:
    """Global rank 0 (or a single process). Read from torchrun's RANK: the process group may not exist yet."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def claim(target: Target, *, overwrite: bool) -> Iterator[Notes]:
    """Check that this run may write its directory and lock it for this process until the block ends.

    Yields notes (already on the console) for train.log. Directories created here
    are removed again if the run leaves them empty (a run refused later, e.g. for
    its data, leaves no trace).
    """
    if not writes_files():
        yield []
        return
    run_dir, notes = target.run_dir, []
    new = target.resume_from is None
    _check_writable(run_dir, new=new, overwrite=overwrite)
    if not new:  # another run's checkpoint copied in here would replace that run's files
        outputs.check_resume_target(target.resume_from, run_dir)
    held = _run_files(run_dir, allow_config=target.restart) if new else []
    if held and not overwrite:
        raise RunDirError(_existing_run_message(run_dir, held, restart=target.restart))
    if target.restart:
        log.info("resume=auto: no checkpoint in %s; starting a new run.", run_dir)
    created = _make_dirs(run_dir, new=new)
    lock = _acquire(run_dir, notes, new=new)
    try:
        if held:
            lock = _move_aside(run_dir, lock, notes)
            created.append(run_dir)
        yield notes
    finally:
        _release(run_dir / LOCK_NAME, lock)
        for directory in reversed(created):
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                directory.rmdir()


def going_back(resume_from: Path, ckpt: dict[str, Any]) -> Notes:
    """A notice when resuming from an older file than last.pth, whose next save then replaces last.pth."""
    last = resume_from.parent / "last.pth"
    if resume_from.name == "last.pth" or not last.is_file() or not writes_files():
        return []
    try:  # mmap: only the counters are read, not gigabytes of tensors
        newer = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["trainer"]["global_step"]
    except Exception:  # noqa: BLE001 - a damaged or foreign last.pth: nothing newer to lose
        return []
    step = ckpt["trainer"]["global_step"]
    if newer <= step:
        return []
    message = (
        f"Resuming from {resume_from.name} goes back from step {newer} (last.pth) to step {step}: steps "
        f"{step + 1}-{newer} are trained again and the next save replaces {last}; copy it now to keep it."
    )
    log.warning(message)
    return [(logging.WARNING, message)]


# ---------------------------------------------------------------- checks
def _run_files(run_dir: Path, *, allow_config: bool) -> list[str]:
    """What makes `run_dir` another run's directory: its checkpoints and config.yaml."""
    if not run_dir.is_dir():
        return []
    files = [p.name for p in checkpoint.checkpoint_files(run_dir)]
    if (run_dir / "config.yaml").is_file() and not allow_config:
        files.append("config.yaml")
    return files


def _existing_run_message(run_dir: Path, held: list[str], *, restart: bool) -> str:
    found = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    if restart:
        return (
            f"resume=auto found no readable checkpoint in {run_dir}, which holds {found} (see the warnings "
            f"above); to start over there set overwrite=true instead of resume=auto (the old run is moved "
            f"aside, not deleted), or choose another run_name"
        )
    # resume=DIR needs DIR/last.pth; resume=auto also takes an older checkpoint, or starts where none was saved.
    go_on = f"resume={run_dir}" if (run_dir / "last.pth").is_file() else "resume=auto (same run_name)"
    return (
        f"{run_dir} already holds a run ({found}); continue it with {go_on}, start another with a "
        f"different run_name=, or start over there with overwrite=true (the old run is moved aside, not deleted)"
    )


def _check_writable(run_dir: Path, *, new: bool, overwrite: bool) -> None:
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(
            f"cannot create the run directory {run_dir}: {existing} is a file; "
            "set output_dir= or run_name= to a path that is free"
        )
    paths = [existing] + [run_dir / name for name in _WRITTEN_IN_PLACE if (run_dir / name).is_file()]
    if overwrite and run_dir.is_dir():
        paths.append(run_dir.parent)  # the old run is renamed inside it
    for path in paths:
        if reason := _unwritable(path):
            raise _read_only(run_dir, path, reason, new=new)
        if path.is_file() and path.name != "config.yaml" and path.stat().st_nlink > 1:  # appended to in place
            raise RunDirError(
                f"{path} has {path.stat().st_nlink} names (hard links), and the run appends to it, "
                "which would change every one of them; copy it (cp, not ln) to break the link, "
                "or use another run_name"
            )


def _read_only(run_dir: Path, path: Path, reason: str, *, new: bool) -> RunDirError:
    if new:
        return RunDirError(
            f"cannot write the run directory {run_dir}: {path} is not writable ({reason}); make it "
            "writable or set output_dir= to a writable directory"
        )
    return RunDirError(
        f"cannot resume in {run_dir}: {path} is not writable ({reason}) and a resume writes there; "
        "make it writable, or copy the run directory to a writable place and resume from the copy"
    )


def _reason(err: OSError) -> str:
    return (err.strerror or str(err)).lower()  # "read-only file system", "permission denied"


def _make_dirs(run_dir: Path, *, new: bool) -> list[Path]:
    """mkdir -p, returning the directories created (outermost first)."""
    missing = []
    directory = run_dir
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    created = []
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue  # another process made it this instant: it is theirs to remove
        except OSError as err:  # what os.access could not foresee (root on some file systems)
            raise _read_only(run_dir, directory.parent, _reason(err), new=new) from None
        created.append(directory)
    return created


def _move_aside(run_dir: Path, lock: str, notes: Notes) -> str:
    """overwrite=true: rename the old run (locked by us) to <name>.old-<time> and lock a fresh directory."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    count = 1
    while aside.exists():
        aside, count = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{count}"), count + 1
    os.rename(run_dir, aside)
    _release(aside / LOCK_NAME, lock)
    run_dir.mkdir()
    message = f"overwrite=true: moved the previous run {run_dir} to {aside} (nothing deleted)."
    log.warning(message)
    notes.append((logging.WARNING, message))
    return _acquire(run_dir, notes, new=True)


# ---------------------------------------------------------------- the lock
def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), so a pid reused by another process is not taken for the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after "pid (comm)"


def _holder_alive(record: dict[str, Any]) -> bool | None:
    """True / False for a holder on this host; None when it is on another host and cannot be checked."""
    if record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    started = record.get("started")
    return started is None or _process_start(pid) in (None, started)


def _acquire(run_dir: Path, notes: Notes, *, new: bool) -> str:
    """Create the lock file (O_EXCL: exactly one process can) holding pid, host and start time."""
    path = run_dir / LOCK_NAME
    pid = os.getpid()
    text = json.dumps(
        {
            "pid": pid,
            "host": socket.gethostname(),
            "started": _process_start(pid),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(path, run_dir, notes)
            continue
        except OSError as err:
            raise _read_only(run_dir, run_dir, _reason(err), new=new) from None
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return text
    raise RunDirError(
        f"the lock file {path} kept changing while this run tried to take it; another process is "
        f"starting in {run_dir}: wait for it, or use another run_name"
    )


def _take_over_if_stale(path: Path, run_dir: Path, notes: Notes) -> None:
    """Return when `path` is gone or was stale (now removed); raise when its holder may still be writing."""
    try:
        text = path.read_text(errors="replace")
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return  # released meanwhile
    except OSError as err:  # a directory, or unreadable: nobody's lock that we can judge
        raise RunDirError(
            f"the lock file {path} cannot be read ({_reason(err)}), so whether a run is writing "
            f"{run_dir} is unknown; remove it if no run is, or use another run_name"
        ) from None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not _is_record(record):
        if age < 5:  # created an instant ago, its holder is writing it
            raise RunDirError(
                f"another process is starting in {run_dir} (lock file {path}); wait for it, or use another run_name"
            )
        # Its writer died between creating and writing it, or something else wrote it: no process to wait for.
        alive, holder = False, None
        message = (
            f"Took over the lock {path}, which held {_shown(text)} instead of a pid, host and start time "
            "(its writer died while creating it, or another program wrote it): no run is writing here."
        )
    else:
        alive = _holder_alive(record)
        holder = f"pid {record['pid']} on {record['host']}, since {record.get('since', 'an unknown time')}"
        message = f"Took over the stale lock {path} of {holder}: that process is no longer running."
    if alive:
        raise RunDirError(
            f"another process ({holder}) is writing {run_dir} (lock file {path}); wait for it to "
            "end or stop it, or use another run_name"
        )
    if alive is None:
        raise RunDirError(
            f"{run_dir} is locked by {holder}, which cannot be checked from {socket.gethostname()} "
            f"(lock file {path}); wait for that run to end, or delete the lock file if it is not running"
        )
    # Renamed away first: of two processes taking over one stale lock, one rename fails.
    grabbed = path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
    try:
        os.rename(path, grabbed)
    except FileNotFoundError:
        return
    if (
        grabbed.read_text(errors="replace") != text
    ):  # a fresh lock replaced the stale one before our rename: put it back
        with contextlib.suppress(FileExistsError):
            os.link(grabbed, path)
        grabbed.unlink()
        return
    grabbed.unlink()
    log.warning(message)
    notes.append((logging.WARNING, message))


def _is_record(record: Any) -> bool:
    """A lock record as `_acquire` writes it: a positive integer pid and a host name."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("pid"), int)
        and record["pid"] > 0
        and isinstance(record.get("host"), str)
    )


def _shown(text: str) -> str:
    """The start of a lock file's contents, for a message: "nothing" or its first 40 characters, quoted."""
    text = text.strip()
    return "nothing" if not text else repr(text[:40] + ("..." if len(text) > 40 else ""))


def _release(path: Path, lock: str) -> None:
    """Remove the lock file if it is still ours."""
    with contextlib.suppress(OSError):
        if path.read_text() == lock:
            path.unlink()
