"""Strided ``1x1`` convolutions (ResNet's downsampling shortcut) through a strided slice.

A convolution whose kernel is ``1`` in every spatial dimension, without padding, with stride
``k`` equals a stride-1 convolution of ``x[..., ::k1, ::k2]``: the output at ``i`` reads the
input at ``k i`` only. On CPU the backward of torch's strided ``1x1`` convolution is up to 5x
slower than that of the slice (256 to 512 channels at 56x56, batch 8: 52 ms against 10 ms;
ResNet50's ``layer2.0.downsample``), and the split runs it in every backward stream. So here:

- the ``d`` stream keeps the model's own strided convolution in the forward (``d`` stays the
  model's value bit for bit) and takes its backward through the slice
  (:func:`pointwise_conv`): ``grad_x = scatter(conv1x1^T(grad))``, zero between the strides;
- the ``s`` stream convolves the slice with ``|W|`` at stride 1 (:func:`subsample`, whose
  backward writes the gradient into zeros once).

Only on CPU, where it was measured; elsewhere :func:`subsampling` says no.
"""

from __future__ import annotations

import torch

from core.absops import CONV, conv_input, in_dtype_of, input_only_grad


def subsampling(kernel_size: tuple[int, ...], stride: tuple[int, ...], padding,
                x: torch.Tensor) -> tuple[slice, ...] | None:
    """The index ``(:, :, ::k1, ::k2, ...)`` that turns a convolution into a stride-1 one of
    the sliced input, or None where that does not apply: a kernel other than ``1``,
    padding, no stride above one, an unbatched input, or a device other than the CPU."""
    if (x.device.type != "cpu" or isinstance(padding, str) or any(padding)
            or any(k != 1 for k in kernel_size) or all(k == 1 for k in stride)
            or x.dim() != len(kernel_size) + 2):
        return None
    return (slice(None), slice(None)) + tuple(slice(None, None, k) for k in stride)


def _scatter(grad: torch.Tensor, shape: torch.Size, index: tuple[slice, ...]) -> torch.Tensor:
    full = grad.new_zeros(shape)
    full[index] = grad
    return full


class _Subsample(torch.autograd.Function):
    """``x[index]``, whose backward writes the gradient into zeros in one pass (autograd's
    takes one pass per sliced dimension)."""

    @staticmethod
    def forward(ctx, x, index):  # noqa: D102
        ctx.meta = (x.shape, index)
        return x[index]

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        shape, index = ctx.meta
        return _scatter(grad, shape, index), None


def subsample(x: torch.Tensor, index: tuple[slice, ...]) -> torch.Tensor:
    """``x[index]`` (a view); under autograd its backward is one scatter into zeros."""
    if input_only_grad(x):
        return _Subsample.apply(x, index)
    return x[index]


class _PointwiseConv(torch.autograd.Function):
    """The strided ``1x1`` convolution ``conv(x, W, b, stride)`` (torch's own, bit for bit),
    whose backward in ``x`` is ``scatter(conv1x1^T(grad))`` (no gradient for ``W``, ``b``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, dilation, groups, index):  # noqa: D102
        n = weight.dim() - 2
        ctx.save_for_backward(weight)
        ctx.meta = (n, x.shape, x[index].shape, groups, index)
        return CONV[n](x, weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (weight,) = ctx.saved_tensors
        n, shape, sub_shape, groups, index = ctx.meta
        sub = conv_input(n, sub_shape, in_dtype_of(grad, weight), grad, 1, 0, 1, groups)
        return _scatter(sub, shape, index), None, None, None, None, None, None


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: tuple[int, ...], dilation: tuple[int, ...], groups: int,
                   index: tuple[slice, ...]) -> torch.Tensor:
    """``conv(x, W, b, stride, 0, dilation, groups)`` for a strided ``1x1`` convolution
    (``index`` from :func:`subsampling`), torch's own in the forward; under autograd its
    backward in ``x`` goes through the slice (where ``W`` and ``b`` need no gradient:
    otherwise torch's convolution as it is)."""
    if input_only_grad(x, weight, bias):
        return _PointwiseConv.apply(x, weight, bias, stride, dilation, groups, index)
    return CONV[weight.dim() - 2](x, weight, bias, stride, 0, dilation, groups)
