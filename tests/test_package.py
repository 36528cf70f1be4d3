"""The wheel: it carries the configs, trains from a directory outside the repository, and has the frcnn-* commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import python_path, tiny_overrides

REPO = Path(__file__).resolve().parent.parent
# What pyproject.toml builds the wheel from (its readme, packages and package-dir); a file it comes to name joins.
WHEEL_SOURCES = ("pyproject.toml", "README.md", "frcnn_train", "configs")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, installed (without dependencies: the venv has them) into a directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    # From a clean copy of what the wheel is built from, and nothing else: a stale build/ in the checkout could put
    # deleted modules into the wheel, and a copy of the whole checkout took its .venv along (6 GB under CI).
    source = tmp / "source"
    source.mkdir()
    for name in WHEEL_SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    # No build isolation: the venv's setuptools builds it, no index needed.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(source)],
        check=True,
        capture_output=True,
        cwd=tmp,
    )
    (wheel,) = tmp.glob("frcnn_train-*.whl")
    site = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    return site


def _run(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    # Only the installed copy is importable: no repository on the path, a working directory outside it.
    env = {**os.environ, "PYTHONPATH": python_path(site, repo=False)}
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_holds_every_package_and_config(installed: Path) -> None:
    shipped = {
        p.relative_to(installed / "frcnn_train" / "configs")
        for p in (installed / "frcnn_train" / "configs").rglob("*.yaml")
    }
    assert shipped == {p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml")}
    packages = {p.parent.relative_to(REPO) for p in (REPO / "frcnn_train").rglob("__init__.py")}
    assert all((installed / package / "__init__.py").is_file() for package in packages), "a subpackage is missing"


def test_installed_wheel_composes_and_trains_outside_the_repository(
    installed: Path, shapes_cache: Path, tmp_path: Path
) -> None:
    shown = _run(installed, tmp_path, sys.executable, "-m", "frcnn_train.train", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr
    assert "name: resnet18_fpn" in shown.stdout and "min_size: 96" in shown.stdout
    where = _run(installed, tmp_path, sys.executable, "-c", "import frcnn_train.config as c; print(c.CONFIG_DIR)")
    assert where.stdout.strip() == str(installed / "frcnn_train" / "configs")

    trained = _run(
        installed,
        tmp_path,
        str(installed / "bin" / "frcnn-train"),
        *tiny_overrides(shapes_cache, Path("outputs")),
        "trainer.max_steps=1",
    )
    assert trained.returncode == 0, trained.stderr
    last = tmp_path / "outputs" / "tiny" / "last.pth"
    assert last.is_file()
    inspected = _run(installed, tmp_path, str(installed / "bin" / "frcnn-inspect"), str(last))
    assert inspected.returncode == 0 and "step 1 (step 1 in epoch 1)" in inspected.stdout, inspected.stderr
    for command in ("frcnn-evaluate", "frcnn-predict", "frcnn-export", "frcnn-data"):
        helped = _run(installed, tmp_path, str(installed / "bin" / command), "--help")
        assert helped.returncode == 0 and f"usage: {command}" in helped.stdout, helped.stderr


def test_own_config_dir_with_an_experiment(installed: Path, tmp_path: Path) -> None:
    experiment = tmp_path / "my_configs" / "experiment"
    experiment.mkdir(parents=True)
    (experiment / "my_trees.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: coco\n  - override /model/backbone: resnet50_fpn\n"
        "  - _self_\ndata:\n  root: /data/trees\n  train_ann: train.json\nrun_name: trees_${seed}\n"
    )
    shown = _run(
        installed,
        tmp_path,
        str(installed / "bin" / "frcnn-train"),
        "--config-dir",
        "my_configs",
        "+experiment=my_trees",
        "--cfg",
        "job",
        "--resolve",
    )
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "root: /data/trees" in out and "train_ann: train.json" in out and "run_name: trees_42" in out
    # data=coco through the experiment: no shapes-sized model is left behind.
    assert "name: resnet50_fpn" in out and "min_size: 800" in out and "box_head_dim: 1024" in out
