"""Config composition and the resume rule: mutable keys apply, anything else is refused."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from frcnn_train.config import check_values, compose_config
from frcnn_train.errors import ConfigError
from frcnn_train.overrides import requested_keys
from frcnn_train.resume import merge_for_resume


def saved_config(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_config(list(overrides)), resolve=True)


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.box_head_dm=3", "Key 'box_head_dm' not in 'ModelConfig'"),  # the schema knows every key
        ("trainer.epochs=many", "'many' of type 'str' could not be converted to Integer"),
        ("model/backbone=resnet19_fpn", "Could not find 'model/backbone/resnet19_fpn'"),
    ],
)
def test_typos_and_wrong_types_fail_at_compose(override: str, named: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_config([override])
    cause = info.value.__cause__
    assert named in str(info.value) + (str(cause) if cause else "")


# One override per rule family of check_values, with the text the user must see.
IMPOSSIBLE = [
    ("trainer.batch_size=0", "trainer.batch_size=0 must be a whole number >= 1"),
    ("trainer.accumulate=0", "trainer.accumulate=0 must be a whole number >= 1"),
    ("optim.lr=-1", "optim.lr=-1.0 must be a number >= 0"),
    ("model.min_size=0", "model.min_size=0 must be a whole number of pixels >= 1"),
    ("model.min_size=200 model.max_size=100", "model.max_size=100 must be >= model.min_size=200"),
    ("trainer.epochs=0", "trainer.epochs=0 must be a whole number >= 1"),
    ("trainer.epochs=-3", "trainer.epochs=-3 must be a whole number >= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0 must be a whole number >= 1, or null"),
    ("trainer.keep_last=-1", "trainer.keep_last=-1 must be a whole number >= 0"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps=-1 must be a whole number >= 0"),
    ("trainer.log_every=0", "trainer.log_every=0 must be a whole number >= 1"),
    ("trainer.grad_clip=0", "trainer.grad_clip=0.0 must be a number > 0, or null"),
    ("data.num_workers=-1", "data.num_workers=-1 must be a whole number >= 0"),
    (
        "data.num_workers=many",
        "data.num_workers=many must be a whole number >= 0 (0: load in the main process), or auto",
    ),
    ("optim.betas=[0.9]", "optim.betas=[0.9] must be two numbers in [0, 1)"),
    ("model.anchor_sizes=[]", "model.anchor_sizes=[] must be one or more sizes"),
    ("trainer.amp_dtype=fp8", "trainer.amp_dtype=fp8 must be fp16 or bf16"),
]


@pytest.mark.parametrize("override, message", IMPOSSIBLE, ids=[o for o, _ in IMPOSSIBLE])
def test_values_that_cannot_work_are_refused_naming_key_and_range(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_values(compose_config(override.split()))
    assert str(info.value).startswith(message) and str(info.value).endswith("fix this value")


def test_every_bad_value_is_listed_and_the_defaults_pass() -> None:
    check_values(compose_config([]))
    check_values(compose_config(["optim.lr=0", "trainer.max_steps=null", "trainer.keep_last=0"]))
    with pytest.raises(ConfigError, match=r"^trainer.epochs=0 .*; trainer.batch_size=0 .*; fix these values$"):
        check_values(compose_config(["trainer.epochs=0", "trainer.batch_size=0"]))
    # `keys` limits the check to what the caller lets a user change (evaluate: data, batch size).
    check_values(compose_config(["trainer.epochs=0"]), keys=("data", "trainer.batch_size"))
    with pytest.raises(ConfigError, match="data.num_workers=-2"):
        check_values(compose_config(["data.num_workers=-2"]), keys=("data", "trainer.batch_size"))


def test_group_choice_requests_only_what_differs_from_defaults() -> None:
    overrides = ["model=mask_rcnn", "trainer.epochs=3"]
    assert requested_keys(compose_config(overrides), overrides) == {"model.arch": "mask_rcnn", "trainer.epochs": 3}


def test_mutable_override_is_applied_and_reported() -> None:
    saved = saved_config("model.box_head_dim=128", "trainer.epochs=2", "data.num_workers=0")
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


def test_num_workers_auto_is_the_default_and_a_saved_number_resumes() -> None:
    """data.num_workers became `auto`; checkpoints from before hold numbers, which a resume keeps or changes."""
    assert compose_config([]).data.num_workers == "auto"
    check_values(compose_config(["data.num_workers=auto"]))
    saved = saved_config("data.num_workers=4")
    merged, changes = merge_for_resume(saved, compose_config(["resume=x.pth"]), ["resume=x.pth"], "x.pth")
    assert merged.data.num_workers == 4 and changes == []
    overrides = ["resume=x.pth", "data.num_workers=auto"]
    merged, changes = merge_for_resume(saved, compose_config(overrides), overrides, "x.pth")
    assert merged.data.num_workers == "auto" and changes == ["data.num_workers: 4 -> 'auto'"]


def test_num_workers_written_in_quotes_is_the_number() -> None:
    """Issue 22, item 14: the key also takes `auto`, so Hydra leaves data.num_workers='2' a string."""
    from frcnn_train.data import resolve_num_workers

    cfg = compose_config(["data.num_workers='2'"])
    assert cfg.data.num_workers == "2"
    check_values(cfg)
    assert resolve_num_workers(cfg.data.num_workers, "cpu") == 2
    with pytest.raises(ConfigError, match=r"data.num_workers=-2 must be a whole number"):
        check_values(compose_config(["data.num_workers='-2'"]))
