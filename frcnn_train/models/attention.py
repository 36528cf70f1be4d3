"""Attention blocks for detection features, and how a block is attached at a site.

Every block maps [N, C, H, W] to the same shape: a backbone stage output, an FPN
level, or the RoI features after pooling ([N, C, 7, 7] for the box head,
[N, C, 14, 14] for the mask head). Blocks take typed keyword arguments; the
builder (models/builder.py) reads the config and decides where they go.

Identity start (`identity_init=True`), so that adding blocks to a pretrained
network leaves its outputs unchanged at step 0 (bitwise, in eval mode):

- SE, CBAM, ECA rescale the input by a sigmoid gate `s(x)` in (0, 1), which can
  never be exactly 1. Each has a learnable scalar `gamma` and returns
  `x * (1 + gamma * (s(x) - 1))`, i.e. `x + gamma * (gate(x) - x)`: gamma = 1 is
  the published block, gamma = 0 the identity. Identity init sets gamma = 0 and
  keeps the gate's usual init; gamma receives a gradient at once
  (`x * (s(x) - 1)`), and the gate's weights start learning as soon as gamma
  leaves zero (the ReZero / LayerScale recipe).
- Non-local is already residual, `x + out(attend(x))`; identity init zeroes the
  output projection `out` (weight and bias), as the non-local paper does with the
  last BatchNorm's scale. `out` gets a gradient at once, the rest after one step.

The state-dict layout never depends on `identity_init` (gamma always exists), so
it may default from another setting without changing what a checkpoint holds.
Blocks have no BatchNorm: RoI batches and frozen-BN backbones make batch
statistics a liability, and keeping them out keeps eval == train semantics.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_CHILD = "attention"  # every block or ModuleDict of blocks is registered under this name


def _check_positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def _check_odd(value: int, name: str) -> int:
    # Odd kernels with padding k // 2 keep the spatial (or channel) size.
    if _check_positive(value, name) % 2 == 0:
        raise ValueError(f"{name}={value} must be odd so that the output keeps its size")
    return value


class _Gate(nn.Module):
    """Shared forward of the gating blocks: `x * (1 + gamma * (scale(x) - 1))`."""

    def __init__(self, identity_init: bool) -> None:
        super().__init__()
        # 0-dim, so that under autocast `gamma * fp16` stays fp16 instead of promoting to fp32.
        self.gamma = nn.Parameter(torch.tensor(0.0 if identity_init else 1.0))

    def scale(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return x * (1 + self.gamma * (self.scale(x) - 1))


class SqueezeExcitation(_Gate):
    """Squeeze-and-excitation (Hu et al. 2018): per-channel gate from the globally pooled input.

    Keys: `fc1` [C/r, C], `fc2` [C, C/r], `gamma` []. The bottleneck is at least 1 channel.
    """

    def __init__(self, channels: int, *, reduction: int = 16, identity_init: bool = False) -> None:
        super().__init__(identity_init)
        hidden = max(1, _check_positive(channels, "channels") // _check_positive(reduction, "reduction"))
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def scale(self, x: Tensor) -> Tensor:
        # mean/amax rather than adaptive pooling: deterministic backward on CUDA.
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return gate[:, :, None, None]


class CBAM(_Gate):
    """CBAM (Woo et al. 2018): a channel gate from average- and max-pooled features, then a spatial gate.

    Keys: `fc1`, `fc2` (the shared channel MLP, as SE), `spatial` [1, 2, k, k], `gamma`.
    The spatial convolution has no BatchNorm (see the module docstring).
    """

    def __init__(
        self, channels: int, *, reduction: int = 16, kernel_size: int = 7, identity_init: bool = False
    ) -> None:
        super().__init__(identity_init)
        hidden = max(1, _check_positive(channels, "channels") // _check_positive(reduction, "reduction"))
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        k = _check_odd(kernel_size, "kernel_size")
        self.spatial = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)

    def _mlp(self, pooled: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(pooled)))

    def scale(self, x: Tensor) -> Tensor:
        channel = torch.sigmoid(self._mlp(x.mean(dim=(2, 3))) + self._mlp(x.amax(dim=(2, 3))))[:, :, None, None]
        refined = x * channel
        pooled = torch.cat([refined.mean(dim=1, keepdim=True), refined.amax(dim=1, keepdim=True)], dim=1)
        return channel * torch.sigmoid(self.spatial(pooled))


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """The ECA paper's adaptive kernel: |log2(C) / gamma + b / gamma|, rounded up to odd."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(_Gate):
    """Efficient channel attention (Wang et al. 2020): a 1-D convolution across pooled channels.

    `kernel_size` None picks it from the channel count (`eca_kernel_size`). Keys: `conv` [1, 1, k], `gamma`.
    """

    def __init__(self, channels: int, *, kernel_size: int | None = None, identity_init: bool = False) -> None:
        super().__init__(identity_init)
        k = eca_kernel_size(_check_positive(channels, "channels")) if kernel_size is None else kernel_size
        k = _check_odd(k, "kernel_size")
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def scale(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(self.conv(x.mean(dim=(2, 3)).unsqueeze(1))).squeeze(1)
        return gate[:, :, None, None]


class NonLocal(nn.Module):
    """Non-local block (Wang et al. 2018), embedded Gaussian, as multi-head self-attention over positions.

    `theta`, `phi`, `g` are 1x1 convolutions to `inner_channels` (None: C // 2), split into
    `heads`; positions attend with softmax(theta^T phi / sqrt(d)) (the embedded Gaussian with the
    Transformer's temperature, which keeps fp16 logits in range), and `out` projects back and is
    added to the input. Cost grows with (H * W)^2: put it on coarse maps (the last stage, RoIs).
    """

    def __init__(
        self, channels: int, *, inner_channels: int | None = None, heads: int = 1, identity_init: bool = False
    ) -> None:
        super().__init__()
        inner = max(1, _check_positive(channels, "channels") // 2) if inner_channels is None else inner_channels
        _check_positive(inner, "inner_channels")
        if inner % _check_positive(heads, "heads"):
            raise ValueError(f"heads={heads} must divide inner_channels={inner}")
        self.heads, self.inner = heads, inner
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out = nn.Conv2d(inner, channels, 1)
        if identity_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape

        def tokens(conv: nn.Conv2d) -> Tensor:  # [N, heads, H*W, d]
            return conv(x).reshape(n, self.heads, self.inner // self.heads, h * w).transpose(2, 3)

        attended = F.scaled_dot_product_attention(tokens(self.theta), tokens(self.phi), tokens(self.g))
        return x + self.out(attended.transpose(2, 3).reshape(n, self.inner, h, w))


# Block type -> class; the builder picks from this dict and lists its names when one is unknown.
BLOCKS: dict[str, type[nn.Module]] = {
    "se": SqueezeExcitation,
    "cbam": CBAM,
    "eca": ECA,
    "nonlocal": NonLocal,
}


# ----------------------------------------------------------------------------- attaching at a site
# Blocks are children of the module at their site, under ATTENTION_CHILD, so every other
# state-dict key stays torchvision's and the attention keys say where they sit. Plain
# functions and a small class as hooks: they survive deepcopy and pickling of the model.


def _run_on_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return getattr(module, ATTENTION_CHILD)(output)


def attach_after(module: nn.Module, block: nn.Module) -> None:
    """Run `block` on `module`'s output, registered as `module.attention`.

    nn.Sequential (ResNet stages, MobileNet's last conv) runs every child in order,
    so the block, registered last, already runs on the output; anything else
    (MobileNet's InvertedResidual) gets a forward hook.
    """
    if hasattr(module, ATTENTION_CHILD):
        raise ValueError(f"{type(module).__name__} already has an `{ATTENTION_CHILD}` attribute")
    module.add_module(ATTENTION_CHILD, block)
    if type(module).forward is not nn.Sequential.forward:
        module.register_forward_hook(_run_on_output)


def _run_per_level(module: nn.Module, args: tuple, output: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
    blocks = getattr(module, ATTENTION_CHILD)
    return OrderedDict((name, blocks[name](x) if name in blocks else x) for name, x in output.items())


def attach_to_levels(fpn: nn.Module, blocks: dict[str, nn.Module]) -> None:
    """Run `blocks[level]` on the FPN's output `level`; registered as `fpn.attention.<level>`."""
    fpn.add_module(ATTENTION_CHILD, nn.ModuleDict(blocks))
    fpn.register_forward_hook(_run_per_level)


class _RunOnInput:
    """Forward pre-hook: the block runs on the head's input (the pooled RoI features)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.block(args[0]), *args[1:])


def attach_to_heads(roi_heads: nn.Module, blocks: dict[str, nn.Module]) -> None:
    """Run `blocks["box"]` / `blocks["mask"]` on the pooled features entering `box_head` / `mask_head`.

    Registered as `roi_heads.attention.<box|mask>` rather than inside the heads:
    MaskRCNNHeads is a Sequential and would run a child on its output instead.
    """
    roi_heads.add_module(ATTENTION_CHILD, nn.ModuleDict(blocks))
    for name, block in blocks.items():
        getattr(roi_heads, f"{name}_head").register_forward_pre_hook(_RunOnInput(block))
