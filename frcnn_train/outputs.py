"""The one rule for every command that writes: it never writes over a file it did not make itself.

Each command asks here, before any work, whether it may write an output path: a
path that exists is refused in one sentence unless it is that command's own
earlier output of the same kind (recognised by its content, not its name), and
the directory must be writable. Outputs are then written by `write_file`: a
temporary file renamed over the old one, so an existing file (and every hard
link to it) is never opened for writing. Training's run directory follows the
same rule through `check_resume_target`: a checkpoint resumes only in its own
run's directory, never in another run's, whose files the resume would replace.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from frcnn_train import checkpoint
from frcnn_train.errors import RunDirError, UserError


class OutputError(UserError):
    """An output path a command may not write: a file it did not make, or a directory it cannot write."""


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
RUN_FILES = ("config.yaml", "train.log", "metrics.jsonl")
TORCHSCRIPT_METADATA = "frcnn_train.json"  # export.py's TorchScript extra file
EXPORT_MARKER = "frcnn_train.export"  # export.py's metadata "format"
# How evaluate's and predict's JSON begin: a list of COCO results (json.dumps of our dicts, predict's led by
# file_name) or an empty list.
_RESULTS_HEAD = re.compile(r'\A\[\s*(\]|\{"(image_id|file_name)": )')


def unwritable(path: Path) -> str | None:
    """Why this process cannot write `path`, or None. Root passes os.access unless the file system is read-only."""
    if os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
        return None
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return "read-only file system" if read_only else "permission denied"


# ---------------------------------------------------------------- recognising our own outputs
def _head(path: Path, size: int = 64) -> str:
    with open(path, "rb") as f:
        return f.read(size).decode("utf-8", errors="replace")


def is_results_json(path: Path) -> bool:
    """A COCO results list as evaluate (detections) and predict (predictions.json) write it."""
    return bool(_RESULTS_HEAD.match(_head(path)))


def _torchscript_export(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(f"/extra/{TORCHSCRIPT_METADATA}") for name in archive.namelist())


def _onnx_export(path: Path) -> bool:
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX (or onnx missing): not an export of ours
        return False
    return any(p.key == "format" and p.value == EXPORT_MARKER for p in proto.metadata_props)


# The PNG text chunk that marks a picture this project drew (frcnn-data show and stats, evaluation plots).
SOFTWARE = "frcnn_train"
STATS_HEAD = "# frcnn-data stats"  # the first line of frcnn-data stats' stats.txt


def _our_picture(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and getattr(im, "text", {}).get("Software") == SOFTWARE
    except Exception:  # noqa: BLE001 - not an image PIL reads: not ours
        return False


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes marked as ours, for write_owned."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", SOFTWARE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


# kind -> (what the command writes, in words; whether a file is an earlier one of them)
KINDS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "detections": ("a detections file of frcnn-evaluate", is_results_json),
    "predictions": ("a predictions.json of frcnn-predict", is_results_json),
    "onnx": ("an ONNX export of frcnn-export", _onnx_export),
    "torchscript": ("a TorchScript export of frcnn-export", _torchscript_export),
    "picture": ("a picture frcnn_train drew", _our_picture),
    "stats": ("a stats.txt of frcnn-data stats", lambda path: _head(path).startswith(STATS_HEAD)),
}


def _ours(path: Path, kind: str) -> bool:
    try:
        return path.is_file() and KINDS[kind][1](path)
    except OSError:
        return False


# ---------------------------------------------------------------- saying what a file is
def _hard_links(path: Path) -> str:
    """ "; best.pth, epoch_0001.pth are hard links to it" (names beside it), or "" for a single name."""
    try:
        links = path.stat().st_nlink
    except OSError:  # a dangling symlink
        return ""
    if links < 2:
        return ""
    names = [p.name for p in sorted(path.parent.iterdir()) if p != path and p.is_file() and os.path.samefile(p, path)]
    if not names:
        return f"; it has {links} names (hard links), which would all change"
    return f"; {', '.join(names)} {'is a hard link' if len(names) == 1 else 'are hard links'} to it"


def describe(path: Path, reads: dict[Path, str] | None = None) -> str:
    """What an existing file is, in words, for a refusal: "the checkpoint it evaluates", "a checkpoint (step 4)"."""
    for read, role in (reads or {}).items():
        if read.exists() and os.path.samefile(read, path):
            return role + _hard_links(path)
    return _what(path) + _hard_links(path)


def _what(path: Path) -> str:
    if not path.is_file():
        return "not a regular file"
    if zipfile.is_zipfile(path) or path.suffix in (".pth", ".pt"):
        if (counters := checkpoint.peek_counters(path)) is not None:
            return f"a checkpoint (step {counters.get('global_step')})"
        if _torchscript_export(path):
            return "a TorchScript export"
        return "a torch file" if zipfile.is_zipfile(path) else f"a {path.suffix} file"
    if path.name in RUN_FILES:
        siblings = checkpoint.checkpoint_files(path.parent) or [n for n in RUN_FILES if (path.parent / n).exists()][1:]
        return f"the {path.name} of the run in {path.parent}" if siblings else f"a {path.name}"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "an image"
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict) and ("annotations" in data or "images" in data):
            return "a COCO annotation file (ground truth)"
    if _onnx_export(path):
        return "an ONNX export"
    return "a file of another kind"


# ---------------------------------------------------------------- the checks
def _check_directory(path: Path, flag: str) -> None:
    """The directory that will hold `path` exists (or can be made) and this process may write it."""
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"{flag} {path} passes through the file {existing}; give a path in a directory")
    if reason := unwritable(existing):
        raise OutputError(
            f"{flag} {path} cannot be written: {existing} is not writable ({reason}); make it "
            "writable or give a path in a writable directory"
        )


def check_file(
    path: Path, *, kind: str, command: str, example: Path, flag: str = "--out", reads: dict[Path, str] | None = None
) -> None:
    """Refuse, before any work, an output file that exists and is not `command`'s own earlier `kind`,
    or one whose directory cannot be written. `example`: a free name to suggest; `reads`: the command's
    inputs by role ("the checkpoint it evaluates"), named as such when the path is one of them."""
    _check_directory(path, flag)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a directory; give a file name, e.g. {example}")
    reads = reads or {}
    if _ours(path, kind) and not any(r.exists() and os.path.samefile(r, path) for r in reads):
        return
    suggestion = example if not example.exists() or _ours(example, kind) else example.with_name(f"new_{example.name}")
    raise OutputError(
        f"{flag} {path} already exists and is {describe(path, reads)}, not {KINDS[kind][0]}, and "
        f"{command} never writes over a file it did not make; give a new file name such as {suggestion}"
    )


def check_directory(out: Path, names: list[str], *, kind: str, command: str, inputs: list[Path]) -> None:
    """An output directory (predict's): may exist; each of `names` in it may exist only as `command`'s own
    earlier output (the directory holds an earlier `kind` file: `names[0]`, e.g. predictions.json)."""
    _check_directory(out / names[0], "--out")
    if not out.is_dir():
        return
    index = out / names[0]
    earlier = _ours(index, kind)
    reads = {p: "an input image of this command" for p in inputs}
    for name in names:
        target = out / name
        if not (target.exists() or target.is_symlink()):
            continue
        if earlier and (target == index or not any(r.exists() and os.path.samefile(r, target) for r in inputs)):
            continue
        why = "it is read by this command" if earlier else f"the directory has no {names[0]} of {command}"
        raise OutputError(
            f"--out {out} already holds {name}, which is {describe(target, reads)}, not {command}'s own "
            f"output ({why}), and {command} never writes over a file it did not make; give a new or "
            "empty directory"
        )


def write_owned(path: Path, data: bytes, *, kind: str, command: str, flag: str = "--out") -> None:
    """Write one file of a directory output (frcnn-data show / stats, evaluation plots) through write_file; a
    file already there must be `command`'s own earlier `kind`. Checked per file, as the names come from the
    data (an image id, a figure of a class)."""
    _check_directory(path, flag)
    if (path.exists() or path.is_symlink()) and not _ours(path, kind):
        raise OutputError(
            f"{flag} {path.parent} already holds {path.name}, which is {describe(path)}, not {KINDS[kind][0]}, "
            f"and {command} never writes over a file it did not make; give a new or empty directory"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, data)


def write_file(path: Path, data: bytes) -> None:
    """Write `data` as `path` through a temporary file and a rename: the old file, and any other name of it
    (a hard link), is never opened for writing."""
    checkpoint.atomic_write(path, lambda f: f.write(data))


# ---------------------------------------------------------------- resuming in a run directory
def _run_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    config = ckpt.get("config") or {}
    return {
        "dir": str(Path(str(config.get("output_dir"))) / str(config.get("run_name"))),
        "started": (ckpt.get("launch") or {}).get("started_at"),
    }


def _peek_run(path: Path) -> dict[str, Any] | None:
    """The run a checkpoint belongs to (its first launch and output_dir/run_name), read through mmap."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - damaged or foreign: it says nothing about a run
        return None
    return _run_of(ckpt) if isinstance(ckpt, dict) and ckpt.get("format") == checkpoint.FORMAT else None


def _config_run(path: Path) -> dict[str, Any] | None:
    try:
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - unreadable: says nothing about a run
        return None
    if not isinstance(config, dict) or "run_name" not in config:
        return None
    return _run_of({"config": config})


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same run: the same first launch when both checkpoints record it, else the same output_dir/run_name."""
    if a["started"] and b["started"]:
        return a["started"] == b["started"]
    return a["dir"] == b["dir"]


def check_resume_target(source: Path, run_dir: Path) -> None:
    """Refuse resuming `source` in `run_dir` when that directory holds another run: its checkpoints or
    config.yaml name a different run than `source` does (the resume would replace that run's files).

    A directory moved or renamed as a whole keeps its files' agreement; a directory holding no other
    run's file (the checkpoint alone) takes it.
    """
    mine = _peek_run(source)
    if mine is None or not run_dir.is_dir():
        return  # not loadable: the resume's own load says why
    others: list[str] = []
    theirs: dict[str, Any] | None = None
    for path in checkpoint.checkpoint_files(run_dir):
        if os.path.samefile(path, source):
            continue
        if (run := _peek_run(path)) is not None and not _same_run(mine, run):
            others.append(path.name)
            theirs = theirs or run
    if (run := _config_run(run_dir / "config.yaml")) is not None and not _same_run(mine, {**run, "started": None}):
        others.append("config.yaml")
        theirs = theirs or run
    if not others:
        return
    when = f", first started {mine['started']}" if mine["started"] and theirs and theirs["dir"] == mine["dir"] else ""
    raise RunDirError(
        f"{source} is a checkpoint of the run {mine['dir']}{when}, but {run_dir} holds another run "
        f"({theirs['dir'] if theirs else 'unknown'}: {', '.join(others)}), whose last.pth and config.yaml a resume "
        f"there would replace; resume it from its own run directory ({mine['dir']}, or any directory holding no "
        f"other run), or start a new run from its weights with init_from={source} and a new run_name="
    )
