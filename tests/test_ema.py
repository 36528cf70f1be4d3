"""trainer.ema: the average's arithmetic, bitwise resume, evaluation of both weights, and every consumer
of a checkpoint (evaluate, predict, init_from) taking the EMA weights unless asked for the raw ones."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import assert_same_training
from frcnn_train import checkpoint
from frcnn_train.ema import ModelEma
from frcnn_train.evaluate import load_model, run_evaluation
from frcnn_train.launch import run
from frcnn_train.resume import ResumeConflict

EMA = ("trainer.ema.decay=0.9", "trainer.ema.warmup_steps=3")
EPOCHS = ("trainer.epochs=2", "trainer.eval_every=1")


def test_update_follows_the_ramped_decay_every_n_steps_and_copies_integer_buffers() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9, warmup_steps=4, every=2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    updates = 0
    for step in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step)
        model[1].num_batches_tracked += 1
        ema.update(model, step)
        if step % 2 == 0:
            updates += 1
            d = 0.9 * (1 - math.exp(-updates / 4))
            for key, value in model.state_dict().items():
                if value.is_floating_point():
                    expected[key] = expected[key] + (1 - d) * (value - expected[key])
                else:
                    expected[key] = value.clone()
    assert ema.updates == 3
    for key, value in ema.module.state_dict().items():
        assert torch.allclose(value.float(), expected[key].float(), rtol=1e-6, atol=1e-6), key
    assert ema.module[1].num_batches_tracked == 6, "copied at the last update (step 6)"
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_resume_with_ema_is_bitwise_and_both_weights_are_evaluated(compose_tiny) -> None:
    straight = run(compose_tiny(*EPOCHS, *EMA, "run_name=straight"))
    reference = checkpoint.load_checkpoint(Path(straight["run_dir"]) / "last.pth")
    assert reference["ema"]["updates"] == 8 and reference["trainer"]["global_step"] == 8
    assert not torch.equal(
        reference["ema"]["model"]["roi_heads.box_predictor.cls_score.weight"],
        reference["model"]["roi_heads.box_predictor.cls_score.weight"],
    )
    metrics = reference["trainer"]["last_metrics"]
    assert "bbox/AP" in metrics and "ema/bbox/AP" in metrics

    stopped = run(compose_tiny(*EPOCHS, *EMA, "run_name=stopped", "trainer.max_steps=5"))
    assert stopped["global_step"] == 5
    overrides = [f"resume={stopped['run_dir']}", "trainer.max_steps=null"]
    run(compose_tiny(*EPOCHS, *EMA, *overrides), overrides=overrides)
    resumed = checkpoint.load_checkpoint(Path(stopped["run_dir"]) / "last.pth")
    assert_same_training(reference, resumed)  # state.PARTS includes "ema": compared bitwise


def test_best_metric_may_choose_by_the_ema(compose_tiny) -> None:
    summary = run(compose_tiny(*EMA, "trainer.best_metric=ema/bbox/AP"))
    ckpt = checkpoint.load_checkpoint(Path(summary["run_dir"]) / "best.pth")
    assert ckpt["trainer"]["best_metric_name"] == "ema/bbox/AP"
    assert ckpt["trainer"]["best_metric"] == ckpt["trainer"]["last_metrics"]["ema/bbox/AP"]


def _weights_of(model: nn.Module, state: dict) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_evaluate_predict_and_init_from_take_the_ema_unless_raw(compose_tiny, tmp_path: Path, caplog) -> None:
    summary = run(compose_tiny(*EMA, "trainer.max_steps=3", "run_name=with_ema"))
    last = Path(summary["run_dir"]) / "last.pth"
    ckpt = checkpoint.load_checkpoint(last)
    cfg = compose_tiny()
    cfg.model.num_classes = len(ckpt["classes"])
    assert _weights_of(load_model(ckpt, cfg, str(last)), ckpt["ema"]["model"])
    assert _weights_of(load_model(ckpt, cfg, str(last), raw=True), ckpt["model"])
    assert run_evaluation(last)[2] == "ema" and run_evaluation(last, raw=True)[2] == "raw"

    caplog.set_level("INFO", logger="frcnn_train")
    for raw, container in ((False, "ema"), (True, "model")):
        overrides = [f"init_from={last}", f"init.raw={str(raw).lower()}", "trainer.max_steps=1", f"run_name=init_{raw}"]
        run(compose_tiny(*overrides), overrides=overrides)
        report = next(r.getMessage() for r in reversed(caplog.records) if r.getMessage().startswith("init_from="))
        assert f"{container} of {last}" in report, report


def test_ema_may_be_switched_on_at_a_resume_but_not_off_or_changed(compose_tiny, caplog) -> None:
    plain = run(compose_tiny(*EPOCHS, "run_name=plain", "trainer.max_steps=3"))
    caplog.set_level("WARNING", logger="frcnn_train")
    overrides = [f"resume={plain['run_dir']}", "trainer.max_steps=null", *EMA]
    run(compose_tiny(*EPOCHS, *overrides), overrides=overrides)
    last = Path(plain["run_dir"]) / "last.pth"
    ckpt = checkpoint.load_checkpoint(last)
    assert ckpt["ema"]["updates"] == 5, "the average starts at the resumed step 3"
    assert any("trainer.ema is on from this resume" in r.getMessage() for r in caplog.records)
    assert "trainer.ema.decay: None -> 0.9" in ckpt["trainer"]["history"][-1]["changes"]
    for change in (["trainer.ema.decay=null"], ["trainer.ema.decay=0.5"], ["trainer.ema.every=2"]):
        overrides = [f"resume={last}", "trainer.epochs=3", *change]
        with pytest.raises(ResumeConflict, match=change[0].split("=")[0].replace(".", r"\.")):
            run(compose_tiny(*overrides), overrides=overrides)


def test_an_ema_never_updated_gives_way_to_the_trained_weights() -> None:
    """trainer.ema.every beyond the steps trained leaves the average at the initial weights (issue 22, item 6):
    evaluate, predict, export and init_from take the trained ones, and say why; a count of 1 or none (a file
    from before the count was kept) keeps the EMA."""
    trained, average = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    ckpt = {"model": trained, "config": {"trainer": {"ema": {"every": 50}}}, "trainer": {"global_step": 4}}
    for updates, expected in ((0, "raw"), (1, "ema"), (None, "ema")):
        ckpt["ema"] = {"model": average} if updates is None else {"model": average, "updates": updates}
        weights, which = checkpoint.inference_weights(ckpt)
        assert which == expected and weights is (trained if expected == "raw" else average)
        assert (checkpoint.ema_skipped(ckpt) is not None) == (updates == 0)
    ckpt["ema"]["updates"] = 0
    assert checkpoint.ema_skipped(ckpt) == (
        "the trained weights are used: the checkpoint's EMA was never updated "
        "(trainer.ema.every=50, 4 steps trained), so it still holds the "
        "weights the run started from"
    )
    assert checkpoint.inference_weights(ckpt, raw=True) == (trained, "raw")
