"""Hunted: a strided 1x1 convolution's backward through the slice (core.pointwise) under
``torch.autocast`` with a double backward (``create_graph=True`` through ``sm.streams``, the
differentiable public path, which follows the caller's autocast)."""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

import core
from core import rules


def _grads(model: nn.Module, xp: torch.Tensor, xn: torch.Tensor) -> list[torch.Tensor]:
    sm = core.split(model, reuse_capture=False)
    xp, xn = xp.clone().requires_grad_(True), xn.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g, h = sm.streams(xp, xn)
        first = torch.autograd.grad((g[:, 1] + h[:, 2]).sum(), (xp, xn), create_graph=True)
        second = torch.autograd.grad(sum((t * t).sum() for t in first), (xp, xn))
    return [g, h, *first, *second]


def test_autocast_double_backward_through_a_strided_pointwise_convolution():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 1, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 5)).eval()
    xp, xn = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    # before the fix: RuntimeError "Input type (CPUBFloat16Type) and weight type
    # (torch.FloatTensor) should be the same" in the second backward
    found = _grads(model, xp, xn)
    with mock.patch.object(rules, "subsampling", lambda *args: None):
        expected = _grads(model, xp, xn)
    for a, b in zip(found, expected, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pointwise_conv_double_backward_under_autocast():
    from core.pointwise import pointwise_conv, subsampling

    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    weight, bias = torch.randn(6, 4, 1, 1), torch.randn(6)
    index = subsampling((1, 1), (2, 2), (0, 0), x)
    out = []
    for fn in (lambda t: pointwise_conv(t, weight, bias, (2, 2), (1, 1), 1, index),
               lambda t: F.conv2d(t, weight, bias, 2)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
            (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
            (gg,) = torch.autograd.grad((g * g).sum(), x)
        out.append((y, g, gg))
    for a, b in zip(*out, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_autocast_double_backward_through_a_convolution_after_max_pooling():
    """Hunted (helper-53): the s stream's convolution with |W| under autocast ran in
    bfloat16; its backward convolved a bfloat16 gradient with the float32 |W|, which a
    double backward behind a max pooling refused ("Input type (CPUBFloat16Type) and weight
    type (torch.FloatTensor) should be the same"). The same gradients as the float32 model
    within bfloat16's precision."""
    torch.manual_seed(0)
    for last in (nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 3, padding=1)):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.MaxPool2d(2), last,
                              nn.Flatten(), nn.Linear(2 * 4 * 4, 5)).eval()
        xp, xn = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
        found = _grads(model, xp, xn)
        sm = core.split(model, reuse_capture=False)
        xp, xn = xp.clone().requires_grad_(True), xn.clone().requires_grad_(True)
        g, h = sm.streams(xp, xn)
        first = torch.autograd.grad((g[:, 1] + h[:, 2]).sum(), (xp, xn), create_graph=True)
        second = torch.autograd.grad(sum((t * t).sum() for t in first), (xp, xn))
        for a, b in zip(found, [g, h, *first, *second], strict=True):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.float(), b, rtol=0.1, atol=0.05 * float(b.abs().max()))
