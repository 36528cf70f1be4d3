"""The Checkpointer: last.pth, best/epoch links, keep_last rotation by epoch number."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from frcnn_train import checkpoint
from frcnn_train.checkpointer import Checkpointer, CheckpointWriteError
from frcnn_train.logs import RunLogger


def trainer_state(step: int, size: int = 10, epoch: int = 0) -> dict:
    return {
        "model": {"w": torch.full((size,), float(step))},
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "trainer": {
            "epoch": epoch,
            "global_step": step,
            "step_in_epoch": 0,
            "best_metric": None,
            "best_step": None,
            "history": [],
        },
        "rng": {},
    }


def make_checkpointer(run_dir: Path, keep_last: int = 3) -> Checkpointer:
    extras = {"config": {"run_name": "x"}, "architecture": {"fingerprint": None, "spec": {}}, "classes": ["a"]}
    return Checkpointer(run_dir, extras=extras, keep_last=keep_last, logger=RunLogger(run_dir, enabled=False))


def test_keep_last_rotates_by_epoch_number_and_only_epoch_files(tmp_path: Path) -> None:
    """Past epoch 9999 a name sort would put epoch_10000 first; other files are never this run's to delete."""
    others = ["epoch_best.pth", "epoch_0001_backup.pth", "epoch_1.pth", "notes.txt"]
    for name in others:
        (tmp_path / name).write_bytes(b"user file")
    ckpt = make_checkpointer(tmp_path, keep_last=2)
    for epoch in (9998, 9999, 10000, 10001):
        ckpt.save(trainer_state(epoch, epoch=epoch), epoch_end=epoch)
    ckpt.wait()
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("epoch_"))
    assert kept == sorted(
        ["epoch_10000.pth", "epoch_10001.pth", "epoch_best.pth", "epoch_0001_backup.pth", "epoch_1.pth"]
    )
    assert all((tmp_path / name).read_bytes() == b"user file" for name in others)
    assert checkpoint.load_checkpoint(tmp_path / "epoch_10001.pth")["trainer"]["global_step"] == 10001


def test_rotation_keeps_epoch_files_ahead_of_a_resume_from_an_older_epoch(tmp_path: Path) -> None:
    ckpt = make_checkpointer(tmp_path, keep_last=1)
    ckpt.save(trainer_state(5, epoch=5), epoch_end=5)
    ckpt.save(trainer_state(2, epoch=2), epoch_end=2)  # resumed from epoch 1: epoch 5 is not older than 2
    ckpt.wait()
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_0002.pth", "epoch_0005.pth"]


def test_a_save_deletes_only_temporaries_no_live_process_is_writing(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # a pid that has exited
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead.pid, live.pid):
            for name in ("last.pth", "best.pth"):
                (tmp_path / f".{name}.tmp-{pid}").write_bytes(b"partial")
        checkpoint.save_checkpoint(checkpoint.make_checkpoint(**trainer_state(1)), tmp_path / "last.pth")
        assert sorted(p.name for p in tmp_path.glob(".*")) == sorted(
            [f".best.pth.tmp-{dead.pid}", f".best.pth.tmp-{live.pid}", f".last.pth.tmp-{live.pid}"]
        )
        make_checkpointer(tmp_path)  # a run starting here cleans every dead writer's temporaries
        assert sorted(p.name for p in tmp_path.glob(".*")) == sorted(
            [f".best.pth.tmp-{live.pid}", f".last.pth.tmp-{live.pid}"]
        )
    finally:
        live.kill()
        live.wait()


def slow_writes(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every background write first sleeps: the training thread's next moves happen during it."""
    real = checkpoint.save_checkpoint

    def slow(ckpt: dict, path: Path) -> None:
        time.sleep(seconds)
        real(ckpt, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", slow)


def test_snapshot_is_a_deep_copy_taken_before_the_next_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_writes(monkeypatch, 0.5)
    ckpt = make_checkpointer(tmp_path)
    state = trainer_state(1)
    lrs = [0.1, 0.2]
    state["scheduler"] = {"_last_lr": lrs}  # a scheduler's state_dict shares its live lists
    state["optimizer"] = {"state": {0: {"momentum_buffer": torch.ones(3)}}}
    ckpt.save(state)
    state["model"]["w"].add_(100)  # what the next optimizer step does, in place, while the write runs
    state["optimizer"]["state"][0]["momentum_buffer"].mul_(7)
    lrs[0] = 9.0
    ckpt.wait()
    saved = checkpoint.load_checkpoint(tmp_path / "last.pth")
    assert torch.equal(saved["model"]["w"], torch.full((10,), 1.0))
    assert torch.equal(saved["optimizer"]["state"][0]["momentum_buffer"], torch.ones(3))
    assert saved["scheduler"]["_last_lr"] == [0.1, 0.2]


def test_save_blocks_only_for_the_copy_and_waits_only_when_two_writes_are_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two buffer sets: a save right after another (an epoch end after a cadence save) does not wait for
    the first write; a third while both are still being written waits for the oldest, and says so."""
    slow_writes(monkeypatch, 1.0)
    caplog.set_level("INFO", logger="frcnn_train")
    ckpt = make_checkpointer(tmp_path)
    started = time.perf_counter()
    ckpt.save(trainer_state(1))
    ckpt.save(trainer_state(2))
    assert time.perf_counter() - started < 0.5 and ckpt.busy  # both writes go on in the background
    ckpt.save(trainer_state(3))  # both buffer sets are being read: this one waits for the write of step 1
    assert 1.0 <= time.perf_counter() - started
    assert checkpoint.load_checkpoint(tmp_path / "last.pth")["trainer"]["global_step"] == 1
    ckpt.wait()
    assert checkpoint.load_checkpoint(tmp_path / "last.pth")["trainer"]["global_step"] == 3
    assert not list(tmp_path.glob(".*tmp*"))
    saves = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Saved")]
    assert [re.search(r"at step (\d)", line).group(1) for line in saves] == ["1", "2", "3"], "written in order"
    assert ["waiting for the write of step" in line for line in saves] == [False, False, True], saves
    assert re.search(r"step 3: blocked training (\d+) ms \(of which (\d+) ms waiting for the write of step 1", saves[2])


def test_best_and_epoch_files_are_hard_links_of_the_file_just_written(tmp_path: Path) -> None:
    ckpt = make_checkpointer(tmp_path)
    ckpt.save(trainer_state(4, epoch=1), epoch_end=1, best=True)
    ckpt.wait()
    last, best, epoch = (tmp_path / n for n in ("last.pth", "best.pth", "epoch_0001.pth"))
    assert os.path.samefile(last, best) and os.path.samefile(last, epoch) and last.stat().st_nlink == 3
    ckpt.save(trainer_state(8, epoch=2))  # a new last.pth is a new file: the links keep step 4
    ckpt.wait()
    assert not os.path.samefile(last, best) and best.stat().st_nlink == 2
    assert checkpoint.load_checkpoint(best)["trainer"]["global_step"] == 4


def test_links_fall_back_to_a_copy_where_unsupported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: Path, dst: Path) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    ckpt = make_checkpointer(tmp_path)
    ckpt.save(trainer_state(4, epoch=1), epoch_end=1, best=True)
    ckpt.wait()
    assert not os.path.samefile(tmp_path / "last.pth", tmp_path / "best.pth")
    assert (tmp_path / "best.pth").read_bytes() == (tmp_path / "last.pth").read_bytes()
    assert (tmp_path / "epoch_0001.pth").read_bytes() == (tmp_path / "last.pth").read_bytes()


def failing_open(monkeypatch: pytest.MonkeyPatch, code: int, *, after_bytes: int | None = None) -> None:
    """checkpoint's open() of a temporary file fails with `code`: at once, or once `after_bytes` are written."""
    real_open = open

    class Filling:
        def __init__(self, f) -> None:
            self.f, self.written = f, 0

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > after_bytes:
                raise OSError(code, os.strerror(code))
            return self.f.write(data)

        def __getattr__(self, name: str):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        if ".tmp-" not in str(path):
            return real_open(path, mode, *args, **kwargs)
        if after_bytes is None:
            raise OSError(code, os.strerror(code), str(path))
        return Filling(real_open(path, mode, *args, **kwargs))

    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)


def test_full_disk_is_one_sentence_and_the_previous_last_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = make_checkpointer(tmp_path)
    ckpt.save(trainer_state(1, size=1_000_000))
    ckpt.wait()
    failing_open(monkeypatch, errno.ENOSPC, after_bytes=100_000)  # torch itself would say "unexpected pos"
    ckpt.save(trainer_state(2, size=1_000_000))
    with pytest.raises(CheckpointWriteError) as info:
        ckpt.wait()
    message = str(info.value)
    assert message == (
        f"no space left on device while writing {tmp_path / 'last.pth'} (about 4 MB needed); "
        f"the previous last.pth (step 1) is intact; free space and resume with resume={tmp_path}"
    )
    assert checkpoint.load_checkpoint(tmp_path / "last.pth")["trainer"]["global_step"] == 1
    assert not list(tmp_path.glob(".*tmp*"))
    monkeypatch.undo()
    ckpt.save(trainer_state(3))  # reported once; the next save works again
    ckpt.wait()


@pytest.mark.parametrize(
    "code, reason", [(errno.EROFS, "the file system is read-only"), (errno.EACCES, "permission denied")]
)
def test_read_only_run_dir_mid_run_is_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str
) -> None:
    """chmod does not stop root (the tests' user), so open() fails as it would on a read-only mount."""
    ckpt = make_checkpointer(tmp_path)
    ckpt.save(trainer_state(1))
    ckpt.wait()
    failing_open(monkeypatch, code)
    ckpt.save(trainer_state(2))
    time.sleep(0.01)
    while ckpt.busy:
        time.sleep(0.01)
    with pytest.raises(
        CheckpointWriteError,
        match=(
            rf"^cannot write {tmp_path / 'last.pth'}: {reason}; the previous last.pth \(step 1\) is intact; "
            rf"make {tmp_path} writable and resume with resume={tmp_path}$"
        ),
    ):
        ckpt.check()  # what the training loop calls after each step
    assert checkpoint.load_checkpoint(tmp_path / "last.pth")["trainer"]["global_step"] == 1


def test_failed_link_names_the_link_and_the_new_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(src: Path, dst: Path) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "link", refused)
    ckpt = make_checkpointer(tmp_path)
    ckpt.save(trainer_state(2, epoch=1), best=True)
    with pytest.raises(CheckpointWriteError, match=r"^cannot write .*best.pth: permission denied; last.pth \(step 2\)"):
        ckpt.wait()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_is_copied_into_reused_pinned_buffers_before_the_next_step(tmp_path: Path) -> None:
    ckpt = make_checkpointer(tmp_path)
    for step in (1, 2):
        state = trainer_state(step, size=5_000_000)
        state["model"]["w"] = state["model"]["w"].cuda()
        ckpt.save(state)
        state["model"]["w"].add_(100)  # the next optimizer step, queued on the same stream as the copy
        ckpt.wait()
        saved = checkpoint.load_checkpoint(tmp_path / "last.pth")["model"]["w"]
        assert torch.equal(saved, torch.full((5_000_000,), float(step)))
        buffer = ckpt._buffers[0][("model", "w")]
        assert buffer.is_pinned()
        if step == 1:
            first = buffer.data_ptr()
    assert buffer.data_ptr() == first, "the pinned buffer is reused between saves"


# ---------------------------------------------------------------- kill -9
# A child process saving through a background Checkpointer. KILL_AT names a call of the save
# sequence at which the child SIGKILLs itself, just before the call runs:
#   replace:1  last.pth fully written to its temporary file, not yet renamed
#   link:1     last.pth renamed; best.pth not linked
#   replace:2  best.pth's temporary link made, not yet renamed
#   link:2     best.pth done; epoch file not linked
#   replace:3  the epoch file's temporary link made, not yet renamed
CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_checkpointer import make_checkpointer, trainer_state
    run_dir, size, kill_at = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    calls = {{"replace": 0, "link": 0}}

    def killing(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            if kill_at == f"{{name}}:{{calls[name]}}":
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call

    ckpt = make_checkpointer(run_dir, keep_last=1)
    step = 0
    while True:
        step += 1
        if step == 2:  # the first save is complete; arm the kill for the second
            os.replace, os.link = killing("replace", os.replace), killing("link", os.link)
        state = trainer_state(step, size=size, epoch=step)
        state["trainer"].update(best_metric=float(step), best_step=step, best_metric_name="bbox/AP")
        ckpt.save(state, epoch_end=step, best=True)
        ckpt.wait()
        print(step, flush=True)
""").format(tests=str(Path(__file__).parent))


def assert_consistent_after_kill(run_dir: Path) -> dict:
    """last.pth loads and is whole; a restart cleans the dead writer's temporaries and repairs the links."""
    last = run_dir / "last.pth"
    ckpt = checkpoint.load_checkpoint(last)
    counters = ckpt["trainer"]
    step = counters["global_step"]
    assert torch.equal(ckpt["model"]["w"], torch.full_like(ckpt["model"]["w"], float(step))), "torn write"
    restarted = make_checkpointer(run_dir, keep_last=1)  # as launch builds it on resume
    restarted.repair_links(last, counters)
    assert not list(run_dir.glob(".*tmp*")), "temporaries of the killed process are cleaned at start"
    assert os.path.samefile(run_dir / "best.pth", last), f"best.pth is the recorded best (step {step})"
    assert os.path.samefile(run_dir / f"epoch_{step:04d}.pth", last)
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == [f"epoch_{step:04d}.pth"], "keep_last=1"
    return counters


@pytest.mark.parametrize(
    "kill_at, step_left", [("replace:1", 1), ("link:1", 2), ("replace:2", 2), ("link:2", 2), ("replace:3", 2)]
)
def test_kill_at_each_instant_of_a_save_leaves_a_consistent_run(tmp_path: Path, kill_at: str, step_left: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), "10", kill_at], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["1"]  # the second save was cut
    if kill_at.startswith("replace"):  # killed between making a temporary file and renaming it: it is left
        assert len(list(tmp_path.glob(".*.tmp-*"))) == 1
    assert assert_consistent_after_kill(tmp_path)["global_step"] == step_left


def kill_during_writes(run_dir: Path, kills: int) -> None:
    """SIGKILL a child that saves 40 MB checkpoints in a loop, each time while a write is in progress.

    Proof that a kill landed during a write: the writer's temporary file still exists after the
    child is dead (a finished write renames it, a failed one deletes it).
    """
    landed = attempts = 0
    while landed < kills:
        attempts += 1
        assert attempts <= 2 * kills, f"only {landed} of {attempts} kills landed during a write"
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(run_dir), "10000000", "never"], stdout=subprocess.PIPE, text=True
        )
        tmp = run_dir / f".last.pth.tmp-{proc.pid}"
        if landed == 0:
            assert proc.stdout.readline().strip() == "1"  # a first complete last.pth to protect
        deadline = time.monotonic() + 60
        while not tmp.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the child never started a write"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if tmp.exists():
            landed += 1
        assert_consistent_after_kill(run_dir)


def test_kill_9_during_background_writes_leaves_last_loadable(tmp_path: Path) -> None:
    kill_during_writes(tmp_path, kills=3)


@pytest.mark.slow
def test_kill_9_during_background_writes_30_times(tmp_path: Path) -> None:
    kill_during_writes(tmp_path, kills=30)


# ---------------------------------------------------------------- in training
FULL_DISK_CLI = textwrap.dedent("""
    import errno, os, runpy, sys
    from frcnn_train import checkpoint
    real_open, opened = open, []

    class Full:  # the disk fills up while the second last.pth is written
        def __init__(self, f):
            self.f = f
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()

    def full_after_one_save(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if ".last.pth.tmp-" in str(path):
            opened.append(path)
            if len(opened) > 1:
                return Full(f)
        return f

    checkpoint.open = full_after_one_save
    sys.argv = ["frcnn-train", *sys.argv[1:]]
    runpy.run_module("frcnn_train.train", run_name="__main__")
""")


def test_full_disk_in_training_ends_in_one_sentence_with_last_intact(compose_tiny, tmp_path: Path) -> None:
    from conftest import tiny_overrides

    cache = Path(compose_tiny().data.cache_dir)
    args = tiny_overrides(cache, tmp_path / "outputs") + [
        "run_name=full",
        "trainer.checkpoint_every_steps=1",
        "trainer.max_steps=4",
    ]
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_CLI, *args], capture_output=True, text=True, timeout=300)
    run_dir = tmp_path / "outputs" / "full"
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    last_line = proc.stderr.strip().splitlines()[-1]
    needed = re.fullmatch(
        rf"error: no space left on device while writing {re.escape(str(run_dir / 'last.pth'))} \(about (\d+) MB "
        rf"needed\); the previous last.pth \(step 1\) is intact; free space and resume with "
        rf"resume={re.escape(str(run_dir))}",
        last_line,
    )
    assert needed, last_line
    assert "step 2/4" in proc.stdout and "step 3/4" not in proc.stdout, "raised after the step following the save"
    assert int(needed.group(1)) == pytest.approx((run_dir / "last.pth").stat().st_size / 2**20, rel=0.05)
    assert checkpoint.load_checkpoint(run_dir / "last.pth")["trainer"]["global_step"] == 1
    assert not list(run_dir.glob(".*tmp*"))


def test_training_waits_for_the_last_write_and_logs_each_save(compose_tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from frcnn_train.launch import run

    slow_writes(monkeypatch, 1.0)
    summary = run(compose_tiny("trainer.checkpoint_every_steps=2", "trainer.max_steps=3", "run_name=waits"))
    run_dir = Path(summary["run_dir"])
    assert not [t for t in threading.enumerate() if t.name == "checkpoint-writer"], "fit returned before the write"
    assert checkpoint.load_checkpoint(run_dir / "last.pth")["trainer"]["global_step"] == 3
    log_lines = [line for line in (run_dir / "train.log").read_text().splitlines() if "Saved last.pth" in line]
    assert [
        re.search(r"at step (\d+): blocked training \d+ ms, written in [\d.]+ s", line).group(1) for line in log_lines
    ] == ["2", "3"]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("checkpoint/blocking_ms")] == [2, 3]
    assert [e.step for e in events.Scalars("checkpoint/write_s")] == [2, 3]
    assert all(e.value >= 1.0 for e in events.Scalars("checkpoint/write_s"))


def test_resume_repairs_a_stale_best(compose_tiny) -> None:
    """As after a kill between last.pth's rename and best.pth's link: best.pth holds an older state."""
    from frcnn_train.launch import run

    run_dir = Path(run(compose_tiny("run_name=stale", "trainer.keep_last=1"))["run_dir"])
    last, best = run_dir / "last.pth", run_dir / "best.pth"
    assert os.path.samefile(last, best)
    older = checkpoint.load_checkpoint(last)
    older["trainer"].update(global_step=2, best_metric=0.0)
    best.unlink()
    torch.save(older, best)
    (run_dir / "epoch_0001.pth").unlink()
    overrides = [f"resume={run_dir}"]  # trainer.epochs=1 reached: nothing to train, only the repair
    run(compose_tiny(*overrides), overrides=overrides)
    assert os.path.samefile(last, best) and os.path.samefile(last, run_dir / "epoch_0001.pth")
