"""Tiny configs composed with Hydra's compose(), shared by every test."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from omegaconf import DictConfig

from frcnn_train.config import compose_config


def tiny_overrides(cache_dir: Path, output_dir: Path) -> list[str]:
    """64 px images, a handful of them, small heads and few proposals: seconds per step on a CPU."""
    return [
        f"data.cache_dir={cache_dir}",
        "data.shapes.num_train=8",
        "data.shapes.num_val=4",
        "data.shapes.image_size=64",
        "data.num_workers=0",
        f"output_dir={output_dir}",
        "run_name=tiny",
        "model.min_size=64",
        "model.max_size=64",
        "model.backbone.fpn_channels=32",
        "model.rpn_pre_nms_top_n_train=64",
        "model.rpn_post_nms_top_n_train=32",
        "model.rpn_pre_nms_top_n_test=32",
        "model.rpn_post_nms_top_n_test=16",
        "model.rpn_batch_size_per_image=32",
        "model.box_batch_size_per_image=16",
        "model.box_head_dim=32",
        "model.mask_head_dim=16",
        "model.mask_head_layers=1",
        "trainer.batch_size=2",
        "trainer.epochs=1",
        "trainer.eval_every=1",
        "trainer.progress=false",
        "trainer.vis_images=1",
        "trainer.log_every=1",
        "schedule.warmup_steps=2",
        "optim.lr=0.01",
    ]


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated shapes dataset for the whole session."""
    return tmp_path_factory.mktemp("shapes_cache")


@pytest.fixture
def compose_tiny(shapes_cache: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """compose_tiny("model=mask_rcnn", ...) -> a tiny config writing under tmp_path/outputs."""

    def compose(*overrides: str) -> DictConfig:
        return compose_config(tiny_overrides(shapes_cache, tmp_path / "outputs") + list(overrides))

    return compose


@pytest.fixture(scope="module")
def tiny_runs(shapes_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_runs(name, *overrides) -> run directory of a tiny training run, trained once per test module."""
    from frcnn_train.launch import run

    out = tmp_path_factory.mktemp("tiny_runs")
    done: dict[str, Path] = {}

    def get(name: str, *overrides: str) -> Path:
        if name not in done:
            cfg = compose_config(tiny_overrides(shapes_cache, out) + [f"run_name={name}", *overrides])
            done[name] = Path(run(cfg)["run_dir"])
        return done[name]

    return get
