"""SplitLRP keeps the parts of a stabilised pair non-negative: the "scale" stabiliser lowers
a sample's mass to about its threshold, and where the activation itself is larger
(``theta^k s < |d|``) the parts ``a+- = (s +- d) / 2`` turned negative; SplitLRP, which
shares relevance in proportion to the parts, then returned relevance that grew by about
1e4 per Inception block (sums of 2e6 for a one-hot seed), with no error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import core
from core.stabilize import stabilise


def test_keep_parts_floors_the_changed_rows_at_the_activation():
    d = torch.tensor([[300.0, -200.0, 1.0], [0.5, -0.5, 0.2]], dtype=torch.float64)
    s = d.abs() + 1.0  # row 0 exceeds the threshold, row 1 does not
    plain = stabilise(d, s.clone(), "scale", 0.1, 10.0)
    assert (plain[0] < d[0].abs()).any()  # the negative parts of the forward's rule
    kept = stabilise(d, s.clone(), "scale", 0.1, 10.0, keep_parts=True)
    torch.testing.assert_close(kept[0], torch.maximum(plain[0], d[0].abs()))
    torch.testing.assert_close(kept[1], s[1])  # an unchanged row stays as it was
    shifted = stabilise(d, s.clone(), "shift", 0.1, 10.0, keep_parts=True)
    torch.testing.assert_close(shifted[0], torch.zeros_like(d[0]))  # the paper's baseline
    inplace = s.clone()
    assert stabilise(d, inplace, "scale", 0.1, 10.0, inplace=True, keep_parts=True) is inplace
    torch.testing.assert_close(inplace, kept)


def test_forward_and_sensitivities_keep_the_plain_stabiliser():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False),
                          nn.ReLU(), nn.Linear(8, 3, bias=False)).double().eval()
    x = torch.rand(2, 6, dtype=torch.float64) * 500
    sm = core.split(model)
    with torch.no_grad():
        f = model(x)
    g, h = sm(x)
    assert float((g - h - f).abs().max()) <= 1e-12 * float(g.abs().max())
    out = sm.forward_pairs(x)  # the forward's stabiliser is the plain one, as before
    assert float((out.s - out.d.abs()).min()) < 0
    xx = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(model(xx)[:, 0].sum(), xx)
    probe = sm.sensitivities(x, 0, ["input"])["input"]
    torch.testing.assert_close(probe.g - probe.h, grad)
    seed = torch.eye(3, dtype=torch.float64)[[0, 1]]
    r = sm.relevance(x, seed)["input"]  # bias-free: conserved, less what epsilon absorbs
    torch.testing.assert_close((r.pos + r.neg).sum(1), torch.ones(2, dtype=torch.float64),
                               rtol=0, atol=1e-4)


@pytest.mark.slow
def test_split_lrp_conserves_through_inception_blocks():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.get_model("inception_v3", weights=None,
                                       init_weights=True).eval().double()
    x = torch.randn(2, 3, 80, 80, dtype=torch.float64)
    seen = {}
    handle = net.Mixed_6c.register_forward_hook(
        lambda module, args, out: seen.__setitem__("in", args[0].detach()))
    net(x)
    handle.remove()
    head = nn.Linear(768, 3, bias=False).double()
    model = nn.Sequential(net.Mixed_6c, net.Mixed_6d, net.Mixed_6e, nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), head).eval()
    a = seen["in"]
    seed = torch.eye(3, dtype=torch.float64)[model(a).argmax(1)]
    r = core.split(model).relevance(a, seed)["input"]
    # was 2.1e6 / 2.7e6 (BatchNorm biases take a share: not exactly 1)
    torch.testing.assert_close((r.pos + r.neg).flatten(1).sum(1),
                               torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-3)


@pytest.mark.parametrize("scale", [1.0, 3.0, 10.0])
def test_one_hot_relevance_stays_non_negative_where_activations_exceed_the_threshold(scale):
    # bias-free 5-layer MLPs whose activations exceed the threshold: with the plain rule
    # the relevance took both signs, its absolute sum 1.1x to 3.7e3x the seed (its signed
    # sum still 1)
    torch.manual_seed(0)
    width, layers = 16, []
    for _ in range(5):
        linear = nn.Linear(width, width, bias=False)
        nn.init.normal_(linear.weight, 0.0, scale / width ** 0.5)
        layers += [linear, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 3, bias=False)).double().eval()
    x = torch.randn(4, width, dtype=torch.float64) * 5
    seed = torch.eye(3, dtype=torch.float64)[model(x).argmax(1)]
    r = core.split(model).relevance(x, seed)["input"]
    assert float(r.pos.min()) >= 0 and float(r.neg.min()) >= 0
    # conserved, less what epsilon absorbs
    torch.testing.assert_close((r.pos + r.neg).sum(1), torch.ones(4, dtype=torch.float64),
                               rtol=0, atol=1e-4)


def test_a_torchvision_squeezenet_gets_non_negative_relevance():
    # with the plain rule: relevance down to -1.3e-2 and absolute sums 1.07 / 1.57 (signed 1)
    torchvision = pytest.importorskip("torchvision")
    from tests.core_checks import randomise_batchnorm

    torch.manual_seed(0)
    model = randomise_batchnorm(torchvision.models.squeezenet1_1(weights=None).eval())
    x = torch.randn(2, 3, 64, 64) * 3
    seed = torch.eye(1000)[model(x).argmax(1)]
    r = core.split(model, merge_batchnorm=True).relevance(x, seed)["input"]
    assert float(r.pos.min()) >= 0 and float(r.neg.min()) >= 0
    torch.testing.assert_close((r.pos + r.neg).flatten(1).sum(1), torch.ones(2),
                               rtol=0, atol=1e-3)
