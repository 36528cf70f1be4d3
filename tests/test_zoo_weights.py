"""torchvision weights by name: the hub cache, the offline refusal, fine-tuning from COCO weights, predict and
export of `torchvision:<builder>`. Nothing is downloaded: files of the right layout and name (random weights)
go into a temporary TORCH_HOME, and every download attempt fails as it would offline."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from frcnn_train import zoo
from frcnn_train.errors import CheckpointError, ConfigError
from frcnn_train.models import build_model

FINETUNE = "maskrcnn_resnet50_fpn_v2"
SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"


def _offline(*args: object, **kwargs: object) -> None:
    raise urllib.error.URLError("no network in tests")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)


def _save(state: dict[str, torch.Tensor], weights: object, home: Path) -> Path:
    path = home / "hub" / "checkpoints" / Path(weights.url).name  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _detector_state(builder: str) -> dict[str, torch.Tensor]:
    """torchvision's own model with random weights; "person" (label 1) scores high, so detections come out, and so
    does label 12, one of COCO's unused ids ("N/A"), which predict must drop."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(builder, weights=None, weights_backbone=None, num_classes=91)
    state = model.state_dict()
    state["roi_heads.box_predictor.cls_score.bias"][1] = 12.0
    state["roi_heads.box_predictor.cls_score.bias"][12] = 12.3
    return state


@pytest.fixture(scope="module")
def zoo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TORCH_HOME holding fake COCO files of two builders (made once: the R50 one takes seconds)."""
    home = tmp_path_factory.mktemp("torch_home")
    for builder in (FINETUNE, SMALL):
        _save(_detector_state(builder), torchvision.models.get_model_weights(builder).DEFAULT, home)
    return home


@pytest.fixture
def torch_home(monkeypatch: pytest.MonkeyPatch, zoo_home: Path) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(zoo_home))
    return zoo_home


def test_backbone_weights_by_name_come_from_the_cache(
    compose_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = _save(state, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, tmp_path)
    assert path.name == "resnet18-f37072fd.pth"  # torchvision's URL basename, hash prefix included
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        cfg = compose_tiny("model/backbone=resnet18_fpn", f"model.backbone.weights={name}", "model.num_classes=2")
        model = build_model(cfg.model)
        assert torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"]), name
        assert type(model.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"  # pretrained: torchvision's rule
    cfg = compose_tiny("model/backbone=resnet18_fpn", "model.backbone.weights=IMAGENET1K_V2", "model.num_classes=2")
    with pytest.raises(
        ConfigError,
        match=r"IMAGENET1K_V2 is not a weights name of torchvision's resnet18; "
        r"choose one of IMAGENET1K_V1, DEFAULT \(ResNet18_Weights\)",
    ):
        build_model(cfg.model)


def test_offline_and_not_cached_is_one_sentence_before_any_run_directory(
    compose_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from frcnn_train.launch import run

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    cfg = compose_tiny("model=fasterrcnn_mobilenet_v3_large_320_fpn", "init_from=torchvision")
    weights = torchvision.models.get_model_weights(SMALL).DEFAULT
    expected = tmp_path / "empty" / "hub" / "checkpoints" / "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"
    with pytest.raises(CheckpointError) as caught:
        run(cfg)
    message = str(caught.value)
    assert f"download {weights.url} and save it as {expected}" in message and "\n" not in message
    assert not (tmp_path / "outputs").exists()  # nothing made on disk
    cfg = compose_tiny("model.backbone.weights=IMAGENET1K_V1")
    with pytest.raises(CheckpointError, match=r"resnet18-f37072fd.pth"):
        run(cfg)
    assert not (tmp_path / "outputs").exists()


def test_init_from_torchvision_needs_a_builder_it_has(compose_tiny) -> None:
    cfg = compose_tiny("model.num_classes=3")  # faster_rcnn with resnet18: no COCO weights in torchvision
    cfg.init_from = "torchvision"
    with pytest.raises(ConfigError, match=r"no COCO weights for faster_rcnn with resnet18_fpn"):
        zoo.fetch_for_run(cfg)
    cfg.init_from = "torchvision:yolo"
    with pytest.raises(ConfigError, match=r"does not name a torchvision detector"):
        zoo.fetch_for_run(cfg)


def test_finetune_from_torchvision_loads_all_but_the_predictors(compose_tiny, torch_home: Path) -> None:
    from frcnn_train import checkpoint
    from frcnn_train.launch import run

    # The preset's architecture (so that COCO's tensors fit), at shapes sizes: one step and an evaluation.
    cfg = compose_tiny(
        f"model={FINETUNE}",
        "+experiment=finetune",
        "model.min_size=64",
        "model.max_size=64",
        "model.backbone.fpn_channels=256",
        "model.box_head_dim=1024",
        "model.mask_head_dim=256",
        "model.mask_head_layers=4",
        "trainer.max_steps=1",
        "trainer.batch_size=2",
        "data.shapes.num_val=2",
        "schedule.warmup_steps=2",
    )
    assert (cfg.init_from, cfg.optim.weight_decay, list(cfg.schedule.milestones)) == ("torchvision", 5e-4, [3, 6, 9])
    summary = run(cfg)
    run_dir = Path(summary["run_dir"])
    log = (run_dir / "train.log").read_text()
    weights = torchvision.models.get_model_weights(FINETUNE).DEFAULT
    cached = torch_home / "hub" / "checkpoints" / "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth"
    assert (
        f"init_from=torchvision: MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1 from {cached} "
        "(COCO-val2017 box AP 47.4, mask AP 41.8; recipe https://github.com/pytorch/vision/pull/5773)"
    ) in log
    assert "model.backbone.norm=frozen_bn, model.backbone.trainable_layers=3" in log
    # Everything loads but the three class-dependent layers (91 COCO outputs -> 3 shapes classes + background).
    assert "reshaped-and-skipped 6 | missing 0 | unexpected 0" in log, log
    for name in ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_predictor.mask_fcn_logits"):
        assert f"reshaped, kept new: roi_heads.{name}.weight" in log and f"roi_heads.{name}.bias" in log
    ckpt = checkpoint.load_checkpoint(run_dir / "last.pth")  # weights_only
    assert ckpt["config"]["model"]["backbone"]["norm"] == "frozen_bn"
    assert ckpt["config"]["model"]["backbone"]["trainable_layers"] == 3
    record = ckpt["launch"]["weights"][0]
    assert record == {
        "value": "torchvision",
        "weights": "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1",
        "file": cached.name,
        "sha256": zoo.sha256(cached),
    }
    assert weights.url.endswith(record["file"])
    assert type(ckpt["model"]["backbone.body.bn1.weight"]) is torch.Tensor
    frozen = [n for n, p in torch.load(run_dir / "last.pth", weights_only=True)["model"].items() if "layer1" in n]
    assert frozen and not any("num_batches_tracked" in n for n in frozen)  # FrozenBatchNorm2d: no counters


def test_inspect_shows_the_weights_a_run_started_from() -> None:
    from frcnn_train.inspect import _weights_line

    line = _weights_line(
        {"value": "torchvision", "weights": "X_Weights.COCO_V1", "file": "x-12345678.pth", "sha256": "ab" * 32}
    )
    assert line == f"torchvision = X_Weights.COCO_V1: x-12345678.pth (sha256 {'ab' * 32})"


def test_from_torchvision_and_predict_draw_coco_names(
    torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from frcnn_train.predict import main as predict_main

    model, classes, cfg = zoo.from_torchvision(
        f"torchvision:{FINETUNE}", ["model.min_size=96", "model.max_size=96", "model.rpn_post_nms_top_n_test=50"]
    )
    assert len(classes) == 90 and classes[:3] == ["person", "bicycle", "car"] and classes[11] == zoo.UNUSED_CLASS
    assert not model.training and cfg.model.version == "v2" and cfg.model.arch == "mask_rcnn"
    with torch.no_grad():
        out = model([torch.rand(3, 96, 96)])[0]
    assert 1 in out["labels"].tolist() and len(out["masks"]) == len(out["boxes"])

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray((torch.rand(80, 100, 3) * 255).byte().numpy()).save(photos / "a.png")
    # Room for every proposal's detections of both classes: the "N/A" ones score higher and would fill the 100.
    build = zoo.from_torchvision
    monkeypatch.setattr(zoo, "from_torchvision", lambda source: build(source, ["model.box_detections_per_img=400"]))
    assert (
        predict_main(
            [f"torchvision:{SMALL}", str(photos), "--out", str(tmp_path / "preds"), "--score-threshold", "0.1"]
        )
        == 0
    )
    results = json.loads((tmp_path / "preds" / "predictions.json").read_text())
    assert results and {r["category_name"] for r in results} == {"person"} and results[0]["category_id"] == 1
    assert (tmp_path / "preds" / "a.png").is_file()
    # The Python API on the same source: frcnn-predict's very detections, placeholder classes left out too.
    import frcnn_train

    det = frcnn_train.load(f"torchvision:{SMALL}", device="cpu")
    mine = det.predict(photos / "a.png", score_threshold=0.1)
    assert det.classes == classes and mine["names"] == [r["category_name"] for r in results]
    assert [round(s, 5) for s in mine["scores"].tolist()] == [r["score"] for r in results]
    monkeypatch.setattr(zoo, "from_torchvision", build)
    assert predict_main(["torchvision:fasterrcnn_resnet50_fpn", str(photos), "--out", str(tmp_path / "p2")]) == 2


def test_export_takes_the_same_names(torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from frcnn_train.export import TORCHSCRIPT_METADATA, export

    monkeypatch.setenv("FRCNN_DATA_CACHE", str(tmp_path / "shapes"))
    result = export(f"torchvision:{SMALL}", "torchscript", tmp_path / "zoo.torchscript.pt", check_images=1)
    assert result.check is not None and result.check.passed and result.check.reference > 0
    assert result.input_shape == [3, 320, 320]  # generated images at the model's own size
    extra = {TORCHSCRIPT_METADATA: ""}
    torch.jit.load(str(result.path), _extra_files=extra)
    meta = json.loads(extra[TORCHSCRIPT_METADATA])
    assert meta["classes"][0] == "person" and len(meta["classes"]) == 90
    assert meta["weights"] == meta["checkpoint"] == f"torchvision:{SMALL}"


def test_inspect_reads_a_torchvision_v2_file_as_v2() -> None:
    from frcnn_train.inspect import infer_overrides

    with torch.device("meta"):  # shapes only
        state = torchvision.models.get_model("fasterrcnn_resnet50_fpn_v2", weights=None, weights_backbone=None)
    found = infer_overrides(state.state_dict())
    assert (
        found["model.version"],
        found["model.box_head_convs"],
        found["model.box_head_conv_dim"],
        found["model.box_head_dim"],
        found["model/backbone"],
    ) == ("v2", "4", "256", "1024", "resnet50_fpn")


def test_evaluate_refuses_a_zoo_source_in_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    from frcnn_train.evaluate import main as evaluate_main

    assert evaluate_main([f"torchvision:{SMALL}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: frcnn-evaluate takes a checkpoint") and len(err.splitlines()) == 1
