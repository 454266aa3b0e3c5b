"""``nn.LocalResponseNorm`` / ``F.local_response_norm`` (AlexNet- and GoogLeNet-era models)
under ``nonlinear="freeze"``: the divisor is frozen, ``g - h`` is the model's output and the
sensitivities are the frozen model's (the divisor a constant)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core


class _Lrn(nn.Module):
    def __init__(self, functional: bool, size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.lrn = nn.LocalResponseNorm(size, alpha=0.5, beta=0.75, k=2.0)
        self.out = nn.Linear(6 * 6 * 6, 4)
        self.functional, self.size = functional, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.conv(x))
        z = (F.local_response_norm(z, self.size, alpha=0.5, beta=0.75, k=2.0)
             if self.functional else self.lrn(z))
        return self.out(z.flatten(1))


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("size", [2, 3])
def test_local_response_norm_splits_with_its_divisor_frozen(functional: bool, size: int):
    torch.manual_seed(0)
    model = _Lrn(functional, size).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(core.UnsupportedOperation, match="nonlinear='freeze'"):
        core.split(model)  # was refused without the freeze hint ("no split-pair rule")
    sm = core.split(model, nonlinear="freeze")
    assert any("1 / divisor frozen" in op for op in sm.frozen_operations())
    g, h = sm(x)
    assert float((g - h - model(x)).abs().max()) <= 1e-13 * float(g.abs().max())
    # the frozen model: z * r with r = 1 / divisor a constant, its gradient by autograd
    z = F.relu(model.conv(x)).detach()
    r = (F.local_response_norm(z, size, 0.5, 0.75, 2.0) / z).nan_to_num()
    xx = x.clone().requires_grad_(True)
    frozen = model.out((F.relu(model.conv(xx)) * r).flatten(1))
    grad, = torch.autograd.grad(frozen[:, 1].sum(), xx)
    probe = sm.sensitivities(x, 1, ["input"])["input"]
    torch.testing.assert_close(probe.g - probe.h, grad, rtol=1e-9, atol=1e-12)
