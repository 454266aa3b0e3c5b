"""The Quantus method "SplitLRP" takes every option of the SplitLRP composite."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn

import quantus_adapters
from zennit_split import SplitLRP, split_lrp


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.stem(x))
        a = torch.relu(a + self.branch(a))
        return self.head(a.mean((2, 3)))


def test_explain_takes_residual_like_the_composite():
    torch.manual_seed(0)
    model = _Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    target = torch.tensor([1, 3])
    maps = {rule: quantus_adapters.explain(model, x.numpy(), target.numpy(), method="SplitLRP",
                                           residual=rule)
            for rule in ("even", "proportional")}
    expected = split_lrp(model, x, target, residual="proportional")["input"].pos.sum(1, True)
    np.testing.assert_allclose(maps["proportional"], expected.numpy(), rtol=1e-5, atol=1e-7)
    assert not np.allclose(maps["proportional"], maps["even"])


def test_explainer_options_are_the_composites():
    info = quantus_adapters.registry.method_info("SplitLRP")
    explainer = set(list(inspect.signature(info.function).parameters)[3:])
    composite = set(inspect.signature(SplitLRP).parameters) - {"canonizers"}
    assert explainer == composite
