"""The Python API: frcnn_train.load(...).predict(...) and frcnn_train.train(...)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import frcnn_train
from frcnn_train import checkpoint
from frcnn_train.errors import ConfigError, DataError
from frcnn_train.predict import main as predict_main
from test_evaluate_predict import MANY_BOXES  # many low-scoring boxes: detections to compare


@pytest.fixture(scope="module")
def faster(tiny_runs) -> Path:
    return tiny_runs("faster", *MANY_BOXES)


@pytest.fixture(scope="module")
def mask(tiny_runs) -> Path:
    return tiny_runs("mask", "model=mask_rcnn", *MANY_BOXES)


def val_images(run_dir: Path) -> list[Path]:
    cfg = checkpoint.load_checkpoint(run_dir / "last.pth")["config"]
    folder = next(Path(cfg["data"]["cache_dir"], "shapes").glob("64px_8+4_*")) / "val"
    return sorted(folder.glob("*.png"))[:3]


def test_predict_equals_frcnn_predict(faster: Path, tmp_path: Path) -> None:
    images = val_images(faster)
    det = frcnn_train.load(faster, device="cpu")
    assert det.classes == checkpoint.load_checkpoint(faster / "best.pth")["classes"]
    results = det.predict([str(p) for p in images], score_threshold=0.1)
    assert (
        predict_main(
            [
                str(faster),
                *map(str, images),
                "--out",
                str(tmp_path / "p"),
                "--score-threshold",
                "0.1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    written = json.loads((tmp_path / "p" / "predictions.json").read_text())
    ours = []
    for path, result in zip(images, results):
        assert set(result) == {"boxes", "scores", "labels", "names"}
        assert result["boxes"].shape == (len(result["scores"]), 4) and result["labels"].dtype == torch.int64
        assert result["names"] == [det.classes[int(label) - 1] for label in result["labels"]]
        boxes = result["boxes"]
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # in float32, as the COCO results
        for box, score, name in zip(xywh.tolist(), result["scores"].tolist(), result["names"]):
            ours.append((str(path), name, round(score, 5), [round(v, 3) for v in box]))
    theirs = [(r["file_name"], r["category_name"], r["score"], r["bbox"]) for r in written]
    assert len(ours) > 3 and ours == theirs


def test_every_kind_of_image_gives_the_same_detections(faster: Path) -> None:
    path = val_images(faster)[0]
    det = frcnn_train.load(faster / "last.pth", device="cpu")
    pil = Image.open(path).convert("RGB")
    array = np.asarray(pil)
    forms = [
        str(path),
        path,
        pil,
        array,
        torch.from_numpy(array.copy()).permute(2, 0, 1),
        array.astype(np.float32) / 255,
        torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255,
    ]
    first = det.predict(forms[0], score_threshold=0.1)
    assert isinstance(first, dict) and len(first["scores"]) > 0  # one image in, one dict out
    many = det.predict(forms, score_threshold=0.1, batch_size=1)  # one per pass: like with like, bitwise
    assert isinstance(many, list) and len(many) == len(forms)
    for result in many[:5]:  # uint8 forms: the very same input, bitwise the same detections
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(result[key], first[key])
    for result in many[5:]:  # x / 255 in float: the model's own uint8 conversion divides the same way
        assert torch.allclose(result["boxes"], first["boxes"], atol=1e-3)
    batched = det.predict(forms, score_threshold=0.1, batch_size=3)  # other batch shapes: other conv kernels
    for result in batched:
        assert torch.allclose(result["boxes"], first["boxes"], atol=1e-2)


def test_gray_images_become_rgb(faster: Path) -> None:
    det = frcnn_train.load(faster, device="cpu")
    gray = np.full((64, 64), 128, dtype=np.uint8)
    assert frcnn_train.api.as_image(gray).shape == (3, 64, 64)
    assert frcnn_train.api.as_image(torch.zeros(1, 8, 8, dtype=torch.uint8)).shape == (3, 8, 8)
    assert isinstance(det.predict(Image.fromarray(gray, mode="L")), dict)


def test_mask_rcnn_gives_boolean_masks_of_the_image_size(mask: Path) -> None:
    det = frcnn_train.load(mask, device="cpu")
    result = det.predict(val_images(mask)[0], score_threshold=0.0)
    assert set(result) == {"boxes", "scores", "labels", "names", "masks"}
    assert result["masks"].dtype == torch.bool and result["masks"].shape == (len(result["scores"]), 64, 64)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((3, 64, 64), dtype=np.uint8), "neither H x W x 3 (RGB) nor H x W (gray)"),
        (np.zeros((8, 8, 3), dtype=np.int64), "has no known scale"),
        (np.full((8, 8, 3), 255.0, dtype=np.float32), "finite values in [0, 1]; divide 0-255 values by 255"),
        (torch.zeros(8, 8, 3), "is not [3, H, W] or [1, H, W]"),
        (torch.full((3, 8, 8), float("nan")), "finite values in [0, 1]"),
        ("no/such/image.png", "does not exist"),
        (12, "an image of type int cannot be read"),
    ],
)
def test_an_image_it_cannot_read_is_one_sentence(faster: Path, image, message: str) -> None:
    det = frcnn_train.load(faster, device="cpu")
    with pytest.raises(DataError, match=None) as err:
        det.predict(image)
    assert message in str(err.value)


def test_load_of_a_missing_source_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(frcnn_train.errors.UserError, match="does not exist"):
        frcnn_train.load(tmp_path / "nothing.pth")


def test_train_runs_what_the_command_runs_and_returns_the_metrics(shapes_cache: Path, tmp_path: Path) -> None:
    from conftest import tiny_overrides

    run_dir, metrics = frcnn_train.train(tiny_overrides(shapes_cache, tmp_path / "outputs") + ["run_name=api"])
    assert run_dir == tmp_path / "outputs" / "api" and (run_dir / "last.pth").is_file()
    assert (
        "bbox/AP" in metrics and metrics == checkpoint.load_checkpoint(run_dir / "last.pth")["trainer"]["last_metrics"]
    )
    det = frcnn_train.load(run_dir, device="cpu")
    assert det.weights == "raw" and det.classes[0] == "circle"


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.epochs=-1", "trainer.epochs"),
        ("model=no_such_model", "available options in 'model'"),
        ("trainer.no_such_key=1", "no_such_key"),
    ],
)
def test_train_raises_the_commands_sentence_and_never_exits(
    shapes_cache: Path, tmp_path: Path, override: str, message: str
) -> None:
    from conftest import tiny_overrides

    with pytest.raises(ConfigError) as err:
        frcnn_train.train(tiny_overrides(shapes_cache, tmp_path / "outputs") + [override])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "outputs").exists()


def test_the_train_module_is_the_train_function() -> None:
    import frcnn_train.train as module

    assert frcnn_train.train is module and callable(frcnn_train.train)
    assert frcnn_train.load is frcnn_train.api.load


def test_importing_the_api_leaves_the_processs_ctrl_c_handler_alone() -> None:
    """A notebook's SIGINT handler is its own: only the command (python -m, frcnn-train) installs one."""
    import subprocess
    import sys

    from conftest import python_path

    code = "import signal, frcnn_train; frcnn_train.train; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "PYTHONPATH": python_path()},
    )
    assert out.stdout.strip() == "True", out.stderr
