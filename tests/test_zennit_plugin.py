"""Quantus's zennit path, the splitxai plugin explainers "SplitLRP" and "LRP"."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from zennit.attribution import Gradient

import quantus_adapters  # noqa: F401 - applies the NumPy 2 shim Quantus 0.6 needs
import zennit_split
from zennit_split import SplitLRP
from zennit_split.plugin import lrp_explainer, split_lrp_explainer, splitxai_explainers


def small_cnn(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1, bias=bias), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5, bias=bias),
    ).eval()


def test_quantus_zennit_path_with_the_registered_name():
    quantus = pytest.importorskip("quantus")
    model = small_cnn()
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32) * 2 - 1
    y = np.array([1, 3])
    maps = quantus.explain(model, x, y, xai_lib="zennit", composite="split_lrp")
    with Gradient(model, SplitLRP()) as attributor:
        _, rel = attributor(torch.from_numpy(x), torch.eye(5)[y])
    assert maps.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(maps, rel.sum(1, keepdim=True).numpy(), rtol=1e-5, atol=1e-7)
    # Quantus passes composite_kwargs and canonizers through to the constructor
    comb = quantus.explain(model, x, y, xai_lib="zennit", composite="split_lrp",
                           composite_kwargs={"stream": "comb"})
    assert not np.allclose(comb, maps)


def test_plugin_offers_both_methods():
    methods = splitxai_explainers()
    assert methods == {"SplitLRP": split_lrp_explainer, "LRP": lrp_explainer}
    assert split_lrp_explainer.__doc__.splitlines()[0].startswith("SplitLRP")
    assert "SplitLRP" in quantus_adapters.available_methods()
    assert "LRP" in quantus_adapters.available_methods()


def test_split_lrp_explainer_input_and_layer_maps():
    model = small_cnn()
    x = torch.rand(2, 3, 8, 8)
    y = torch.tensor([0, 4])
    rel = split_lrp_explainer(model, x, y, stream="comb")
    with Gradient(model, SplitLRP(stream="comb")) as attributor:
        _, expected = attributor(x, torch.eye(5)[y])
    torch.testing.assert_close(rel, expected)
    layer_map = split_lrp_explainer(model, x, y, layer="4")
    assert layer_map.shape == (2, 1, 4, 4) and torch.isfinite(layer_map).all()
    with pytest.raises(ValueError, match="'8'"):
        split_lrp_explainer(model, x, y, layer="8")   # the logits are no map
    with pytest.raises(TypeError, match="alpha"):
        split_lrp_explainer(model, x, y, alpha=0.4)


def test_explain_through_quantus_adapters():
    model = small_cnn()
    x = np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32)
    for method, options in [("SplitLRP", {"layer": "4"}), ("LRP", {}), ("LRP", {"layer": "2"})]:
        maps = quantus_adapters.explain(model, x, np.array([1, 2]), method=method, **options)
        assert maps.shape == (2, 1, 8, 8) and np.isfinite(maps).all()
    with pytest.raises(TypeError, match="stream"):
        quantus_adapters.explain(model, x, np.array([1, 2]), method="LRP", stream="pos")


def test_lrp_gamma_conserves_on_bias_free_models_and_leaves_model_alone():
    model = small_cnn(bias=False)
    x = torch.rand(3, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rel = lrp_explainer(model, x, torch.tensor([0, 1, 2]))
    assert rel.shape == x.shape
    torch.testing.assert_close(rel.flatten(1).sum(1), torch.ones(3), rtol=1e-3, atol=1e-3)
    layer = lrp_explainer(model, x, torch.tensor([0, 1, 2]), layer="5")
    assert layer.shape == (3, 1, 4, 4)
    torch.testing.assert_close(layer.flatten(1).sum(1), torch.ones(3), rtol=1e-3, atol=1e-3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_lrp_gamma_differs_from_the_gradient():
    model = small_cnn(bias=False)
    x = torch.rand(1, 3, 8, 8)
    plain = zennit_split.lrp_gamma(model, x, 1, gamma=0.0)
    gamma = zennit_split.lrp_gamma(model, x, 1, gamma=0.25)
    assert not torch.allclose(plain, gamma)


class _RevertsLikeZennit10:
    """A canonizer that merges the first BatchNorm into the convolution before it and reverts
    the way zennit 1.0 does: ``object.__setattr__`` leaves the restored weight and bias as
    instance attributes over the parameter slots, the zero bias it created for a bias-free
    convolution stays registered; a rule that modifies the weight (zennit's ParamMod) then
    leaves the merged weight in the parameter slot."""

    def apply(self, model):
        conv, norm = model[0], model[1]
        weight, bias = conv.weight, conv.bias
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        scale = norm.weight / (norm.running_var + norm.eps).sqrt()
        merged = nn.Parameter((weight * scale[:, None, None, None]).detach())
        object.__setattr__(conv, "weight", merged)
        object.__setattr__(conv, "bias", nn.Parameter(
            ((conv.bias - norm.running_mean) * scale + norm.bias).detach()))
        norm_state = {k: getattr(norm, k) for k in ("weight", "bias", "running_mean",
                                                     "running_var")}
        object.__setattr__(norm, "weight", torch.ones_like(norm.weight))
        object.__setattr__(norm, "bias", torch.zeros_like(norm.bias))
        object.__setattr__(norm, "running_mean", torch.zeros_like(norm.running_mean))
        object.__setattr__(norm, "running_var", torch.ones_like(norm.running_var) - norm.eps)

        class Handle:
            def remove(self):
                object.__setattr__(conv, "weight", weight)
                object.__setattr__(conv, "bias", bias)
                for key, value in norm_state.items():
                    object.__setattr__(norm, key, value)

        return [Handle()]


def _slots(model):
    """Each module's slot entries (kept alive, so that their ids stay theirs) and attributes."""
    return [(name, dict(m._parameters), dict(m._buffers), sorted(vars(m)))
            for name, m in model.named_modules()]


def _ids(slots, objects=True):
    return [(name, {k: id(v) if objects else None for k, v in params.items()},
             {k: id(v) for k, v in buffers.items()}, names)
            for name, params, buffers, names in slots]


def test_canonizer_reverts_leave_no_shadow_no_extra_bias_no_merged_weight(monkeypatch):
    # zennit 1.0: after lrp_gamma (SequentialMergeBatchNorm) a ResNet-18 had 82 parameters
    # instead of 62 (zero biases), and state_dict() held the BN-merged conv weights
    model = small_cnn(bias=False)
    x = torch.rand(2, 3, 8, 8)
    before, state = _slots(model), {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(zennit_split.helpers, "_default_canonizers",
                        lambda model: [_RevertsLikeZennit10()])
    zennit_split.lrp_gamma(model, x, torch.tensor([0, 1]))
    after = _slots(model)
    assert _ids(after) == _ids(before)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with Gradient(model, SplitLRP(canonizers=[_RevertsLikeZennit10()])) as attributor:
        attributor(x, torch.eye(5)[[0, 1]])
    assert _ids(_slots(model)) == _ids(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model[0].bias is None and "weight" not in vars(model[0])
