"""Parameter groups and the per-step LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from frcnn_train.config import OptimConfig, ScheduleConfig
from frcnn_train.errors import ConfigError
from frcnn_train.optim import apply_current_schedule, build_optimizer, build_param_groups, build_scheduler, lr_factor_fn


class TinyDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.backbone.fpn = nn.Conv2d(4, 4, 1)
        self.roi_heads = nn.Linear(4, 2)


def optim_cfg(**kwargs):
    return OmegaConf.merge(OmegaConf.structured(OptimConfig), kwargs)


def names(group: dict) -> list[str]:
    return group["param_names"]


def test_norms_and_biases_get_no_weight_decay() -> None:
    groups = {g["name"]: g for g in build_param_groups(TinyDetector(), optim_cfg(weight_decay=0.1))}
    assert names(groups["default"]) == ["backbone.body.0.weight", "backbone.fpn.weight", "roi_heads.weight"]
    assert groups["default"]["weight_decay"] == 0.1
    assert set(names(groups["default/no_decay"])) == {
        "backbone.body.0.bias",
        "backbone.body.1.weight",
        "backbone.body.1.bias",
        "backbone.fpn.bias",
        "roi_heads.bias",
    }
    assert groups["default/no_decay"]["weight_decay"] == 0.0


def test_rules_set_lr_multipliers_and_freeze() -> None:
    model = TinyDetector()
    cfg = optim_cfg(lr=0.1, param_groups=[{"match": "backbone", "lr_mult": 0.1}, {"match": "fpn", "freeze": True}])
    optimizer = build_optimizer(model, cfg)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["backbone"]["lr"] == pytest.approx(0.01) and by_name["default"]["lr"] == pytest.approx(0.1)
    assert not model.backbone.fpn.weight.requires_grad
    in_optimizer = {n for g in optimizer.param_groups for n in g["param_names"]}
    assert "backbone.fpn.weight" not in in_optimizer and "roi_heads.weight" in in_optimizer


def test_bad_rule_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"optim.param_groups\[0\].match"):
        build_param_groups(TinyDetector(), optim_cfg(param_groups=[{"match": "back(bone"}]))


def schedule(**kwargs):
    return OmegaConf.merge(OmegaConf.structured(ScheduleConfig), kwargs)


def test_warmup_then_multistep() -> None:
    f = lr_factor_fn(
        schedule(warmup_steps=10, warmup_factor=0.1, milestones=[2, 3], gamma=0.5), steps_per_epoch=10, total_steps=40
    )
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55) and f(10) == 1.0
    assert f(19) == 1.0 and f(20) == 0.5 and f(30) == 0.25


def test_cosine_reaches_floor() -> None:
    f = lr_factor_fn(schedule(name="cosine", warmup_steps=0, min_lr_factor=0.1), steps_per_epoch=10, total_steps=100)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)


def test_scheduler_resumes_on_the_same_curve_across_warmup() -> None:
    """A scheduler restored mid-warmup continues exactly where an uninterrupted one is."""

    def make():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, build_scheduler(opt, schedule(warmup_steps=6, warmup_factor=0.0), steps_per_epoch=5, total_steps=20)

    opt, sched = make()
    lrs = []
    for _ in range(12):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    opt1, sched1 = make()
    for _ in range(4):
        opt1.step()
        sched1.step()
    state_opt, state_sched = opt1.state_dict(), sched1.state_dict()
    opt2, sched2 = make()
    opt2.load_state_dict(state_opt)
    sched2.load_state_dict(state_sched)
    resumed = [opt2.param_groups[0]["lr"]]
    for _ in range(8):
        opt2.step()
        sched2.step()
        resumed.append(opt2.param_groups[0]["lr"])
    assert resumed == lrs[3:]


def test_resume_onto_a_longer_cosine_takes_the_new_curve_at_once() -> None:
    """More epochs under cosine re-span the decay: the coming step already gets the new LR."""

    def make(total: int):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, build_scheduler(
            opt, schedule(name="cosine", warmup_steps=0, min_lr_factor=0.0), steps_per_epoch=5, total_steps=total
        )

    opt, sched = make(20)
    for _ in range(10):
        opt.step()
        sched.step()
    saved = opt.state_dict(), sched.state_dict()

    same_opt, same = make(20)
    same_opt.load_state_dict(saved[0])
    same.load_state_dict(saved[1])
    assert apply_current_schedule(same) is None

    longer_opt, longer = make(40)
    longer_opt.load_state_dict(saved[0])
    longer.load_state_dict(saved[1])
    assert apply_current_schedule(longer) == (pytest.approx(0.5), pytest.approx(0.5 * (1 + math.cos(math.pi / 4))))
    fresh_opt, fresh = make(40)
    for _ in range(10):
        fresh_opt.step()
        fresh.step()
    assert longer_opt.param_groups[0]["lr"] == fresh_opt.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "settings",
    [
        {"name": "sgd", "momentum": 0.9},
        {"name": "sgd", "momentum": 0.0},
        {"name": "adamw"},
    ],
    ids=["sgd-momentum", "sgd-plain", "adamw"],
)
def test_a_first_step_the_grad_scaler_skips_changes_nothing(settings: dict) -> None:
    """fp16 runs start at loss scale 65536, so their first steps usually have inf gradients that the
    GradScaler skips. torch's fused SGD made its momentum buffers with empty_like on that skipped step
    and the next good step wrote their garbage into the weights (issue 17: diverged at step 4)."""

    def train(skip_first: bool) -> tuple[torch.Tensor, dict]:
        torch.manual_seed(0)
        model = TinyDetector()
        optimizer = build_optimizer(model, optim_cfg(lr=0.1, weight_decay=0.01, **settings))
        scaler = torch.amp.GradScaler("cpu")
        x = torch.rand(2, 3, 6, 6)

        def step(poison: bool) -> None:
            loss = model.roi_heads(model.backbone.fpn(model.backbone.body(x)).mean((2, 3))).sum()
            scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        if skip_first:
            step(poison=True)
            assert scaler.get_scale() == 65536.0 / 2, "the scaler saw the inf and skipped the step"
        step(poison=False)
        step(poison=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), optimizer.state_dict()["state"]

    after_skip, state_after_skip = train(skip_first=True)
    clean, clean_state = train(skip_first=False)
    assert torch.isfinite(after_skip).all()
    assert torch.equal(after_skip, clean), f"largest difference {(after_skip - clean).abs().max():.3g}"
    for index, entry in clean_state.items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(state_after_skip[index][key]), torch.as_tensor(value)), (index, key)
