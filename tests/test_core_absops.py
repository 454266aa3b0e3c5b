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
