"""End to end: train + evaluate on tiny shapes, the run directory, and failures a user causes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frcnn_train import checkpoint
from frcnn_train.errors import CheckpointError
from frcnn_train.evaluation import coco_metrics
from frcnn_train.launch import run
from frcnn_train.progress import duration as _duration
from frcnn_train.trainer import TrainingError


def test_mask_rcnn_trains_evaluates_and_fills_the_run_directory(compose_tiny) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run(compose_tiny("model=mask_rcnn", "trainer.keep_last=1", "trainer.epochs=2"))
    run_dir = Path(summary["run_dir"])
    assert summary["completed"]
    assert {"bbox/AP50", "segm/AP50", "segm/APl"} <= set(summary["metrics"])
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "last.pth", "best.pth", "epoch_0002.pth", "metrics.jsonl", "train.log"} <= names
    assert "epoch_0001.pth" not in names, "trainer.keep_last=1 keeps only the newest epoch file"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and "segm/AP" in lines[0]
    train_log = (run_dir / "train.log").read_text()
    assert "Validation after epoch 2" in train_log and "epoch 2 step 1/" in train_log and "ETA " in train_log
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {
        "train/loss_mask",
        "train/loss_classifier",
        "lr/default",
        "val/segm/AP",
        "train/images_per_s",
        "time/epoch_s",
    } <= set(tags["scalars"])
    assert "val/predictions/0" in tags["images"]
    ckpt = checkpoint.load_checkpoint(run_dir / "last.pth")
    assert ckpt["classes"] == ["circle", "square", "triangle", "star", "ellipse"]
    assert ckpt["config"]["model"]["num_classes"] == 5
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


def test_ground_truth_as_predictions_scores_ap_one(compose_tiny) -> None:
    from frcnn_train.data import build_datasets

    val = build_datasets(compose_tiny().data, with_masks=True).val
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
            "segmentation": val.coco.annToRLE(a),
        }
        for a in val.coco.dataset["annotations"]
    ]
    before = [dict(r) for r in results]
    assert coco_metrics(val.coco, results, "bbox")["AP"] == pytest.approx(1.0)
    assert coco_metrics(val.coco, results, "segm")["AP"] == pytest.approx(1.0)
    assert results == before, "pycocotools must not add keys to the caller's results"
    assert coco_metrics(val.coco, [], "bbox")["AP"] == 0.0


def test_mid_epoch_checkpoint_cadence(compose_tiny) -> None:
    summary = run(compose_tiny("trainer.checkpoint_every_steps=3", "trainer.max_steps=3", "trainer.keep_last=0"))
    ckpt = checkpoint.load_checkpoint(Path(summary["run_dir"]) / "last.pth")
    assert ckpt["trainer"]["global_step"] == 3 and ckpt["trainer"]["step_in_epoch"] == 3
    assert not list(Path(summary["run_dir"]).glob("epoch_*.pth"))


def test_non_finite_loss_names_the_step_and_keeps_the_checkpoint(compose_tiny) -> None:
    first = run(compose_tiny("trainer.max_steps=1"))
    last = Path(first["run_dir"]) / "last.pth"
    before = last.read_bytes()
    ckpt = torch.load(last, weights_only=True)  # poison the weights so the next step's loss is not finite
    ckpt["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    ckpt["architecture"]["fingerprint"] = None
    poisoned = last.with_name("poisoned.pth")
    torch.save(ckpt, poisoned)
    overrides = [f"resume={poisoned}", "trainer.max_steps=null"]
    with pytest.raises(TrainingError, match=r"non-finite at step 2 \(epoch 1: loss_classifier=nan"):
        run(compose_tiny(*overrides), overrides=overrides)
    assert last.read_bytes() == before


def test_changed_code_is_caught_by_the_fingerprint(compose_tiny) -> None:
    first = run(compose_tiny("trainer.max_steps=1"))
    last = Path(first["run_dir"]) / "last.pth"
    ckpt = torch.load(last, weights_only=True)  # as if a newer version had renamed a module
    ckpt["model"]["roi_heads.box_head.fc6_renamed.weight"] = ckpt["model"].pop("roi_heads.box_head.fc6.weight")
    ckpt["architecture"]["fingerprint"] = "0" * 64
    torch.save(ckpt, last)
    overrides = [f"resume={last}"]
    with pytest.raises(CheckpointError, match=r"does not match.*roi_heads.box_head"):
        run(compose_tiny(*overrides), overrides=overrides)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data=coco data.root=/nonexistent/coco", "/nonexistent/coco"),
        ("resume=/nonexistent/run/last.pth", "/nonexistent/run/last.pth does not exist"),
        ("device=cuda:7", "use device=cpu"),
        # Weight files are checked before the data is generated (tiny data, should that change).
        (
            "init_from=/nonexistent/w.pth data.shapes.num_train=2 data.shapes.num_val=1",
            "init_from=/nonexistent/w.pth does not exist",
        ),
        (
            "model.backbone.weights=/nonexistent/r18.pth data.shapes.num_train=2 data.shapes.num_val=1",
            "model.backbone.weights=/nonexistent/r18.pth does not exist",
        ),
    ],
)
def test_cli_errors_are_one_sentence(override: str, expected: str, tmp_path: Path) -> None:
    if "cuda" in override and torch.cuda.is_available():
        pytest.skip("CUDA present")
    proc = subprocess.run(
        [sys.executable, "-m", "frcnn_train.train", *override.split(), f"output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1 and error_lines[0].startswith("error: ") and expected in error_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_amp_on_cpu_warns_once_and_trains_in_fp32(compose_tiny, caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: AMP would apply")
    summary = run(compose_tiny("trainer.amp=true", "trainer.max_steps=1"))
    assert summary["global_step"] == 1
    assert sum("applies to CUDA only" in r.message for r in caplog.records) == 1
    assert checkpoint.load_checkpoint(Path(summary["run_dir"]) / "last.pth")["scaler"] == {}


def test_eta_reads_like_a_clock() -> None:
    assert [_duration(s) for s in (0.4, 42, 425, 7_980)] == ["0s", "42s", "7m05s", "2h13m"]


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_one_save_per_step_where_the_cadence_meets_an_epoch_end(compose_tiny, caplog) -> None:
    """The cadence save of an epoch's last step is left to the epoch end's save, which links every name."""
    caplog.set_level("INFO", logger="frcnn_train")
    run(compose_tiny("trainer.epochs=2", "trainer.checkpoint_every_steps=2"))
    saves = [m for m in _messages(caplog) if m.startswith("Saved ")]
    steps = [int(m.split(" at step ")[1].split(":")[0]) for m in saves]
    assert steps == [2, 4, 6, 8], saves
    assert "epoch_0001.pth" in saves[1] and "epoch_0002.pth" in saves[3]


def test_one_numbering_of_epochs_everywhere(compose_tiny, caplog, capsys) -> None:
    """Epochs count from 1 as the progress line does; the closing table says when it was computed."""
    from frcnn_train import inspect

    caplog.set_level("INFO", logger="frcnn_train")
    # max_steps lands on the end of epoch 1 of 2; the last evaluation was epoch 1's.
    stopped = run(compose_tiny("trainer.epochs=2", "trainer.max_steps=4", "run_name=numbers"))
    messages = _messages(caplog)
    assert any(m.startswith("Stopped at step 4 (the end of epoch 1) (trainer.max_steps=4 reached)") for m in messages)
    assert any(m.startswith("Validation after epoch 1 (step 4):") for m in messages)
    assert any(m.startswith("Validation at step 4 (the end of epoch 1):") for m in messages)
    caplog.clear()
    overrides = [f"resume={stopped['run_dir']}", "trainer.max_steps=7"]
    run(compose_tiny("trainer.epochs=2", *overrides), overrides=overrides)
    messages = _messages(caplog)
    assert any(" at step 4 (the end of epoch 1) with trainer.max_steps: 4 -> 7." in m for m in messages), messages
    assert any(m.startswith("Stopped at step 7 (step 3 of 4 in epoch 2)") for m in messages)
    # The closing table is still epoch 1's: labelled so, not with the epoch in progress.
    assert any(m.startswith("Validation at step 4 (the end of epoch 1):") for m in messages)
    caplog.clear()
    overrides = [f"resume={stopped['run_dir']}", "trainer.max_steps=null"]
    run(compose_tiny("trainer.epochs=2", *overrides), overrides=overrides)
    assert any(" at step 7 (step 3 of 4 in epoch 2) with " in m for m in _messages(caplog))
    assert inspect.main([str(Path(stopped["run_dir"]) / "epoch_0001.pth")]) == 0
    assert "step 4 (the end of epoch 1)" in capsys.readouterr().out


def test_images_per_second_with_one_step_per_epoch(compose_tiny, caplog) -> None:
    caplog.set_level("INFO", logger="frcnn_train")
    run(compose_tiny("data.shapes.num_train=2", "trainer.epochs=2", "trainer.eval_every=0"))
    rates = [float(m.split("  ")[-2].split()[0]) for m in _messages(caplog) if " img/s " in m]
    assert len(rates) == 2 and all(rate > 0 for rate in rates), rates


def test_a_slow_step_reads_as_a_rate_not_zero(monkeypatch, caplog, tmp_path: Path) -> None:
    """One 512 px image per step of Mask R-CNN on a small CPU: 40 s a step is 0.025 img/s, not '0.0 img/s'."""
    from frcnn_train import progress
    from frcnn_train.logs import RunLogger

    clock = iter(range(0, 10_000, 40))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    caplog.set_level("INFO", logger="frcnn_train")
    step_log = progress.StepLog(
        RunLogger(tmp_path, enabled=False), log_every=1, progress=False, epochs=1, steps_per_epoch=1
    )
    step_log.start_epoch(0, 0)
    step_log.step(
        {"loss_a": torch.tensor(1.0)},
        images=1,
        epoch=0,
        global_step=1,
        step_in_epoch=1,
        steps_left=0,
        lrs={"default": 0.01},
    )
    assert "loss 1.0000  lr 0.01  0.025 img/s  ETA 0s" in _messages(caplog)[-1]


def test_a_validation_split_without_annotations_makes_no_best(compose_tiny, tmp_path: Path, caplog) -> None:
    """COCOeval's -1 (nothing to score against) is no AP: no best.pth, said once, not 'best = -1'."""
    import shutil

    from frcnn_train.data import build_datasets

    source = build_datasets(compose_tiny().data, with_masks=False).train.images_dir.parent
    root = tmp_path / "coco"
    shutil.copytree(source, root)
    val = json.loads((root / "instances_val.json").read_text())
    (root / "instances_val.json").write_text(json.dumps({**val, "annotations": []}))
    caplog.set_level("WARNING", logger="frcnn_train")
    summary = run(
        compose_tiny(
            "data=coco",
            f"data.root={root}",
            "data.train_images=train",
            "data.val_images=val",
            "data.train_ann=instances_train.json",
            "data.val_ann=instances_val.json",
            "trainer.epochs=2",
        )
    )
    assert summary["completed"] and summary["best_metric"] is None
    assert not (Path(summary["run_dir"]) / "best.pth").exists()
    said = [m for m in _messages(caplog) if "is undefined on the validation split" in m]
    assert len(said) == 1 and "it has no annotated objects" in said[0], said


def test_the_lr_follows_the_global_batch(compose_tiny, caplog) -> None:
    caplog.set_level("INFO", logger="frcnn_train")
    summary = run(
        compose_tiny(
            "optim.reference_batch=4", "trainer.batch_size=1", "schedule.warmup_steps=0", "trainer.max_steps=1"
        )
    )
    groups = checkpoint.load_checkpoint(Path(summary["run_dir"]) / "last.pth")["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [pytest.approx(0.0025)] * len(groups)
    assert any(m.startswith("LR 0.0025 = optim.lr 0.01 x 1/4: linear scaling") for m in _messages(caplog))


@pytest.mark.skipif(not __import__("frcnn_train.runtime").runtime.cpu_has_fast_bf16(), reason="no bf16 CPU kernels")
def test_bf16_autocast_trains_on_a_cpu_with_bf16_kernels(compose_tiny) -> None:
    summary = run(compose_tiny("device=cpu", "trainer.amp=true", "trainer.amp_dtype=bf16", "trainer.max_steps=2"))
    ckpt = checkpoint.load_checkpoint(Path(summary["run_dir"]) / "last.pth")
    assert summary["global_step"] == 2 and ckpt["launch"]["precision"] == "bf16" and ckpt["scaler"] == {}


def test_a_ctrl_c_that_c_code_swallowed_still_ends_the_start_up(compose_tiny, tmp_path: Path) -> None:
    """NumPy can swallow the KeyboardInterrupt a Ctrl-C raises while the dataset is generated; train.py's
    flag is asked once more before the first file is written, so the run does not train on regardless."""
    with pytest.raises(KeyboardInterrupt):
        run(compose_tiny("run_name=swallowed"), interrupted=lambda: True)
    run_dir = tmp_path / "outputs" / "swallowed"
    assert not run_dir.exists() or not list(run_dir.iterdir()), list(run_dir.iterdir())


def test_logged_losses_are_every_loss_averaged_over_ranks(monkeypatch, tmp_path: Path) -> None:
    """The total is the sum of whatever the model returned (not only keys starting with 'loss'), and each
    mean is reduced over the ranks (torchvision's reduce_dict) before it is logged."""
    from frcnn_train import distributed, progress
    from frcnn_train.logs import RunLogger

    reduced = []
    monkeypatch.setattr(distributed, "mean_over_ranks", lambda t: reduced.append(t.clone()) or t * 2)
    logger = RunLogger(tmp_path, enabled=False)
    written = {}
    monkeypatch.setattr(logger, "scalars", lambda values, step: written.update(values))
    step_log = progress.StepLog(logger, log_every=2, progress=False, epochs=1, steps_per_epoch=4)
    step_log.start_epoch(0, 0)
    for step, (a, b) in enumerate([(1.0, 3.0), (2.0, 5.0)], start=1):
        step_log.step(
            {"loss_box": torch.tensor(a), "rpn_objectness": torch.tensor(b)},
            images=2,
            epoch=0,
            global_step=step,
            step_in_epoch=step,
            steps_left=2,
            lrs={"default": 0.1},
            extra={"grad_norm": torch.tensor(10.0)},
        )
    assert len(reduced) == 1 and reduced[0].tolist() == [1.5, 4.0, 10.0], "one reduction per log line"
    assert written["train/loss_box"] == 3.0 and written["train/rpn_objectness"] == 8.0
    assert written["train/loss"] == 11.0, "every loss the model returned, grad_norm not among them"
    assert written["train/grad_norm"] == 20.0 and written["lr/default"] == 0.1
