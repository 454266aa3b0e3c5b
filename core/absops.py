"""Affine maps with ``|W|`` that do not keep ``|W|`` alive for the backward pass.

The ``s`` stream goes through ``|W| s + |b|``. Autograd would save the temporary ``|W|`` of
every layer until the backward pass (for VGG16 that is another copy of its 528 MiB of
weights); these functions save the model's own weight instead and take its absolute value
again in the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn import grad as nn_grad

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT = {1: nn_grad.conv1d_input, 2: nn_grad.conv2d_input, 3: nn_grad.conv3d_input}


# |W| of a large linear layer is taken in blocks of rows of at most this many entries, so
# that no full-size temporary copy of the weight exists (VGG16's first classifier layer
# would need 392 MiB).
BLOCK = 1 << 22


def _row_blocks(weight: torch.Tensor) -> list[tuple[int, int]]:
    rows = weight.shape[0]
    step = max(1, BLOCK // max(1, weight[0].numel()))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def _linear_abs(s: torch.Tensor, weight: torch.Tensor,
                bias_abs: torch.Tensor | None) -> torch.Tensor:
    if weight.numel() <= BLOCK:
        return F.linear(s, weight.abs(), bias_abs)
    parts = [F.linear(s, weight[a:b].abs(), None if bias_abs is None else bias_abs[a:b])
             for a, b in _row_blocks(weight)]
    return torch.cat(parts, dim=-1)


class _AbsLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, weight, bias_abs):  # noqa: D102
        ctx.save_for_backward(weight)
        return _linear_abs(s, weight, bias_abs)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (weight,) = ctx.saved_tensors
        if weight.numel() <= BLOCK:
            return grad @ weight.abs(), None, None
        out = None
        for a, b in _row_blocks(weight):
            part = grad[..., a:b] @ weight[a:b].abs()
            out = part if out is None else out.add_(part)
        return out, None, None


class _AbsConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, weight, bias_abs, n, stride, padding, dilation, groups):  # noqa: D102
        ctx.save_for_backward(weight)
        ctx.meta = (n, s.shape, stride, padding, dilation, groups)
        return _CONV[n](s, weight.abs(), bias_abs, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (weight,) = ctx.saved_tensors
        n, shape, stride, padding, dilation, groups = ctx.meta
        grad_in = _CONV_INPUT[n](shape, weight.abs(), grad, stride, padding, dilation, groups)
        return grad_in, None, None, None, None, None, None, None


def _needs_graph(s: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and s.requires_grad


def abs_linear(s: torch.Tensor, weight: torch.Tensor,
               bias_abs: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(s, |W|, |b|)``; ``weight`` is the signed weight (detached)."""
    if _needs_graph(s):
        return _AbsLinear.apply(s, weight, bias_abs)
    return _linear_abs(s, weight, bias_abs)


def abs_conv(s: torch.Tensor, weight: torch.Tensor, bias_abs: torch.Tensor | None, n: int,
             stride, padding, dilation, groups: int) -> torch.Tensor:
    """``F.conv{n}d(s, |W|, |b|, ...)`` with numeric (zero) padding."""
    if _needs_graph(s) and not isinstance(padding, str):
        return _AbsConv.apply(s, weight, bias_abs, n, stride, padding, dilation, groups)
    return _CONV[n](s, weight.abs(), bias_abs, stride, padding, dilation, groups)


class _NegativePart(torch.autograd.Function):
    """``relu(-z)`` whose backward reads the mask off the ReLU's own output ``relu(z)``.

    Autograd would keep the pre-activation ``z`` alive for the mask; the ReLU's output is
    kept anyway (by the ReLU itself and the next layer), so saving it costs nothing.
    """

    @staticmethod
    def forward(ctx, z, relu_out):  # noqa: D102
        ctx.save_for_backward(relu_out)
        return torch.sub(relu_out, z)  # relu(z) - z == relu(-z) exactly, in one pass

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (relu_out,) = ctx.saved_tensors
        return torch.where(relu_out == 0, -grad, 0.0), None


def add_negative_part(s: torch.Tensor, z: torch.Tensor, relu_out: torch.Tensor) -> torch.Tensor:
    """``s + relu(-z)`` given ``relu_out = relu(z)``; the derivative in ``z`` is
    ``-1{z <= 0}`` (so that it and the ReLU's ``1{z > 0}`` add up to one)."""
    if torch.is_grad_enabled() and (z.requires_grad or s.requires_grad):
        return s + _NegativePart.apply(z, relu_out)
    return torch.sub(s, z.clamp_max(0))
