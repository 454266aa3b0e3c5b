"""Stop-gradients and gradient hooks that a split would silently ignore are refused (issue 11,
items 1 and 3: hooks run or are refused, never silently ignored; numbers right or refused).

The split's sensitivities follow the forward's operations through the split pair: an
operation that the forward computes with gradients off (a ``torch.no_grad()`` block, the
forward of a custom ``torch.autograd.Function``, a reentrant checkpoint), a gradient hook
registered on a tensor in the forward and a module's backward hook all change the gradient
that autograd computes, so the probes' ``grad`` would differ from the model's. Each is
refused with a message naming it; the forward values (``sm(x)``) stay available, and a
computation with gradients off that does not depend on the input is fine.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import core


class _Straight(torch.autograd.Function):
    """A ReLU whose backward passes the gradient through (a straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad


class Net(nn.Module):
    """Conv, ReLU, linear head; ``mode`` picks how the middle is computed."""

    def __init__(self, mode: str = "plain") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.mode = mode
        self.register_buffer("seen", torch.zeros(4))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.conv(x) * scale
        if self.mode == "no_grad":
            with torch.no_grad():
                side = self.relu(h)
            h = self.relu(h) + side
        elif self.mode == "set_grad_enabled":
            with torch.set_grad_enabled(False):
                h = h * 2
            h = self.relu(h)
        elif self.mode == "function":
            h = _Straight.apply(h)
        elif self.mode == "tensor_hook":
            h.register_hook(lambda g: g * 0)
            h = self.relu(h)
        elif self.mode == "reentrant":
            h = checkpoint(self.relu, h, use_reentrant=True)
        elif self.mode == "checkpoint":
            h = checkpoint(self.relu, h, use_reentrant=False)
        elif self.mode == "monitor":  # gradients off on the input, off the output's path
            h = self.relu(h)
            with torch.no_grad():
                self.seen.mul_(0.9).add_(0.1 * h.mean((0, 2, 3)))
        elif self.mode == "mask":  # gradients off on a comparison: no gradient anyway
            with torch.no_grad():
                mask = (h > 0.1).float()
            h = self.relu(h) * mask
        elif self.mode == "constant_no_grad":  # gradients off, but not on the input
            with torch.no_grad():
                weight_scale = self.fc.weight.abs().mean() + 1.0
            h = self.relu(h) * weight_scale
        else:
            h = self.relu(h)
        return self.fc(h.flatten(1))


def _model(mode: str) -> Net:
    torch.manual_seed(0)
    return Net(mode).eval()


def _x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 6, 6)


def _grad(model: nn.Module, x: torch.Tensor, target: int, **kwargs) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    model(x, **kwargs)[:, target].sum().backward()
    return x.grad


# eager recording (a keyword argument) and symbolic tracing (none) must both refuse
CAPTURES = [{}, {"scale": 1.0}]


@pytest.mark.parametrize("kwargs", CAPTURES, ids=["traced", "recorded"])
@pytest.mark.parametrize("mode,names", [
    ("no_grad", "torch.no_grad()"),
    ("set_grad_enabled", "torch.set_grad_enabled(False)"),
    ("function", "custom torch.autograd.Function"),
    ("reentrant", "use_reentrant=False"),
])
def test_gradients_off_on_the_input_are_refused(mode, names, kwargs):
    """Refused for the backward passes; the streams split exactly (their values are the
    forward's, whatever the gradient mode)."""
    model, x = _model(mode), _x()
    sm = core.split(model)
    g, h = sm(x, **kwargs)
    assert torch.allclose(g - h, model(x, **kwargs), atol=1e-6)
    with pytest.raises(core.UnsupportedOperation, match="with gradients off") as info:
        sm.sensitivities(x, 1, ["input"], alpha=0.5, kwargs=kwargs)
    assert names in str(info.value) and ".detach()" in str(info.value)
    with pytest.raises(core.UnsupportedOperation, match="with gradients off"):
        sm.relevance(x, torch.eye(3)[[1, 1]], kwargs=kwargs)


@pytest.mark.parametrize("kwargs", CAPTURES, ids=["traced", "recorded"])
def test_a_gradient_hook_registered_in_the_forward_is_refused(kwargs):
    sm = core.split(_model("tensor_hook"))
    with pytest.raises(core.UnsupportedOperation, match=r"Tensor\.register_hook"):
        sm.sensitivities(_x(), 1, ["input"], alpha=0.5, kwargs=kwargs)


@pytest.mark.parametrize("mode", ["checkpoint", "constant_no_grad", "plain", "monitor",
                                  "mask"])
@pytest.mark.parametrize("kwargs", CAPTURES, ids=["traced", "recorded"])
def test_what_keeps_the_gradient_is_split_exactly(mode, kwargs):
    """A non-reentrant checkpoint, gradients off on a computation that does not depend on
    the input, on one whose value does not reach the output (a statistic kept in a buffer)
    and on a comparison (a mask has no gradient anyway): the probes' grad is the model's
    gradient, and so is the g stream's difference of local sensitivities Dg at alpha 1/2
    (where the shift zeroes S)."""
    model, x = _model(mode), _x()
    seen = model.seen.clone()
    nonlinear = "freeze" if mode == "mask" else "error"  # a comparison of activations
    sm = core.split(model, nonlinear=nonlinear)
    probe = sm.sensitivities(x, 1, ["input"], alpha=0.5, kwargs=kwargs)["input"]
    assert torch.equal(model.seen, seen)  # the statistic was updated on a copy
    reference = _grad(model, x, 1, **kwargs)
    assert torch.allclose(probe.grad, reference, atol=1e-6, rtol=1e-5)
    assert torch.allclose(probe.Dg, reference, atol=1e-6, rtol=1e-5)


def test_a_caller_under_no_grad_is_not_taken_for_a_stop_gradient():
    """The capture runs with gradients on whatever the caller's mode: a model split and
    explained inside ``torch.no_grad()`` gives what it gives outside."""
    model, x = _model("plain"), _x()
    outside = core.split(model).sensitivities(x, 1, ["input"], alpha=0.5)["input"]
    core.reuse.clear()
    with torch.no_grad():
        inside = core.split(model).sensitivities(x, 1, ["input"], alpha=0.5)["input"]
    assert torch.equal(inside.S, outside.S) and torch.equal(inside.grad, outside.grad)


def _full_backward(model: Net) -> object:
    return model.fc.register_full_backward_hook(lambda m, gi, go: (gi[0] * 0,))


def _backward_pre(model: Net) -> object:
    return model.fc.register_full_backward_pre_hook(lambda m, go: (go[0] * 2,))


def _legacy(model: Net) -> object:
    return model.conv.register_backward_hook(lambda m, gi, go: None)


@pytest.mark.parametrize("register,where", [
    (_full_backward, "'fc'"), (_backward_pre, "'fc'"), (_legacy, "'conv'"),
])
def test_module_backward_hooks_are_refused_for_backward_passes_only(register, where):
    model, x = _model("plain"), _x()
    handle = register(model)
    try:
        sm = core.split(model)
        g, h = sm(x)  # the forward does not go through backward hooks: it is exact
        assert torch.allclose(g - h, model(x), atol=1e-6)
        with pytest.raises(core.UnsupportedOperation, match=f"module {where} has a backward"):
            sm.sensitivities(x, 1, ["input"], alpha=0.5)
        with pytest.raises(core.UnsupportedOperation, match="backward hook"):
            sm.relevance(x, torch.eye(3)[[1, 1]])
        hooks = model.fc._backward_hooks or model.fc._backward_pre_hooks or \
            model.conv._backward_hooks
        assert len(hooks) == 1  # the user's hook is left in place
    finally:
        handle.remove()
    probe = core.split(model).sensitivities(x, 1, ["input"], alpha=0.5)["input"]
    assert torch.allclose(probe.grad, _grad(model, x, 1), atol=1e-6, rtol=1e-5)


def test_a_global_backward_hook_is_refused():
    model, x = _model("plain"), _x()
    handle = nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None)
    try:
        with pytest.raises(core.UnsupportedOperation, match="global module backward hook"):
            core.split(model).sensitivities(x, 1, ["input"], alpha=0.5)
    finally:
        handle.remove()
