"""Checkpoint files: schema, atomic writing, integrity checks, migration, resume resolution.

A checkpoint holds only tensors and plain containers, so it loads with
`torch.load(path, map_location="cpu", weights_only=True)`: loading never runs
code from the file. See DESIGN.md ("Checkpoint file") for the keys.
"""

from __future__ import annotations

import datetime
import errno
import os
import platform
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision

from frcnn_train.errors import CheckpointError
from frcnn_train.state import OPTIONAL_PARTS, PARTS

FORMAT = "frcnn_train.checkpoint"
FORMAT_VERSION = 1
# The run's fixed facts, then every registered part of its state (state.PARTS) a checkpoint must hold.
REQUIRED_KEYS = ("config", "architecture", "classes") + tuple(k for k in PARTS if k not in OPTIONAL_PARTS)
# A wrapper prefix at the start of a key or after a dot (DDP around a compiled model, ...).
_WRAPPER_RE = re.compile(r"(^|\.)(?:module|_orig_mod)\.")


def library_versions() -> dict[str, str]:
    from frcnn_train import __version__

    return {
        "frcnn_train": __version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


def strip_wrapper_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Drop `module.` (DataParallel / DDP) and `_orig_mod.` (torch.compile) wherever they appear."""

    def clean(key: str) -> str:
        while _WRAPPER_RE.search(key):  # nested wrappers: module._orig_mod.x
            key = _WRAPPER_RE.sub(r"\1", key)
        return key

    return {clean(key): value for key, value in state.items()}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DataParallel / DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


# ---------------------------------------------------------------- migration
def _migrate_v0(ckpt: dict[str, Any]) -> dict[str, Any]:
    """v0 (pre-release layout): `state_dict`/`optim` names, flat counters, no RNG or fingerprint."""
    ckpt = dict(ckpt)
    ckpt["model"] = ckpt.pop("state_dict")
    ckpt["optimizer"] = ckpt.pop("optim")
    ckpt.setdefault("scheduler", {})
    ckpt.setdefault("scaler", {})
    ckpt["trainer"] = {
        "epoch": ckpt.pop("epoch"),
        "global_step": ckpt.pop("step"),
        "step_in_epoch": 0,
        "best_metric": None,
        "history": [],
    }
    ckpt.setdefault("rng", {})
    ckpt.setdefault("architecture", {"fingerprint": None, "spec": {}})
    ckpt.setdefault("classes", [])
    ckpt["format_version"] = 1
    return ckpt


# format_version -> function upgrading a checkpoint of that version by one step.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _migrate_v0}


def migrate(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    version = ckpt.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {version}, newer than this frcnn_train understands "
            f"({FORMAT_VERSION}); upgrade frcnn_train to load it"
        )
    while version < FORMAT_VERSION:
        ckpt = MIGRATIONS[version](ckpt)
        version = ckpt["format_version"]
    return ckpt


# ---------------------------------------------------------------- reading
# What torch's safe loader says when a pickle names a global (a class or function that loading
# would call). Torch has used two wordings; both are matched, never a copied full message:
#   "Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default"
#   "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
_REFUSED_GLOBAL_RE = re.compile(r"unsupported(?: global:)? GLOBAL ([\w.]+)", re.IGNORECASE)


def _is_raw_pickle(path: Path) -> bool:
    """A file written by `pickle.dump` (protocol 3-5, which torch.save never uses): the safe loader
    cannot parse it at all ("Unsupported operand"), whatever it holds."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and head[1] in (3, 4, 5)


def read_file(path: str | Path, *, trust: bool = False, for_resume: bool = False) -> Any:
    """torch.load with every failure turned into one sentence naming the file."""
    path = require_file(path)
    try:
        with warnings.catch_warnings():  # the raw-pickle case below says it in our words
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for damaged files
        text = str(err)
        refused = _REFUSED_GLOBAL_RE.search(text)
        if refused or _is_raw_pickle(path):
            what = (
                f"holds pickled Python objects whose loading calls {refused.group(1)}, code that would run "
                "on this machine,"
                if refused
                else "is a plain Python pickle (not written by torch.save), which may hold code that would run on "
                "this machine when loaded,"
            )
            # init.trust=true is named only beside what it does: run the file's code.
            trust = "only if you trust whoever made the file, init.trust=true loads it and runs that code"
            fix = (
                f"frcnn_train checkpoints never hold such objects, so other code wrote it; to start from its "
                f"weights use init_from= ({trust})"
                if for_resume
                else f"re-save its tensors with torch.save(model.state_dict(), ...), or, {trust}"
            )
            raise CheckpointError(f"{path} {what} so safe weights_only loading refused it; {fix}") from None
        raise CheckpointError(
            f"{path} ({path.stat().st_size} bytes) is not a readable checkpoint: it is truncated, corrupted "
            "or not a torch file; use another checkpoint or copy the file again"
        ) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read, validate and migrate one of our checkpoints (weights_only)."""
    path = Path(path)
    ckpt = read_file(path, for_resume=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an frcnn_train checkpoint (no '{FORMAT}' marker); "
            "to start from its weights use init_from= instead of resume="
        )
    ckpt = migrate(ckpt, path)
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} is an incomplete checkpoint (missing {', '.join(missing)}); use another checkpoint"
        )
    return ckpt


def inference_weights(ckpt: dict[str, Any], *, raw: bool = False) -> tuple[dict[str, Any], str]:
    """The model weights to predict with and which they are: the EMA's ("ema") when the run kept an
    exponential moving average (trainer.ema), as detectron2 / mmdetection / Ultralytics evaluate, unless
    `raw`; else the trained weights ("raw"). An EMA that was never updated holds the initial weights, so
    then the trained ones (see ema_skipped). evaluate, predict, export and init_from all choose here."""
    ema = ckpt.get("ema")
    if ema and not raw and not ema_skipped(ckpt):
        return ema["model"], "ema"
    return ckpt["model"], "raw"


def ema_skipped(ckpt: dict[str, Any]) -> str | None:
    """Why the checkpoint's EMA weights are not used although it has them (one line), or None. Its update count
    (ema.py ModelEma.state_dict) is 0 when trainer.ema.every exceeded the steps trained: the average is still
    the weights the run started from."""
    ema = ckpt.get("ema")
    if not ema or ema.get("updates") != 0:  # absent: written before the count was kept; trust the average
        return None
    every = ((ckpt.get("config") or {}).get("trainer") or {}).get("ema", {}).get("every")
    step = (ckpt.get("trainer") or {}).get("global_step")
    return (
        f"the trained weights are used: the checkpoint's EMA was never updated (trainer.ema.every={every}, "
        f"{step} steps trained), so it still holds the weights the run started from"
    )


# ---------------------------------------------------------------- writing
def make_checkpoint(**parts: Any) -> dict[str, Any]:
    """Stamp the format header on the parts (REQUIRED_KEYS and the optional ones)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        **parts,
    }


def temporary_path(path: Path) -> Path:
    """Where this process writes `path` before renaming it: hidden, beside it, named by our pid."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


_TEMPORARY_RE = re.compile(r"^\.(.+)\.tmp-(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(directory: Path, name: str | None = None) -> list[Path]:
    """Delete temporaries (of `name`, or of any file) that no live process is writing.

    A temporary belongs to the pid in its name: one of ours left by an earlier failure,
    or one of a process killed mid-write. A live process's temporary is never touched.
    """
    removed = []
    for tmp in directory.glob(f".{name or '*'}.tmp-*"):
        match = _TEMPORARY_RE.match(tmp.name)
        if match and (int(match.group(2)) == os.getpid() or not _pid_alive(int(match.group(2)))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class _ErrnoKeepingFile:
    """A binary file whose failed write keeps its OSError: torch.save reports it only as
    'unexpected pos', losing the errno that says the disk is full or read-only."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self._f.flush()


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it.

    A crash at any instant leaves either the old file or the new one, never a mix.
    OSErrors (full disk, read-only directory) come out as themselves, errno intact.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            kept = _ErrnoKeepingFile(f)
            try:
                write(kept)
            except Exception:
                if kept.error is not None:
                    raise kept.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    if path.parent.is_dir():
        remove_stale_temporaries(path.parent, path.name)
    atomic_write(path, lambda f: torch.save(ckpt, f))


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    with open(src, "rb") as source:
        atomic_write(Path(dst), lambda f: shutil.copyfileobj(source, f))


# link(2) is not supported here (FAT, some network and FUSE file systems, across devices).
_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def link_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Make `dst` the same file as `src` (a hard link: no bytes copied), replacing `dst` atomically.

    `src` is never rewritten in place (every save renames a new file over it), so the
    link keeps this version. Where hard links are unsupported, an atomic copy.
    """
    src, dst = Path(src), Path(dst)
    tmp = temporary_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
        copy_checkpoint(src, dst)
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)


def peek_counters(path: Path) -> dict[str, Any] | None:
    """The `trainer` counters of a checkpoint, read through mmap (cheap), or None when it does not load."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return dict(ckpt["trainer"])
    except Exception:  # noqa: BLE001 - missing, damaged or foreign: all mean "no usable counters"
        return None


# ---------------------------------------------------------------- finding checkpoints
def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run directory, newest first: last.pth, then the others by modification time.

    last.pth always holds the latest state; best and epoch files are copies of
    an earlier last.pth made just after it (so their mtime is newer).
    """
    files = [p for p in Path(run_dir).glob("*.pth") if p.is_file()]
    return sorted(files, key=lambda p: (p.name == "last.pth", p.stat().st_mtime_ns), reverse=True)


def _existing_hint(directory: Path) -> str:
    files = checkpoint_files(directory) if directory.is_dir() else []
    if not files:
        return f" and {directory} holds no .pth file"
    return f"; checkpoints in {directory}: {', '.join(p.name for p in files)}"


def require_file(path: str | Path, key: str | None = None) -> Path:
    """`path` when it is a file; otherwise one sentence naming it (as `key=path`) and the .pth files beside it."""
    path = Path(path).expanduser()
    name = f"{key}={path}" if key else str(path)
    if not path.exists():
        raise CheckpointError(f"{name} does not exist{_existing_hint(path.parent)}")
    if path.is_dir():
        raise CheckpointError(f"{name} is a directory; give a file such as {path / 'last.pth'}")
    return path


def newest_valid(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that loads, and (path, reason) for each newer one that did not."""
    bad = []
    for path in checkpoint_files(run_dir):
        try:
            load_checkpoint(path)
            return path, bad
        except CheckpointError as err:
            bad.append((path, str(err)))
    return None, bad


def load_for_resume(path: Path) -> dict[str, Any]:
    """load_checkpoint, with the newest good checkpoint beside `path` named when it fails."""
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        good, _ = newest_valid(path.parent)
        if good is None:
            raise
        raise CheckpointError(f"{err} (the newest good one beside it is resume={good})") from None


def resolve_resume(resume: str, run_dir: Path) -> tuple[Path | None, list[str]]:
    """Map `resume=` (a file, a run directory, or `auto`) to a checkpoint file.

    Returns the file (None: `auto` found nothing, start fresh) and warnings to show.
    """
    if resume == "auto":
        if not run_dir.is_dir():
            return None, []
        found, bad = newest_valid(run_dir)
        warnings = [f"resume=auto skipped {path}: {reason}" for path, reason in bad]
        return found, warnings
    path = Path(resume)
    if path.is_dir():
        last = path / "last.pth"
        if not last.exists():
            raise CheckpointError(f"resume={resume}: {last} does not exist{_existing_hint(path)}")
        return last, []
    if not path.exists():
        raise CheckpointError(f"resume={resume} does not exist{_existing_hint(path.parent)}")
    return path, []


def checkpoint_in(path: str | Path) -> Path:
    """What `evaluate` and `predict` read: a file as given, or a run directory's best.pth, else its last.pth."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    for name in ("best.pth", "last.pth"):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(
        f"{path} is a directory without best.pth or last.pth{_existing_hint(path)}; "
        "give a checkpoint file, or the run directory of a run that saved one"
    )
