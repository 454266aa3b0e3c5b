"""Products of activations (exact) and frozen smooth operations (``nonlinear="freeze"``).

The product rule is checked against the explicit four-product split network in float64
(values and all four shifted local sensitivities, the alpha shift applied by autograd hooks);
the frozen rules against autograd of the frozen model (the model with every frozen factor
detached).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core
from core import frozen, products
from core.pair import Pair
from tests.core_checks import check_forward, check_sensitivities
from tests.split_reference import linear_split, maxout, split_input


# --------------------------------------------------------------------------- reference
class _Shift(torch.autograd.Function):
    """Identity on a pair ``(a+, a-)``; the backward shift ``d± <- d± - alpha (d+ + d-)``."""

    @staticmethod
    def forward(ctx, p, n, alpha):
        ctx.alpha = alpha
        return p.view_as(p), n.view_as(n)

    @staticmethod
    def backward(ctx, gp, gn):
        both = ctx.alpha * (gp + gn)
        return gp - both, gn - both, None


def _four_products(ap, an, bp, bn, op):
    """``c+ = B(a+, b+) + B(a-, b-)``, ``c- = B(a+, b-) + B(a-, b+)`` (eq. 19)."""
    return op(ap, bp) + op(an, bn), op(ap, bn) + op(an, bp)


class ProductNet(nn.Module):
    """ReLU branches multiplied elementwise (a GLU with a ReLU gate) and as matrices."""

    def __init__(self) -> None:
        super().__init__()
        self.fa = nn.Linear(5, 6)
        self.fb = nn.Linear(5, 6)
        self.fc = nn.Linear(5, 6)
        self.act_a = nn.ReLU()
        self.act_b = nn.ReLU()
        self.out = nn.Linear(6 + 4, 3)

    def forward(self, x):
        a = self.act_a(self.fa(x))
        b = self.act_b(self.fb(x))
        glu = a * self.fc(x)                                   # ReLU gate times a linear map
        mm = torch.bmm(a.view(-1, 2, 3), b.view(-1, 3, 2))      # (B, 2, 2): like Q K^T
        return self.out(torch.cat([glu, mm.flatten(1)], dim=1))


def _reference(model: ProductNet, x, target, alpha):
    """Values and sensitivities of the explicit four-product split network (float64)."""
    ap0, an0 = (t.clone().requires_grad_(True) for t in split_input(x))
    ap, an = _Shift.apply(ap0, an0, alpha)
    # the ReLU units' split outputs (a- a node of its own, not the pre-activation z-)
    ra = [t.clone() for t in maxout(*linear_split(ap, an, model.fa))]
    rb = [t.clone() for t in maxout(*linear_split(ap, an, model.fb))]
    a = _Shift.apply(*ra, alpha)
    b = _Shift.apply(*rb, alpha)
    c = linear_split(ap, an, model.fc)
    glu = _four_products(a[0], a[1], c[0], c[1], torch.mul)
    mm = _four_products(a[0].view(-1, 2, 3), a[1].view(-1, 2, 3), b[0].view(-1, 3, 2),
                        b[1].view(-1, 3, 2), torch.bmm)
    zp = torch.cat([glu[0], mm[0].flatten(1)], 1)
    zn = torch.cat([glu[1], mm[1].flatten(1)], 1)
    gp, gn = _Shift.apply(*linear_split(zp, zn, model.out), alpha)
    onehot = F.one_hot(torch.tensor(target), 3).to(x.dtype).expand_as(gp)
    sens = {}
    for stream, out in (("g", gp), ("h", gn)):
        grads = torch.autograd.grad((out * onehot).sum(), [ap0, an0, *ra, *rb],
                                    retain_graph=True)
        sens[stream] = {"input": grads[0:2], "act_a": grads[2:4], "act_b": grads[4:6]}
    return (gp.detach(), gn.detach()), sens


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_product_rule_matches_four_product_reference(alpha):
    torch.manual_seed(0)
    model = ProductNet().double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    sm = core.split(model, stabilizer="none")
    (g_ref, h_ref), sens = _reference(model, x, 1, alpha)
    g, h = sm(x)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-13)
    probes = sm.sensitivities(x, 1, ["input", "act_a", "act_b"], alpha=alpha)
    for layer, p in probes.items():
        for stream, (pos, neg) in (("g", (p.pos_g, p.neg_g)), ("h", (p.pos_h, p.neg_h))):
            ref_pos, ref_neg = sens[stream][layer]
            torch.testing.assert_close(pos, ref_pos, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(neg, ref_neg, rtol=1e-10, atol=1e-12)
        assert p.exact  # products are exact: nothing frozen


def test_product_backward_rule_states_the_adjoints():
    torch.manual_seed(1)
    a = Pair(torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64) + 1)
    b = Pair(torch.randn(4, 2, dtype=torch.float64), torch.rand(4, 2, dtype=torch.float64) + 1)
    S_c, Dg_c = torch.rand(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    (S_a, Dg_a), (S_b, Dg_b) = products.product_backward(S_c, Dg_c, a, b, torch.matmul)
    torch.testing.assert_close(S_a, S_c @ b.s.T)
    torch.testing.assert_close(Dg_a, Dg_c @ b.d.T)
    torch.testing.assert_close(S_b, a.s.T @ S_c)
    torch.testing.assert_close(Dg_b, a.d.T @ Dg_c)
    # in stream coordinates: d/da+ = (S + Dg)/2 etc. equal the four-product chain rule
    ap, an = (a.s + a.d) / 2, (a.s - a.d) / 2
    bp, bn = (b.s + b.d) / 2, (b.s - b.d) / 2
    dp, dn = (S_c + Dg_c) / 2, (S_c - Dg_c) / 2  # sensitivities of g at (c+, c-)
    torch.testing.assert_close((S_a + Dg_a) / 2, dp @ bp.T + dn @ bn.T)
    torch.testing.assert_close((S_a - Dg_a) / 2, dp @ bn.T + dn @ bp.T)
    torch.testing.assert_close(products.product(a, b, torch.matmul).d, a.d @ b.d)
    cp, cn = _four_products(ap, an, bp, bn, torch.matmul)
    torch.testing.assert_close(products.product(a, b, torch.matmul).s, cp + cn)


def test_product_streams_are_monotone_not_convex():
    torch.manual_seed(2)
    model = ProductNet().double().eval()
    sm = core.split(model, stabilizer="none")
    x = torch.randn(8, 5, dtype=torch.float64)
    p = sm.sensitivities(x, 0, ["input", "act_a"], alpha=0.0)
    for probe in p.values():  # alpha = 0: the true gradients of g and h in the split inputs
        for t in (probe.pos_g, probe.neg_g, probe.pos_h, probe.neg_h):
            assert (t >= -1e-12).all()
    xp, xn = split_input(x)
    step = torch.rand_like(xp)
    g0, h0 = sm.streams(xp, xn)
    g1, h1 = sm.streams(xp + step, xn + step)
    assert (g1 >= g0 - 1e-12).all() and (h1 >= h0 - 1e-12).all()
    # not convex: along some segment the midpoint lies above the chord
    torch.manual_seed(3)
    u, v = torch.rand(64, 5, dtype=torch.float64) * 3, torch.rand(64, 5, dtype=torch.float64) * 3
    zero = torch.zeros_like(u)
    gu, _ = sm.streams(u, zero)
    gv, _ = sm.streams(v, zero)
    gm, _ = sm.streams((u + v) / 2, zero)
    assert (gm > (gu + gv) / 2 + 1e-9).any()


def test_float32_products_keep_the_models_own_output_bit_for_bit():
    torch.manual_seed(4)
    model = ProductNet().eval()
    x = torch.randn(16, 5)
    out = core.split(model).forward_pairs(x)
    assert torch.equal(out.d, model(x))


# --------------------------------------------------------------------------- frozen model
class Smooth(nn.Module):
    """Every frozen form: secant units, norms, a sigmoid gate, softmax attention (by hand
    and fused), a division by an activation; ``frozen=True`` evaluates the frozen model."""

    def __init__(self, frozen: bool = False) -> None:
        super().__init__()
        self.frozen = frozen
        self.inp = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.gn = nn.GroupNorm(2, 4)
        self.rms = nn.RMSNorm(8)
        self.se = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)
        with torch.no_grad():
            self.ln.weight.uniform_(-1, 1)  # negative affine weights: |w| in the s stream

    def _c(self, t):
        return t.detach() if self.frozen else t

    def forward(self, x):
        z = self.inp(x)
        if self.frozen:
            z = z * torch.sigmoid(z).detach()                              # SiLU
        else:
            z = F.silu(z)
        z = self._ln(z)
        t = z.view(z.shape[0], 2, 4)                                       # 2 tokens
        q, k, v = (m(z).view(-1, 2, 4) for m in (self.q, self.k, self.v))
        weights = torch.softmax(q @ k.transpose(1, 2) / 2, dim=-1)
        a = self._c(weights) @ v
        fused = self._sdpa(q, k, v)
        t = self._gn(t.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2) + a + fused
        z = t.flatten(1)
        z = self._gelu(z)
        z = z * self._c(torch.sigmoid(self.se(z)))                         # SE-type gate
        z = self._rms(z)
        z = z / self._c(z.abs().mean(dim=1, keepdim=True) + 1)             # division
        return self.out(z)

    def _ln(self, z):
        if not self.frozen:
            return self.ln(z)
        r = torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + self.ln.eps).detach()
        return (z - z.mean(-1, keepdim=True)) * r * self.ln.weight + self.ln.bias

    def _gn(self, t):
        if not self.frozen:
            return self.gn(t)
        g = t.reshape(t.shape[0], 2, -1)
        r = torch.rsqrt(g.var(2, unbiased=False, keepdim=True) + self.gn.eps).detach()
        out = ((g - g.mean(2, keepdim=True)) * r).reshape(t.shape)
        return out * self.gn.weight.view(1, -1, 1, 1) + self.gn.bias.view(1, -1, 1, 1)

    def _rms(self, z):
        if not self.frozen:
            return self.rms(z)
        eps = torch.finfo(z.dtype).eps
        r = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps).detach()
        return z * r * self.rms.weight

    def _gelu(self, z):
        if not self.frozen:
            return F.gelu(z)
        return z * (0.5 * (1 + torch.erf(z / 2 ** 0.5))).detach()

    def _sdpa(self, q, k, v):
        if not self.frozen:
            return F.scaled_dot_product_attention(q, k, v)
        return torch.softmax(q @ k.transpose(1, 2) / 2, dim=-1).detach() @ v


def _pair_models():
    torch.manual_seed(5)
    model = Smooth().double().eval()
    reference = Smooth(frozen=True).double().eval()
    reference.load_state_dict(model.state_dict())
    return model, reference


def test_freeze_is_exact_forward_and_its_gradient_is_the_frozen_models():
    model, reference = _pair_models()
    x = torch.randn(5, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match="froze"):
        sm = core.split(model, nonlinear="freeze", stabilizer="none")
    g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(reference(x), model(x), rtol=0, atol=1e-12)
    xr = x.clone().requires_grad_(True)
    (frozen_grad,) = torch.autograd.grad(reference(xr)[:, 2].sum(), xr)
    xt = x.clone().requires_grad_(True)
    (true_grad,) = torch.autograd.grad(model(xt)[:, 2].sum(), xt)
    for alpha in (0.0, 0.3):
        p = sm.sensitivities(x, 2, ["input"], alpha=alpha)["input"]
        torch.testing.assert_close(p.grad, frozen_grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.g - p.h, frozen_grad, rtol=1e-10, atol=1e-12)
        assert not p.exact and len(p.frozen) == len(sm.frozen_operations())
    assert (frozen_grad - true_grad).abs().max() > 1e-3  # where it differs: documented
    # alpha = 0: the sensitivities are the gradients of the frozen split's streams
    p = sm.sensitivities(x, 2, ["input"], alpha=0.0)["input"]
    xp, xn = (t.clone().requires_grad_(True) for t in split_input(x))
    g, h = sm.streams(xp, xn)
    gp, gn = torch.autograd.grad(g[:, 2].sum(), [xp, xn], retain_graph=True)
    hp, hn = torch.autograd.grad(h[:, 2].sum(), [xp, xn])
    for got, want in ((p.pos_g, gp), (p.neg_g, gn), (p.pos_h, hp), (p.neg_h, hn)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_frozen_operations_are_listed_warned_and_reported_per_probe():
    model, _ = _pair_models()
    with pytest.raises(core.UnsupportedOperation, match="nonlinear='freeze'"):
        core.split(model)
    with pytest.raises(ValueError, match="nonlinear"):
        core.split(model, nonlinear="approximate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sm = core.split(model, nonlinear="freeze")
    listed = sm.frozen_operations()
    kinds = " ".join(listed)
    for what in ("silu", "'ln'", "softmax", "scaled_dot_product_attention", "'gn'", "gelu",
                 "sigmoid", "'rms'", "1 / b"):
        assert what in kinds, what
    assert sum("froze" in str(w.message) for w in caught) == 1
    x = torch.randn(3, 6, dtype=torch.float64)
    probes = sm.sensitivities(x, 0, ["input", "rms", "out:input", "out"])
    assert probes["out"].exact and probes["out:input"].exact
    assert probes["rms"].frozen == (listed[-1],)  # only the division lies after it
    assert set(probes["input"].frozen) == set(listed)


def test_freeze_leaves_the_model_unchanged_and_float32_exact():
    model, _ = _pair_models()
    model = model.float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = core.split(model, nonlinear="freeze")
    assert torch.equal(sm.forward_pairs(x).d, model(x))
    sm.sensitivities(x, 1, ["input", "ln"])
    sm.relevance(x, F.one_hot(torch.tensor([1] * 4), 3).float())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fn", [F.silu, F.gelu, F.mish, F.elu, F.selu, F.softplus, torch.tanh,
                                F.logsigmoid, lambda z: F.gelu(z, approximate="tanh"),
                                F.softsign, F.tanhshrink])
def test_secant_units(fn):
    z = torch.linspace(-30, 30, 601, dtype=torch.float64)
    z = torch.cat([z, torch.zeros(1, dtype=torch.float64)])
    p = Pair(z, z.abs() + 0.5)
    out = frozen.secant_unit(getattr(fn, "__name__", "unit"), fn, p)
    assert torch.equal(out.d, fn(z))  # the model's own value
    phi0 = float(fn(torch.zeros((), dtype=torch.float64)))
    zero = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (slope0,) = torch.autograd.grad(fn(zero), zero)  # c = phi'(0) at z = 0
    c = torch.where(z == 0, slope0, (fn(z) - phi0) / torch.where(z == 0, 1, z))
    assert (c >= -1e-15).all()  # secant slopes of these units are non-negative
    torch.testing.assert_close(out.s, c.abs() * p.s + abs(phi0), rtol=1e-9, atol=1e-12)
    assert (out.s >= out.d.abs() - 1e-9).all()  # a+ and a- stay non-negative


def test_hardswish_and_hardsigmoid_are_exact_without_freeze():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 8), nn.Hardswish(), nn.Linear(8, 8), nn.Hardsigmoid(),
                          nn.Linear(8, 2)).double().eval()
    sm = core.split(model, stabilizer="none")
    assert sm.frozen_operations() == []
    x = torch.randn(16, 4, dtype=torch.float64) * 4
    g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
    p = sm.sensitivities(x, 1, ["input"], alpha=0.0)["input"]
    xt = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xt)[:, 1].sum(), xt)
    torch.testing.assert_close(p.grad, grad)  # exact: the true gradient
    assert (p.pos_g >= -1e-12).all() and (p.neg_g >= -1e-12).all()


class _FunctionalHard(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.hardsigmoid(self.b(F.hardswish(self.a(x)))))


@pytest.mark.parametrize("build", [
    lambda: nn.Sequential(nn.Linear(4, 8), nn.Hardswish(), nn.Linear(8, 2)),
    _FunctionalHard,
], ids=["module", "functional"])
def test_hardswish_in_float64_is_the_models_to_rounding(build):
    """g - h and the gradient through Hardswish are the model's in float64 to 1e-12. The
    gradient was the product form's (z * F.hardsigmoid(z)), whose hardsigmoid backward has a
    float32 1/6: 3.3e-9 off the model's gradient of size 0.25."""
    torch.manual_seed(6)
    model = build().double().eval()
    x = torch.randn(64, 4, dtype=torch.float64) * 4
    for stabilizer in ("none", "scale"):
        sm = core.split(model, stabilizer=stabilizer)
        g, h = sm(x)
        torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
        p = sm.sensitivities(x, 1, ["input"], alpha=0.0)["input"]
        xt = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xt)[:, 1].sum(), xt)
        torch.testing.assert_close(p.grad, grad, rtol=0, atol=1e-14)


def test_addcmul_and_abs_are_exact():
    torch.manual_seed(7)

    class Grn(nn.Module):  # ConvNeXt-V2's global response normalisation, by hand
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.gamma = nn.Parameter(torch.randn(6))
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            z = self.fc(x)
            return self.out(torch.addcmul(z, self.gamma, z * F.relu(z), value=-0.5) + z.abs())

    model = Grn().double().eval()
    sm = core.split(model, stabilizer="none")
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(sm(x)[0] - sm(x)[1], model(x), rtol=0, atol=1e-12)
    p = sm.sensitivities(x, 0, ["input"], alpha=0.0)["input"]
    assert p.exact and (p.pos_g >= -1e-12).all() and (p.neg_g >= -1e-12).all()


def test_gate_expanded_like_a_pair():
    # efficient channel attention: the sigmoid gate (a constant) is expanded like the pair
    torch.manual_seed(8)

    class Eca(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.gate = nn.Conv1d(1, 1, 3, padding=1)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            z = F.relu(self.conv(x))
            y = self.gate(z.mean((2, 3)).view(z.shape[0], 1, -1)).view(z.shape[0], -1, 1, 1)
            z = z * y.sigmoid().expand_as(z)
            return self.out(z.mean((2, 3)))

    model = Eca().eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="froze"):
        sm = core.split(model, nonlinear="freeze")
    assert torch.equal(sm.forward_pairs(x).d, model(x))
    assert any("sigmoid" in op for op in sm.frozen_operations())


def test_adapters_accept_and_record_the_option():
    import quantus_adapters
    from captum_split import SplitGrad

    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer = SplitGrad(model, alpha=0.5, nonlinear="freeze")
        assert explainer.nonlinear == "freeze"
        with pytest.raises(core.UnsupportedOperation, match="nonlinear='freeze'"):
            SplitGrad(model)
        for method in ("SplitCAM", "SplitGrad", "SplitLRP"):
            maps = quantus_adapters.explain(model, x.numpy(), [0, 1], method=method,
                                            nonlinear="freeze")
            assert maps.shape == (2, 1, 8, 8)


def test_frozen_attention_over_a_constant_value_is_a_constant():
    """Queries and keys from the input, values a parameter (iFormer-style learned values):
    with the weights frozen the attention output is a constant, not a pair, and the split
    stays exact (it raised AttributeError on the constant)."""

    class LearnedValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(4, 4)
            self.k = nn.Linear(4, 4)
            self.values = nn.Parameter(torch.randn(1, 3, 4))
            self.out = nn.Linear(4 * 3 + 4 * 3, 2)

        def forward(self, x):                     # x: (B, 3, 4)
            q, k = torch.relu(self.q(x)), self.k(x)
            a = F.scaled_dot_product_attention(q, k, self.values.expand(x.shape[0], -1, -1))
            return self.out(torch.cat([a.flatten(1), q.flatten(1)], 1))

    torch.manual_seed(2)
    model = LearnedValues().double().eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="froze"):
        sm = core.split(model, nonlinear="freeze")
    g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
    probe = sm.sensitivities(x, 1, ["input"], alpha=0.3)["input"]
    # the frozen model: only the q path carries gradient (out is linear, so the constant's
    # value does not matter)
    xr = x.clone().requires_grad_(True)
    q = torch.relu(model.q(xr)).flatten(1)
    logits = model.out(torch.cat([torch.zeros(2, 12, dtype=torch.float64), q], 1))
    (grad,) = torch.autograd.grad(logits[:, 1].sum(), xr)
    torch.testing.assert_close(probe.g - probe.h, grad, rtol=1e-10, atol=1e-12)


def _check_frozen(model, reference, x, target: int, froze: str) -> core.SplitModel:
    """``nonlinear="freeze"`` warns ``froze``; in float64 g - h is the model's output to
    1e-12 and the input sensitivity is ``reference``'s gradient (alpha 0) to 1e-10."""
    with pytest.warns(UserWarning, match=froze):
        sm = core.split(model, nonlinear="freeze", stabilizer="none")
    g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reference(xr)[:, target].sum(), xr)
    p = sm.sensitivities(x, target, ["input"], alpha=0.0)["input"]
    torch.testing.assert_close(p.grad, grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p.g - p.h, grad, rtol=1e-10, atol=1e-12)
    return sm


# --------------------------------------------------------------------------- instance norm
class InstanceNormNet(nn.Module):
    """nnU-Net's block (convolution, InstanceNorm with affine weights, LeakyReLU) twice;
    ``frozen=True`` evaluates the model with every ``1 / std`` frozen."""

    def __init__(self, frozen: bool = False) -> None:
        super().__init__()
        self.frozen = frozen
        self.conv1, self.conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.norm1, self.norm2 = nn.InstanceNorm2d(4, affine=True), nn.InstanceNorm2d(4)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.norm1.weight.uniform_(-1, 1)
            self.norm1.bias.uniform_(-1, 1)

    def _norm(self, m, z):
        if not self.frozen:
            return m(z)
        r = torch.rsqrt(z.var((2, 3), unbiased=False, keepdim=True) + m.eps).detach()
        out = (z - z.mean((2, 3), keepdim=True)) * r
        return out if m.weight is None else out * m.weight.view(1, -1, 1, 1) + m.bias.view(
            1, -1, 1, 1)

    def forward(self, x):
        z = F.leaky_relu(self._norm(self.norm1, self.conv1(x)), 0.01)
        z = F.leaky_relu(self._norm(self.norm2, self.conv2(z)), 0.01)
        return self.fc(z.mean((2, 3)))


def test_instance_norm_with_input_statistics_is_frozen_exactly():
    torch.manual_seed(11)
    model = InstanceNormNet().double().eval()
    reference = InstanceNormNet(frozen=True).double().eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    with pytest.raises(core.UnsupportedOperation, match="'norm1'.*nonlinear='freeze'"):
        core.split(model)
    with pytest.warns(UserWarning, match="froze 2"):
        sm = core.split(model, nonlinear="freeze", stabilizer="none")
    assert all("every channel of every sample" in f for f in sm.frozen_operations())
    g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
    xr = x.clone().requires_grad_(True)
    (frozen_grad,) = torch.autograd.grad(reference(xr)[:, 1].sum(), xr)
    p = sm.sensitivities(x, 1, ["input"], alpha=0.0)["input"]
    torch.testing.assert_close(p.grad, frozen_grad, rtol=1e-10, atol=1e-12)
    model32 = model.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm32 = core.split(model32, nonlinear="freeze")
    assert torch.equal(sm32.forward_pairs(x.float()).d, model32(x.float()))


class RunningInstanceNorm(nn.Module):
    """InstanceNorm with running statistics, as a module and as a function: exact."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.register_buffer("mean", torch.linspace(-1, 1, 4))
        self.register_buffer("var", torch.linspace(0.5, 2, 4))
        self.fc = nn.Linear(4 * 16, 3)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)
            self.norm.weight.uniform_(-1, 1)
            self.norm.bias.uniform_(-1, 1)

    def forward(self, x):
        z = F.relu(self.norm(self.conv(x)))
        z = F.instance_norm(z, self.mean, self.var, use_input_stats=False)
        return self.fc(F.relu(z).flatten(1))


def test_instance_norm_with_running_statistics_is_exact():
    torch.manual_seed(12)
    model = RunningInstanceNorm().eval()
    x = torch.randn(3, 2, 6, 6)
    check_forward(model, x)  # nonlinear="error": nothing is frozen
    check_sensitivities(model, x, torch.tensor([0, 1, 2]), ["input", "norm", "conv"])
    assert not core.split(model).frozen_operations()


class PerSampleInstanceNorm(nn.Module):
    """An InstanceNorm1d on unbatched inputs, one sample at a time (captured eagerly)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(5, 12), nn.InstanceNorm1d(3), nn.Linear(12, 2)

    def forward(self, x):
        z = F.relu(self.fc1(x)).view(x.shape[0], 3, 4)
        z = torch.stack([self.norm(z[i]) for i in range(z.shape[0])])
        return self.fc2(F.relu(z).flatten(1))


def test_instance_norm_of_an_unbatched_input():
    torch.manual_seed(13)
    model = PerSampleInstanceNorm().double().eval()
    x = torch.randn(3, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="froze"):
        sm = core.split(model, nonlinear="freeze", stabilizer="none")
        g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- masks
class Masks(nn.Module):
    """Masks: a constant one (a buffer) in ``torch.where``/``masked_fill``, exact without
    freezing; and comparisons of activations (``where(z > 0, z, 0.1 z)``, ``z * (z > 0)``,
    ``masked_fill(z < 0, 0)``), step functions frozen by ``nonlinear="freeze"``."""

    def __init__(self, compare: bool) -> None:
        super().__init__()
        self.compare = compare
        self.a, self.fc = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("keep", torch.tensor([True, False] * 4))

    def forward(self, x):
        z = self.a(x)
        z = torch.where(self.keep, z, 0.5).masked_fill(self.keep.roll(1) & ~self.keep, -2.0)
        z = z.where(self.keep, -z)
        if self.compare:
            z = torch.where(z > 0, z, 0.1 * z)
            z = z * (z > -0.05).float() + z.masked_fill(z < 0.2, 0.0)
        return self.fc(torch.relu(z))


def test_a_constant_mask_selects_exactly():
    torch.manual_seed(14)
    model = Masks(compare=False).eval()
    x = torch.randn(5, 4)
    check_forward(model, x)
    check_sensitivities(model, x, torch.tensor([0, 1, 2, 0, 1]), ["input", "a"])


def test_comparisons_of_activations_are_frozen_and_keep_the_gradient():
    torch.manual_seed(15)
    model = Masks(compare=True).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(core.UnsupportedOperation, match="nonlinear='freeze'.*step function"):
        core.split(model)
    # a mask is constant around almost every input: the frozen gradient is the model's
    _check_frozen(model, model, x, 1, "froze 3")


class Gated(nn.Module):
    """A GLU (module and function) and Softsign/Tanhshrink modules; ``frozen=True``
    evaluates them with the sigmoid gates and the secant slopes frozen."""

    def __init__(self, frozen: bool = False) -> None:
        super().__init__()
        self.frozen = frozen
        self.a, self.b, self.fc = nn.Linear(4, 12), nn.Linear(6, 8), nn.Linear(4, 3)
        self.glu, self.soft, self.shrink = nn.GLU(1), nn.Softsign(), nn.Tanhshrink()

    def _glu(self, z, dim):
        if not self.frozen:
            return self.glu(z) if dim == 1 else F.glu(z, dim)
        a, b = z.chunk(2, dim)
        return a * torch.sigmoid(b).detach()

    def _secant(self, m, fn, z):
        return m(z) if not self.frozen else z * torch.where(z == 0, 0.0, fn(z) / z).detach()

    def forward(self, x):
        z = self._glu(self.a(x), 1)
        z = self._secant(self.soft, F.softsign, self.b(z))
        z = self._secant(self.shrink, F.tanhshrink, z)
        return self.fc(self._glu(z.view(-1, 2, 4), 1).flatten(1) + self._glu(z, -1))


def test_glu_softsign_and_tanhshrink_are_frozen_exactly():
    torch.manual_seed(18)
    model = Gated().double().eval()
    reference = Gated(frozen=True).double().eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(core.UnsupportedOperation, match="'glu'.*nonlinear='freeze'"):
        core.split(model)
    _check_frozen(model, reference, x, 2, "froze 5")
