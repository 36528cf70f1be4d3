"""`inspect` on our checkpoints, foreign weights, run directories and differences; parameter groups in it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from frcnn_train import checkpoint
from frcnn_train.errors import ConfigError
from frcnn_train.inspect import main
from frcnn_train.launch import run

BACKBONE_SLOW = "optim.param_groups=[{match:backbone,lr_mult:0.1}]"


@pytest.fixture(scope="module")
def slow_backbone(tiny_runs) -> Path:
    """One full epoch (with evaluation) and the backbone at a tenth of the head LR."""
    return tiny_runs("slow_backbone", BACKBONE_SLOW)


@pytest.fixture(scope="module")
def wide_head(tiny_runs) -> Path:
    return tiny_runs("wide_head", "model.box_head_dim=64", "trainer.max_steps=2")


def inspect(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_checkpoint_summary(slow_backbone, capsys) -> None:
    code, out, _ = inspect(capsys, slow_backbone / "last.pth")
    assert code == 0, out
    for text in (
        "frcnn_train.checkpoint v1, complete",
        "step 4 (the end of epoch 1)",
        "best          bbox/AP = ",
        "faster_rcnn / resnet18_fpn, attention none",
        "5: circle, square, triangle, star, ellipse",
        "sgd, 4 param groups",
        "multistep, last step 4",
        "scaler        off",
        "torchvision ",
    ):
        assert text in out, text
    ckpt = checkpoint.load_checkpoint(slow_backbone / "last.pth")
    assert ckpt["architecture"]["fingerprint"][:12] in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert rows["backbone"][2] == "0.1" and rows["default"][2] == "1"  # the lr multiplier column


def test_param_groups_lr_multiplier_is_in_the_checkpoints_optimizer(slow_backbone) -> None:
    groups = {g["name"]: g for g in checkpoint.load_checkpoint(slow_backbone / "last.pth")["optimizer"]["param_groups"]}
    assert set(groups) == {"backbone", "backbone/no_decay", "default", "default/no_decay"}
    assert groups["backbone"]["lr"] == pytest.approx(0.1 * groups["default"]["lr"])
    assert groups["backbone/no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 1e-4
    assert all(n.startswith("backbone.body.") for n in groups["backbone"]["param_names"])
    assert not any(n.startswith("backbone.body.") for n in groups["default"]["param_names"])


def test_resume_with_other_param_group_rules_is_refused(slow_backbone, compose_tiny) -> None:
    overrides = [f"resume={slow_backbone}", "optim.param_groups=[{match:backbone,lr_mult:0.5}]"]
    with pytest.raises(ConfigError, match=r"optim.param_groups \(checkpoint .*lr_mult': 0.1.*requested"):
        run(compose_tiny(*overrides), overrides=overrides)


def test_json_keys_and_config(slow_backbone, capsys) -> None:
    code, out, _ = inspect(capsys, slow_backbone / "last.pth", "--json", "--keys", "--config")
    facts = json.loads(out)
    assert code == 0 and facts["kind"] == "checkpoint" and facts["complete"]
    assert facts["global_step"] == 4 and facts["classes"][0] == "circle"
    assert {g["name"]: g["lr_mult"] for g in facts["param_groups"]}["backbone"] == 0.1
    assert facts["config"]["model"]["box_head_dim"] == 32
    assert {"name": "roi_heads.box_head.fc6.weight", "shape": [32, 32 * 7 * 7], "dtype": "float32"} in facts["keys"]
    code, out, _ = inspect(capsys, slow_backbone / "last.pth", "--keys", "--config")
    assert "roi_heads.box_head.fc6.weight" in out and "32x1568" in out and "box_head_dim: 32" in out


def test_foreign_state_dicts_say_whether_init_from_loads_them(slow_backbone, tmp_path: Path, capsys) -> None:
    state = checkpoint.load_checkpoint(slow_backbone / "last.pth")["model"]
    torch.save({"model_state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.pth")
    code, out, _ = inspect(capsys, tmp_path / "ddp.pth")
    assert code == 0
    assert "model_state_dict; wrapper prefixes: module." in out
    assert "11.31M in 150 tensors" in out and "backbone.body.layer1" in out
    # Class count, head and FPN widths are read from the shapes, so the dry run fits exactly.
    assert "model.num_classes=5" in out and "model.box_head_dim=32" in out
    assert "loaded 130 | reshaped-and-skipped 0 | missing 0 | unexpected 0" in out
    code, out, _ = inspect(capsys, tmp_path / "ddp.pth", "model.num_classes=2", "--json")
    facts = json.loads(out)
    assert facts["kind"] == "weights" and facts["init_from"]["ok"] and facts["wrappers"] == ["module."]
    assert len(facts["init_from"]["report"]["reshaped"]) == 4


def test_a_classifier_file_is_described_and_init_from_would_fail(tmp_path: Path, capsys) -> None:
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    code, out, _ = inspect(capsys, tmp_path / "resnet18.pth")
    assert code == 0 and "state dict    raw; wrapper prefixes: none" in out and "11.69M in 122 tensors" in out
    assert "assumed 1" in out and "would fail: no tensor of" in out and "classification backbone" in out


def test_run_directory_lists_checkpoints_and_the_resume_auto_pick(slow_backbone, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(slow_backbone / "epoch_0001.pth", run_dir / "epoch_0001.pth")
    (run_dir / "last.pth").write_bytes((slow_backbone / "last.pth").read_bytes()[:4096])  # cut off mid-write
    newer = time.time() + 5
    os.utime(run_dir / "last.pth", (newer, newer))
    code, out, _ = inspect(capsys, run_dir)
    assert code == 0
    last = next(line for line in out.splitlines() if line.strip().startswith("last.pth"))
    assert "INVALID" in last and "truncated, corrupted" in last
    epoch = next(line for line in out.splitlines() if line.strip().startswith("epoch_0001.pth"))
    assert epoch.split()[1:3] == ["1", "4"] and "ok  <- resume=auto" in epoch
    facts = json.loads(inspect(capsys, run_dir, "--json")[1])
    assert facts["resume_auto"] == "epoch_0001.pth" and [c["valid"] for c in facts["checkpoints"]] == [False, True]


def test_diff_of_two_checkpoints(slow_backbone, wide_head, capsys) -> None:
    code, out, _ = inspect(capsys, slow_backbone / "last.pth", wide_head / "last.pth")
    assert code == 0
    assert next(line for line in out.splitlines() if line.strip().startswith("model.box_head_dim")).endswith("32 -> 64")
    facts = json.loads(inspect(capsys, slow_backbone / "last.pth", wide_head / "last.pth", "--json")[1])
    config = {d["key"]: (d["a"], d["b"]) for d in facts["config"]}
    assert config["model.box_head_dim"] == (32, 64) and config["run_name"] == ("slow_backbone", "wide_head")
    assert "optim.param_groups" in config and config["trainer.max_steps"] == (None, 2)
    assert facts["architecture"] == ["model.box_head_dim: 32 -> 64"]
    assert any(line.startswith("roi_heads.box_head: 4 tensors reshaped") for line in facts["tensors"])
    counters = {d["key"]: (d["a"], d["b"]) for d in facts["counters"]}
    assert counters["global_step"] == (4, 2) and "fingerprint" in counters
    values = {v["group"]: v for v in facts["values"]}
    assert "roi_heads.box_head" not in values, "reshaped tensors are reported under tensors, not values"
    assert values["rpn.head"]["differ"] == values["rpn.head"]["shared"] > 0 and values["rpn.head"]["max_abs"] > 0


def test_diff_of_a_checkpoint_with_itself_says_identical(slow_backbone, capsys) -> None:
    code, out, _ = inspect(capsys, slow_backbone / "last.pth", slow_backbone / "epoch_0001.pth")
    assert code == 0
    assert any(
        line.startswith("values: all ") and line.endswith(" shared tensors identical") for line in out.splitlines()
    ), out


def test_diff_against_overrides_says_whether_resume_accepts_them(slow_backbone, capsys) -> None:
    ckpt = slow_backbone / "last.pth"
    facts = json.loads(inspect(capsys, ckpt, "trainer.epochs=3", "--json")[1])
    assert facts["config"] == [{"key": "trainer.epochs", "a": 1, "b": 3}]
    assert facts["architecture"] == [] and facts["tensors"] == []
    assert facts["resume"] == {"accepted": True, "changes": ["trainer.epochs: 1 -> 3"]}
    code, out, _ = inspect(capsys, ckpt, "model=mask_rcnn")
    assert code == 0
    assert "model.arch  faster_rcnn -> mask_rcnn" in out
    assert "roi_heads.mask_head: 2 tensors added" in out and "roi_heads.mask_predictor: 4 tensors added" in out
    assert "with these overrides: refused: cannot resume" in out and "model.arch (checkpoint 'faster_rcnn'" in out
    facts = json.loads(inspect(capsys, ckpt, "optim.param_groups=[{match:backbone,lr_mult:0.5}]", "--json")[1])
    assert [d["key"] for d in facts["config"]] == ["optim.param_groups"] and not facts["resume"]["accepted"]


def test_errors_are_one_sentence_and_exit_2(tmp_path: Path, capsys) -> None:
    code, _, err = inspect(capsys, tmp_path / "nope.pth")
    assert code == 2 and err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1


def test_entry_point_runs_as_a_module(slow_backbone) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "frcnn_train.inspect", str(slow_backbone / "last.pth"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epoch"] == 1
