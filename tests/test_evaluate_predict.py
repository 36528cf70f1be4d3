"""`evaluate` reproduces a run's own validation numbers; `predict` writes drawn images and COCO results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from frcnn_train import checkpoint
from frcnn_train.evaluate import main as evaluate_main
from frcnn_train.predict import main as predict_main

# Inference-only knobs (not part of the architecture): many low-scoring boxes per image, so that
# one epoch of training already gives a non-zero AP and "equal" below is not 0.0 == 0.0.
MANY_BOXES = (
    "model.box_score_thresh=0.0",
    "model.rpn_pre_nms_top_n_test=1000",
    "model.rpn_post_nms_top_n_test=300",
    "model.box_detections_per_img=300",
)


@pytest.fixture(scope="module")
def trained(tiny_runs) -> Path:
    return tiny_runs("faster", *MANY_BOXES)


def val_images(run_dir: Path) -> Path:
    cfg = checkpoint.load_checkpoint(run_dir / "last.pth")["config"]
    return next(Path(cfg["data"]["cache_dir"], "shapes").glob("64px_8+4_*")) / "val"


def test_evaluate_reproduces_the_runs_last_metrics_exactly(trained: Path, capsys) -> None:
    ckpt = trained / "last.pth"
    assert evaluate_main([str(ckpt), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = checkpoint.load_checkpoint(ckpt)["trainer"]["last_metrics"]
    assert expected["bbox/AP"] > 0  # a meaningful comparison
    assert printed["metrics"] == expected  # exact: same model, loader, batch size and settings
    detections = json.loads(Path(printed["detections"]).read_text())
    assert Path(printed["detections"]) == trained / "detections_last.json"
    assert detections and set(detections[0]) == {"image_id", "category_id", "bbox", "score"}


def test_evaluate_prints_the_table_and_writes_where_asked(trained: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "dets.json"
    assert evaluate_main([str(trained / "last.pth"), "data.num_workers=0", "device=cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert text.splitlines()[1].startswith("bbox") and f"detections: {out}" in text
    assert isinstance(json.loads(out.read_text()), list)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.box_head_dim=64", "rebuilds the model from the checkpoint's config, so model.box_head_dim cannot"),
        ("optim.lr=0.1", "evaluate cannot override optim.lr"),
    ],
)
def test_evaluate_refuses_other_overrides(trained: Path, capsys, override: str, message: str) -> None:
    assert evaluate_main([str(trained / "last.pth"), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_predict_a_directory_writes_images_and_results(trained: Path, tmp_path: Path, capsys) -> None:
    images = sorted(val_images(trained).glob("*.png"))
    out = tmp_path / "preds"
    code = predict_main(
        [
            str(trained / "last.pth"),
            str(images[0].parent),
            "--out",
            str(out),
            "--score-threshold",
            "0.1",
            "--batch-size",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    for image in images:
        drawn = Image.open(out / image.name)
        assert drawn.size == Image.open(image).size and drawn.mode == "RGB"
    results = json.loads((out / "predictions.json").read_text())
    assert results and {r["image_id"] for r in results} <= set(range(len(images)))
    classes = checkpoint.load_checkpoint(trained / "last.pth")["classes"]
    for r in results:
        assert r["file_name"] == str(images[r["image_id"]])
        assert r["score"] >= 0.1 and len(r["bbox"]) == 4
        assert r["category_name"] == classes[r["category_id"] - 1]


def test_predict_says_when_the_threshold_hides_everything(trained: Path, tmp_path: Path, capsys) -> None:
    image = sorted(val_images(trained).glob("*.png"))[0]
    assert predict_main([str(trained / "last.pth"), str(image), "--out", str(tmp_path), "--score-threshold", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("0 detections") and "below --score-threshold 1.0 (highest 0." in out, out


def test_predict_mask_rcnn_writes_rle_masks(tiny_runs, tmp_path: Path) -> None:
    mask_run = tiny_runs("mask", "model=mask_rcnn", "trainer.max_steps=1")
    image = sorted(val_images(mask_run).glob("*.png"))[0]
    assert predict_main([str(mask_run / "last.pth"), str(image), "--out", str(tmp_path), "--score-threshold", "0"]) == 0
    results = json.loads((tmp_path / "predictions.json").read_text())
    assert results and all(set(r["segmentation"]) == {"size", "counts"} for r in results)
    assert results[0]["segmentation"]["size"] == [64, 64]


def test_predict_input_errors_are_one_sentence(trained: Path, tmp_path: Path, capsys) -> None:
    ckpt = str(trained / "last.pth")
    assert predict_main([ckpt, str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.jpg does not exist" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hello")
    assert predict_main([ckpt, str(tmp_path / "notes.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "notes.txt is not an image" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert predict_main([ckpt, str(tmp_path / "broken.png"), "--out", str(tmp_path / "o")]) == 2
    assert "broken.png could not be decoded" in capsys.readouterr().err


def test_drawing_takes_uint8_as_the_float_images_it_replaces() -> None:
    """TensorBoard samples and predict draw the datasets' uint8 images as they drew their float ones."""
    import torch

    from frcnn_train.visualize import draw_detections

    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    output = {
        "boxes": torch.tensor([[2.0, 3.0, 30.0, 20.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
        "masks": torch.rand(1, 1, 40, 50, generator=torch.Generator().manual_seed(1)),
    }
    drawn = draw_detections(image, output, ["thing"])
    assert torch.equal(drawn, draw_detections(image.float().div_(255.0), output, ["thing"]))
    assert torch.equal(draw_detections(image, {k: v[:0] for k, v in output.items()}, ["thing"]), image)


def test_predict_reads_a_16_bit_image(trained: Path, tmp_path: Path, capsys) -> None:
    import numpy as np

    image = tmp_path / "deep.png"
    Image.fromarray(np.linspace(9252, 37265, 64 * 64).reshape(64, 64).astype(np.uint16)).save(image)
    assert predict_main([str(trained / "last.pth"), str(image), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    drawn = np.asarray(Image.open(tmp_path / "o" / "deep.png"))
    assert 30 < drawn.min() and drawn.max() < 150, "the 16-bit values were clipped, not scaled"


def test_output_names_never_collide_and_keep_real_names() -> None:
    """Issue 22, item 8: a renamed copy skips names that inputs hold themselves, compared without case."""
    from frcnn_train.predict import output_names

    files = [Path("x/a.png"), Path("y/a.png"), Path("y/a_1.png"), Path("z/A.png"), Path("w/a_2.png")]
    names = output_names(files)
    assert names == ["a.png", "a_3.png", "a_1.png", "A_4.png", "a_2.png"]
    assert len({n.lower() for n in names}) == len(files)
