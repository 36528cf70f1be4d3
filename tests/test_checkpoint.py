"""Checkpoint files: atomic writes, damaged files, migration, resume resolution."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from frcnn_train import checkpoint
from frcnn_train.errors import CheckpointError


def fake_checkpoint(step: int = 0, size: int = 10) -> dict:
    return checkpoint.make_checkpoint(
        config={"run_name": "x"},
        architecture={"fingerprint": "abc", "spec": {}},
        classes=["a"],
        model={"w": torch.full((size,), float(step))},
        optimizer={},
        scheduler={},
        scaler={},
        trainer={"epoch": 0, "global_step": step, "step_in_epoch": step, "best_metric": None, "history": []},
        rng={},
    )


def test_roundtrip_loads_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "last.pth"
    checkpoint.save_checkpoint(fake_checkpoint(step=3), path)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain containers only
    assert raw["format"] == checkpoint.FORMAT and raw["format_version"] == checkpoint.FORMAT_VERSION
    assert set(raw["versions"]) == {"frcnn_train", "torch", "torchvision", "python"}
    assert checkpoint.load_checkpoint(path)["trainer"]["global_step"] == 3
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"


def test_failed_write_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pth"
    checkpoint.save_checkpoint(fake_checkpoint(step=1), path)

    class Unsaveable:  # torch.save raises on it halfway through the payload
        def __reduce__(self):
            raise RuntimeError("disk full")

    bad = fake_checkpoint(step=2)
    bad["trainer"]["history"] = [Unsaveable()]
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save_checkpoint(bad, path)
    assert checkpoint.load_checkpoint(path)["trainer"]["global_step"] == 1
    assert not list(tmp_path.glob(".*tmp*"))


def test_kill_9_during_save_leaves_last_loadable(tmp_path: Path) -> None:
    """SIGKILL a process that rewrites a 40 MB last.pth in a loop; what is left always loads."""
    path = tmp_path / "last.pth"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import fake_checkpoint
        from frcnn_train import checkpoint
        step = 0
        while True:
            checkpoint.save_checkpoint(fake_checkpoint(step=step, size=10_000_000), {str(path)!r})
            step += 1
            print(step, flush=True)
    """)
    for delay in (0.05, 0.3, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        if not path.exists():
            proc.stdout.readline()  # the first save finished
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = checkpoint.load_checkpoint(path)
        assert ckpt["model"]["w"].numel() == 10_000_000
    # The killed writer's temporary file is cleaned up by the next save.
    checkpoint.save_checkpoint(fake_checkpoint(step=99), path)
    assert not list(tmp_path.glob(".*tmp*"))


def test_truncated_file_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "last.pth"
    checkpoint.save_checkpoint(fake_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "truncated" in message and "\n" not in message


def test_garbage_and_foreign_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load_checkpoint(garbage)
    foreign = tmp_path / "state_dict.pth"
    torch.save({"conv.weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="init_from="):
        checkpoint.load_checkpoint(foreign)


def test_pickled_objects_are_refused_without_running_them(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"format": checkpoint.FORMAT, "payload": Path("/")}, path)  # needs full unpickling
    with pytest.raises(CheckpointError, match="init.trust=true"):
        checkpoint.load_checkpoint(path)


class _RunsACommand:
    """Pickles as a call to os.system, as a malicious file would (the command only touches a marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("for_resume", [False, True])
def test_a_file_whose_pickle_calls_a_function_is_called_code(tmp_path: Path, writer: str, for_resume: bool) -> None:
    """Against the torch installed, whatever its wording (2.14: "unsupported GLOBAL posix.system whose
    module posix is blocked"; earlier: "Unsupported global: GLOBAL ..."), and never executed."""
    import pickle

    marker, path = tmp_path / "it_ran", tmp_path / "evil.pth"
    payload = {"model": {"w": torch.zeros(2)}, "extra": _RunsACommand(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:  # protocol 4+: the safe loader cannot even parse it
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(CheckpointError) as info:
        checkpoint.read_file(path, for_resume=for_resume)
    message = str(info.value)
    assert message.startswith(str(path)) and "code that would run on this machine" in message, message
    if writer == "torch.save":
        assert f"calls {os.system.__module__}.system" in message, message
    assert "init.trust=true loads it and runs that code" in message and "\n" not in message
    assert ("use init_from=" in message) == for_resume
    assert not marker.exists()


def test_missing_path_lists_existing_checkpoints(tmp_path: Path) -> None:
    checkpoint.save_checkpoint(fake_checkpoint(), tmp_path / "epoch_0001.pth")
    with pytest.raises(CheckpointError, match="epoch_0001.pth"):
        checkpoint.load_checkpoint(tmp_path / "lsat.pth")
    with pytest.raises(CheckpointError, match="epoch_0001.pth"):
        checkpoint.resolve_resume(str(tmp_path), tmp_path)  # a run dir without last.pth


def test_migration_from_v0_layout(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    torch.save(
        {
            "format": checkpoint.FORMAT,
            "format_version": 0,
            "config": {},
            "state_dict": {"w": torch.ones(1)},
            "optim": {},
            "epoch": 4,
            "step": 40,
        },
        path,
    )
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt["format_version"] == 1
    assert ckpt["trainer"]["epoch"] == 4 and ckpt["trainer"]["global_step"] == 40
    assert torch.equal(ckpt["model"]["w"], torch.ones(1))


def test_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.pth"
    ckpt = fake_checkpoint()
    ckpt["format_version"] = checkpoint.FORMAT_VERSION + 1
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="upgrade frcnn_train"):
        checkpoint.load_checkpoint(path)


def test_resume_auto(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert checkpoint.resolve_resume("auto", run_dir) == (None, [])  # no directory: fresh start
    checkpoint.save_checkpoint(fake_checkpoint(step=1), run_dir / "epoch_0001.pth")
    assert checkpoint.resolve_resume("auto", run_dir)[0] == run_dir / "epoch_0001.pth"
    time.sleep(0.01)
    (run_dir / "last.pth").write_bytes(b"half a file")  # the newest, corrupt
    found, warnings = checkpoint.resolve_resume("auto", run_dir)
    assert found == run_dir / "epoch_0001.pth"
    assert len(warnings) == 1 and "last.pth" in warnings[0]


def test_strip_wrapper_prefixes() -> None:
    state = {"module._orig_mod.backbone.w": 1, "_orig_mod.rpn.b": 2, "roi_heads.module.x": 3, "submodule.y": 4}
    assert checkpoint.strip_wrapper_prefixes(state) == {"backbone.w": 1, "rpn.b": 2, "roi_heads.x": 3, "submodule.y": 4}


def test_resume_auto_prefers_last_over_newer_copies(tmp_path: Path) -> None:
    checkpoint.save_checkpoint(fake_checkpoint(step=4), tmp_path / "last.pth")
    time.sleep(0.01)
    checkpoint.copy_checkpoint(tmp_path / "last.pth", tmp_path / "epoch_0001.pth")  # made just after last.pth
    assert checkpoint.resolve_resume("auto", tmp_path)[0] == tmp_path / "last.pth"
