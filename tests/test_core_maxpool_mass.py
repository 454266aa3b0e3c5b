"""The convex max pooling's ``s' = maxpool(d) + sumpool(s - d)``: one autograd function whose
backward makes two tensors (``core.max_rules``) gives the values and gradients of the formula
written out in plain torch operations, with and without values (above the deepest probe), in
2-d and 3-d, overlapping and padded windows, ``ceil_mode``, channels-last, double backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core
from core import max_rules
from core.pair import Pair
from core.registry import Ctx


def _reference(s, d, n, kernel, stride, padding, ceil_mode):
    """The formula in plain torch operations (autograd differentiates it)."""
    pool = {2: F.max_pool2d, 3: F.max_pool3d}[n]
    avg = {2: F.avg_pool2d, 3: F.avg_pool3d}[n]
    top, idx = pool(d, kernel, stride, padding, 1, ceil_mode, return_indices=True)
    lead = d.shape[:-n]
    winner = d.reshape(lead + (-1,)).gather(-1, idx.reshape(lead + (-1,))).view(idx.shape)
    return winner + avg(s - d, kernel, stride, padding, ceil_mode, True, 1)


def _ctx(mass: bool = True) -> Ctx:
    return Ctx(maxpool="convex", where="test", mass=mass)


CASES = [  # n, shape, kernel, stride, padding, ceil_mode
    (2, (2, 3, 9, 9), 3, 2, 1, False),  # overlapping windows, padded (ResNet's stem)
    (2, (2, 3, 8, 8), 2, 2, 0, False),  # VGG's
    (2, (1, 2, 7, 9), (3, 2), (2, 1), (1, 0), True),
    (3, (2, 2, 5, 6, 5), 3, 2, 1, True),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("n, shape, kernel, stride, padding, ceil_mode", CASES)
def test_values_and_gradients_are_those_of_the_formula(n, shape, kernel, stride, padding,
                                                       ceil_mode, channels_last):
    torch.manual_seed(1)
    d = torch.randn(shape, dtype=torch.float64)
    s = d.abs() + torch.rand(shape, dtype=torch.float64)
    if channels_last:
        layout = torch.channels_last if n == 2 else torch.channels_last_3d
        d, s = (t.to(memory_format=layout) for t in (d, s))
    d.requires_grad_(True)
    s.requires_grad_(True)
    ref = _reference(s, d, n, kernel, stride, padding, ceil_mode)
    pair = max_rules._max_pool(_ctx(), Pair(d, s), n, kernel, stride, padding, 1, ceil_mode)
    assert torch.allclose(pair.s, ref, rtol=1e-14, atol=1e-14)
    seed = torch.randn(ref.shape, dtype=torch.float64)
    want = torch.autograd.grad(ref, (s, d), seed)
    got = torch.autograd.grad(pair.s, (s, d), seed)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-13)
    # without values (above the deepest probe): a placeholder with the same backward
    free = max_rules._max_pool(_ctx(False), Pair(d, s), n, kernel, stride, padding, 1,
                               ceil_mode)
    assert free.s.shape == ref.shape and not free.s.any()
    assert all(torch.equal(a, b) for a, b in
               zip(torch.autograd.grad(free.s, (s, d), seed), got, strict=True))


def test_double_backward_matches_the_formula():
    torch.manual_seed(2)
    d = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    s = (d.detach().abs() + 1).requires_grad_(True)

    def hvp(fn):
        out = fn()
        (gs, gd) = torch.autograd.grad((out ** 2).sum(), (s, d), create_graph=True)
        return torch.autograd.grad((gs * gd).sum(), (s, d))

    want = hvp(lambda: _reference(s, d, 2, 3, 2, 1, False))
    got = hvp(lambda: max_rules._max_pool(_ctx(), Pair(d, s), 2, 3, 2, 1, 1, False).s)
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() <= 1e-14 * b.abs().max()


def test_minus_infinity_pads_carry_no_mass():
    """An input padded with -inf before the pooling (a "same" max pooling) keeps the
    composed path, where the -inf entries carry no mass."""
    torch.manual_seed(3)
    d = F.pad(torch.randn(1, 2, 5, 5, dtype=torch.float64), (1, 1, 1, 1), value=float("-inf"))
    s = torch.where(torch.isneginf(d), 0.0, d.abs() + 1)
    pair = max_rules._max_pool(_ctx(), Pair(d, s), 2, 3, 1, 0, 1, False)
    assert torch.isfinite(pair.s).all()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1), nn.Conv2d(6, 6, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def test_sensitivities_through_max_poolings_match_the_composed_rule(monkeypatch):
    """A model's sensitivities at and below two poolings, with the fused rule and with the
    composed one (the function turned off): the same to rounding."""
    torch.manual_seed(4)
    model = _Net().double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 3, 4])
    layers = ["input", "features.1", "features.4"]
    fused = core.split(model).sensitivities(x, target, layers, alpha="auto")
    monkeypatch.setattr(max_rules, "_windows_of_avg_pool", lambda *args: False)
    composed = core.split(model).sensitivities(x, target, layers, alpha="auto")
    for layer in layers:
        for field in ("activation", "mass", "S", "Dg", "grad"):
            a, b = getattr(fused[layer], field), getattr(composed[layer], field)
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * b.abs().max()), (layer, field)


REDUCTIONS = {
    "amax": lambda y: y.amax(-1),
    "amin": lambda y: y.amin(-1),
    "max over all": lambda y: y.amax(-1) * y.max(),
    "max(dim)": lambda y: y.max(-1).values,
    "min(dim)": lambda y: y.min(-1).values,
}


class _Reduce(torch.nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.act, self.fc, self.how = torch.nn.ReLU(), torch.nn.Linear(4, 3), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(REDUCTIONS[self.how](self.act(x)))


@pytest.mark.parametrize("how", list(REDUCTIONS))
def test_ties_share_the_gradient_as_autograd_does(how):
    """Dead ReLU channels tie at 0: autograd shares the gradient of ``amax``, ``amin`` and
    ``max()`` over everything evenly among tied elements and gives ``max(dim)``'s to the
    index it returns; the probes' grad and Dg at alpha 1/2 follow (amax put it all on one
    element: 0.34 off)."""
    torch.manual_seed(10)
    model = _Reduce(how).double().eval()
    x = -torch.rand(2, 4, 6, dtype=torch.float64)
    x[:, 0, 3] = 1.0
    x[:, 1, :2] = 0.5  # a tie of positive values too
    seen = {}
    handle = model.act.register_forward_hook(lambda m, i, o: seen.setdefault("act", o))
    xr = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(model(xr)[:, 0].sum(), seen["act"])
    handle.remove()
    probe = core.split(model).sensitivities(x, 0, layers=["act"], alpha=0.5)["act"]
    torch.testing.assert_close(probe.grad, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probe.Dg, reference, rtol=1e-12, atol=1e-12)


def test_sensitivities_through_a_max_pooling_raise_no_warning():
    """The pooling's -inf check reads a value of a tensor that requires grad: detached, or
    torch warns (an error under ``-W error``)."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.LazyLinear(3)).eval()
    x = torch.rand(2, 3, 10, 10)
    model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe = core.split(model).sensitivities(x, 1, ["input"], alpha=0.5)["input"]
    assert torch.isfinite(probe.pos_g).all()
