"""Tiny configs composed with Hydra's compose(), shared by every test."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from frcnn_train.config import compose_config
from frcnn_train.state import PARTS, Counters

# A test run started in the background (`pytest &`, nohup) inherits SIGINT ignored, and so would every
# process it starts; the Ctrl-C tests need it delivered as in a terminal (a handled signal is reset to
# the default in a child, an ignored one stays ignored).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


REPO = Path(__file__).resolve().parents[1]


def python_path(*first: str | Path, repo: bool = True) -> str:
    """PYTHONPATH for a subprocess: `first`, then (with `repo`) this repository, then the entries
    already set. Extended, not replaced: where the dependencies come through PYTHONPATH (the GPU
    machine installs them into /tmp/site), a replaced one would leave the subprocess without hydra.
    `repo=False` also drops this repository from the inherited entries (a test of the installed wheel)."""
    inherited = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    if not repo:
        inherited = [e for e in inherited if Path(e).resolve() != REPO]
    entries = [str(e) for e in first] + ([str(REPO)] if repo else []) + inherited
    return os.pathsep.join(dict.fromkeys(entries))


# ---------------------------------------------------------------- thread counts
# Float sums are reordered by the number of intra-op threads (each thread sums its own slice) and by the CPU's
# kernels, so a test that claims exactness must run both of its sides with the same thread count on the same
# host. torchrun sets OMP_NUM_THREADS=1 for its workers (when it starts several per node and the variable is not
# set); a test that compares a torchrun run with an in-process one pins both sides to this count.
WORKER_THREADS = 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """The block runs with `n` intra-op threads (the in-process side of a like-for-like comparison)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_env(n: int | None = None) -> dict[str, str]:
    """Environment for a subprocess that must sum floats as this process does: its intra-op thread count is
    `n`, by default this process's own (a subprocess would otherwise take OMP_NUM_THREADS or the core count,
    which need not be what pytest runs with)."""
    return {"OMP_NUM_THREADS": str(n if n is not None else torch.get_num_threads())}


def assert_same_detections(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, atol: float | dict[str, float]
) -> None:
    """One image's detections by two models agree to `atol` (boxes in pixels, scores, masks; or one per key),
    paired by label and nearest box, not by position: where the two sides' kernels sum floats in another order,
    two near-equal scores may swap places in the score-sorted output (what export_check does for an exported
    file)."""
    from frcnn_train.export_check import match

    assert got.keys() == want.keys() and len(got["boxes"]) == len(want["boxes"]), (
        f"{len(got['boxes'])} detections vs {len(want['boxes'])}"
    )
    pairs = match(want["boxes"], want["labels"], got["boxes"], got["labels"])
    assert len(pairs) == len(want["boxes"]), f"{len(want['boxes']) - len(pairs)} detections have no same-label partner"
    mine = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    theirs = torch.tensor([j for _, j in pairs], dtype=torch.long)
    for key in want:
        torch.testing.assert_close(
            got[key][theirs], want[key][mine], rtol=0, msg=key, atol=atol[key] if isinstance(atol, dict) else atol
        )


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
        "optim.reference_batch=null",  # the LR as given whatever the batch: tests assert LR values
    ]


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated shapes dataset for the whole session."""
    return tmp_path_factory.mktemp("shapes_cache")


@pytest.fixture(scope="session", autouse=True)
def _files_under_pytests_directory(tmp_path_factory: pytest.TempPathFactory, shapes_cache: Path) -> Iterator[None]:
    """Temporary files of the code under test and of every process it starts (torchrun's torchelastic_* log
    directories, TorchInductor's cache, anything through tempfile) go under pytest's directory, which a passing
    run removes, instead of piling up in /tmp; so does a dataset that a test generates without data.cache_dir
    (FRCNN_DATA_CACHE), instead of going to ~/.cache/frcnn_train."""
    settings = {"TMPDIR": str(tmp_path_factory.mktemp("tmpdir")), "FRCNN_DATA_CACHE": str(shapes_cache)}
    before, before_tempdir = {name: os.environ.get(name) for name in settings}, tempfile.tempdir
    os.environ.update(settings)
    tempfile.tempdir = settings["TMPDIR"]
    yield
    tempfile.tempdir = before_tempdir
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module", autouse=True)
def _module_temporaries_removed(
    request: pytest.FixtureRequest, shapes_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """The directories a test module's fixtures made (tmp_path_factory.mktemp: its tiny runs, wheels, exports)
    are removed when the module ends, unless one of its tests failed: pytest would keep them to the end of the
    session, so a full run's disk would be the sum of every module's. The session's shapes_cache is requested
    here so that it exists before the module starts and stays: a session-scoped fixture that makes a directory
    must be requested here too. tmp_path_retention_policy = "failed" removes the rest."""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            if path.is_symlink():  # pytest's <name>current links to the newest of its directories
                path.unlink(missing_ok=True)
            else:
                shutil.rmtree(path, ignore_errors=True)


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


# ---------------------------------------------------------------- comparing training states
def _assert_same(a: Any, b: Any, where: str) -> None:
    """Equal values, recursing into dicts (same keys), lists and tuples (same length), tensors (bitwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{where}: a tensor and a {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        )
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{where}: a dict and a {type(b)}"
        assert set(a) == set(b), f"{where}: keys only in one: {sorted(set(a) ^ set(b), key=str)}"
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        pass
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


# Every part the state registry declares (state.PARTS) is training state, so a part added there is compared
# here too. `trainer` is compared below without its resume history; `config` (mutable keys may change on
# resume), `created` and `versions` legitimately differ between a straight and a resumed run.
TRAINING_STATE = tuple(part for part in PARTS if part != "trainer")
# Checked to be present, so that a renamed counter cannot drop out of the comparison unnoticed.
TRAINER_COUNTERS = tuple(f.name for f in fields(Counters))


def assert_same_training(a: dict, b: dict) -> None:
    """Two checkpoints hold the same training state, bitwise: model, optimizer state and param_groups,
    scheduler, scaler, the Trainer's counters and best metric, and every RNG stream (python, numpy,
    torch, CUDA, each rank's) with the data-order state."""
    for part in TRAINING_STATE:
        assert (part in a) == (part in b), f"{part} in only one checkpoint"
        _assert_same(a.get(part), b.get(part), part)
    for rng in ("python", "numpy", "torch", "cuda", "ranks", "data"):
        assert rng in a["rng"], f"the checkpoint has no rng.{rng}: the comparison would miss it"
    assert set(TRAINER_COUNTERS) <= set(a["trainer"]), "a Trainer counter is missing from the checkpoint"
    # Every counter, also ones added later; only the resume history differs by design.
    _assert_same(
        {k: v for k, v in a["trainer"].items() if k != "history"},
        {k: v for k, v in b["trainer"].items() if k != "history"},
        "trainer",
    )
