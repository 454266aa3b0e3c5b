"""SplitLRP's ``layer``: names, submodules, and one clear error for anything else."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zennit.attribution import Gradient

from zennit_split import SplitLRP, lrp_gamma, split_lrp


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 3),
    ).eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
SEED = torch.eye(3)[[0, 2]]


@pytest.mark.parametrize("layer", [3, 2.5, [3], {"a": 1}])
def test_a_layer_of_another_type_is_one_type_error_line(layer):
    with pytest.raises(TypeError, match=r"SplitLRP: layer=.* must be a module name") as info:
        SplitLRP(layer=layer)
    assert "\n" not in str(info.value)


def test_the_composite_takes_submodules_and_keeps_them_under_their_names():
    model = small_cnn()
    composite = SplitLRP(layer=[model[3], "4"])
    with Gradient(model, composite) as attributor:
        attributor(X, SEED)
    assert set(composite.relevance) == {"input", "3", "4"}
    reference = split_lrp(model, X, torch.tensor([0, 2]), ["3"])["3"]
    torch.testing.assert_close(composite.relevance["3"].pos, reference.pos)


def test_a_module_of_another_model_is_refused_at_registration():
    model = small_cnn()
    with pytest.raises(ValueError, match="not a submodule"):
        with Gradient(model, SplitLRP(layer=nn.Conv2d(3, 4, 3))) as attributor:
            attributor(X, SEED)


def test_split_lrp_and_lrp_gamma_take_a_submodule():
    model = small_cnn()
    by_module = split_lrp(model, X, torch.tensor([0, 2]), [model[3]])
    assert list(by_module) == ["3"]
    torch.testing.assert_close(
        by_module["3"].pos, split_lrp(model, X, torch.tensor([0, 2]), "3")["3"].pos)
    torch.testing.assert_close(lrp_gamma(model, X, torch.tensor([0, 2]), layer=model[3]),
                               lrp_gamma(model, X, torch.tensor([0, 2]), layer="3"))
