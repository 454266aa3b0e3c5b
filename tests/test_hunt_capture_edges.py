"""Edge cases of how the split captures a user's model (core/capture.py, core/reuse.py):
models whose weights are recomputed at each forward, changes between splits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import core
from core.errors import UnsupportedOperation


def _pruned() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 5)).double().eval()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    return model


def test_a_pruned_module_is_refused_by_name() -> None:
    """torch.nn.utils.prune's forward pre-hook recomputes ``weight`` (weight_orig * mask) as
    a plain attribute at each forward; the split read the attribute of the model's last
    forward: after new weight_orig values (an optimizer step, load_state_dict) g - h was
    0.14 off model(x)."""
    model = _pruned()
    with torch.no_grad():
        model[0].weight_orig.mul_(2.0)  # no forward since
    with pytest.raises(UnsupportedOperation, match="torch.nn.utils.prune"):
        core.split(model)


def test_a_pruned_module_splits_after_prune_remove() -> None:
    model = _pruned()
    prune.remove(model[0], "weight")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        g, h = core.split(model)(x)
        torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)


class _Config:
    def __init__(self, scale: float) -> None:
        self.scale = scale


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, config: _Config) -> torch.Tensor:
        return torch.relu(self.fc(x)) * config.scale


def test_an_argument_changed_in_place_is_not_served_a_stale_graph() -> None:
    """An argument compared by identity (a config object) was a cache key by its id: after
    ``config.scale = 7.0`` the same object got the graph recorded at scale 2, 1.43 off."""
    torch.manual_seed(0)
    model, x = _Scaled().double().eval(), torch.randn(2, 4, dtype=torch.float64)
    sm, config = core.split(model), _Config(2.0)
    with torch.no_grad():
        sm(x, config)
        config.scale = 7.0
        g, h = sm(x, config)
        torch.testing.assert_close(g - h, model(x, config), rtol=0, atol=1e-12)
