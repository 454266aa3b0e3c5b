"""A final log-softmax (PyTorch's MNIST example) is a frozen shift under ``nonlinear="freeze"``:
``g - h`` is the model's output and the sensitivities and SplitLRP relevance are the logits'
(the normaliser ``logsumexp`` is a constant); ``nn.Softmax2d`` is a gate like ``nn.Softmax``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core
from captum_split import SplitGrad

FORMS = {
    "F.log_softmax": lambda m, z: F.log_softmax(z, dim=1),
    "torch.log_softmax": lambda m, z: torch.log_softmax(z, 1),
    "x.log_softmax": lambda m, z: z.log_softmax(dim=1),
    "nn.LogSoftmax": lambda m, z: m.log_softmax(z),
}


class _Mnist(nn.Module):
    """The shape of PyTorch's MNIST example: convolutions, max pooling, logits, log-softmax."""

    def __init__(self, form: str | None) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3)
        self.fc = nn.Linear(8 * 5 * 5, 10)
        self.log_softmax = nn.LogSoftmax(dim=1)
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        z = self.fc(torch.flatten(x, 1))
        return z if self.form is None else FORMS[self.form](self, z)


def _pair(form: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = _Mnist(form).double().eval()
    logits = _Mnist(None).double().eval()
    logits.load_state_dict(model.state_dict())
    return model, logits


@pytest.mark.parametrize("form", list(FORMS))
def test_a_final_log_softmax_is_a_frozen_shift(form: str) -> None:
    model, logits = _pair(form)
    x, y = torch.rand(3, 1, 14, 14, dtype=torch.float64), torch.tensor([1, 2, 3])
    with pytest.raises(core.UnsupportedOperation, match="nonlinear='freeze'"):
        core.split(model)
    sm = core.split(model, nonlinear="freeze")
    assert ["normaliser logsumexp frozen" in op for op in sm.frozen_operations()] == [True]
    g, h = sm(x)
    f = model(x)
    assert float((g - h - f).abs().max()) <= 1e-13 * float(g.abs().max())
    # the gradient and the relevance are those of the logits (before: the whole output was
    # a constant gate, "the output ... does not depend on its input through the split")
    xx = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(logits(xx).gather(1, y[:, None]).sum(), xx)
    probe = sm.sensitivities(x, y, ["input"])["input"]
    torch.testing.assert_close(probe.g - probe.h, grad, rtol=0, atol=1e-15)
    seed = torch.eye(10, dtype=torch.float64)[y]
    torch.testing.assert_close(sm.relevance(x, seed)["input"].comb,
                               core.split(logits).relevance(x, seed)["input"].comb,
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(SplitGrad(model, nonlinear="freeze").attribute(x, target=y),
                               SplitGrad(logits).attribute(x, target=y), rtol=1e-12, atol=1e-15)


def test_softmax2d_is_a_gate_under_freeze() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softmax2d(), nn.Conv2d(4, 2, 1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).double().eval()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(core.UnsupportedOperation, match="nonlinear='freeze'"):
        core.split(model)
    with pytest.raises(core.UnsupportedOperation, match="does not depend on its input"):
        core.split(model, nonlinear="freeze")(x)  # every path passes the gate
    branch = _Residual(model).eval()
    sm = core.split(branch, nonlinear="freeze")
    g, h = sm(x)
    assert float((g - h - branch(x)).abs().max()) <= 1e-13 * float(g.abs().max())
    assert any("Softmax2d" in op for op in sm.frozen_operations())


class _Residual(nn.Module):
    """``x * softmax2d(conv(x))`` summed with a plain path: the gate scales a pair."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.seq[0](x)
        z = z * self.seq[1](z) + z
        for module in list(self.seq)[2:]:
            z = module(z)
        return z
