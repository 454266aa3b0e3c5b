"""The ``d`` stream's eval-mode BatchNorm keeps torch's forward (``d`` is the model's value
bit for bit) and takes its backward as ``grad * k`` (core.absops.batch_norm_eval): the
sensitivities equal autograd's gradient of the model, and torch's batch norm backward
(2.3x slower on CPU) no longer runs in them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import core
from tests.core_checks import randomise_batchnorm


class _Seen(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(7)
    if kind == "2d":
        model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                              nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                              nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
        x = torch.randn(3, 3, 8, 8)
    elif kind == "1d-features":
        model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
        x = torch.randn(3, 6)
    else:  # 3d
        model = nn.Sequential(nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 3 * 3 * 3, 5))
        x = torch.randn(3, 2, 4, 4, 4)
    return randomise_batchnorm(model.eval()).double(), x.double()


@pytest.mark.parametrize("kind", ["2d", "1d-features", "3d"])
@pytest.mark.parametrize("alpha", [0.4, "auto"])
def test_sensitivities_keep_the_gradient_without_torchs_batch_norm_backward(kind, alpha):
    model, x = _model(kind)
    target = torch.tensor([0, 2, 4])
    sm = core.split(model)
    with torch.no_grad():
        assert torch.equal(sm.forward_pairs(x).d, model(x))
    with _Seen() as seen:
        probe = sm.sensitivities(x, target, ["input"], alpha=alpha)["input"]
    assert "aten.native_batch_norm_backward" not in seen.names
    assert all(p.grad is None for p in model.parameters())
    inp = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(inp).gather(1, target.view(-1, 1)).sum(), inp)
    torch.testing.assert_close(probe.grad, grad, rtol=1e-12, atol=1e-14)


def test_a_batch_norm_with_parameters_that_need_gradients_keeps_torchs_backward():
    from core.absops import batch_norm_eval

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, requires_grad=True)
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    weight = torch.randn(3, requires_grad=True)
    k = (weight / torch.sqrt(var + 1e-5)).detach()
    out = batch_norm_eval(x, mean, var, weight, None, 1e-5, k)
    out.sum().backward()
    assert weight.grad is not None  # torch's own backward, weight gradient included
    ref = torch.nn.functional.batch_norm(x.detach(), mean, var, weight.detach(), None,
                                         False, 0.0, 1e-5)
    assert torch.equal(out.detach(), ref)
