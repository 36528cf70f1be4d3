"""Optimizer, parameter groups and the per-step learning-rate schedule."""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from frcnn_train.errors import ConfigError

# Shorthands for optim.param_groups[*].match; anything else is a regular expression.
PARAM_SHORTHANDS = {
    "backbone": r"^backbone\.body\.",
    "fpn": r"^backbone\.fpn\.",
    "rpn": r"^rpn\.",
    "roi_heads": r"^roi_heads\.",
    "attention": r"(^|\.)attention\.",
}
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Biases and norm-layer weights, which weight decay would only pull towards zero."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if param_name == "bias" or isinstance(module, _NORM_TYPES):
                names.add(full)
    return names


def lr_scale(optim_cfg: DictConfig, global_batch: int) -> tuple[float, str]:
    """The factor on optim.lr for a global batch of `global_batch` images, and the line that says so.

    optim.lr is the LR of a global batch of optim.reference_batch images; another batch
    scales it linearly (Goyal et al. 2017; detectron2's REFERENCE_WORLD_SIZE), so a
    smaller batch (one GPU, one big image) does not diverge at the LR of a larger one.
    """
    reference = optim_cfg.reference_batch
    if reference is None:
        return 1.0, (
            f"LR {optim_cfg.lr:g} as given, for a global batch of {global_batch} images "
            "(optim.reference_batch=null: no scaling with the batch)."
        )
    scale = global_batch / reference
    return scale, (
        f"LR {optim_cfg.lr * scale:g} = optim.lr {optim_cfg.lr:g} x {global_batch}/{reference}: linear "
        f"scaling from optim.reference_batch={reference} images to this run's global batch of "
        f"{global_batch} (processes x trainer.batch_size x trainer.accumulate); "
        "optim.reference_batch=null uses optim.lr as it is."
    )


def build_param_groups(model: nn.Module, optim_cfg: DictConfig, *, lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Assign every trainable parameter to a group by the first matching rule.

    Groups are built in a fixed order (rules in config order, then "default"; each
    split into decay / no-decay), so the optimizer state of a checkpoint maps back
    onto the same parameters. Parameters matched by a `freeze` rule get
    requires_grad=False and, like other frozen parameters, never reach the optimizer.
    """
    rules = []
    for i, rule in enumerate(optim_cfg.param_groups):
        pattern = PARAM_SHORTHANDS.get(rule.match, rule.match)
        try:
            rules.append((rule, re.compile(pattern)))
        except re.error as err:
            raise ConfigError(
                f"optim.param_groups[{i}].match={rule.match!r} is not a valid regular expression ({err}); "
                f"use a regex or one of {', '.join(PARAM_SHORTHANDS)}"
            ) from None
    no_decay = _no_decay_names(model) if optim_cfg.no_decay_norm_and_bias else set()
    groups: dict[str, dict[str, Any]] = {}
    order = [rule.match for rule, _ in rules] + ["default"]
    for name, param in model.named_parameters():
        rule = next((r for r, regex in rules if regex.search(name)), None)
        if rule is not None and rule.freeze:
            param.requires_grad_(False)
        if not param.requires_grad:
            continue
        base = rule.match if rule is not None else "default"
        lr_mult = rule.lr_mult if rule is not None else 1.0
        decay = optim_cfg.weight_decay
        if rule is not None and rule.weight_decay is not None:
            decay = rule.weight_decay
        key = base + ("/no_decay" if name in no_decay else "")
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "param_names": [],
                "lr": optim_cfg.lr * lr_scale * lr_mult,
                "lr_mult": lr_mult,
                "weight_decay": 0.0 if name in no_decay else decay,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    ordered = sorted(groups.values(), key=lambda g: (order.index(g["name"].split("/")[0]), g["name"]))
    if not ordered:
        raise ConfigError(
            "no trainable parameters: every parameter is frozen; relax model.backbone.trainable_layers or the freeze rules in optim.param_groups"
        )
    return ordered


class SGD(torch.optim.SGD):
    """torch's SGD with momentum buffers that exist (as zeros) before the first update.

    torch's fused SGD creates them with `empty_like` in the step call itself, also when
    a GradScaler passes `found_inf` and the kernel then skips the update: the buffers stay
    uninitialised (values like -2e19) and the next good step writes them into the weights.
    fp16 runs usually skip their first steps (inf gradients at loss scale 65536), so this
    made every fp16 run diverge within a few steps. A zero buffer gives the same first
    update (0 * momentum + grad is grad), so nothing else changes. Once every buffer
    exists (after the first step, or a loaded state that has them) steps skip the check.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buffers_made = False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._buffers_made = False  # an older state may lack some buffers

    def step(self, closure: Callable[[], float] | None = None, **scaler_args: Any) -> Any:
        if not self._buffers_made:
            self._buffers_made = self._make_momentum_buffers()
        return super().step(closure, **scaler_args)

    def _make_momentum_buffers(self) -> bool:
        """Zero buffers for the parameters with a gradient and none yet; whether every one now has one."""
        complete = True
        for group in self.param_groups:
            if group["momentum"]:
                for p in group["params"]:
                    if self.state[p].get("momentum_buffer") is not None:
                        continue
                    if p.grad is None:
                        complete = False
                    else:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return complete


def build_optimizer(model: nn.Module, optim_cfg: DictConfig, *, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """SGD or AdamW over build_param_groups (each group's LR: optim.lr x lr_scale x its lr_mult).
    Build it after the model is on its device: on CPU and CUDA it uses torch's fused kernels
    (one kernel per tensor instead of three; a quarter less optimizer time on the CPU), elsewhere
    the plain loop."""
    groups = build_param_groups(model, optim_cfg, lr_scale=lr_scale)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]) or None
    lr = optim_cfg.lr * lr_scale
    if optim_cfg.name == "sgd":
        return SGD(groups, lr=lr, momentum=optim_cfg.momentum, fused=fused)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas), fused=fused)
    raise ConfigError(f"optim.name={optim_cfg.name!r} is not an optimizer; choose sgd or adamw")


def group_summary(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Plain description of the groups, for the log, the checkpoint and `inspect`."""
    return [
        {
            "name": g.get("name", f"group{i}"),
            "params": len(g["params"]),
            "lr": g["lr"],
            "lr_mult": g.get("lr_mult", 1.0),
            "weight_decay": g["weight_decay"],
            "param_names": list(g.get("param_names", [])),
        }
        for i, g in enumerate(optimizer.param_groups)
    ]


def lr_factor_fn(schedule_cfg: DictConfig, *, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of each group's base LR at optimizer step `step`: linear warmup, then the decay."""
    warmup = schedule_cfg.warmup_steps
    start = schedule_cfg.warmup_factor
    if schedule_cfg.name == "multistep":
        milestones = sorted(round(m * steps_per_epoch) for m in schedule_cfg.milestones)

        def decay(step: int) -> float:
            return schedule_cfg.gamma ** bisect.bisect_right(milestones, step)
    elif schedule_cfg.name == "cosine":
        floor = schedule_cfg.min_lr_factor

        def decay(step: int) -> float:
            progress = min(step / max(total_steps, 1), 1.0)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        raise ConfigError(f"schedule.name={schedule_cfg.name!r} is not a schedule; choose multistep or cosine")

    def factor(step: int) -> float:
        ramp = start + (1 - start) * step / warmup if step < warmup else 1.0
        return ramp * decay(step)

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule_cfg: DictConfig, *, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    # A plain function (not an object) so the scheduler's state_dict holds only
    # counters: a resume with more epochs then gets the new cosine length.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor_fn(schedule_cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    )


def apply_current_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> tuple[float, float] | None:
    """After a resume, put each group on the rebuilt schedule's LR for the coming step.

    The checkpoint holds the LR its own schedule computed. A mutable change that
    reshapes the schedule (more epochs under cosine) would otherwise take effect
    one step late; returns the first group's (checkpoint LR, new LR) when they differ.
    """
    groups = scheduler.optimizer.param_groups
    wanted = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    before = groups[0]["lr"]
    if all(math.isclose(g["lr"], lr, rel_tol=1e-12, abs_tol=0.0) for g, lr in zip(groups, wanted)):
        return None
    for group, lr in zip(groups, wanted):
        group["lr"] = lr
    return before, wanted[0]
