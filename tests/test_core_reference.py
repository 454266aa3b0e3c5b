"""The split against the slow explicit float64 reference (four-product network, F.3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import core
from core.zoo import cifar10_samples, normalize_cifar, resnet20
from tests import split_reference as ref


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 5)
    ).double().eval()


def _layers(model: nn.Sequential):
    return [(m.weight.detach(), m.bias.detach()) for m in model if isinstance(m, nn.Linear)]


MLP_POINTS = ["input", "1", "3", "4"]  # activations a(0), a(1), a(2), logits


@pytest.mark.parametrize("input_split", ["relu", "half"])
def test_forward_matches_explicit_split_network(input_split):
    model = _mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    acts, _ = ref.mlp_forward(_layers(model), x, input_split)
    sm = core.split(model, stabilizer="none", input_split=input_split)
    pairs = sm.pairs(x, MLP_POINTS)
    for name, (ap, an) in zip(MLP_POINTS, acts, strict=True):
        torch.testing.assert_close(pairs[name].pos, ap, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pairs[name].neg, an, rtol=1e-12, atol=1e-12)
    g, h = sm(x)
    torch.testing.assert_close(g, acts[-1][0])
    torch.testing.assert_close(h, acts[-1][1])
    assert torch.equal(sm.forward_pairs(x).d, model(x))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.4, 0.5])
@pytest.mark.parametrize("input_split", ["relu", "half"])
def test_sensitivities_match_f3_recursion(alpha, input_split):
    model = _mlp(1)
    x = torch.randn(4, 6, dtype=torch.float64)
    target = torch.tensor([0, 3, 4, 1])
    _, expected = ref.mlp_sensitivities(_layers(model), x, target, alpha, input_split)
    sm = core.split(model, stabilizer="none", input_split=input_split)
    probes = sm.sensitivities(x, target, MLP_POINTS, alpha=alpha)
    for name, (pg, ng, ph, nh) in zip(MLP_POINTS, expected, strict=True):
        p = probes[name]
        for got, want in ((p.pos_g, pg), (p.neg_g, ng), (p.pos_h, ph), (p.neg_h, nh)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p.g - p.h, p.grad, rtol=1e-12, atol=1e-12)


def test_per_layer_alpha_matches_recursion():
    model = _mlp(2)
    x = torch.randn(3, 6, dtype=torch.float64)
    target = torch.tensor([2, 2, 0])
    alphas = {"input": 0.1, "1": 0.2, "3": 0.35, "output": 0.45}
    _, expected = ref.mlp_sensitivities(_layers(model), x, target, [0.1, 0.2, 0.35, 0.45])
    probes = core.split(model, stabilizer="none").sensitivities(x, target, MLP_POINTS, alphas)
    for name, want in zip(MLP_POINTS, expected, strict=True):
        p = probes[name]
        for got, w in zip((p.pos_g, p.neg_g, p.pos_h, p.neg_h), want, strict=True):
            torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)


def test_unknown_shift_point_is_rejected():
    with pytest.raises(ValueError, match="unknown shift points"):
        core.split(_mlp()).sensitivities(torch.randn(1, 6).double(), 0, ["1"], {"nope": 0.1})


def test_theorem_7_sum_of_sensitivities_is_product_of_abs_weights():
    model = _mlp(3)
    x = torch.randn(2, 6, dtype=torch.float64)
    alpha = 0.3
    probes = core.split(model).sensitivities(x, 1, MLP_POINTS, alpha=alpha)
    w = [layer[0].abs() for layer in _layers(model)]
    row = torch.zeros(5, dtype=torch.float64)
    row[1] = 1.0
    expected = {"4": row * (1 - 2 * alpha)}
    expected["3"] = expected["4"] @ w[2] * (1 - 2 * alpha)
    expected["1"] = expected["3"] @ w[1] * (1 - 2 * alpha)
    expected["input"] = expected["1"] @ w[0] * (1 - 2 * alpha)
    for name, want in expected.items():
        p = probes[name]
        torch.testing.assert_close(p.pos_g + p.neg_g, want.expand_as(p.S), rtol=1e-12, atol=0)
        torch.testing.assert_close(p.pos_h + p.neg_h, want.expand_as(p.S), rtol=1e-12, atol=0)


def test_theorem_6_uniform_shift_moves_both_streams_by_abs_weights():
    model = _mlp(4)
    layers = _layers(model)
    x = torch.randn(3, 6, dtype=torch.float64)
    acts, _ = ref.mlp_forward(layers, x)
    c = torch.rand(9, dtype=torch.float64)  # a shift at activation 1
    ap, an = acts[1]

    def tail(ap, an):
        for i, (w, b) in enumerate(layers[1:]):
            wp, wn = w.clamp_min(0), (-w).clamp_min(0)
            zp = ap @ wp.T + an @ wn.T + b.clamp_min(0)
            zn = ap @ wn.T + an @ wp.T + (-b).clamp_min(0)
            ap, an = (torch.maximum(zp, zn), zn) if i == 0 else (zp, zn)
        return ap, an

    g0, h0 = tail(ap, an)
    g1, h1 = tail(ap + c, an + c)
    shift = c @ layers[1][0].abs().T @ layers[2][0].abs().T
    torch.testing.assert_close(g1 - g0, shift.expand_as(g0))
    torch.testing.assert_close(h1 - h0, shift.expand_as(h0))
    # and the split's stabilisers, symmetric shifts, leave the sensitivities alone
    sens = [core.split(model, stabilizer=s, threshold=0.0).sensitivities(x, 0, ["input"], 0.2)
            for s in ("none", "scale", "shift")]
    for other in sens[1:]:
        torch.testing.assert_close(other["input"].pos_g, sens[0]["input"].pos_g)


def _cnn() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
    ).double().eval()


def test_alpha_zero_equals_autograd_of_explicit_split_cnn():
    model = _cnn()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    target = torch.tensor([4, 0, 2])
    xp, xn = ref.split_input(x)
    xp.requires_grad_(True)
    xn.requires_grad_(True)
    z1 = ref.conv_split(xp, xn, model[0])
    a1 = ref.maxout(*z1)
    a2 = ref.convex_maxpool(*a1, 2)
    a2 = tuple(t.detach().requires_grad_(True) for t in a2)
    z3 = ref.conv_split(*a2, model[3])
    a4 = ref.maxout(*z3)
    out = ref.linear_split(a4[0].flatten(1), a4[1].flatten(1), model[6])
    g = out[0].gather(1, target[:, None]).sum()
    h = out[1].gather(1, target[:, None]).sum()
    probes = core.split(model, maxpool="convex", stabilizer="none").sensitivities(
        x, target, ["input", "2", "6"], alpha=0.0)
    for name, (tp, tn) in {"input": (xp, xn), "2": a2}.items():
        if name == "input":  # the pool's pair is a leaf above: differentiate end to end
            gp, gn = torch.autograd.grad(_g_from(model, xp, xn, target), (xp, xn))
            hp, hn = torch.autograd.grad(_g_from(model, xp, xn, target, stream=1), (xp, xn))
        else:
            gp, gn = torch.autograd.grad(g, (tp, tn), retain_graph=True)
            hp, hn = torch.autograd.grad(h, (tp, tn), retain_graph=True)
        p = probes[name]
        torch.testing.assert_close(p.pos, tp.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p.neg, tn.detach(), rtol=1e-12, atol=1e-12)
        for got, want in ((p.pos_g, gp), (p.neg_g, gn), (p.pos_h, hp), (p.neg_h, hn)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(probes["6"].pos.gather(1, target[:, None]).sum(), g)


def _g_from(model, xp, xn, target, stream=0):
    a1 = ref.maxout(*ref.conv_split(xp, xn, model[0]))
    a2 = ref.convex_maxpool(*a1, 2)
    a4 = ref.maxout(*ref.conv_split(*a2, model[3]))
    out = ref.linear_split(a4[0].flatten(1), a4[1].flatten(1), model[6])
    return out[stream].gather(1, target[:, None]).sum()


@pytest.mark.parametrize("maxpool", ["convex", "wta"])
def test_streams_without_stabiliser_are_monotone_and_convex_in_the_input_pair(maxpool):
    model = _cnn()
    sm = core.split(model, maxpool=maxpool, stabilizer="none")
    torch.manual_seed(0)
    xp = torch.rand(4, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    xn = torch.rand(4, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    g, h = sm.streams(xp, xn)
    for stream in (g, h):
        grads = torch.autograd.grad(stream.sum(), (xp, xn), retain_graph=True)
        assert all((t >= -1e-12).all() for t in grads), "a split stream is not monotone"
    if maxpool == "wta":
        return  # wta gives up convexity (section 3.4); monotonicity is what it keeps
    with torch.no_grad():
        up, un = torch.rand_like(xp) * 3, torch.rand_like(xn) * 3
        vp, vn = torch.rand_like(xp) * 3, torch.rand_like(xn) * 3
        gu, hu = sm.streams(up, un)
        gv, hv = sm.streams(vp, vn)
        gm, hm = sm.streams((up + vp) / 2, (un + vn) / 2)
    assert (gm <= (gu + gv) / 2 + 1e-9).all()
    assert (hm <= (hu + hv) / 2 + 1e-9).all()


def test_float32_sensitivities_agree_with_float64_on_resnet20():
    model = resnet20()
    x, y = cifar10_samples()
    x = normalize_cifar(x[:3])
    layers = ["layer2.0.conv2", "layer3", "input"]
    p32 = core.split(model).sensitivities(x, y[:3], layers, alpha=0.3)
    p64 = core.split(resnet20().double()).sensitivities(x.double(), y[:3], layers, alpha=0.3)
    for name in layers:
        for attr in ("g", "h", "grad", "S"):
            a, b = getattr(p32[name], attr).double(), getattr(p64[name], attr)
            err = (a - b).abs().max() / b.abs().max().clamp_min(1e-30)
            assert err < 1e-4, (name, attr, float(err))
