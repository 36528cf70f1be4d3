"""Attention blocks and sites: shapes, identity start, stable names, every backbone and arch, errors."""

from __future__ import annotations

import copy
import itertools
import math
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.models import detection as tv_detection
from torchvision.models import resnet18

from frcnn_train.config import ModelConfig
from frcnn_train.errors import ConfigError
from frcnn_train.models import BACKBONES, architecture_spec, build_model, diff_layouts, fingerprint, tensor_layout
from frcnn_train.models.attention import BLOCKS, CBAM, ECA, NonLocal, SqueezeExcitation, eca_kernel_size
from frcnn_train.models.builder import attention_plan, valid_attention_sites

RESNET_MASK_SITES = [
    "backbone.layer1",
    "backbone.layer2",
    "backbone.layer3",
    "backbone.layer4",
    "fpn.0",
    "fpn.1",
    "fpn.2",
    "fpn.3",
    "fpn.pool",
    "roi_heads.box",
    "roi_heads.mask",
]
# Where each site's block lands in the state dict (tiny configs: fpn_channels=32).
RESNET_MASK_MODULES = [
    "backbone.body.layer1.attention",
    "backbone.body.layer2.attention",
    "backbone.body.layer3.attention",
    "backbone.body.layer4.attention",
    "backbone.fpn.attention.0",
    "backbone.fpn.attention.1",
    "backbone.fpn.attention.2",
    "backbone.fpn.attention.3",
    "backbone.fpn.attention.pool",
    "roi_heads.attention.box",
    "roi_heads.attention.mask",
]
# Every block type in one model: se by default, the others by per-site override (both forms).
MIXED_OVERRIDES = (
    "+model.attention.overrides={fpn.0:{type:cbam,reduction:4},"
    "roi_heads.box:{type:nonlocal,heads:2,inner_channels:8},roi_heads:{mask:{type:eca}},"
    "backbone.layer4:{type:nonlocal}}"
)


def _cfg(compose_tiny, *overrides: str) -> DictConfig:
    cfg = compose_tiny(*overrides)
    cfg.model.num_classes = 3  # no dataset is read here
    return cfg


def _sites(sites: list[str]) -> str:
    return f"model.attention.sites=[{','.join(sites)}]"


def _batch(with_masks: bool) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=gen) for _ in range(2)]
    targets = []
    for box, label in (([4.0, 6.0, 30.0, 40.0], 1), ([20.0, 18.0, 60.0, 50.0], 2)):
        target = {"boxes": torch.tensor([box]), "labels": torch.tensor([label])}
        if with_masks:
            masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
            x0, y0, x1, y1 = map(int, box)
            masks[0, y0:y1, x0:x1] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


def _attention_modules(model: torch.nn.Module) -> list[str]:
    """Module paths of the blocks, from their state-dict keys, in state-dict order."""
    names = [k.rsplit(".", 1)[0] for k in model.state_dict() if ".attention." in k]
    paths = []
    for name in names:
        parts = name.split(".")
        cut = parts.index("attention") + (2 if parts[0] == "roi_heads" or parts[1] == "fpn" else 1)
        paths.append(".".join(parts[:cut]))
    return list(dict.fromkeys(paths))


# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("shape", [(2, 32, 7, 7), (3, 32, 14, 14), (2, 32, 5, 9), (1, 32, 1, 1), (0, 32, 7, 7)])
def test_blocks_keep_the_shape_and_identity_init_is_exact(kind: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    assert torch.equal(BLOCKS[kind](32, identity_init=True)(x), x)
    y = BLOCKS[kind](32)(x)
    assert y.shape == x.shape
    if shape[0]:
        assert not torch.allclose(y, x), "without identity_init the block is the published one, not a no-op"


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_identity_blocks_get_gradients_and_leave_identity(kind: str) -> None:
    torch.manual_seed(0)
    block = BLOCKS[kind](16, identity_init=True)
    x, target = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.5)
    for _ in range(2):  # the first step moves gamma (or `out`), the second reaches the rest
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(block(x), target).backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    assert not torch.equal(block(x), x)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_blocks_under_autocast_keep_the_input_dtype(kind: str) -> None:
    block = BLOCKS[kind](32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = block(torch.randn(2, 32, 7, 7, dtype=torch.bfloat16))
        full = block(torch.randn(2, 32, 7, 7))
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert torch.isfinite(low).all() and torch.isfinite(full).all()


def test_block_parameters_set_their_tensors() -> None:
    assert SqueezeExcitation(256, reduction=16).fc1.weight.shape == (16, 256)
    assert SqueezeExcitation(256, reduction=8).fc2.weight.shape == (256, 32)
    assert SqueezeExcitation(8, reduction=16).fc1.weight.shape == (1, 8)  # at least one channel
    cbam = CBAM(64, reduction=4, kernel_size=3)
    assert (cbam.fc1.weight.shape, cbam.spatial.weight.shape) == ((16, 64), (1, 2, 3, 3))
    assert ECA(256).conv.weight.shape == (1, 1, 5) and ECA(256, kernel_size=9).conv.weight.shape == (1, 1, 9)
    nonlocal_ = NonLocal(64, heads=4)
    assert nonlocal_.theta.weight.shape == (32, 64, 1, 1) and nonlocal_.out.weight.shape == (64, 32, 1, 1)
    assert NonLocal(64, inner_channels=16).g.weight.shape == (16, 64, 1, 1)
    for block in (SqueezeExcitation(64), CBAM(64), ECA(64)):
        assert block.gamma.shape == () and block.gamma.item() == 1.0
    assert {b.gamma.item() for b in (SqueezeExcitation(64, identity_init=True), ECA(64, identity_init=True))} == {0.0}


def test_eca_kernel_size_follows_the_paper() -> None:
    # k = |log2(C)/2 + 1/2| made odd (Wang et al. 2020, eq. 12).
    assert [eca_kernel_size(c) for c in (16, 64, 256, 512, 1024, 2048)] == [3, 3, 5, 5, 5, 7]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SqueezeExcitation(64, reduction=0), "reduction=0"),
        (lambda: CBAM(64, kernel_size=4), "kernel_size=4 must be odd"),
        (lambda: ECA(64, kernel_size=2), "kernel_size=2 must be odd"),
        (lambda: NonLocal(64, heads=3), "heads=3 must divide inner_channels=32"),
        (lambda: NonLocal(64, inner_channels=0), "inner_channels=0"),
    ],
)
def test_block_arguments_are_checked(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


# ----------------------------------------------------------------------------- sites on models


def test_valid_sites_follow_backbone_arch_and_returned_layers(compose_tiny) -> None:
    assert valid_attention_sites(_cfg(compose_tiny, "model=mask_rcnn").model) == RESNET_MASK_SITES
    assert valid_attention_sites(_cfg(compose_tiny).model) == RESNET_MASK_SITES[:-1]
    assert valid_attention_sites(_cfg(compose_tiny, "model/backbone=mobilenet_v3_fpn").model) == [
        "backbone.13",
        "backbone.16",
        "fpn.0",
        "fpn.1",
        "fpn.pool",
        "roi_heads.box",
    ]
    assert valid_attention_sites(_cfg(compose_tiny, "model/backbone=mobilenet_v2_fpn").model)[:2] == [
        "backbone.14",
        "backbone.18",
    ]
    assert valid_attention_sites(_cfg(compose_tiny, "model.backbone.returned_layers=[2,3,4]").model) == [
        "backbone.layer2",
        "backbone.layer3",
        "backbone.layer4",
        "fpn.0",
        "fpn.1",
        "fpn.2",
        "fpn.pool",
        "roi_heads.box",
    ]


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_default_sites_fit_every_backbone(compose_tiny, backbone: str) -> None:
    """The group files name groups, not ResNet stages, so `model/attention=<type>` works on any backbone."""
    stages = [
        s
        for s in valid_attention_sites(_cfg(compose_tiny, f"model/backbone={backbone}").model)
        if s.startswith("backbone.")
    ]
    for kind in BLOCKS:
        cfg = _cfg(compose_tiny, f"model/backbone={backbone}", f"model/attention={kind}")
        assert list(attention_plan(cfg.model)) == (stages[-1:] if kind == "nonlocal" else stages), kind


def test_site_groups_expand_in_model_order(compose_tiny) -> None:
    cfg = _cfg(
        compose_tiny,
        "model=mask_rcnn",
        "model/attention=eca",
        "model.attention.sites=[roi_heads,backbone.last,fpn,backbone.layer4]",
    )
    assert list(attention_plan(cfg.model)) == [
        "backbone.layer4",
        "fpn.0",
        "fpn.1",
        "fpn.2",
        "fpn.3",
        "fpn.pool",
        "roi_heads.box",
        "roi_heads.mask",
    ]


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_each_block_at_every_site_trains_and_predicts(compose_tiny, kind: str) -> None:
    torch.manual_seed(0)
    cfg = _cfg(compose_tiny, "model=mask_rcnn", f"model/attention={kind}", _sites(RESNET_MASK_SITES))
    model = build_model(cfg.model)
    assert _attention_modules(model) == RESNET_MASK_MODULES
    assert all(isinstance(model.get_submodule(p), BLOCKS[kind]) for p in RESNET_MASK_MODULES)
    images, targets = _batch(with_masks=True)
    model.train()
    losses = model(images, targets)
    assert all(math.isfinite(v.item()) for v in losses.values()), losses
    sum(losses.values()).backward()
    # Reached by the graph; a level no sampled anchor or RoI falls on may still get an all-zero gradient.
    unused = [n for n, p in model.named_parameters() if ".attention." in n and p.grad is None]
    assert unused == [], "every block runs"


@pytest.mark.parametrize(("backbone", "kind"), list(zip(BACKBONES, itertools.cycle(BLOCKS))))
def test_every_backbone_takes_blocks_at_all_its_sites(compose_tiny, backbone: str, kind: str) -> None:
    torch.manual_seed(0)
    base = _cfg(compose_tiny, f"model/backbone={backbone}")
    sites = valid_attention_sites(base.model)
    cfg = _cfg(compose_tiny, f"model/backbone={backbone}", f"model/attention={kind}", _sites(sites))
    model = build_model(cfg.model)
    stages = [s.split(".", 1)[1] for s in sites if s.startswith("backbone.")]
    assert _attention_modules(model)[: len(stages)] == [f"backbone.body.{s}.attention" for s in stages]
    # MobileNet stages end in InvertedResidual (a hook runs the block) or a Sequential (runs it as a child).
    calls = []
    model.get_submodule(f"backbone.body.{stages[0]}.attention").register_forward_hook(lambda *_: calls.append(1))
    images, targets = _batch(with_masks=False)
    model.train()
    losses = model(images, targets)
    assert all(math.isfinite(v.item()) for v in losses.values()), losses
    assert calls == [1], "the first stage's block runs exactly once per forward"


def test_one_model_mixes_block_types_by_override_under_autocast(compose_tiny) -> None:
    cfg = _cfg(
        compose_tiny,
        "model=mask_rcnn",
        "model/attention=se",
        "model.attention.reduction=8",
        _sites(RESNET_MASK_SITES),
        MIXED_OVERRIDES,
    )
    model = build_model(cfg.model)
    kinds = {p: type(model.get_submodule(p)).__name__ for p in RESNET_MASK_MODULES}
    assert kinds["backbone.body.layer3.attention"] == "SqueezeExcitation"
    assert model.backbone.body.layer3.attention.fc1.weight.shape == (256 // 8, 256)
    assert kinds["backbone.body.layer4.attention"] == "NonLocal"
    assert kinds["backbone.fpn.attention.0"] == "CBAM" and model.backbone.fpn.attention["0"].fc1.out_features == 8
    assert kinds["roi_heads.attention.box"] == "NonLocal" and model.roi_heads.attention.box.heads == 2
    assert kinds["roi_heads.attention.mask"] == "ECA"  # the nested form of an override counts too
    images, targets = _batch(with_masks=True)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(math.isfinite(v.item()) for v in losses.values()), losses


def test_an_override_can_give_a_site_its_block_without_a_global_type(compose_tiny) -> None:
    cfg = _cfg(
        compose_tiny, "model.attention.sites=[roi_heads.box]", "+model.attention.overrides={roi_heads.box:{type:eca}}"
    )
    assert isinstance(build_model(cfg.model).roi_heads.attention.box, ECA)


# ----------------------------------------------------------------------------- names and identity


def test_names_are_stable_and_every_other_key_stays_torchvision(compose_tiny) -> None:
    plain = list(tensor_layout(build_model(_cfg(compose_tiny, "model=mask_rcnn").model)))
    cfg = _cfg(compose_tiny, "model=mask_rcnn", "model/attention=cbam", _sites(RESNET_MASK_SITES))
    first, second = tensor_layout(build_model(cfg.model)), tensor_layout(build_model(cfg.model))
    assert first == second
    assert [k for k in first if ".attention." not in k] == plain
    shuffled = _cfg(compose_tiny, "model=mask_rcnn", "model/attention=cbam", _sites(RESNET_MASK_SITES[::-1]))
    assert tensor_layout(build_model(shuffled.model)) == first, "the list's order does not change the model"
    assert "backbone.body.layer3.attention.spatial.weight" in first
    assert "backbone.fpn.attention.pool.fc1.weight" in first and "roi_heads.attention.mask.gamma" in first


def test_model_zoo_keys_still_map_with_attention_everywhere() -> None:
    cfg = OmegaConf.structured(ModelConfig(arch="mask_rcnn", num_classes=90))
    cfg.attention.type, cfg.attention.sites = "se", RESNET_MASK_SITES
    with torch.device("meta"):
        ours = tensor_layout(build_model(cfg))
        theirs = tensor_layout(tv_detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91))
    assert {k: v for k, v in ours.items() if ".attention." not in k} == theirs
    assert [k for k in ours if ".attention." not in k] == list(theirs)


def test_identity_init_leaves_a_trained_model_unchanged(compose_tiny) -> None:
    # Every block type at once (per-site overrides), at every site: one pair of models instead of four.
    torch.manual_seed(0)
    plain = build_model(_cfg(compose_tiny, "model=mask_rcnn").model).eval()
    cfg = _cfg(
        compose_tiny,
        "model=mask_rcnn",
        "model/attention=se",
        _sites(RESNET_MASK_SITES),
        "model.attention.identity_init=true",
        MIXED_OVERRIDES,
    )
    attended = build_model(cfg.model).eval()
    assert {type(attended.get_submodule(p)).__name__ for p in RESNET_MASK_MODULES} == {
        "SqueezeExcitation",
        "CBAM",
        "ECA",
        "NonLocal",
    }
    missing, unexpected = attended.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".attention." in k for k in missing)
    images, _ = _batch(with_masks=True)
    with torch.no_grad():
        expected, got = plain(images), attended(images)
        x = torch.rand(1, 3, 64, 64)
        plain_features, features = plain.backbone(x), attended.backbone(x)
    assert all(torch.equal(plain_features[k], features[k]) for k in plain_features)
    assert len(expected[0]["boxes"]) > 0, "random heads still detect something at score 0.05"
    for a, b in zip(expected, got):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bitwise equal outputs"


def test_identity_init_defaults_to_on_with_backbone_weights(compose_tiny, tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), weights)
    sites = _sites(["backbone.layer4", "roi_heads.box"])
    overrides = "+model.attention.overrides={roi_heads.box:{type:nonlocal}}"

    def gate_and_projection(*extra: str) -> tuple[float, bool]:
        model = build_model(_cfg(compose_tiny, "model/attention=se", sites, overrides, *extra).model)
        return model.backbone.body.layer4.attention.gamma.item(), bool(model.roi_heads.attention.box.out.weight.any())

    assert gate_and_projection(f"model.backbone.weights={weights}") == (0.0, False)
    assert gate_and_projection() == (1.0, True)
    assert gate_and_projection(f"model.backbone.weights={weights}", "model.attention.identity_init=false") == (
        1.0,
        True,
    )
    assert gate_and_projection("model.attention.identity_init=true") == (0.0, False)


def test_copies_and_pickles_keep_working_blocks(compose_tiny) -> None:
    sites = ["backbone.13", "backbone.16", "fpn.1", "roi_heads.box"]  # 13 is hooked, 16 a Sequential child
    cfg = _cfg(compose_tiny, "model/backbone=mobilenet_v3_fpn", "model/attention=se", _sites(sites))
    model = build_model(cfg.model).eval()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        hook = next(iter(clone.roi_heads.box_head._forward_pre_hooks.values()))
        assert hook.block is clone.roi_heads.attention.box, "the hook runs the copy's own block"
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(model.backbone(x).values(), clone.backbone(x).values()))
            clone.backbone.fpn.attention["1"].gamma.fill_(0.5)
            assert not torch.equal(model.backbone(x)["1"], clone.backbone(x)["1"])


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("model/attention=se", "model.attention.sites=[backbone.layer5]"),
            r"model.attention.sites: backbone.layer5 is not a site; valid sites for faster_rcnn with resnet18_fpn: "
            r"backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4, fpn.0, fpn.1, fpn.2, fpn.3, fpn.pool, "
            r"roi_heads.box \(roi_heads.mask needs model=mask_rcnn\)",
        ),
        (
            ("model/attention=se", "model.attention.sites=[roi_heads.mask]"),
            r"roi_heads.mask is not a site; .*roi_heads.box \(roi_heads.mask needs model=mask_rcnn\)",
        ),
        (
            ("model/backbone=mobilenet_v3_fpn", "model/attention=se", "model.attention.sites=[backbone.layer3]"),
            r"backbone.layer3 is not a site; valid sites for faster_rcnn with mobilenet_v3_fpn: "
            r"backbone.13, backbone.16, fpn.0, fpn.1, fpn.pool, roi_heads.box \(roi_heads.mask needs model=mask_rcnn\), "
            r"or the groups backbone, fpn, roi_heads, backbone.last",
        ),
        (
            ("model/attention=se", "+model.attention.overrides={fpn.0:{reduction:4}}"),
            r"model.attention.overrides names fpn.0, not in model.attention.sites \['backbone'\]",
        ),
        (
            ("model.attention.type=sk", "model.attention.sites=[fpn.0]"),
            r"model.attention.type=sk is not an attention type; choose one of none, se, cbam, eca, nonlocal",
        ),
        (("model.attention.sites=[fpn.0]",), r"model.attention.sites lists fpn.0 but model.attention.type=none"),
        (("model/attention=se", "model.attention.sites=[fpn.0,fpn.0]"), r"lists fpn.0 more than once"),
        (
            ("model/attention=se", "+model.attention.overrides={backbone.layer3:{type:sk}}"),
            r"overrides\[backbone.layer3\].type=sk is not an attention block; choose one of se, cbam, eca, nonlocal",
        ),
        (
            ("model/attention=eca", "+model.attention.overrides={backbone.layer3:{reduction:4}}"),
            r"overrides\[backbone.layer3\].reduction does not apply to eca blocks, which take eca_kernel_size",
        ),
        (
            ("model/attention=se", "+model.attention.overrides={backbone.layer3:{ratio:4}}"),
            r"unknown key 'ratio'; an override may set type, reduction, kernel_size, eca_kernel_size",
        ),
        (
            ("model/attention=se", "model.attention.reduction=0"),
            r"model.attention.reduction=0 must be a positive integer",
        ),
        (
            ("model/attention=cbam", "model.attention.kernel_size=4"),
            r"model.attention.kernel_size=4 must be a positive odd",
        ),
        (
            ("model/attention=eca", "+model.attention.overrides={backbone.layer4:{eca_kernel_size:2}}"),
            r"overrides\[backbone.layer4\].eca_kernel_size=2 must be a positive odd integer or null",
        ),
        (
            ("model/attention=nonlocal", "model.attention.heads=3"),
            r"the nonlocal block at backbone.layer4 \(512 channels\) cannot be built: heads=3 must divide inner_channels=256",
        ),
    ],
)
def test_wrong_attention_configs_are_refused_naming_the_key(
    compose_tiny, overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(_cfg(compose_tiny, *overrides).model)


# ----------------------------------------------------------------------------- fingerprint


def _meta_fingerprint(cfg: DictConfig) -> tuple[str, dict]:
    with torch.device("meta"):  # names, shapes and dtypes are all a fingerprint reads
        model = build_model(cfg.model)
    return fingerprint(architecture_spec(cfg.model), model), tensor_layout(model)


def test_fingerprint_covers_type_sites_and_parameters(compose_tiny) -> None:
    base = ("model/attention=se", "model.attention.sites=[backbone.layer3]")
    digest, _ = _meta_fingerprint(_cfg(compose_tiny, *base))
    assert _meta_fingerprint(_cfg(compose_tiny, *base))[0] == digest
    for change in (
        "model.attention.reduction=8",
        "model.attention.type=cbam",
        "model.attention.sites=[backbone.layer2]",
        "+model.attention.overrides={backbone.layer3:{type:eca}}",
    ):
        assert _meta_fingerprint(_cfg(compose_tiny, *base, change))[0] != digest, change
    assert _meta_fingerprint(_cfg(compose_tiny))[0] != digest


def test_layout_diff_names_the_attention_module_and_shapes(compose_tiny) -> None:
    base = ("model/attention=se", "model.attention.sites=[backbone.layer3,roi_heads.box]")
    _, r16 = _meta_fingerprint(_cfg(compose_tiny, *base))
    _, r8 = _meta_fingerprint(_cfg(compose_tiny, *base, "model.attention.reduction=8"))
    _, plain = _meta_fingerprint(_cfg(compose_tiny))
    assert diff_layouts(r16, r8) == [
        "backbone.body.layer3: 3 tensors reshaped (attention.fc1.weight [16, 256] -> [32, 256], "
        "attention.fc1.bias [16] -> [32], attention.fc2.weight [256, 16] -> [256, 32])",
        "roi_heads.attention: 3 tensors reshaped (box.fc1.weight [2, 32] -> [4, 32], box.fc1.bias [2] -> [4], "
        "box.fc2.weight [32, 2] -> [32, 4])",
    ]
    assert diff_layouts(plain, r16) == [
        "backbone.body.layer3.attention: 5 tensors added",
        "roi_heads.attention: 5 tensors added",
    ]


def test_the_attention_param_group_shorthand_selects_every_block(compose_tiny) -> None:
    from frcnn_train.optim import build_param_groups

    cfg = _cfg(
        compose_tiny,
        "model/attention=se",
        _sites(["backbone.layer4", "fpn.pool", "roi_heads.box"]),
        "optim.param_groups=[{match: attention, lr_mult: 10}]",
    )
    model = build_model(cfg.model)
    groups = build_param_groups(model, cfg.optim)
    chosen = [n for g in groups if g["name"].startswith("attention") for n in g["param_names"]]
    assert sorted(chosen) == sorted(n for n, _ in model.named_parameters() if ".attention." in n)
    assert {g["lr_mult"] for g in groups if g["name"].startswith("attention")} == {10}
