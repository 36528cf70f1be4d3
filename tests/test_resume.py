"""Resume is exact: a run stopped anywhere and resumed ends bitwise equal to one never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_same_training, python_path, threads_env
from frcnn_train import checkpoint
from frcnn_train.config import compose_config
from frcnn_train.errors import CheckpointError, ConfigError
from frcnn_train.launch import run

# Tiny shapes: 8 train images, batch 2 -> 4 steps per epoch; 2 epochs = 8 steps. Warmup runs
# into the second epoch, so stops at steps 3 and 4 fall inside it (the LR must not jump).
EPOCHS = ("trainer.epochs=2", "schedule.warmup_steps=6")


def final_state(run_dir: Path) -> dict:
    return checkpoint.load_checkpoint(run_dir / "last.pth")


@pytest.fixture(scope="module")
def references(shapes_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs never stopped, one per set of extra overrides, shared by the tests of this file."""
    from conftest import tiny_overrides

    cache: dict = {}
    outputs = tmp_path_factory.mktemp("references")

    def get(*extra: str) -> dict:
        if extra not in cache:
            cfg = compose_config(tiny_overrides(shapes_cache, outputs) + [*EPOCHS, f"run_name=ref{len(cache)}", *extra])
            summary = run(cfg)
            assert summary["completed"] and summary["global_step"] == 8
            cache[extra] = final_state(Path(summary["run_dir"]))
        return cache[extra]

    return get


@pytest.fixture
def reference(references, request) -> dict:
    """The uninterrupted run for the test's extra overrides (indirect parameter), default none."""
    return references(*getattr(request, "param", ()))


def _mutations() -> dict:
    """One change per part of the training state, each of which assert_same_training must see."""

    def first_param_state(c):
        return next(iter(c["optimizer"]["state"].values()))

    return {
        "model tensor": lambda c: c["model"][next(iter(c["model"]))].view(-1)[0].add_(1.0),
        "model key removed": lambda c: c["model"].pop(next(iter(c["model"]))),
        "optimizer state value": lambda c: first_param_state(c)["momentum_buffer"].view(-1)[0].add_(1.0),
        "optimizer state entry removed": lambda c: c["optimizer"]["state"].pop(next(iter(c["optimizer"]["state"]))),
        "param_group lr": lambda c: c["optimizer"]["param_groups"][-1].update(lr=1.5),
        "param_group removed": lambda c: c["optimizer"]["param_groups"].pop(),
        "scheduler": lambda c: c["scheduler"].update(last_epoch=c["scheduler"]["last_epoch"] + 1),
        "scaler": lambda c: c.update(scaler={"scale": 65536.0}),
        "step_in_epoch": lambda c: c["trainer"].update(step_in_epoch=c["trainer"]["step_in_epoch"] + 1),
        "best metric": lambda c: c["trainer"].update(best_metric=(c["trainer"]["best_metric"] or 0.0) + 1e-9),
        "python rng": lambda c: c["rng"]["python"]["state"].view(-1)[5].add_(1),
        "numpy rng": lambda c: c["rng"]["numpy"].update(pos=c["rng"]["numpy"]["pos"] + 1),
        "torch rng": lambda c: c["rng"]["torch"].view(-1)[10].add_(1),
        "cuda rng": lambda c: c["rng"]["cuda"].append(torch.zeros(16, dtype=torch.uint8)),
        "a rank's rng": lambda c: c["rng"]["ranks"][0]["torch"].view(-1)[10].add_(1),
        "data order": lambda c: c["rng"]["data"].update(consumed=c["rng"]["data"]["consumed"] + 1),
    }


@pytest.mark.parametrize("part", list(_mutations()))
def test_assert_same_training_sees_every_part_of_the_state(reference, part: str) -> None:
    import copy

    assert_same_training(reference, copy.deepcopy(reference))
    changed = copy.deepcopy(reference)
    _mutations()[part](changed)
    with pytest.raises(AssertionError):
        assert_same_training(reference, changed)
    with pytest.raises(AssertionError):
        assert_same_training(changed, reference)  # either side may be the shorter one


@pytest.mark.parametrize("stop_at", [3, 4])  # mid-epoch, and exactly at the epoch boundary
def test_max_steps_stop_and_resume_is_bitwise_exact(compose_tiny, reference, stop_at: int) -> None:
    stopped = run(compose_tiny(*EPOCHS, "run_name=stopped", f"trainer.max_steps={stop_at}"))
    assert not stopped["completed"] and stopped["global_step"] == stop_at
    mid = final_state(Path(stopped["run_dir"]))
    assert mid["trainer"]["step_in_epoch"] == stop_at % 4
    overrides = [f"resume={stopped['run_dir']}", "trainer.max_steps=null"]
    resumed = run(compose_tiny(*EPOCHS, "run_name=ignored", *overrides), overrides=overrides)
    assert resumed["completed"] and resumed["run_dir"] == stopped["run_dir"]
    final = final_state(Path(resumed["run_dir"]))
    assert_same_training(reference, final)
    lrs = [g["lr"] for g in mid["optimizer"]["param_groups"]]
    assert lrs[0] == pytest.approx(0.01 * (0.001 + 0.999 * stop_at / 6)), "stopped inside the warmup ramp"
    history = final["trainer"]["history"]
    assert len(history) == 1 and history[0]["global_step"] == stop_at
    assert history[0]["changes"] == [f"trainer.max_steps: {stop_at} -> None"]


@pytest.mark.parametrize(
    "reference", [("data.num_workers=2", "trainer.accumulate=2", "trainer.batch_size=1")], indirect=True
)
def test_resume_with_workers_and_accumulation_is_exact(compose_tiny, reference) -> None:
    extra = ("data.num_workers=2", "trainer.accumulate=2", "trainer.batch_size=1")
    stopped = run(compose_tiny(*EPOCHS, "run_name=stopped", "trainer.max_steps=5", *extra))
    assert not stopped["completed"] and stopped["global_step"] == 5, "the resume starts mid-epoch"
    assert final_state(Path(stopped["run_dir"]))["trainer"]["step_in_epoch"] == 1
    overrides = [f"resume={stopped['run_dir']}/last.pth", "trainer.max_steps=null"]
    run(compose_tiny(*EPOCHS, *extra, *overrides), overrides=overrides)
    assert_same_training(reference, final_state(Path(stopped["run_dir"])))


@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 0), (signal.SIGINT, 2)])
def test_signal_at_a_random_step_then_resume_is_exact(
    compose_tiny, reference, tmp_path: Path, signum: int, workers: int
) -> None:
    """The real CLI in a subprocess, stopped whenever its second step has logged: by SIGTERM to the
    process (a scheduler's `kill`), or by SIGINT to the whole process group, workers included (Ctrl-C)."""
    from conftest import tiny_overrides

    cache = Path(compose_tiny().data.cache_dir)
    args = (
        tiny_overrides(cache, tmp_path / "outputs")
        + list(EPOCHS)
        + ["run_name=signalled", f"data.num_workers={workers}"]
    )
    # Steps before the stop run in the subprocess, the rest here: bitwise needs this process's thread count there.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **threads_env()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "frcnn_train.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    output = []
    for line in proc.stdout:
        output.append(line)
        if "step 2/4" in line:
            os.killpg(proc.pid, signum) if signum == signal.SIGINT else proc.send_signal(signum)
            break
    output += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 128 + signum, "".join(output)  # stopped and resumable: README "Exit codes"
    text = "".join(output)
    name = signal.Signals(signum).name
    assert f"received {name}" in text and "resume=" in text and text.count(f"{name}: finishing") == 1, text
    run_dir = tmp_path / "outputs" / "signalled"
    stopped_at = final_state(run_dir)["trainer"]["global_step"]
    assert 2 <= stopped_at < 8
    overrides = [f"resume={run_dir}"]
    run(compose_tiny(*EPOCHS, *overrides), overrides=overrides)
    assert_same_training(reference, final_state(run_dir))


def test_changed_architecture_is_refused_before_any_work(compose_tiny) -> None:
    first = run(compose_tiny("trainer.max_steps=1", "run_name=a"))
    before = sorted(p.name for p in Path(first["run_dir"]).iterdir())
    overrides = [f"resume={first['run_dir']}", "model.box_head_dim=64"]
    with pytest.raises(ConfigError, match=r"model.box_head_dim \(checkpoint 32, requested 64\)"):
        run(compose_tiny(*overrides), overrides=overrides)
    assert sorted(p.name for p in Path(first["run_dir"]).iterdir()) == before


def test_tensorboard_curve_continues_without_overlap(compose_tiny) -> None:
    """Resuming from an earlier checkpoint purges the later events, so each step appears once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = run(compose_tiny(*EPOCHS, "run_name=tb"))
    run_dir = Path(done["run_dir"])
    overrides = [f"resume={run_dir / 'epoch_0001.pth'}"]
    run(compose_tiny(*EPOCHS, *overrides), overrides=overrides)
    time.sleep(0.1)
    events = EventAccumulator(str(run_dir), purge_orphaned_data=True)
    events.Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == list(range(1, 9))


def test_resume_auto_starts_fresh_then_continues(compose_tiny) -> None:
    overrides = ["resume=auto", "run_name=auto", "trainer.max_steps=2"]
    first = run(compose_tiny(*overrides), overrides=overrides)
    assert first["global_step"] == 2 and not final_state(Path(first["run_dir"]))["trainer"]["history"]
    overrides = ["resume=auto", "run_name=auto", "trainer.max_steps=3"]
    second = run(compose_tiny(*overrides), overrides=overrides)
    assert second["run_dir"] == first["run_dir"] and second["global_step"] == 3
    assert final_state(Path(second["run_dir"]))["trainer"]["history"][0]["global_step"] == 2


def test_resume_already_at_max_steps_trains_nothing_and_says_how_to_go_on(
    compose_tiny, caplog: pytest.LogCaptureFixture
) -> None:
    stopped = run(compose_tiny("trainer.max_steps=2", "run_name=at_max"))
    printed = [r.message for r in caplog.records if "Resume with:" in r.message]
    assert printed and printed[-1].endswith("/last.pth trainer.max_steps=null"), printed
    before = final_state(Path(stopped["run_dir"]))
    overrides = [f"resume={stopped['run_dir']}"]  # max_steps=2 comes back from the checkpoint
    again = run(compose_tiny(*overrides), overrides=overrides)
    assert again["global_step"] == 2 and "max_steps=2" in again["stop_reason"]
    assert any("Nothing to train" in r.message and "trainer.max_steps=null" in r.message for r in caplog.records)
    assert_same_training(before, final_state(Path(stopped["run_dir"])))


def test_more_epochs_under_cosine_is_announced_with_the_lr_it_moves_to(
    compose_tiny, caplog: pytest.LogCaptureFixture
) -> None:
    first = run(compose_tiny("schedule=cosine", "schedule.warmup_steps=0", "trainer.epochs=1", "run_name=cos"))
    overrides = [f"resume={first['run_dir']}", "trainer.epochs=2"]
    run(compose_tiny(*overrides, "trainer.max_steps=5"), overrides=[*overrides, "trainer.max_steps=5"])
    moved = [r.message for r in caplog.records if "The LR schedule changed" in r.message]
    assert len(moved) == 1 and "trainer.epochs: 1 -> 2" in moved[0] and "at step 5" in moved[0], moved


def test_resume_and_evaluate_do_not_need_the_backbone_weights_file(compose_tiny, tmp_path: Path) -> None:
    """The checkpoint holds every weight: moving to a machine without the ImageNet file must not matter."""
    from torchvision.models import resnet18

    from frcnn_train.evaluate import main as evaluate_main

    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(resnet18(weights=None).state_dict(), weights)
    first = run(compose_tiny(f"model.backbone.weights={weights}", "trainer.max_steps=2", "run_name=pretrained"))
    weights.unlink()
    overrides = [f"resume={first['run_dir']}", "trainer.max_steps=null"]
    resumed = run(compose_tiny(*overrides), overrides=overrides)
    assert resumed["completed"] and resumed["global_step"] == 4  # frozen BN kept: the fingerprint matched
    assert evaluate_main([str(Path(first["run_dir"]) / "last.pth")]) == 0


def test_damaged_last_names_the_newest_good_checkpoint_beside_it(compose_tiny) -> None:
    run_dir = Path(run(compose_tiny("run_name=damaged"))["run_dir"])
    last = run_dir / "last.pth"
    data = last.read_bytes()
    last.unlink()  # a new, damaged file: written in place it would damage its hard links best.pth and epoch_0001.pth
    last.write_bytes(data[:50_000])
    before = {p.name: p.stat().st_size for p in run_dir.iterdir()}
    overrides = [f"resume={run_dir}"]
    with pytest.raises(
        CheckpointError, match=r"truncated.*newest good one beside it is resume=.*(epoch_0001|best)\.pth\)$"
    ):
        run(compose_tiny(*overrides), overrides=overrides)
    assert {p.name: p.stat().st_size for p in run_dir.iterdir()} == before


@pytest.fixture(scope="module")
def coco_copy(shapes_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[str, ...]]:
    """The tiny shapes dataset as a COCO folder of our own (its files get damaged), and the overrides to use it."""
    import shutil

    from conftest import tiny_overrides
    from frcnn_train.data import build_datasets

    cfg = compose_config(tiny_overrides(shapes_cache, tmp_path_factory.mktemp("unused")))
    root = tmp_path_factory.mktemp("coco") / "coco"
    shutil.copytree(build_datasets(cfg.data, with_masks=False).train.images_dir.parent, root)
    return root, (
        "data=coco",
        f"data.root={root}",
        "data.train_images=train",
        "data.val_images=val",
        "data.train_ann=instances_train.json",
        "data.val_ann=instances_val.json",
    )


@pytest.mark.parametrize("split", ["train", "val"])
def test_bad_image_saves_first_and_a_resume_after_the_fix_is_exact(
    compose_tiny, references, coco_copy, split: str
) -> None:
    """A damaged image mid-run (a training batch at step 3, or the evaluation ending epoch 1): last.pth is
    saved before the error, and once the file is fixed the resumed run equals one never interrupted."""
    from frcnn_train.data import ResumableSampler
    from frcnn_train.errors import DataError

    root, data = coco_copy
    reference = references(*data)
    if split == "train":  # the first image of the third batch: two steps are done when it is read
        order = ResumableSampler(8, batch_size=2, seed=42, epoch=0).order()
        names = [p.name for p in sorted((root / "train").iterdir())]  # image ids follow the file names
        image, saved_at = root / "train" / names[order[4][0]], 2
    else:
        image, saved_at = sorted((root / "val").iterdir())[0], 4
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])
    try:
        with pytest.raises(DataError, match=f"image {image} .*truncated or corrupt"):
            run(compose_tiny(*EPOCHS, *data, f"run_name=bad_{split}"))
    finally:
        image.write_bytes(good)
    run_dir = Path(compose_tiny(f"run_name=bad_{split}").output_dir) / f"bad_{split}"
    saved = final_state(run_dir)
    assert saved["trainer"]["global_step"] == saved_at
    if split == "val":  # saved as "every step of epoch 1 done, not yet ended", so the resume evaluates it
        assert (saved["trainer"]["epoch"], saved["trainer"]["step_in_epoch"]) == (0, 4)
    overrides = [f"resume={run_dir}"]
    resumed = run(compose_tiny(*EPOCHS, *data, *overrides), overrides=overrides)
    assert resumed["completed"]
    assert_same_training(reference, final_state(run_dir))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]


@pytest.mark.slow
def test_random_stop_resume_chain_is_bitwise_exact(compose_tiny, shapes_cache: Path, tmp_path: Path) -> None:
    """At least 10 stops of the real CLI by SIGTERM (to the process) or SIGINT (to its group, as Ctrl-C),
    at random: after a training step, at an epoch's end (during evaluation and the saves), or while a
    checkpoint is being written; each resumed with resume=auto. The end equals a run never stopped."""
    import queue
    import random
    import threading

    from conftest import tiny_overrides

    epochs = ("trainer.epochs=6", "schedule.warmup_steps=6", "trainer.checkpoint_every_steps=1", "trainer.keep_last=2")
    reference = run(compose_tiny(*epochs, "run_name=straight"))
    assert reference["completed"] and reference["global_step"] == 24
    args = tiny_overrides(shapes_cache, tmp_path / "outputs") + list(epochs) + ["run_name=chain", "resume=auto"]
    run_dir, rng = tmp_path / "outputs" / "chain", random.Random(12)
    # The reference trained here: the chain's processes sum floats as this one does (bitwise needs it).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path(), **threads_env()}
    stops: list[tuple[str, str, int]] = []
    for _ in range(40):
        proc = subprocess.Popen(
            [sys.executable, "-m", "frcnn_train.train", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        lines: queue.Queue = queue.Queue()
        # Bound now: the names are the next attempt's by the time a late line would arrive.
        threading.Thread(
            target=lambda proc=proc, lines=lines: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
            daemon=True,
        ).start()
        when, signum = rng.choice(["step", "epoch_end", "saving"]), rng.choice([signal.SIGTERM, signal.SIGINT])
        output, sent, finished = [], False, False
        while True:
            try:
                line = lines.get(timeout=0.01)
            except queue.Empty:
                line = ""
            if line is None:
                break
            output.append(line)
            started = any(" step " in text and "/4" in text for text in output)
            last_step = "epoch 6 step 4/4" in line  # after it the handlers go: a signal would be too late
            due = (
                not sent
                and started
                and not last_step
                and (
                    (when == "step" and " step " in line)
                    or (when == "epoch_end" and "step 4/4" in line)
                    or (when == "saving" and any(p.name.startswith(".") and "tmp" in p.name for p in run_dir.iterdir()))
                )
            )
            if due:
                os.killpg(proc.pid, signum) if signum == signal.SIGINT else proc.send_signal(signum)
                sent = True
        proc.wait(timeout=300)
        text = "".join(output)
        assert "Traceback" not in text, text
        finished = "Finished 6 epochs" in text
        if sent and not finished:
            assert proc.returncode == 128 + signum, text  # stopped and resumable: README "Exit codes"
            step = checkpoint.load_checkpoint(run_dir / "last.pth")["trainer"]["global_step"]
            stops.append((when, signal.Signals(signum).name, step))
        if finished:
            break
    assert finished, stops
    assert len(stops) >= 10, f"only {len(stops)} stops landed before the run finished: {stops}"
    assert {s[1] for s in stops} == {"SIGTERM", "SIGINT"} and {s[0] for s in stops} == {"step", "epoch_end", "saving"}
    assert_same_training(final_state(Path(reference["run_dir"])), final_state(run_dir))
