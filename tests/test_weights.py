"""init_from: weights saved by other code load into a fresh model, and the report says what happened."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from conftest import tiny_overrides
from frcnn_train.config import compose_config
from frcnn_train.errors import CheckpointError, ConfigError
from frcnn_train.launch import run
from frcnn_train.models import build_model
from frcnn_train.weights import LoadReport, load_init_weights

COUNTER = "num_batches_tracked"


@pytest.fixture(scope="module")
def tiny_cfg(shapes_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("weights_out")

    def compose(*overrides: str) -> DictConfig:
        return compose_config(tiny_overrides(shapes_cache, out) + ["model.num_classes=5", *overrides])

    return compose


def build(cfg: DictConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg.model)


@pytest.fixture(scope="module")
def source(tiny_cfg) -> dict[str, torch.Tensor]:
    """The state of a tiny Faster R-CNN initialised from another seed than the models it loads into."""
    return build(tiny_cfg(), seed=1).state_dict()


def assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    for name, tensor in model.state_dict().items():
        if not name.startswith(skip):
            assert torch.equal(tensor, state[name]), name


def load(model: torch.nn.Module, path: Path, **kwargs) -> LoadReport:
    options = {"remap": [], "strict": False, "trust": False, **kwargs}
    return load_init_weights(model, path, **options)


def test_ddp_save_loads_every_tensor_and_buffer(tiny_cfg, source, tmp_path: Path) -> None:
    torch.save({"module." + k: v for k, v in source.items()}, tmp_path / "ddp.pth")
    model = build(tiny_cfg(), seed=2)
    report = load(model, tmp_path / "ddp.pth", strict=True)
    assert_loaded(model, source)  # running_mean / running_var buffers included
    assert report.stripped == ["module."] and not (report.missing or report.unexpected or report.reshaped)
    assert len(report.loaded) == len([k for k in source if not k.endswith(COUNTER)])
    assert report.format().splitlines()[0].startswith(f"loaded {len(report.loaded)} | reshaped-and-skipped 0")


@pytest.mark.parametrize("container", ["state_dict", "model_state_dict", "model"])
def test_compiled_save_wrapped_in_a_dict_loads(tiny_cfg, source, tmp_path: Path, container: str) -> None:
    # DDP around a compiled model: the prefixes nest.
    state = {"module._orig_mod." + k: v for k, v in source.items()}
    torch.save({container: state, "epoch": 7, "optimizer": {}}, tmp_path / "compiled.pth")
    model = build(tiny_cfg(), seed=2)
    report = load(model, tmp_path / "compiled.pth")
    assert_loaded(model, source)
    assert report.container == container and report.stripped == ["module.", "_orig_mod."]


def test_torchvision_coco_file_into_five_classes_reshapes_only_the_predictor(tmp_path: Path) -> None:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    zoo = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    torch.save(zoo, tmp_path / "fasterrcnn_resnet50_fpn_coco.pth")
    cfg = compose_config(
        [
            "model/backbone=resnet50_fpn",
            "model.backbone.fpn_channels=256",
            "model.box_head_dim=1024",
            "model.num_classes=5",
        ]
    )
    model = build(cfg, seed=3)
    fresh = model.roi_heads.box_predictor.cls_score.weight.clone()
    report = load(model, tmp_path / "fasterrcnn_resnet50_fpn_coco.pth")
    predictor = "roi_heads.box_predictor."
    assert sorted(name for name, _, _ in report.reshaped) == sorted(
        predictor + k for k in ("cls_score.weight", "cls_score.bias", "bbox_pred.weight", "bbox_pred.bias")
    )
    assert (predictor + "cls_score.weight", (91, 1024), (6, 1024)) in report.reshaped
    assert not report.missing and not report.unexpected
    # An untrained torchvision model has BatchNorm2d counters; the report says why they are not counted.
    assert report.counters == sum(k.endswith("num_batches_tracked") for k in zoo) > 0
    assert f"{report.counters} BatchNorm num_batches_tracked counters not counted" in report.format()
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, fresh)  # the fresh head is kept
    assert_loaded(model, zoo, skip=(predictor,))
    assert (
        "reshaped, kept new: roi_heads.box_predictor.cls_score.weight file [91, 1024] -> model [6, 1024]"
        in report.format()
    )


def test_mask_rcnn_with_other_classes_reshapes_box_and_mask_predictors(tiny_cfg, tmp_path: Path) -> None:
    other = build(tiny_cfg("model=mask_rcnn", "model.num_classes=3"), seed=1).state_dict()
    torch.save(other, tmp_path / "mask3.pth")
    report = load(build(tiny_cfg("model=mask_rcnn"), seed=2), tmp_path / "mask3.pth")
    assert {name.rsplit(".", 1)[0] for name, _, _ in report.reshaped} == {
        "roi_heads.box_predictor.cls_score",
        "roi_heads.box_predictor.bbox_pred",
        "roi_heads.mask_predictor.mask_fcn_logits",
    }


def test_remap_rules_apply_in_order(tiny_cfg, source, tmp_path: Path) -> None:
    renamed = {}
    for key, value in source.items():
        key = key.replace("roi_heads.box_head.", "heads.box.")
        renamed["detector." + key] = value
    torch.save(renamed, tmp_path / "renamed.pth")
    rules = [{"from": "detector.", "to": ""}, {"from": r"^heads\.box\.(fc\d)", "to": r"roi_heads.box_head.\1"}]
    model = build(tiny_cfg(), seed=2)
    report = load(model, tmp_path / "renamed.pth", remap=rules, strict=True)
    assert_loaded(model, source)
    assert not report.unexpected
    # Without the second rule, the box head is reported on both sides.
    report = load(build(tiny_cfg(), seed=2), tmp_path / "renamed.pth", remap=rules[:1])
    assert "roi_heads.box_head.fc6.weight" in report.missing and "heads.box.fc6.weight" in report.unexpected
    with pytest.raises(ConfigError, match=r"init.remap\[0\].from"):
        load(build(tiny_cfg(), seed=2), tmp_path / "renamed.pth", remap=[{"from": "(unclosed", "to": ""}])


def test_strict_refuses_any_skip_and_leaves_the_model_alone(tiny_cfg, tmp_path: Path) -> None:
    torch.save(build(tiny_cfg("model.num_classes=2"), seed=1).state_dict(), tmp_path / "two.pth")
    model = build(tiny_cfg(), seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"init.strict=true .* 4 reshaped \(roi_heads.box_predictor"):
        load(model, tmp_path / "two.pth", strict=True)
    assert_loaded(model, before)


def test_untrusted_pickle_is_refused_unless_trusted(tiny_cfg, source, tmp_path: Path) -> None:
    torch.save({"model": source, "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match=r"argparse.Namespace.*init.trust=true"):
        load(build(tiny_cfg(), seed=2), tmp_path / "pickled.pth")
    model = build(tiny_cfg(), seed=2)
    load(model, tmp_path / "pickled.pth", trust=True)
    assert_loaded(model, source)


def test_nothing_matching_is_an_error_that_names_the_prefixes(tiny_cfg, tmp_path: Path) -> None:
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet18_imagenet.pth")
    with pytest.raises(
        CheckpointError,
        match=r"file prefixes: conv1, bn1, layer1.0.*classification backbone"
        r".*model.backbone.weights=.*to: 'backbone.body.'",
    ):
        load(build(tiny_cfg(), seed=2), tmp_path / "resnet18_imagenet.pth")
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "no_tensors.pth")
    with pytest.raises(CheckpointError, match="without tensors"):
        load(build(tiny_cfg(), seed=2), tmp_path / "no_tensors.pth")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_mask_checkpoint_fine_tunes_faster_rcnn_end_to_end(compose_tiny) -> None:
    """A real Mask R-CNN checkpoint as init_from of a Faster R-CNN run: mask keys unexpected, training goes on."""
    mask_run = Path(run(compose_tiny("model=mask_rcnn", "trainer.max_steps=1", "run_name=mask"))["run_dir"])
    collect = Collect()
    # The report is logged before train.log opens, so listen on the logger itself.
    logging.getLogger("frcnn_train").addHandler(collect)
    try:
        summary = run(compose_tiny(f"init_from={mask_run / 'last.pth'}", "trainer.max_steps=1", "run_name=fine"))
    finally:
        logging.getLogger("frcnn_train").removeHandler(collect)
    assert summary["global_step"] == 1
    report = next(line for line in collect.lines if line.startswith(f"init_from={mask_run / 'last.pth'}:"))
    assert "| unexpected 6" in report  # tiny mask head: 1 conv, and the predictor's 2 convs
    assert "roi_heads.mask_head" in report and "roi_heads.mask_predictor" in report
    assert "reshaped-and-skipped 0 | missing 0" in report
