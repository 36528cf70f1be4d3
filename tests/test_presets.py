"""Presets and experiments: a dataset never resizes the model; group choices on resume name their keys."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from frcnn_train.config import compose_config
from frcnn_train.overrides import requested_keys
from frcnn_train.resume import ResumeConflict, merge_for_resume

SHAPES_SIZES = {"min_size": 96, "box_head_dim": 256, "rpn_post_nms_top_n_train": 150}
TORCHVISION_SIZES = {"min_size": 800, "box_head_dim": 1024, "rpn_post_nms_top_n_train": 2000}


def _sizes(*overrides: str) -> dict:
    model = compose_config(list(overrides)).model
    return {key: model[key] for key in SHAPES_SIZES}


@pytest.mark.parametrize(
    "overrides, sizes",
    [
        ((), SHAPES_SIZES),  # the embedded default stays CPU-sized
        (("model=mask_rcnn",), SHAPES_SIZES),
        (("data=coco", "data.root=/data/coco"), TORCHVISION_SIZES),  # no shapes-sized heads left behind
        (("data=voc", "data.root=/data/voc", "model=mask_rcnn"), TORCHVISION_SIZES),
    ],
)
def test_the_preset_follows_the_model_and_data_pair(overrides, sizes) -> None:
    assert _sizes(*overrides) == sizes


def test_the_shapes_data_option_sets_only_data_keys() -> None:
    assert all(key.startswith("data.") for key in requested_keys(compose_config(["data=shapes"]), ["data=shapes"]))
    assert compose_config(["model.box_head_dim=64"]).model.box_head_dim == 64, "the command line beats the preset"
    assert compose_config(["data=shapes", "model.min_size=256"]).model.min_size == 256


def test_an_experiment_requests_its_own_keys_and_the_choices_it_overrides() -> None:
    cfg = compose_config(["+experiment=shapes_mask_cbam"])
    assert (cfg.model.arch, cfg.model.attention.type, cfg.model.mask_head_dim) == ("mask_rcnn", "cbam", 64)
    keys = requested_keys(cfg, ["+experiment=shapes_mask_cbam"])
    assert keys["model.arch"] == "mask_rcnn" and keys["model.attention.type"] == "cbam"
    assert keys["trainer.eval_every"] == 4 and "model.backbone.name" not in keys


def test_resume_with_the_experiment_it_started_with_is_accepted_and_another_refused() -> None:
    experiment = ["+experiment=shapes_mask_cbam"]
    saved = OmegaConf.to_container(compose_config(experiment), resolve=True)
    _, changes = merge_for_resume(saved, compose_config(experiment), experiment, "last.pth")
    assert changes == []
    plain = OmegaConf.to_container(compose_config(), resolve=True)
    with pytest.raises(ResumeConflict, match=r"model.arch \(checkpoint 'faster_rcnn', requested 'mask_rcnn'\)"):
        merge_for_resume(plain, compose_config(experiment), experiment, "last.pth")
