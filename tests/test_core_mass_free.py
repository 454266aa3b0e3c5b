"""The sensitivities skip the s values above their deepest probe (mass-linear rules only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core
from core.interpreter import SplitInterpreter
from tests.core_checks import randomise_batchnorm


class Block(nn.Module):
    def __init__(self, gate: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(4)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.bn(self.conv(x)), 0.1)
        if self.gate:
            y = y * y  # a product of two activations: its backward reads s
        return x + y


def _model(gate: bool) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), Block(), nn.MaxPool2d(2),
                          Block(gate), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    return randomise_batchnorm(model.eval())


@pytest.mark.parametrize("alpha", [0.3, "auto"])
def test_skipping_the_mass_above_the_probes_changes_no_bit(monkeypatch, alpha):
    model, x = _model(False), torch.randn(3, 2, 8, 8)
    sm = core.split(model)
    call = sm.prepare(x)
    layers = ["2", "input"]
    free = call.interpreter.mass_free([call.node_of(n) for n in layers])
    assert call.node_of("4") in free and call.node_of("2") not in free
    fast = sm.sensitivities(x, torch.tensor([0, 2, 4]), layers, alpha=alpha)
    monkeypatch.setattr(SplitInterpreter, "mass_free", lambda self, probes: set())
    full = sm.sensitivities(x, torch.tensor([0, 2, 4]), layers, alpha=alpha)
    for layer in layers:
        for field in ("activation", "mass", "S", "Dg", "grad"):
            assert torch.equal(getattr(fast[layer], field), getattr(full[layer], field)), field


def test_a_product_above_the_probe_keeps_the_mass_values():
    model, x = _model(True), torch.randn(2, 2, 8, 8)
    call = core.split(model).prepare(x)
    assert call.interpreter.mass_free([call.node_of("2")]) == set()
    assert call.interpreter.mass_free([call.node_of("5")])  # above the product: skipped
