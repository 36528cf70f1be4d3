"""Config composition and the resume rule: mutable keys apply, anything else is refused."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from frcnn_train.config import compose_config, merge_for_resume, requested_keys
from frcnn_train.errors import ConfigError


def saved_config(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_config(list(overrides)), resolve=True)


@pytest.mark.parametrize("override", ["model.box_head_dm=3", "trainer.epochs=many", "model/backbone=resnet19_fpn"])
def test_typos_and_wrong_types_fail_at_compose(override: str) -> None:
    with pytest.raises(Exception) as info:
        compose_config([override])
    assert override.split("=")[0].split("/")[-1].split(".")[-1] in str(info.value) or "resnet19" in str(info.value)


def test_group_choice_requests_only_what_differs_from_defaults() -> None:
    overrides = ["model=mask_rcnn", "trainer.epochs=3"]
    assert requested_keys(compose_config(overrides), overrides) == {"model.arch": "mask_rcnn", "trainer.epochs": 3}


def test_mutable_override_is_applied_and_reported() -> None:
    saved = saved_config("model.box_head_dim=128", "trainer.epochs=2")
    overrides = ["trainer.epochs=5", "data.num_workers=3", "resume=x.pth"]
    merged, changes = merge_for_resume(saved, compose_config(overrides), overrides, "x.pth")
    assert merged.trainer.epochs == 5 and merged.data.num_workers == 3
    assert merged.model.box_head_dim == 128, "the architecture comes from the checkpoint, not the defaults"
    assert changes == ["trainer.epochs: 2 -> 5", "data.num_workers: 0 -> 3"]


def test_flag_left_off_keeps_the_checkpoint_architecture() -> None:
    saved = saved_config("model=mask_rcnn", "model/backbone=mobilenet_v3_fpn")
    merged, changes = merge_for_resume(saved, compose_config([]), [], "x.pth")
    assert merged.model.arch == "mask_rcnn" and merged.model.backbone.name == "mobilenet_v3_fpn"
    assert changes == []


def test_repeating_the_checkpoint_values_is_accepted() -> None:
    saved = saved_config("model=mask_rcnn", "model.box_head_dim=128")
    overrides = ["model=mask_rcnn", "model.box_head_dim=128"]
    merged, changes = merge_for_resume(saved, compose_config(overrides), overrides, "x.pth")
    assert changes == [] and merged.model.box_head_dim == 128


def test_changed_architecture_is_refused_with_both_values() -> None:
    saved = saved_config("model.box_head_dim=128")
    overrides = ["model.box_head_dim=256", "optim.lr=0.1", "trainer.epochs=9"]
    with pytest.raises(ConfigError) as info:
        merge_for_resume(saved, compose_config(overrides), overrides, "runs/x/last.pth")
    message = str(info.value)
    assert "model.box_head_dim (checkpoint 128, requested 256)" in message
    assert "optim.lr (checkpoint 0.01, requested 0.1)" in message
    assert "trainer.epochs (" not in message, "mutable keys are not conflicts"
    assert "init_from=runs/x/last.pth" in message
