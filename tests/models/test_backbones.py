"""build_backbone: local ImageNet weights, norm choice, freezing, returned layers, FPN width."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from frcnn_train.errors import CheckpointError, ConfigError
from frcnn_train.models import BACKBONES, build_backbone, stage_names


def _build(name: str = "resnet18_fpn", **kw):
    args = dict(weights=None, trainable_layers=None, norm="auto", returned_layers=None, fpn_channels=32)
    args.update(kw)
    return build_backbone(name, **args)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    state = resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18-imagenet.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def mobilenet_v2_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(2)
    state = mobilenet_v2(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2-imagenet.pth"
    torch.save(state, path)
    return path, state


def test_backbone_names() -> None:
    assert BACKBONES == (
        "resnet18_fpn",
        "resnet34_fpn",
        "resnet50_fpn",
        "resnet101_fpn",
        "mobilenet_v2_fpn",
        "mobilenet_v3_fpn",
    )


def test_resnet_weights_load_with_frozen_bn(resnet18_file) -> None:
    path, state = resnet18_file
    bb = _build(weights=str(path))
    assert torch.equal(bb.body.conv1.weight, state["conv1.weight"])
    assert torch.equal(bb.body.layer3[1].bn2.running_var, state["layer3.1.bn2.running_var"])
    assert isinstance(bb.body.bn1, FrozenBatchNorm2d)


def test_loading_says_what_it_took_from_which_file(resnet18_file, caplog: pytest.LogCaptureFixture) -> None:
    path, state = resnet18_file
    caplog.set_level("INFO", logger="frcnn_train")
    _build(weights=str(path))  # frozen BN: the file's num_batches_tracked have nowhere to go
    _build(weights=str(path), norm="bn")
    counters = sum(k.endswith("num_batches_tracked") for k in state)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model.backbone.weights: loaded")]
    assert lines == [
        f"model.backbone.weights: loaded {len(state) - 2 - counters} resnet18 tensors from {path}; skipped 2 "
        f"classifier-head tensor(s) and {counters} BatchNorm step counter(s), which detection does not use.",
        f"model.backbone.weights: loaded {len(state) - 2} resnet18 tensors from {path}; skipped 2 "
        "classifier-head tensor(s) and 0 BatchNorm step counter(s), which detection does not use.",
    ]


def test_module_prefixed_weights_load(resnet18_file, tmp_path: Path) -> None:
    path, state = resnet18_file
    prefixed = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed)
    bb = _build(weights=str(prefixed), norm="bn")
    assert isinstance(bb.body.bn1, nn.BatchNorm2d)
    assert torch.equal(bb.body.layer4[0].conv2.weight, state["layer4.0.conv2.weight"])


def test_mobilenet_weights_load(mobilenet_v2_file) -> None:
    path, state = mobilenet_v2_file
    bb = _build("mobilenet_v2_fpn", weights=str(path))
    assert torch.equal(bb.body["0"][0].weight, state["features.0.0.weight"])
    assert torch.equal(bb.body["14"].conv[1][0].weight, state["features.14.conv.1.0.weight"])


def test_wrong_weights_file_names_file_backbone_and_origin(mobilenet_v2_file) -> None:
    path, _ = mobilenet_v2_file
    with pytest.raises(CheckpointError) as info:
        _build(weights=str(path))
    msg = str(info.value)
    assert str(path) in msg and "resnet18" in msg and "0 of 100" in msg and "mobilenet_v2" in msg
    assert "\n" not in msg


def test_other_resnet_depth_is_refused(resnet18_file) -> None:
    path, _ = resnet18_file
    with pytest.raises(CheckpointError, match=r"does not match resnet34 .*looks like a resnet18 file"):
        _build("resnet34_fpn", weights=str(path))


def test_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=f"{missing} does not exist"):
        _build(weights=str(missing))


@pytest.mark.parametrize("content", [b"not a torch file at all", bytes(range(256)) * 4])
def test_garbage_weights_file(tmp_path: Path, content: bytes) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{junk} .*is not a readable") as info:
        _build(weights=str(junk))
    assert "\n" not in str(info.value)


def test_non_tensor_file_is_refused(tmp_path: Path) -> None:
    odd = tmp_path / "odd.pth"
    torch.save({"epoch": 3, "note": "hi"}, odd)
    with pytest.raises(CheckpointError, match=f"{odd} holds a dict without tensors"):
        _build(weights=str(odd))


def test_norm_choice(resnet18_file) -> None:
    path, _ = resnet18_file
    assert isinstance(_build().body.bn1, nn.BatchNorm2d)
    assert isinstance(_build(norm="frozen_bn").body.bn1, FrozenBatchNorm2d)
    assert type(_build(weights=str(path), norm="bn").body.bn1) is nn.BatchNorm2d
    with pytest.raises(ConfigError, match="model.backbone.norm=group.*auto, frozen_bn, bn"):
        _build(norm="group")


def _trainable_prefixes(bb: nn.Module) -> set[str]:
    return {name.split(".")[0] for name, p in bb.body.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (None, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}),
        (5, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}),
        (3, {"layer2", "layer3", "layer4"}),
        (1, {"layer4"}),
        (0, set()),
    ],
)
def test_resnet_trainable_layers(layers: int | None, expected: set[str]) -> None:
    bb = _build(trainable_layers=layers, norm="bn")
    assert _trainable_prefixes(bb) == expected
    assert all(p.requires_grad for p in bb.fpn.parameters())
    frozen = [n for n, p in bb.body.named_parameters() if n.split(".")[0] not in expected]
    assert all(not bb.body.get_parameter(n).requires_grad for n in frozen)


@pytest.mark.parametrize(("layers", "first_trainable"), [(None, 0), (6, 0), (2, 14), (1, 18), (0, 19)])
def test_mobilenet_trainable_layers(layers: int | None, first_trainable: int) -> None:
    # mobilenet_v2 stages start at features 0, 2, 4, 7, 14, 18 (torchvision's strided blocks).
    bb = _build("mobilenet_v2_fpn", trainable_layers=layers, norm="bn")
    for name, p in bb.body.named_parameters():
        assert p.requires_grad == (int(name.split(".")[0]) >= first_trainable), name


@pytest.mark.parametrize(("name", "bad"), [("resnet18_fpn", 6), ("resnet18_fpn", -1), ("mobilenet_v3_fpn", 7)])
def test_trainable_layers_out_of_range(name: str, bad: int) -> None:
    high = 5 if name.startswith("resnet") else 6
    with pytest.raises(ConfigError, match=rf"model.backbone.trainable_layers={bad} .*\[0, {high}\]"):
        _build(name, trainable_layers=bad)


def test_returned_layers_and_stage_names() -> None:
    assert stage_names("resnet50_fpn") == ["layer1", "layer2", "layer3", "layer4"]
    assert stage_names("mobilenet_v2_fpn") == ["14", "18"]
    assert stage_names("mobilenet_v3_fpn") == ["13", "16"]
    assert stage_names("resnet18_fpn", [2, 3]) == ["layer2", "layer3"]

    bb = _build(returned_layers=[2, 3], fpn_channels=24)
    assert bb.out_channels == 24
    assert [b[0].in_channels for b in bb.fpn.inner_blocks] == [128, 256]
    assert "layer4" not in dict(bb.body.named_children())
    out = bb(torch.rand(1, 3, 64, 64))
    assert list(out) == ["0", "1", "pool"] and out["0"].shape == (1, 24, 8, 8)

    mb = _build("mobilenet_v3_fpn", returned_layers=[3, 4, 5], fpn_channels=16)
    assert [b[0].in_channels for b in mb.fpn.inner_blocks] == [80, 160, 960]
    for bad in ([0, 1], [3, 2], [], [1, 5]):
        with pytest.raises(ConfigError, match=r"model.backbone.returned_layers=.*\[1, 4\]"):
            _build(returned_layers=bad)


def test_default_fpn_width_keeps_torchvision_fpn() -> None:
    bb = _build(fpn_channels=256)
    assert bb.out_channels == 256 and bb.fpn.layer_blocks[0][0].out_channels == 256
