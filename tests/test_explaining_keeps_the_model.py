"""Explaining never changes the model (issue 11, point 3): a model in training mode is
explained with eval semantics, and afterwards its training flags and buffers are bit for bit
as before -- in every adapter path (core, Captum, Zennit, Quantus), through the one context
manager :func:`core.eval_semantics`."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import core
from tests.core_checks import assert_rel_close, randomise_batchnorm


class Net(nn.Module):
    """Conv, BatchNorm, dropout and a forward that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        z = self.drop(self.relu(self.bn(self.conv(x))))
        return self.fc(self.pool(z).flatten(1))


def _training_model() -> Net:
    return randomise_batchnorm(Net(), 1).train()


def _state(model: nn.Module) -> dict:
    return {
        "buffers": {n: (b.clone(), b._version, b.data_ptr()) for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def _assert_kept(model: nn.Module, before: dict, flags: bool = True) -> None:
    for name, b in model.named_buffers():
        value, version, ptr = before["buffers"][name]
        assert torch.equal(b, value) and b.data_ptr() == ptr, f"buffer {name} changed"
    if flags:
        assert {n: m.training for n, m in model.named_modules()} == before["training"]


X = torch.randn(2, 3, 8, 8)


def test_eval_semantics_restores_flags_and_buffers_also_after_an_error():
    model = _training_model()
    before = _state(model)
    with pytest.warns(UserWarning, match="training mode"), pytest.raises(KeyError):
        with core.eval_semantics(model) as m:
            assert not any(mod.training for mod in m.modules())
            m(X)  # the counter is incremented inside ...
            raise KeyError("boom")
    _assert_kept(model, before)  # ... and copied back
    assert model.calls._version == before["buffers"]["calls"][1] + 2  # one write, one restore


def test_core_paths():
    model = _training_model()
    before = _state(model)
    reference = _training_model().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = core.split(model)
        g, h = sm(X)
        sm.sensitivities(X, 1, ["bn", "input"])
        sm.relevance(X, torch.eye(3)[[0, 2]])
    with torch.no_grad():
        assert_rel_close(g - h, reference(X), 1e-5, scale=float(g.abs().max()))
    _assert_kept(model, before)
    for name, b in model.named_buffers():  # untouched buffers keep their version counter
        assert b._version == before["buffers"][name][1], name


def test_captum_paths():
    from captum_split import SplitCAM, SplitGrad

    model = _training_model()
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cam = SplitCAM(model, "conv", alpha=0.5).attribute(X, target=[0, 1])
        SplitGrad(model, alpha=0.4).attribute(X, target=1)
    _assert_kept(model, before)
    eval_cam = SplitCAM(_training_model().eval(), "conv", alpha=0.5).attribute(X, target=[0, 1])
    assert torch.equal(cam, eval_cam)


def test_zennit_paths():
    from zennit.attribution import Gradient

    from zennit_split import SplitLRP

    model = _training_model()
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Gradient(model, SplitLRP()) as attributor:
            _, relevance = attributor(X, torch.eye(3)[[0, 2]])
    assert torch.isfinite(relevance).all()
    _assert_kept(model, before)


@pytest.mark.parametrize("method,options", [
    ("SplitLRP", {}), ("SplitCAM", {"layer": "conv"}), ("GradCAM", {"layer": "conv"}),
    ("LayerCAM", {"layer": "conv"}), ("Saliency", {}), ("IntegratedGradients", {}),
    ("Occlusion", {}),
])
def test_quantus_explain_paths(method, options):
    from quantus_adapters import explain

    model = _training_model()
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maps = explain(model, X.numpy(), np.array([0, 2]), method=method, **options)
    assert np.isfinite(maps).all()
    # buffers bit for bit; the model ends in eval mode, as quantus.explain leaves it
    _assert_kept(model, before, flags=False)
    assert not any(m.training for m in model.modules())


class FrozenEma(nn.Module):
    """A forward that updates an EMA kept in a frozen nn.Parameter, in place under no_grad,
    and writes into a slice of another parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)
        self.ema = nn.Parameter(torch.zeros(4), requires_grad=False)
        self.seen = nn.Parameter(torch.zeros(2), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.conv(x))
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * z.mean((0, 2, 3)))
            self.seen[0] += 1
        return self.fc(z.mean((2, 3)))


def test_a_parameter_written_by_the_forward_is_kept():
    """The capture's twin shares the parameters: a forward writing into one (an EMA in a
    frozen nn.Parameter) changed the user's model in every path that records it."""
    from captum_split import SplitCAM, SplitGrad
    from quantus_adapters import explain

    calls = {
        "split": lambda m: core.split(m)(X),
        "sensitivities": lambda m: core.split(m).sensitivities(X, 1, ["conv"]),
        "relevance": lambda m: core.split(m).relevance(X, torch.eye(3)[[0, 2]]),
        "SplitGrad": lambda m: SplitGrad(m).attribute(X, target=1),
        "SplitCAM": lambda m: SplitCAM(m, "conv").attribute(X, target=[0, 2]),
        "quantus": lambda m: explain(m, X.numpy(), np.array([0, 2]), method="SplitGrad"),
    }
    for name, call in calls.items():
        model = FrozenEma().eval()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        call(model)
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), f"{name}: parameter {n} changed"
