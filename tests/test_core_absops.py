"""|W| affine maps: same values and gradients as the plain ops, blocked or not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core import absops


@pytest.mark.parametrize("block", [absops.BLOCK, 1000])  # the second forces row blocks
def test_abs_linear_matches_plain_linear(monkeypatch, block):
    monkeypatch.setattr(absops, "BLOCK", block)
    torch.manual_seed(0)
    w, b = torch.randn(37, 300, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    s = torch.rand(4, 300, dtype=torch.float64, requires_grad=True)
    out = absops.abs_linear(s, w, b.abs())
    ref = F.linear(s, w.abs(), b.abs())
    torch.testing.assert_close(out, ref)
    seed = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, s, seed)[0],
                               torch.autograd.grad(ref, s, seed)[0])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_abs_conv_matches_plain_conv(n):
    torch.manual_seed(n)
    w = torch.randn((6, 2) + (3,) * n, dtype=torch.float64)
    s = torch.rand((2, 4) + (7,) * n, dtype=torch.float64, requires_grad=True)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    out = absops.abs_conv(s, w, None, n, 2, 1, 1, 2)
    ref = conv(s, w.abs(), None, 2, 1, 1, 2)
    torch.testing.assert_close(out, ref)
    seed = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, s, seed)[0],
                               torch.autograd.grad(ref, s, seed)[0])


@pytest.mark.parametrize("shape", [(3, 5), (2, 5, 7), (2, 5, 4, 3), (1, 5, 2, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_affine_is_k_s_plus_t_with_backward_grad_times_k(shape, dtype):
    torch.manual_seed(len(shape))
    k, t = torch.rand(5, dtype=dtype), torch.rand(5, dtype=dtype)
    column = (1, 5) + (1,) * (len(shape) - 2)
    s = torch.rand(shape, dtype=dtype, requires_grad=True)
    seed = torch.randn(shape, dtype=dtype)
    ref = torch.addcmul(t.view(column), s, k.view(column))
    with torch.no_grad():
        torch.testing.assert_close(absops.channel_affine(s, k, t), ref)
    out = absops.channel_affine(s, k, t)
    torch.testing.assert_close(out, ref)
    grad = torch.autograd.grad(out, s, seed)[0]
    assert torch.equal(grad, seed * k.view(column))
    # the placeholder (no value) has the same backward, bit for bit
    free = absops.channel_affine(s, k, t, value=False)
    assert free.shape == ref.shape and not free.any()
    assert torch.equal(torch.autograd.grad(free, s, seed)[0], grad)
