"""Bugs found hunting the beyond-ReLU split (products, ``nonlinear="freeze"``)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import core


class _LearnedAttention(nn.Module):
    """``F.scaled_dot_product_attention`` with learned (constant) queries and keys: the
    weights ``A = softmax(q k^T / sqrt(e))`` are constants, ``A v`` an exact linear map."""

    def __init__(self, mask: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.q = nn.Parameter(torch.randn(1, 1, 3, 8))
        self.k = nn.Parameter(torch.randn(1, 1, 5, 8))
        self.out = nn.Linear(24, 2)
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.lin(x)[:, None]
        n = v.shape[0]
        # an additive mask computed from the input (an activation, not a constant)
        m = v.sum(-1, keepdim=True).transpose(-1, -2) if self.mask else None
        y = F.scaled_dot_product_attention(self.q.expand(n, -1, -1, -1),
                                           self.k.expand(n, -1, -1, -1), v, attn_mask=m)
        return self.out(y.flatten(1))


def _assert_exact(sm: core.SplitModel, model: nn.Module, x: torch.Tensor, target: int) -> None:
    """``g - h`` is the model's output and the local sensitivity at the input (alpha 0) its
    gradient, in float64."""
    g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
    p = sm.sensitivities(x, target, ["input"], alpha=0.0)["input"]
    assert p.exact
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr)[:, target].sum(), xr)
    torch.testing.assert_close(p.grad, grad, rtol=1e-10, atol=1e-12)


def test_attention_with_constant_query_and_key_is_exact_not_frozen():
    # was: refused without nonlinear="freeze" and listed as frozen (p.exact False), as
    # nn.MultiheadAttention with constant query and key is not
    torch.manual_seed(0)
    model = _LearnedAttention().double().eval()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    sm = core.split(model)
    assert sm.frozen_operations() == []
    _assert_exact(sm, model, x, 1)
    # an additive mask computed from the input still freezes the weights
    masked = _LearnedAttention(mask=True).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = core.split(masked, nonlinear="freeze")
    assert [f for f in sm.frozen_operations() if "attention weights frozen" in f]


class _FloatPower(nn.Module):
    def __init__(self, exponent: float) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)
        self.exponent = exponent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lin(x)
        return self.out(a + a ** self.exponent)


def test_power_with_a_whole_float_exponent_is_the_exact_product():
    # was: x ** 2.0 frozen to a constant (nonlinear="error" refused it; with "freeze" its
    # gradient was dropped: p.grad missed the model's by 100 % on that path), x ** 2 exact
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64)
    for exponent in (2.0, 3.0):
        model = _FloatPower(exponent).double().eval()
        sm = core.split(model)
        assert sm.frozen_operations() == []
        _assert_exact(sm, model, x, 0)
        rel = sm.relevance(x, torch.ones(3, 2, dtype=torch.float64))["input"]
        assert torch.isfinite(rel.pos).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = core.split(_FloatPower(0.5).double().eval(), nonlinear="freeze")
    assert len(sm.frozen_operations()) == 1  # a fractional power is still a constant


def test_rms_norm_without_eps_in_half_precision_uses_torchs_epsilon():
    # torch's rms_norm with eps=None adds float32's epsilon for float16 and bfloat16 inputs
    # (it computes in float32); the frozen 1 / rms added the half dtype's own (1e-3, 8e-3):
    # on activations of 0.01 the streams went negative (-0.66 against activations of 1.9)
    # and the frozen gradient was 0.11 instead of 0.51
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        model = nn.Sequential(nn.Linear(4, 8), nn.RMSNorm(8), nn.Linear(8, 3)).eval()
        with torch.no_grad():
            model[0].weight.mul_(0.02)
            model[0].bias.zero_()
        x = torch.randn(2, 4)
        # the frozen model in float32, 1 / rms at the model's activation
        xr = x.clone().requires_grad_(True)
        a = model[0](xr)
        r = torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
        y = model[2](a * r.detach() * model[1].weight)
        (grad,) = torch.autograd.grad(y[:, 1].sum(), xr)
        model = model.to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sm = core.split(model, nonlinear="freeze", stabilizer="none")
            probes = sm.sensitivities(x.to(dtype), 1, ["1", "input"], alpha=0.0)
        rms = probes["1"]
        scale = (rms.pos - rms.neg).abs().max()
        assert min(rms.pos.min(), rms.neg.min()) >= -0.02 * scale  # to the dtype's rounding
        torch.testing.assert_close(probes["input"].grad.float(), grad, rtol=0.05, atol=0.01)


class _EagerSquare(nn.Module):
    """``a ** 2`` in a forward that symbolic tracing cannot follow (captured by running it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lin(x)
        if float(a.detach().sum()) > -1e9:  # data-dependent control flow
            a = a ** 2
        return self.out(a)


def test_power_operator_in_a_model_captured_by_running_it():
    # was: UnsupportedOperation "pow is not piecewise linear" (the recorder sees
    # torch.Tensor.__pow__, which had no rule), while the traced a ** 2 is exact
    torch.manual_seed(0)
    model = _EagerSquare().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    sm = core.split(model)
    _assert_exact(sm, model, x, 1)
    assert sm.frozen_operations(x) == []
