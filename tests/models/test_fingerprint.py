"""Architecture spec, fingerprint and the diffs users read when a resume is refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from omegaconf import DictConfig

from frcnn_train.models import (
    architecture_spec,
    build_model,
    diff_layouts,
    diff_specs,
    fingerprint,
    tensor_layout,
)


def _cfg(compose_tiny, *overrides: str) -> DictConfig:
    cfg = compose_tiny("model/backbone=resnet18_fpn", *overrides)
    cfg.model.num_classes = 3
    return cfg


def _fp(cfg: DictConfig) -> str:
    return fingerprint(architecture_spec(cfg.model), build_model(cfg.model))


def test_spec_is_flat_plain_and_resolved(compose_tiny) -> None:
    spec = architecture_spec(_cfg(compose_tiny, "model=mask_rcnn").model)
    assert spec["model.arch"] == "mask_rcnn"
    assert spec["model.num_classes"] == 3
    assert spec["model.backbone.name"] == "resnet18_fpn"
    assert spec["model.backbone.norm"] == "bn"  # auto without weights
    assert spec["model.backbone.returned_layers"] == [1, 2, 3, 4]  # null resolved
    assert spec["model.backbone.fpn_channels"] == 32
    assert spec["model.box_head_dim"] == 32
    assert (spec["model.mask_head_layers"], spec["model.mask_head_dim"]) == (1, 16)
    assert spec["model.anchor_sizes"] == [12, 24, 48, 96, 192]
    assert spec["model.attention.type"] == "none" and spec["model.attention.sites"] == []
    assert {"model.attention.reduction", "model.attention.overrides"} <= set(spec)
    for absent in (
        "model.min_size",
        "model.box_score_thresh",
        "model.rpn_pre_nms_top_n_train",
        "model.backbone.weights",
        "model.attention.identity_init",
    ):
        assert absent not in spec
    assert json.loads(json.dumps(spec)) == spec


def test_spec_resolves_norm_from_weights(compose_tiny) -> None:
    cfg = _cfg(compose_tiny, "model.backbone.weights=/somewhere/resnet18.pth")
    assert architecture_spec(cfg.model)["model.backbone.norm"] == "frozen_bn"
    explicit = _cfg(compose_tiny, "model.backbone.returned_layers=[1,2,3,4]", "model.backbone.norm=bn")
    assert architecture_spec(explicit.model) == architecture_spec(_cfg(compose_tiny).model)


def test_fingerprint_is_stable_and_ignores_untensored_keys(compose_tiny) -> None:
    cfg = _cfg(compose_tiny)
    base = _fp(cfg)
    assert re.fullmatch(r"[0-9a-f]{64}", base), base  # a sha256 hex digest, as DESIGN.md states
    # dtypes are part of it: a float64 build of the same config is another architecture to load into.
    assert fingerprint(architecture_spec(cfg.model), build_model(cfg.model).double()) != base
    assert _fp(_cfg(compose_tiny)) == base
    assert _fp(_cfg(compose_tiny, "model.min_size=96", "model.box_score_thresh=0.5")) == base
    assert _fp(_cfg(compose_tiny, "model.backbone.trainable_layers=2")) == base


@pytest.mark.parametrize(
    ("overrides", "num_classes"),
    [
        ((), 5),
        (("model.box_head_dim=64",), 3),
        (("model/backbone=resnet34_fpn",), 3),
        (("model=mask_rcnn",), 3),
        (("model.backbone.norm=frozen_bn",), 3),
    ],
)
def test_fingerprint_changes_with_architecture(compose_tiny, overrides: tuple[str, ...], num_classes: int) -> None:
    base = _fp(_cfg(compose_tiny))
    cfg = _cfg(compose_tiny, *overrides)
    cfg.model.num_classes = num_classes
    assert _fp(cfg) != base


def test_fingerprint_sees_the_tensors_not_only_the_spec(compose_tiny) -> None:
    cfg = _cfg(compose_tiny)
    spec, model = architecture_spec(cfg.model), build_model(cfg.model)
    before = fingerprint(spec, model)
    model.roi_heads.box_head.fc7 = torch.nn.Linear(32, 32, bias=False)
    assert fingerprint(spec, model) != before


def test_diff_specs_lines() -> None:
    old = {"model.box_head_dim": 256, "model.attention.type": "none", "model.mask_head_dim": 64, "model.x": [1, 2]}
    new = {"model.box_head_dim": 128, "model.attention.type": "se", "model.x": [1, 2], "model.attention.heads": 1}
    assert diff_specs(old, new) == [
        "model.box_head_dim: 256 -> 128",
        "model.attention.type: none -> se",
        "model.mask_head_dim: removed (was 64)",
        "model.attention.heads: added (1)",
    ]
    assert diff_specs(old, dict(old)) == []


def test_tensor_layout_from_module_state_or_wrapper(compose_tiny) -> None:
    model = build_model(_cfg(compose_tiny).model)
    layout = tensor_layout(model)
    assert layout["roi_heads.box_head.fc6.weight"] == ([32, 32 * 7 * 7], "float32")
    assert list(layout) == list(model.state_dict())
    assert tensor_layout(model.state_dict()) == layout
    assert tensor_layout({f"module.{k}": v for k, v in model.state_dict().items()}) == layout
    assert tensor_layout(torch.nn.DataParallel(model)) == layout


def test_diff_layouts_reshaped_heads(compose_tiny) -> None:
    old = tensor_layout(build_model(_cfg(compose_tiny).model))
    new = tensor_layout(build_model(_cfg(compose_tiny, "model.box_head_dim=16").model))
    lines = diff_layouts(old, new)
    assert lines[0] == (
        "roi_heads.box_head: 4 tensors reshaped (fc6.weight [32, 1568] -> [16, 1568], "
        "fc6.bias [32] -> [16], fc7.weight [32, 32] -> [16, 16], ...)"
    )
    assert lines[1].startswith("roi_heads.box_predictor: 2 tensors reshaped (cls_score.weight [4, 32] -> [4, 16]")
    assert diff_layouts(old, old) == []
    # Layouts read back from JSON (lists, not tuples) compare the same.
    assert diff_layouts(json.loads(json.dumps(old)), new) == lines


def test_diff_layouts_names_added_and_removed_modules(compose_tiny) -> None:
    state = build_model(_cfg(compose_tiny).model).state_dict()
    with_block = dict(state)
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        with_block[f"backbone.body.layer2.attention.{name}"] = torch.zeros(2)
    assert diff_layouts(state, with_block) == ["backbone.body.layer2.attention: 4 tensors added"]
    assert diff_layouts(with_block, state) == ["backbone.body.layer2.attention: 4 tensors removed"]

    mask = tensor_layout(build_model(_cfg(compose_tiny, "model=mask_rcnn").model))
    assert diff_layouts(tensor_layout(state), mask) == [
        "roi_heads.mask_head: 2 tensors added",
        "roi_heads.mask_predictor: 4 tensors added",
    ]


def test_diff_layouts_reports_dtype_changes(compose_tiny) -> None:
    model = build_model(_cfg(compose_tiny).model)
    old = tensor_layout(model)
    model.roi_heads.box_predictor.half()
    new = tensor_layout(model)
    assert diff_layouts(old, new) == [
        "roi_heads.box_predictor: 4 tensors retyped (cls_score.weight float32 -> float16, "
        "cls_score.bias float32 -> float16, bbox_pred.weight float32 -> float16, ...)"
    ]
