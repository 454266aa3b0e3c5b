"""The captum_split plugin: registration through pluggy and the explainer-callable contract."""

from __future__ import annotations

import importlib.metadata
import inspect

import numpy as np
import pluggy
import pytest
import torch
from captum.attr import LayerGradCam

import core.zoo
from captum_split import GradCAMPlusPlus, LayerCAM, SplitCAM, SplitGrad
from captum_split import plugin as captum_plugin

NAMES = {"SplitCAM", "SplitGrad", "LayerCAM", "GradCAM", "GradCAMPlusPlus"}


@pytest.fixture(scope="module")
def resnet20():
    x, y = core.zoo.cifar10_samples()
    return core.zoo.resnet20(pretrained=True), core.zoo.normalize_cifar(x[4:6]), y[4:6]


def test_entry_point_and_pluggy_hook():
    eps = importlib.metadata.entry_points(group="splitxai")
    assert any(ep.name == "captum" and ep.value == "captum_split.plugin" for ep in eps)
    manager = pluggy.PluginManager("splitxai")
    manager.register(captum_plugin, name="captum")
    (table,) = manager.hook.splitxai_explainers()
    assert set(table) == NAMES
    for fn in table.values():
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:3]] == ["model", "inputs", "targets"]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[3:])
        first = inspect.getdoc(fn).splitlines()[0]
        assert first and not first.startswith(" ")


def test_methods_listed_by_the_registry():
    from quantus_adapters.registry import available_methods

    methods = available_methods()
    assert NAMES <= set(methods)


def test_explainers_match_the_classes(resnet20):
    model, x, y = resnet20
    table = captum_plugin.splitxai_explainers()
    cam = table["SplitCAM"](model, x, y, layer="layer2", alpha=0.3, sign="+")
    torch.testing.assert_close(
        cam, SplitCAM(model, "layer2", alpha=0.3, sign="+").attribute(x, target=y)
    )
    assert cam.shape == (2, 1, 16, 16)
    # default layer of the CAM methods: the last convolution
    last = SplitCAM(model, "layer3.2.conv2").attribute(x, target=y)
    torch.testing.assert_close(table["SplitCAM"](model, x, y), last)
    # SplitGrad without a layer: the paper's channel mean at the input
    grad = table["SplitGrad"](model, x, y, stream="h")
    assert grad.shape == (2, 1, 32, 32)
    torch.testing.assert_close(
        grad, SplitGrad(model, stream="h").attribute(x, target=y).mean(1, keepdim=True)
    )
    at_layer = table["SplitGrad"](model, x, y, layer="layer1.2")
    assert at_layer.shape == (2, 1, 32, 32)
    lc = table["LayerCAM"](model, x, y, layer="layer3")
    torch.testing.assert_close(lc, LayerCAM(model, model.layer3).attribute(x, target=y))
    gc = table["GradCAM"](model, x, y)
    ref = LayerGradCam(model, model.layer3[2].conv2).attribute(x, y, relu_attributions=True)
    torch.testing.assert_close(gc, ref)
    pp = table["GradCAMPlusPlus"](model, x, y, layer="layer3", relu_attributions=False)
    torch.testing.assert_close(
        pp, GradCAMPlusPlus(model, "layer3").attribute(x, y, relu_attributions=False)
    )


def test_unknown_options_and_bad_values(resnet20):
    model, x, y = resnet20
    table = captum_plugin.splitxai_explainers()
    for name in NAMES:
        with pytest.raises(TypeError, match="strem"):
            table[name](model, x, y, strem="g")
    with pytest.raises(ValueError, match="sign"):
        table["SplitCAM"](model, x, y, sign="positive")
    with pytest.raises(ValueError, match="layer3.2.conv2"):
        table["LayerCAM"](model, x, y, layer="layer3.2.conv")
    with pytest.raises(ValueError, match="out of range"):
        table["GradCAM"](model, x, torch.tensor([0, 10]))


def test_through_quantus_explain(resnet20):
    from quantus_adapters import explain

    model, x, y = resnet20
    maps = explain(
        model, x.numpy(), y.numpy(), method="SplitCAM", layer="layer2.2.conv2", sign="+"
    )
    assert maps.shape == (2, 1, 32, 32) and maps.dtype == np.float32
    maps = explain(model, x.numpy(), y.numpy(), method="LayerCAM", layer="layer3")
    assert maps.shape == (2, 1, 32, 32) and (maps >= 0).all()
