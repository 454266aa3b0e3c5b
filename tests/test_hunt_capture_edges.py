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
