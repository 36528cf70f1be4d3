"""The ResNet stem's max pooling on the CPU: forward in channels-last, backward as PyTorch's.

PyTorch's CPU max_pool2d is about ten times faster on a channels-last input than on
the usual layout, while its backward is faster on the usual layout. Both kernels
pick the same element of each window (the first maximum in scan order) and give
indices into the same (h, w) plane, so this module runs the forward on a
channels-last copy and the backward with the usual kernel: bitwise the same
output and gradient as nn.MaxPool2d (tests/models/test_cpu_kernels.py), a few
percent of a CPU training step at the shapes sizes less. On CUDA, and for
channels-last inputs, it is nn.MaxPool2d.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class _ChannelsLastForward(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        kernel: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        ceil_mode: bool,
    ) -> Tensor:
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), kernel, stride, padding, dilation, ceil_mode
        )
        indices = indices.contiguous()
        ctx.save_for_backward(x, indices)
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        return out.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, indices = ctx.saved_tensors
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), x, *ctx.args, indices)
        return grad_x, None, None, None, None, None


def _pair(value: int | tuple[int, ...]) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value)] * 2


class CpuMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d whose CPU forward runs on a channels-last copy (same values, indices and gradients)."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or x.is_contiguous(memory_format=torch.channels_last)
            or self.return_indices
        ):
            return super().forward(x)
        stride = self.stride if self.stride is not None else self.kernel_size
        return _ChannelsLastForward.apply(
            x, _pair(self.kernel_size), _pair(stride), _pair(self.padding), _pair(self.dilation), self.ceil_mode
        )
