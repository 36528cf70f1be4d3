"""End to end: attention survives resume whatever the flags say, and conflicting changes are refused.

Each test is one failure users hit with optional modules: a flag forgotten on resume, a
conflicting or resized block on resume, and weights moved between models with and
without attention.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from frcnn_train import checkpoint
from frcnn_train.config import compose_config
from frcnn_train.errors import ConfigError
from frcnn_train.launch import run
from frcnn_train.models import build_model
from frcnn_train.weights import load_init_weights

CBAM = ("model/attention=cbam", "model.attention.sites=[backbone.layer3,roi_heads.box]")
CBAM_MODULES = ("backbone.body.layer3.attention.", "roi_heads.attention.box.")


def attention_keys(state: dict) -> list[str]:
    return [k for k in state if ".attention." in k]


def snapshot(run_dir: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}


@pytest.fixture(scope="module")
def trained(shapes_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with CBAM at backbone.layer3 and roi_heads.box, stopped after one step; tests only read it."""
    from conftest import tiny_overrides

    outputs = tmp_path_factory.mktemp("attention_runs")
    summary = run(
        compose_config(tiny_overrides(shapes_cache, outputs) + ["run_name=cbam", *CBAM, "trainer.max_steps=1"])
    )
    return Path(summary["run_dir"])


def test_resume_without_attention_flags_rebuilds_the_blocks(compose_tiny) -> None:
    # A per-site override too: its dotted site name must survive the checkpoint's config round trip.
    first = run(
        compose_tiny(
            *CBAM,
            "+model.attention.overrides={roi_heads.box:{kernel_size:3}}",
            "run_name=forgetful",
            "trainer.max_steps=1",
        )
    )
    run_dir = Path(first["run_dir"])
    before = checkpoint.load_checkpoint(run_dir / "last.pth")
    assert before["model"]["roi_heads.attention.box.spatial.weight"].shape == (1, 2, 3, 3)

    overrides = [f"resume={run_dir}", "trainer.max_steps=3"]  # no model/attention on the command line
    cfg = compose_tiny(*overrides)
    assert cfg.model.attention.type == "none"
    resumed = run(cfg, overrides=overrides)

    assert resumed["global_step"] == 3 and resumed["run_dir"] == str(run_dir)
    after = checkpoint.load_checkpoint(run_dir / "last.pth")
    keys = attention_keys(after["model"])
    assert keys == attention_keys(before["model"]) and all(k.startswith(CBAM_MODULES) for k in keys)
    assert after["config"]["model"]["attention"]["type"] == "cbam"
    assert after["architecture"]["fingerprint"] == before["architecture"]["fingerprint"]
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in keys), "the blocks kept training"
    assert [h["global_step"] for h in after["trainer"]["history"]] == [1]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        pytest.param(
            "model/attention=se",
            [
                "model.attention.type (checkpoint 'cbam', requested 'se')",
                "model.attention.sites (checkpoint ['backbone.layer3', 'roi_heads.box'], requested ['backbone'])",
                "modules that would change: ",
                "backbone.body.layer3.attention.spatial: 1 tensor removed",
                "roi_heads.attention: 6 tensors removed",
                "backbone.body.layer4.attention: 5 tensors added",
            ],
            id="another-block",
        ),
        pytest.param(
            "model.attention.sites=[backbone.layer2]",
            [
                "model.attention.sites (checkpoint ['backbone.layer3', 'roi_heads.box'], requested ['backbone.layer2'])",
                "backbone.body.layer2.attention: 6 tensors added",
                "backbone.body.layer3.attention: 6 tensors removed",
                "roi_heads.attention: 6 tensors removed",
            ],
            id="other-sites",
        ),
        pytest.param(
            "model.attention.reduction=8",
            [
                "model.attention.reduction (checkpoint 16, requested 8)",
                "backbone.body.layer3: 3 tensors reshaped (attention.fc1.weight [16, 256] -> [32, 256], "
                "attention.fc1.bias [16] -> [32], attention.fc2.weight [256, 16] -> [256, 32])",
                "roi_heads.attention: 3 tensors reshaped (box.fc1.weight [2, 32] -> [4, 32]",
            ],
            id="reduction-16-to-8",
        ),
        pytest.param(
            "+model.attention.overrides={roi_heads.box:{reduction:8}}",
            [
                "model.attention.overrides.roi_heads.box.reduction (checkpoint None, requested 8)",
                "modules that would change: roi_heads.attention: 3 tensors reshaped (box.fc1.weight [2, 32] -> [4, 32]",
            ],
            id="per-site-reduction",
        ),
        pytest.param(
            "model/attention=none",
            ["model.attention.type (checkpoint 'cbam', requested 'none')", "roi_heads.attention: 6 tensors removed"],
            id="switched-off",
        ),
    ],
)
def test_conflicting_attention_on_resume_is_refused_before_any_work(
    compose_tiny, trained: Path, tmp_path: Path, override: str, expected: list[str]
) -> None:
    run_dir = Path(shutil.copytree(trained, tmp_path / "run"))  # a resume that is not refused must not touch `trained`
    before = snapshot(run_dir)
    overrides = [f"resume={run_dir}", override]
    with pytest.raises(ConfigError) as info:
        run(compose_tiny(*overrides), overrides=overrides)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert f"init_from={run_dir / 'last.pth'}" in message
    assert snapshot(run_dir) == before, "nothing was written"


def test_init_from_moves_weights_between_models_with_and_without_attention(
    compose_tiny, trained: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = trained / "last.pth"
    saved = checkpoint.load_checkpoint(source)["model"]
    with_attention = attention_keys(saved)

    # With attention -> without, end to end: the run starts, and its log lists the skipped blocks.
    caplog.set_level(logging.INFO)
    plain_run = run(compose_tiny(f"init_from={source}", "run_name=plain", "trainer.max_steps=1"))
    assert "unexpected, ignored: backbone.body.layer3.attention.gamma" in caplog.text

    cfg = compose_tiny()
    cfg.model.num_classes = 5
    plain = build_model(cfg.model)
    report = load_init_weights(plain, source, remap=[], strict=False, trust=False)
    assert report.unexpected == with_attention and report.missing == [] and report.reshaped == []
    assert len(report.loaded) == len([k for k in plain.state_dict() if not k.endswith("num_batches_tracked")])
    assert torch.equal(
        plain.state_dict()["backbone.body.layer3.0.conv1.weight"], saved["backbone.body.layer3.0.conv1.weight"]
    )

    # Without attention -> with: everything else loads, the blocks are reported as newly initialised.
    cfg = compose_tiny(*CBAM)
    cfg.model.num_classes = 5
    attended = build_model(cfg.model)
    fresh = {k: v.clone() for k, v in attended.state_dict().items() if ".attention." in k}
    report = load_init_weights(attended, Path(plain_run["run_dir"]) / "last.pth", remap=[], strict=False, trust=False)
    assert report.missing == with_attention and report.unexpected == [] and report.reshaped == []
    assert "missing, newly initialised: backbone.body.layer3.attention.gamma" in report.format()
    assert all(torch.equal(attended.state_dict()[k], v) for k, v in fresh.items())


def test_init_from_starts_new_blocks_as_identity(compose_tiny, trained: Path) -> None:
    """Blocks added on top of a trained detector start as identity mappings (gamma = 0)."""
    plain = run(compose_tiny("run_name=plain_source", "trainer.max_steps=1"))
    added = run(
        compose_tiny(
            *CBAM, f"init_from={plain['run_dir']}/last.pth", "run_name=added", "trainer.max_steps=1", "optim.lr=0"
        )
    )
    ckpt = checkpoint.load_checkpoint(Path(added["run_dir"]) / "last.pth")
    assert ckpt["config"]["model"]["attention"]["identity_init"] is True
    gammas = [v for k, v in ckpt["model"].items() if k.endswith("attention.gamma") or k.endswith(".gamma")]
    assert gammas and all(float(g) == 0.0 for g in gammas)
