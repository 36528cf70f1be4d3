"""Nothing a user has is lost (issue 22): no command writes over a file it did not make itself.

The five cases of the second break-it trial that destroyed a run, each run as the trial ran it and
checked as it checked: exit 2, one sentence, and the same sha256 of every file in the run
directory and the inputs before and after. Then what each command may do (replace its own earlier
output), and the messages that must say what works: a full disk, a stop signal at an epoch's end,
a `.lock` holding garbage, and a "Resume with:" command that pastes into a shell.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_overrides
from frcnn_train import checkpoint, evaluate, export, outputs, predict, rundir
from frcnn_train.config import compose_config
from frcnn_train.errors import UserError
from frcnn_train.launch import run
from test_bad_inputs import _snapshot, shared  # noqa: F401 - `shared`: the module's fixture
from test_rundir import read_only

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # tracer warnings of the TorchScript export


@pytest.fixture(scope="module")
def epoch_run(tiny_runs) -> Path:
    """One whole tiny epoch (4 steps, evaluated): last.pth, with best.pth and epoch_0001.pth hard links to it."""
    run_dir = tiny_runs("e")
    assert os.path.samefile(run_dir / "last.pth", run_dir / "best.pth")
    assert os.path.samefile(run_dir / "last.pth", run_dir / "epoch_0001.pth")
    return run_dir


def _photo(folder: Path, name: str = "photo.png") -> Path:
    """A small valid image in `folder`/images."""
    path = folder / "images" / name
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(np.full((48, 64, 3), 127, dtype=np.uint8)).save(path)
    return path


def _cli(main, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(code: int, out: str, err: str) -> str:
    """The one error line of a refusal (exit 2, no traceback, one line)."""
    assert code == 2, out + err
    assert "Traceback" not in out + err
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out + err
    return lines[0].removeprefix("error: ")


def _unchanged(before: dict[Path, str], *roots: Path) -> None:
    after = _snapshot(*roots)
    changed = sorted(str(p) for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert not changed, f"files changed, added or removed: {changed}"


# ---------------------------------------------------------------- the five cases of damage
def test_1_evaluate_out_onto_the_checkpoint_it_evaluates(epoch_run: Path, capsys) -> None:
    """`frcnn-evaluate outputs/e/last.pth --out outputs/e/last.pth`: JSON into last.pth and its two hard links."""
    last = epoch_run / "last.pth"
    before = _snapshot(epoch_run)
    message = _refused(*_cli(evaluate.main, [str(last), "--out", str(last)], capsys))
    assert message == (
        f"--out {last} already exists and is the checkpoint it evaluates; best.pth, epoch_0001.pth are hard links "
        "to it, not a detections file of frcnn-evaluate, and frcnn-evaluate never writes over a file it did not "
        f"make; give a new file name such as {epoch_run / 'detections_last.json'}"
    )
    _unchanged(before, epoch_run)


def test_2_evaluate_out_onto_the_runs_config(epoch_run: Path, capsys) -> None:
    """`frcnn-evaluate outputs/e2 --out outputs/e2/config.yaml`."""
    config = epoch_run / "config.yaml"
    before = _snapshot(epoch_run)
    message = _refused(*_cli(evaluate.main, [str(epoch_run), "--out", str(config)], capsys))
    assert message.startswith(
        f"--out {config} already exists and is the config.yaml of the run in {epoch_run}, "
        "not a detections file of frcnn-evaluate"
    ), message
    _unchanged(before, epoch_run)


def test_3_evaluate_out_onto_the_ground_truth_it_scores_against(
    epoch_run: Path,
    shared,  # noqa: F811
    tmp_path: Path,
    capsys,
) -> None:
    """`frcnn-evaluate outputs/c data.root=D --out D/instances_val.json`."""
    root = tmp_path / "D"
    shutil.copytree(shared["coco"], root)
    truth = root / "instances_val.json"
    before = _snapshot(epoch_run, root)
    argv = [
        str(epoch_run),
        "data=coco",
        f"data.root={root}",
        "data.train_images=train",
        "data.val_images=val",
        "data.train_ann=instances_train.json",
        "data.val_ann=instances_val.json",
        "--out",
        str(truth),
    ]
    message = _refused(*_cli(evaluate.main, argv, capsys))
    assert message.startswith(
        f"--out {truth} already exists and is a COCO annotation file (ground truth), not a "
        "detections file of frcnn-evaluate"
    ), message
    _unchanged(before, epoch_run, root)


def test_4_export_out_onto_the_checkpoint_it_exports(epoch_run: Path, capsys) -> None:
    """`frcnn-export outputs/x/last.pth --format torchscript --out outputs/x/last.pth`."""
    last = epoch_run / "last.pth"
    before = _snapshot(epoch_run)
    message = _refused(*_cli(export.main, [str(last), "--format", "torchscript", "--out", str(last)], capsys))
    assert message == (
        f"--out {last} already exists and is the checkpoint it exports; best.pth, epoch_0001.pth are hard links to "
        "it, not a TorchScript export of frcnn-export, and frcnn-export never writes over a file it did not make; "
        f"give a new file name such as {epoch_run / 'last.torchscript.pt'}"
    )
    _unchanged(before, epoch_run)


def _two_runs(tiny_runs, tmp_path: Path) -> tuple[Path, Path]:
    """Copies of two one-step runs A and B (the module's trained runs stay as they are)."""
    runs = tmp_path / "outputs"
    for name in ("runA", "runB"):
        shutil.copytree(tiny_runs(name, "trainer.max_steps=1"), runs / name)
    return runs / "runA", runs / "runB"


def test_5_another_runs_checkpoint_is_not_resumed_in_this_run(tiny_runs, shapes_cache: Path, tmp_path: Path) -> None:
    """Run B's checkpoint copied into run A's directory: `resume=outputs/runA/from_B.pth`."""
    run_a, run_b = _two_runs(tiny_runs, tmp_path)
    foreign = run_a / "from_B.pth"
    shutil.copy2(run_b / "last.pth", foreign)
    before = _snapshot(run_a, run_b)
    args = tiny_overrides(shapes_cache, tmp_path / "outputs") + [f"resume={foreign}", "trainer.max_steps=2"]
    with pytest.raises(UserError) as refused:
        run(compose_config(args), overrides=args)
    b_dir = Path(tiny_runs("runB")).parent / "runB"  # where B's checkpoint says its run is
    a_dir = Path(tiny_runs("runA")).parent / "runA"
    assert str(refused.value) == (
        f"{foreign} is a checkpoint of the run {b_dir}, but {run_a} holds another run ({a_dir}: last.pth, "
        f"config.yaml), whose last.pth and config.yaml a resume there would replace; resume it from its own run "
        f"directory ({b_dir}, or any directory holding no other run), or start a new run from its weights with "
        f"init_from={foreign} and a new run_name="
    )
    _unchanged(before, run_a, run_b)


def test_a_read_only_export_directory_is_refused_before_the_export(
    epoch_run: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: an 18-line PermissionError traceback after the export was done."""
    target = tmp_path / "exports"
    target.mkdir()
    exported = []
    monkeypatch.setattr(export, "_torchscript_bytes", lambda *a: exported.append(1) or b"")
    before = _snapshot(epoch_run, target)
    with read_only(target, monkeypatch) as really:
        if not really:  # root with no read-only mount: the check itself is what is shown
            monkeypatch.setattr(outputs, "unwritable", lambda p: "read-only file system" if p == target else None)
        out = target / "model.torchscript.pt"
        message = _refused(
            *_cli(export.main, [str(epoch_run / "last.pth"), "--format", "torchscript", "--out", str(out)], capsys)
        )
    assert re.fullmatch(
        rf"--out {re.escape(str(out))} cannot be written: {re.escape(str(target))} is not writable "
        r"\((read-only file system|permission denied)\); make it writable or give a path in a "
        r"writable directory",
        message,
    ), message
    assert not exported, "the export ran before the refusal"
    _unchanged(before, epoch_run, target)


def test_predict_does_not_write_over_a_file_in_its_out_directory(epoch_run: Path, tmp_path: Path, capsys) -> None:
    """A directory of someone else's files, one of them named as a drawn image would be."""
    image = _photo(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    shutil.copy(image, out / "photo.png")
    (out / "notes.txt").write_text("keep\n")
    before = _snapshot(epoch_run, tmp_path)
    message = _refused(*_cli(predict.main, [str(epoch_run), str(image), "--out", str(out)], capsys))
    assert message.startswith(
        f"--out {out} already holds photo.png, which is an image, not frcnn-predict's own output"
    ), message
    _unchanged(before, epoch_run, tmp_path)


# ---------------------------------------------------------------- what each command may replace: its own output
def test_evaluate_twice_into_the_same_file(epoch_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "d.json"
    before = _snapshot(epoch_run)
    code, stdout, stderr = _cli(evaluate.main, [str(epoch_run / "last.pth"), "--out", str(out)], capsys)
    assert code == 0, stdout + stderr
    assert isinstance(json.loads(out.read_text()), list)
    keep = tmp_path / "keep.json"
    os.link(out, keep)  # a hard link the user made to keep this one: replaced by a rename, it keeps its bytes
    kept = keep.read_bytes()
    code, stdout, stderr = _cli(evaluate.main, [str(epoch_run / "last.pth"), "--out", str(out)], capsys)
    assert code == 0, stdout + stderr
    assert keep.read_bytes() == kept and not os.path.samefile(out, keep)
    _unchanged(before, epoch_run)


def test_predict_twice_into_the_same_directory(epoch_run: Path, tmp_path: Path, capsys) -> None:
    image = _photo(tmp_path)
    out = tmp_path / "preds"
    for _ in range(2):
        code, stdout, stderr = _cli(
            predict.main, [str(epoch_run), str(image), "--out", str(out), "--score-threshold", "0"], capsys
        )
        assert code == 0, stdout + stderr
    assert sorted(p.name for p in out.iterdir()) == ["photo.png", "predictions.json"]
    assert outputs.is_results_json(out / "predictions.json")


def test_export_twice_into_the_same_file_but_not_over_the_other_format(epoch_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model.pt"
    argv = [str(epoch_run / "last.pth"), "--format", "torchscript", "--out", str(out), "--check-images", "0"]
    for _ in range(2):
        code, stdout, stderr = _cli(export.main, argv, capsys)
        assert code == 0, stdout + stderr
    before = _snapshot(tmp_path)
    message = _refused(
        *_cli(
            export.main,
            [str(epoch_run / "last.pth"), "--format", "onnx", "--out", str(out), "--check-images", "0"],
            capsys,
        )
    )
    assert message.startswith(
        f"--out {out} already exists and is a TorchScript export, not an ONNX export of frcnn-export"
    ), message
    _unchanged(before, tmp_path)


def test_a_run_directory_moved_as_a_whole_and_a_lone_checkpoint_resume(
    tiny_runs, shapes_cache: Path, tmp_path: Path
) -> None:
    run_a, run_b = _two_runs(tiny_runs, tmp_path)
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    run_a.rename(moved)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy2(run_b / "last.pth", alone / "from_B.pth")
    for resume in (moved, alone / "from_B.pth"):
        # No run_name=: a resume continues in the checkpoint's own directory (a different run_name is refused).
        tiny = [a for a in tiny_overrides(shapes_cache, tmp_path / "outputs") if not a.startswith("run_name=")]
        args = tiny + [f"resume={resume}", "trainer.max_steps=2"]
        summary = run(compose_config(args), overrides=args)
        assert summary["global_step"] == 2


# ---------------------------------------------------------------- advice that works
def test_a_full_disk_at_the_first_save_advises_resume_auto_which_works(compose_tiny, monkeypatch) -> None:
    """No last.pth was written, so resume=DIR cannot work (item 11); resume=auto starts the run again."""
    import errno

    def full(ckpt, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_checkpoint", full)
        with pytest.raises(UserError) as refused:
            run(compose_tiny("run_name=full", "trainer.max_steps=1"))
    run_dir = Path(compose_tiny().output_dir) / "full"
    assert str(refused.value).endswith(
        "no loadable last.pth was written before; free space and run the same command again with resume=auto, "
        "which starts the run afresh there as nothing was saved"
    ), refused.value
    with pytest.raises(UserError, match=r"continue it with resume=auto \(same run_name\)"):
        run(compose_tiny("run_name=full", "trainer.max_steps=1"))  # the same start again: no circular advice
    summary = run(compose_tiny("run_name=full", "trainer.max_steps=1", "resume=auto"))
    assert summary["global_step"] == 1 and (run_dir / "last.pth").is_file()


class _SignalAt:
    """Sends SIGTERM to this process when the wrapped method is called at the given global step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: type, name: str, step: int) -> None:
        real = getattr(owner, name)

        def wrapper(obj, *args, **kwargs):
            if kwargs.get("step", kwargs.get("global_step")) == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(obj, *args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


def _metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_sigterm_during_the_epoch_end_evaluation_ends_the_run_with_that_step(compose_tiny, monkeypatch) -> None:
    """Item 12: 4 steps an epoch, evaluated after each; SIGTERM while epoch 1 is evaluated. Before: it went on
    to save, train step 5, save again and only then stop."""
    from frcnn_train.validation import Validator

    _SignalAt(monkeypatch, Validator, "run", step=4)
    summary = run(compose_tiny("run_name=sig_eval", "trainer.epochs=2"))
    run_dir = Path(summary["run_dir"])
    assert summary["stop_reason"] == "received SIGTERM" and summary["global_step"] == 4
    saved = checkpoint.load_checkpoint(run_dir / "last.pth")["trainer"]
    assert (saved["global_step"], saved["epoch"], saved["step_in_epoch"]) == (4, 1, 0)
    assert _metrics_steps(run_dir) == [4]


def test_sigterm_in_an_epochs_last_step_skips_its_evaluation_which_runs_after_the_resume(
    compose_tiny, monkeypatch
) -> None:
    from frcnn_train.progress import StepLog

    with monkeypatch.context() as patch:
        _SignalAt(patch, StepLog, "step", step=4)
        summary = run(compose_tiny("run_name=sig_step", "trainer.epochs=2"))
    run_dir = Path(summary["run_dir"])
    assert summary["stop_reason"] == "received SIGTERM" and summary["global_step"] == 4
    saved = checkpoint.load_checkpoint(run_dir / "last.pth")["trainer"]
    assert (saved["global_step"], saved["epoch"], saved["step_in_epoch"]) == (4, 0, 4)
    assert _metrics_steps(run_dir) == []
    overrides = [f"resume={run_dir}", "trainer.epochs=1"]
    run(compose_tiny(*overrides), overrides=overrides)
    assert _metrics_steps(run_dir) == [4], "the skipped evaluation did not run after the resume"


@pytest.mark.parametrize("contents", [b"garbage\xff\x00", b"", b'{"pid": null}'], ids=["bytes", "empty", "no_pid"])
def test_a_lock_holding_garbage_is_named_for_what_it_holds(tmp_path: Path, caplog, contents: bytes) -> None:
    """Item 13. Before: "Took over the stale lock ... of pid None on None, since None"."""
    lock = tmp_path / "run" / rundir.LOCK_NAME
    lock.parent.mkdir()
    lock.write_bytes(contents)
    os.utime(lock, (1, 1))  # long ago: not a lock being written this instant
    caplog.set_level(logging.WARNING, logger="frcnn_train")
    with rundir.claim(rundir.Target(tmp_path / "run"), overwrite=False):
        pass
    held = repr(contents.decode(errors="replace")) if contents else "nothing"
    assert caplog.messages == [
        (
            f"Took over the lock {lock}, which held {held} instead of a pid, host and start time (its writer died "
            "while creating it, or another program wrote it): no run is writing here."
        )
    ]
    assert "None" not in caplog.text and not lock.exists()


def test_a_lock_that_cannot_be_read_is_one_sentence(tmp_path: Path) -> None:
    lock = tmp_path / "run" / rundir.LOCK_NAME
    lock.mkdir(parents=True)
    with pytest.raises(UserError) as refused, rundir.claim(rundir.Target(tmp_path / "run"), overwrite=False):
        pass
    assert str(refused.value) == (
        f"the lock file {lock} cannot be read (is a directory), so whether a run is writing {tmp_path / 'run'} is "
        "unknown; remove it if no run is, or use another run_name"
    )


def test_a_train_log_with_other_names_is_not_appended_to(tmp_path: Path) -> None:
    """train.log and metrics.jsonl are appended in place: a hard link would change with them."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pth").write_bytes(b"a checkpoint")
    elsewhere = tmp_path / "my_notes.log"
    elsewhere.write_text("mine\n")
    os.link(elsewhere, run_dir / "train.log")
    before = _snapshot(tmp_path)
    with (
        pytest.raises(UserError) as refused,
        rundir.claim(rundir.Target(run_dir, run_dir / "last.pth"), overwrite=False),
    ):
        pass
    assert str(refused.value) == (
        f"{run_dir / 'train.log'} has 2 names (hard links), and the run appends to it, which would change every one "
        "of them; copy it (cp, not ln) to break the link, or use another run_name"
    )
    _unchanged(before, tmp_path)


def _printed_command(caplog) -> str:
    lines = [m for m in caplog.messages if "Resume with:" in m]
    return lines[-1].split("Resume with:", 1)[1].strip()


def _through_bash(command: str) -> list[str]:
    """The words bash gives `python` when the printed command is pasted."""
    shell = f'python() {{ printf "%s\\0" "$@"; }}\n{command}\n'
    done = subprocess.run(["bash", "-c", shell], capture_output=True, check=True)
    return done.stdout.decode().split("\0")[:-1]


@pytest.mark.parametrize("finished", [False, True], ids=["stopped", "finished"])
def test_the_printed_resume_command_pastes_into_a_shell(compose_tiny, tmp_path: Path, caplog, finished: bool) -> None:
    """Item 16: spaces and non-ASCII letters in output_dir and run_name; the printed command, run by bash,
    gives Hydra the checkpoint's path back."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    caplog.set_level(logging.INFO, logger="frcnn_train")
    output_dir = tmp_path / "läufe mit leerzeichen"
    overrides = [f"output_dir='{output_dir}'", "run_name='lauf ü \"1\"'"]
    overrides += [] if finished else ["trainer.max_steps=1"]
    summary = run(compose_tiny(*overrides), overrides=overrides)
    command = _printed_command(caplog)
    words = _through_bash(command)
    assert words[:2] == ["-m", "frcnn_train.train"], words
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(words[2:])}
    assert Path(parsed["resume"]) == Path(summary["run_dir"]) / "last.pth" and Path(parsed["resume"]).is_file()
    if finished:
        assert parsed["trainer.epochs"] == 2
    else:
        assert parsed["trainer.max_steps"] is None
    assert shlex.split(command, comments=True) == ["python", *words]


# ---------------------------------------------------------------- every command, also one added later
# Calls that open or replace a file for writing. Outside this list a command writes through outputs.write_file
# (a rename, after outputs.check_file / check_directory) or checkpoint.atomic_write.
_WRITES = re.compile(
    r"""open\([^)]*["'][wax]b?["']|\.write_(text|bytes)\(|torch\.save\(|jit\.save\(|"""
    r"""(?<!self)(?<!checkpointer)\.save\(|OmegaConf\.save\(|os\.open\(.*O_WRONLY|FileHandler\(|"""
    r"""SummaryWriter\(|shutil\.(copy\w*|move)\(|os\.(replace|rename|link)\("""
)
# (module, text on the line): why it may write there.
_ALLOWED_WRITES = {
    ("checkpoint.py", 'open(tmp, "wb")'): "atomic_write's own temporary file",
    ("checkpoint.py", "os.replace(tmp, "): "atomic_write / link_checkpoint: the rename that replaces",
    ("checkpoint.py", "atomic_write(path, lambda f: torch.save"): "into atomic_write's temporary file",
    ("checkpoint.py", "os.link(src, tmp)"): "a hard link made under a temporary name, then renamed",
    ("checkpoint.py", "re-save its tensors with torch.save"): "a message",
    ("checkpoint.py", "atomic_write(Path(dst), lambda f: shutil.copyfileobj"): "into atomic_write's temporary file",
    ("inspect.py", "os.open(os.devnull, os.O_WRONLY)"): "/dev/null, for a closed pipe",
    ("rundir.py", 'os.fdopen(fd, "w")'): "the lock file just created with O_EXCL",
    ("weights.py", "# torch.save(model)"): "a comment",
    ("export.py", "torch.jit.save(traced, buffer"): "into memory; written by outputs.write_file",
    ("predict.py", ".save(buffer"): "into memory; written by outputs.write_file",
    ("outputs.py", 'image.save(buffer, format="PNG"'): "into memory; written by write_owned",
    ("rundir.py", "os.rename(run_dir, aside)"): "overwrite=true moves the old run aside, never deletes",
    ("rundir.py", "os.O_CREAT | os.O_EXCL | os.O_WRONLY"): "the lock: O_EXCL creates, never opens an existing file",
    ("rundir.py", "os.rename(path, grabbed)"): "a stale lock taken over",
    ("rundir.py", "os.link(grabbed, path)"): "a fresh lock put back (link fails if one exists)",
    ("logs.py", 'FileHandler(run_dir / "train.log", mode="a"'): "this run's train.log (rundir checks its links)",
    ("logs.py", "SummaryWriter(log_dir="): "TensorBoard: new event files of this run",
    ("logs.py", 'open(self.run_dir / "metrics.jsonl", "a"'): "this run's metrics.jsonl (rundir checks its links)",
    ("train.py", 'open(sweep_dir / "jobs.jsonl", "a"'): "the sweep's own record",
    ("shapes.py", "os.rename(tmp, final)"): "the generated dataset, built in a temporary directory",
    ("shapes.py", "Image.fromarray(pixels).save(out"): "the generated dataset's images, in its temporary directory",
    ("shapes.py", 'open(out / f"instances_{split}.json", "w")'): "the generated dataset's annotations, same",
}


def test_no_module_writes_a_file_except_through_the_rule() -> None:
    package = Path(checkpoint.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _WRITES.search(line) and not any(
                path.name == module and text in line for module, text in _ALLOWED_WRITES
            ):
                found.append(f"{path.relative_to(package)}:{number}: {line.strip()}")
    assert not found, "writes a file without outputs.write_file / checkpoint.atomic_write:\n" + "\n".join(found)
