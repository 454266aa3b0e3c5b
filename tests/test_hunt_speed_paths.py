"""Hunted: the stabiliser's early return (core.stabilize._all_below) compared
``max|s| + max|d|`` with ``2 * threshold``, which is inf for a threshold above half the
largest float: a sample that the per-sample decisions (:func:`core.stabilize._exceeds`)
scale or reset was returned unchanged there (the decisions of 8622535 differed)."""

from __future__ import annotations

import pytest
import torch

from core import stabilize


@pytest.mark.parametrize("threshold", [1e308, 1.7e308])
@pytest.mark.parametrize("mode", ["scale", "shift"])
def test_a_threshold_above_half_the_largest_float_keeps_the_decisions(threshold, mode):
    # max |a+-| = (|s| + |d|) / 2 = inf in float64 > threshold: the sample exceeds
    s = torch.tensor([[1e308, 1.0], [1.0, 2.0]], dtype=torch.float64)
    d = torch.tensor([[1e308, 0.5], [0.5, 1.0]], dtype=torch.float64)
    exceed, _ = stabilize._exceeds(d, s, threshold)
    assert exceed == [True, False]
    if mode == "scale":
        factors = stabilize._scale_factors(d, s, 0.1, threshold)
        expected = s * torch.tensor(factors, dtype=s.dtype).view(-1, 1)
    else:
        expected = torch.where(torch.tensor(exceed).view(-1, 1), torch.zeros_like(s), s)
    for inplace in (False, True):
        out = stabilise_copy(d, s, mode, threshold, inplace)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # one sample (reduced over the whole tensor) alike
    out = stabilise_copy(d[:1], s[:1], mode, threshold, False)
    torch.testing.assert_close(out, expected[:1], rtol=0, atol=0)


def stabilise_copy(d, s, mode, threshold, inplace):
    return stabilize.stabilise(d.clone(), s.clone(), mode, 0.1, threshold, inplace=inplace)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_channel_product_of_an_empty_batch_is_that_of_the_convolution(n):
    # the 1x1 product (absops.is_channel_product) reshaped with -1, which an empty batch cannot
    # infer ("cannot reshape tensor of 0 elements"); torch's convolution gives an empty
    # result, and gradient
    import torch.nn.functional as F

    from core import absops

    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    s = torch.rand((0, 3) + (4,) * n)
    w, b = torch.randn((5, 3) + (1,) * n), torch.rand(5)
    assert absops.is_channel_product(s, w, 1, 0, 1)
    expected = conv(s, w.abs(), b)
    with torch.no_grad():
        out = absops.abs_conv(s, w, b, n, 1, 0, 1, 1, scratch=absops.SCRATCH)
    assert out.shape == expected.shape
    s.requires_grad_(True)
    out = absops.abs_conv(s, w, b, n, 1, 0, 1, 1)
    assert out.shape == expected.shape
    (grad,) = torch.autograd.grad(out, s, torch.ones_like(out))
    assert grad.shape == s.shape
