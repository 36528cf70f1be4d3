"""The run directory: never overwritten by accident, one writer at a time, read-only refused up front,
and a resumed run's metrics.jsonl equal to a straight run's."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from frcnn_train import checkpoint, rundir
from frcnn_train.errors import ConfigError, DataError, RunDirError
from frcnn_train.launch import run
from frcnn_train.logs import trim_metrics

ONE_STEP = "trainer.max_steps=1"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def old_run(run_dir: Path, *names: str) -> dict[str, bytes]:
    """A run directory holding `names` (distinct bytes each); returns the snapshot of its parent."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        (run_dir / name).write_bytes(f"old {name}\n".encode())
    return snapshot(run_dir.parent)


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    return tmp_path / "outputs"  # compose_tiny's output_dir; its run_name is "tiny"


@pytest.fixture
def no_data(tmp_path: Path) -> tuple[str, Path]:
    """An override pointing the shapes cache at a fresh path: it exists afterwards only if data work began."""
    cache = tmp_path / "fresh_cache"
    return f"data.cache_dir={cache}", cache


# ---------------------------------------------------------------- another run's directory
@pytest.mark.parametrize("held", ["config.yaml", "last.pth", "epoch_0003.pth"])
def test_a_new_run_into_an_existing_run_is_refused(compose_tiny, outputs: Path, no_data, held: str) -> None:
    run_dir = outputs / "tiny"
    before = old_run(run_dir, held, "train.log", "metrics.jsonl")
    with pytest.raises(RunDirError) as refused:
        run(compose_tiny(no_data[0]))
    message = str(refused.value)
    assert f"{run_dir} already holds a run ({held})" in message
    # resume=DIR needs DIR/last.pth; without one the advice is resume=auto, which works there (issue 22, item 11).
    go_on = f"resume={run_dir}" if held == "last.pth" else "resume=auto (same run_name)"
    assert f"continue it with {go_on}," in message and "run_name=" in message and "overwrite=true" in message
    assert snapshot(outputs) == before and not no_data[1].exists()


def test_the_cli_refusal_is_one_sentence(shapes_cache: Path, outputs: Path) -> None:
    before = old_run(outputs / "run1", "config.yaml", "last.pth")
    proc = subprocess.run(
        [sys.executable, "-m", "frcnn_train.train", f"output_dir={outputs}", "run_name=run1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {outputs / 'run1'} already holds a run"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert snapshot(outputs) == before


def test_overwrite_moves_the_old_run_aside_and_says_where(compose_tiny, outputs: Path) -> None:
    run_dir = outputs / "tiny"
    before = old_run(run_dir, "config.yaml", "last.pth", "epoch_0001.pth", "train.log", "metrics.jsonl")
    summary = run(compose_tiny("overwrite=true", ONE_STEP))
    (aside,) = outputs.glob("tiny.old-*")
    moved = {k[len(aside.name) + 1 :]: v for k, v in snapshot(outputs).items() if k.startswith(aside.name + "/")}
    assert moved == {k[len("tiny/") :]: v for k, v in before.items()}, "the old run must move aside intact"
    assert checkpoint.load_checkpoint(run_dir / "last.pth")["trainer"]["global_step"] == summary["global_step"] == 1
    assert not (run_dir / "epoch_0001.pth").exists() and not (run_dir / "metrics.jsonl").exists()
    log = (run_dir / "train.log").read_text()
    assert f"moved the previous run {run_dir} to {aside} (nothing deleted)" in log and "old train.log" not in log
    assert not (run_dir / rundir.LOCK_NAME).exists() and not (aside / rundir.LOCK_NAME).exists()


def test_overwrite_and_resume_together_are_refused(compose_tiny, outputs: Path) -> None:
    with pytest.raises(ConfigError, match=r"overwrite=true starts a new run but resume=auto continues one"):
        run(compose_tiny("overwrite=true", "resume=auto"))
    assert not outputs.exists()


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "../elsewhere", "nul\0byte"])
def test_run_name_is_one_path_component(compose_tiny, tmp_path: Path, name: str) -> None:
    cfg = compose_tiny()
    cfg.run_name = name
    with pytest.raises(ConfigError, match=r"^run_name=.* must be a single directory name .* set output_dir="):
        run(cfg)
    assert list(tmp_path.iterdir()) == []


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(compose_tiny, outputs: Path) -> None:
    """Its config.yaml is no reason to refuse; what it wrote after step 0 is dropped."""
    run_dir = outputs / "tiny"
    old_run(run_dir, "config.yaml", "train.log")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 4, "bbox/AP": 0.5}) + "\n")
    overrides = ["resume=auto", ONE_STEP]
    summary = run(compose_tiny(*overrides), overrides=overrides)
    assert summary["global_step"] == 1 and (run_dir / "metrics.jsonl").read_text() == ""


def test_resume_auto_over_only_damaged_checkpoints_is_refused(
    compose_tiny, outputs: Path, no_data, caplog: pytest.LogCaptureFixture
) -> None:
    before = old_run(outputs / "tiny", "config.yaml", "last.pth")
    overrides = ["resume=auto", no_data[0]]
    caplog.set_level(logging.INFO)
    with pytest.raises(
        RunDirError,
        match=r"resume=auto found no readable checkpoint in .*tiny, which holds "
        r"last.pth .* set overwrite=true instead of resume=auto",
    ):
        run(compose_tiny(*overrides), overrides=overrides)
    assert snapshot(outputs) == before and not no_data[1].exists()
    assert "resume=auto skipped" in caplog.text and "starting a new run" not in caplog.text


# ---------------------------------------------------------------- the lock
HOLDER = """
import sys, time
from pathlib import Path
from frcnn_train import rundir
with rundir.claim(rundir.Target(Path(sys.argv[1])), overwrite=False):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_process_is_refused_and_a_stale_lock_taken_over(
    compose_tiny, outputs: Path, no_data, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = outputs / "tiny"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = snapshot(outputs)
        overrides = ["resume=auto", no_data[0]]
        with pytest.raises(
            RunDirError,
            match=rf"another process \(pid {holder.pid} on {socket.gethostname()}, "
            rf"since .*\) is writing {run_dir} \(lock file .*\.lock\); wait",
        ):
            run(compose_tiny(*overrides), overrides=overrides)
        assert snapshot(outputs) == before and not no_data[1].exists()
    finally:
        holder.kill()  # SIGKILL: no chance to release, the lock goes stale
        holder.wait()
    assert (run_dir / rundir.LOCK_NAME).exists()
    caplog.set_level(logging.INFO)
    overrides = ["resume=auto", ONE_STEP]
    run(compose_tiny(*overrides), overrides=overrides)
    taken = f"Took over the stale lock {run_dir / rundir.LOCK_NAME} of pid {holder.pid}"
    assert taken in caplog.text and taken in (run_dir / "train.log").read_text()
    assert not (run_dir / rundir.LOCK_NAME).exists(), "a finished run releases its lock"


def write_lock(run_dir: Path, **record: object) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / rundir.LOCK_NAME
    path.write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": rundir._process_start(os.getpid()),
                "since": "then",
                **record,
            }
        )
    )
    return path


def test_a_pid_reused_by_another_process_does_not_hold_the_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lock = write_lock(tmp_path / "run", started="1")  # this live pid, but a process started at another time
    with rundir.claim(rundir.Target(tmp_path / "run"), overwrite=False):
        assert json.loads(lock.read_text())["started"] == rundir._process_start(os.getpid())
    assert "Took over the stale lock" in caplog.text and not lock.exists()


def test_a_lock_from_another_host_is_not_guessed_at(tmp_path: Path) -> None:
    lock = write_lock(tmp_path / "run", host="elsewhere", pid=123)
    before = lock.read_bytes()
    with pytest.raises(RunDirError, match=r"locked by pid 123 on elsewhere.*delete the lock file if it is not running"):
        with rundir.claim(rundir.Target(tmp_path / "run"), overwrite=False):
            pass
    assert lock.read_bytes() == before


def test_only_global_rank_0_takes_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = write_lock(tmp_path / "run")  # held by this (live) process
    before = lock.read_bytes()
    monkeypatch.setenv("RANK", "1")
    with rundir.claim(rundir.Target(tmp_path / "run"), overwrite=False) as notes:
        assert notes == []
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RunDirError, match=rf"another process \(pid {os.getpid()}"):
        with rundir.claim(rundir.Target(tmp_path / "run"), overwrite=False):
            pass
    assert lock.read_bytes() == before


# ---------------------------------------------------------------- read-only
@contextlib.contextmanager
def read_only(path: Path, monkeypatch: pytest.MonkeyPatch, *, bind: bool = True) -> Iterator[bool]:
    """Make `path` (a directory or file) really read-only: chmod when not root; as root a read-only bind
    mount (the whole file system below `path`) or chattr +i (only the entries of `path` itself).

    Yields False when neither works here and the check is only made to see `path` as read-only.
    """
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield True
        finally:
            path.chmod(mode)
        return
    ways = [(["mount", "--bind", "-o", "ro", str(path), str(path)], ["umount", str(path)])] if bind else []
    for on, off in ways + [(["chattr", "+i", str(path)], ["chattr", "-i", str(path)])]:
        if shutil.which(on[0]) and subprocess.run(on, capture_output=True).returncode == 0:
            try:
                yield True
            finally:
                subprocess.run(off, check=True)
            return
    # No way to stop root writing here: only the check can be shown to come first.
    monkeypatch.setattr(rundir, "_unwritable", lambda p: "read-only file system" if p == path else None)
    yield False


REASON = r"\((read-only file system|permission denied|operation not permitted)\)"


@pytest.mark.parametrize("probe_only", [False, True], ids=["as_is", "access_check_fooled"])
def test_a_read_only_output_dir_refuses_a_new_run(
    compose_tiny, outputs: Path, no_data, probe_only: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = old_run(outputs / "other_run", "config.yaml")
    with read_only(outputs, monkeypatch) as really:
        if probe_only:  # os.access fooled (root, some file systems): creating the directory must still say it
            if not really:
                pytest.skip("no way to make a directory read-only for root here")
            monkeypatch.setattr(rundir, "_unwritable", lambda p: None)
        with pytest.raises(RunDirError) as refused:
            run(compose_tiny(no_data[0]))
    assert re.fullmatch(
        rf"cannot write the run directory {outputs / 'tiny'}: {outputs} is not writable {REASON}; "
        r"make it writable or set output_dir= to a writable directory",
        str(refused.value),
    ), refused
    assert snapshot(outputs) == before and not no_data[1].exists()


@pytest.mark.parametrize("probe_only", [False, True], ids=["as_is", "access_check_fooled"])
def test_a_read_only_run_dir_refuses_a_resume(
    compose_tiny, outputs: Path, no_data, probe_only: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before the checkpoint is read: this last.pth is not even a checkpoint."""
    run_dir = outputs / "tiny"
    before = old_run(run_dir, "config.yaml", "last.pth", "train.log")
    overrides = [f"resume={run_dir}", no_data[0]]
    with read_only(run_dir, monkeypatch) as really:
        if probe_only:
            if not really:
                pytest.skip("no way to make a directory read-only for root here")
            monkeypatch.setattr(rundir, "_unwritable", lambda p: None)
        with pytest.raises(RunDirError) as refused:
            run(compose_tiny(*overrides), overrides=overrides)
    assert re.fullmatch(
        rf"cannot resume in {run_dir}: {run_dir} is not writable {REASON} and a resume writes "
        r"there; make it writable, or copy the run directory to a writable place and resume "
        r"from the copy",
        str(refused.value),
    ), refused
    assert snapshot(outputs) == before and not no_data[1].exists()


def test_a_read_only_log_file_refuses_a_resume(
    compose_tiny, outputs: Path, no_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.log is appended to in place: a writable directory is not enough."""
    run_dir = outputs / "tiny"
    before = old_run(run_dir, "config.yaml", "last.pth", "train.log")
    overrides = [f"resume={run_dir}", no_data[0]]
    with read_only(run_dir / "train.log", monkeypatch):
        with pytest.raises(
            RunDirError,
            match=rf"^cannot resume in {run_dir}: {run_dir / 'train.log'} is not "
            rf"writable {REASON} and a resume writes there; make it writable",
        ):
            run(compose_tiny(*overrides), overrides=overrides)
    assert snapshot(outputs) == before and not no_data[1].exists()


def test_overwrite_in_a_read_only_output_dir_is_refused(
    compose_tiny, outputs: Path, no_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old run is renamed inside output_dir: its own directory being writable is not enough."""
    run_dir = outputs / "tiny"
    before = old_run(run_dir, "config.yaml", "last.pth")
    with read_only(outputs, monkeypatch, bind=False):  # chattr +i: tiny/ itself stays writable
        with pytest.raises(
            RunDirError,
            match=rf"^cannot write the run directory {run_dir}: {outputs} is not "
            rf"writable {REASON}; make it writable or set output_dir=",
        ):
            run(compose_tiny("overwrite=true", no_data[0]))
    assert snapshot(outputs) == before and not no_data[1].exists()


# ---------------------------------------------------------------- metrics.jsonl on resume
@pytest.fixture(scope="module")
def straight(tiny_runs) -> Path:
    """Two epochs never stopped: metrics.jsonl has the lines of steps 4 and 8; epoch_0001.pth is at step 4."""
    return tiny_runs("straight", "trainer.epochs=2")


def test_a_kill_between_evaluation_and_save_leaves_no_duplicate_line(
    compose_tiny, straight: Path, tmp_path: Path
) -> None:
    run_dir = shutil.copytree(straight, tmp_path / "killed")
    # The disk as a kill right after epoch 2's evaluation leaves it: its line written, last.pth still at step 4.
    shutil.copy(run_dir / "epoch_0001.pth", run_dir / "last.pth")
    (run_dir / "epoch_0002.pth").unlink()
    overrides = [f"resume={run_dir}"]
    run(compose_tiny(*overrides), overrides=overrides)
    assert (run_dir / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [4, 8]


def test_resuming_an_older_epoch_file_says_how_far_back_it_goes(
    compose_tiny, straight: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = shutil.copytree(straight, tmp_path / "back")
    overrides = [f"resume={run_dir / 'epoch_0001.pth'}"]
    run(compose_tiny(*overrides), overrides=overrides)
    notice = "Resuming from epoch_0001.pth goes back from step 8 (last.pth) to step 4: steps 5-8 are trained again"
    assert notice in caplog.text and notice in (run_dir / "train.log").read_text()
    assert (run_dir / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()


def test_trim_keeps_what_the_checkpoint_had_seen(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"epoch": 1, "step": 4}, {"epoch": 2, "step": 8}, {"epoch": 3, "step": 12}, {"note": "not ours"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"epoch": 4, "st')  # torn by a kill
    # A save at step 8 taken mid-epoch (epoch 1 still running) comes before epoch 2's evaluation.
    assert trim_metrics(path, 8, 1) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == [lines[0], lines[3]]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert trim_metrics(path, 8, 2) == 1  # the epoch-end save after epoch 2's evaluation
    assert [json.loads(line) for line in path.read_text().splitlines()] == [lines[0], lines[1], lines[3]]
    before = path.read_bytes()
    assert trim_metrics(path, 12, 3) == 0 and path.read_bytes() == before


def test_a_run_refused_later_leaves_no_empty_run_directory(compose_tiny, outputs: Path) -> None:
    """The lock makes the directory early; a run that fails before writing anything takes it away again."""
    with pytest.raises(DataError, match="/nonexistent/coco"):
        run(compose_tiny("data=coco", "data.root=/nonexistent/coco"))
    assert not outputs.exists()
