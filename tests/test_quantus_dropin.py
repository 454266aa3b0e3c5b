"""``quantus_adapters.explain`` called exactly as Quantus 0.6's ``quantus.explain`` is called.

Each test calls both functions with the same keywords on a small LeNet-style model
(1 x 28 x 28, as Quantus's own test models) or a 3-channel CNN, and compares type, shape,
dtype and values, or checks that a keyword Quantus reads but splitxai cannot honour is
refused in one line that says what to do.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from quantus_adapters import explain

quantus = pytest.importorskip("quantus")
pytest.importorskip("captum")


class LeNet(nn.Module):
    """A LeNet in the style of Quantus's test models (named conv_1 / conv_2 layers)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_1 = nn.Conv2d(1, 6, 5)
        self.relu_1 = nn.ReLU()
        self.pool_1 = nn.MaxPool2d(2, 2)
        self.conv_2 = nn.Conv2d(6, 16, 5)
        self.relu_2 = nn.ReLU()
        self.pool_2 = nn.MaxPool2d(2, 2)
        self.fc_1 = nn.Linear(256, 32)
        self.relu_3 = nn.ReLU()
        self.fc_2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool_1(self.relu_1(self.conv_1(x)))
        x = self.pool_2(self.relu_2(self.conv_2(x)))
        return self.fc_2(self.relu_3(self.fc_1(x.flatten(1))))


def mnist_like(n: int = 4) -> np.ndarray:
    return np.random.default_rng(1).uniform(size=(n, 1, 28, 28)).astype(np.float32)


Y = np.array([0, 3, 5, 9])


def both(model, x, y, **kwargs):
    """(quantus.explain's result, splitxai's) under the same torch and NumPy seeds."""
    out = []
    for fn in (quantus.explain, explain):
        torch.manual_seed(0)
        np.random.seed(0)  # noqa: NPY002 - Captum's GradientShap draws from NumPy's global RNG
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(fn(model, x, y, **kwargs))
    return out


def assert_same(expected, got):
    assert type(got) is np.ndarray
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("mode", [None, "nearest", "bilinear"])
@pytest.mark.parametrize("method", ["GradCam", "LayerGradCam"])
def test_gradcam_with_quantus_s_interpolate_keywords_gives_quantus_s_map(method, mode):
    """Quantus's GradCam recipe: ``gc_layer`` plus ``interpolate=(H, W)`` (and optionally
    ``interpolate_mode``; Captum's ``"nearest"`` by default). Quantus's LayerGradCam keeps
    negative values (Captum's ``relu_attributions=False``)."""
    model, x = LeNet().eval(), mnist_like()
    kwargs = {"method": method, "gc_layer": "model.conv_2", "interpolate": (28, 28)}
    if mode is not None:
        kwargs["interpolate_mode"] = mode
    torch.manual_seed(0)
    expected = quantus.explain(model, x, Y, **kwargs)
    got = explain(model, x, Y, relu_attributions=False, **kwargs)
    assert_same(expected, got)


def test_interpolate_of_another_size_and_two_modes_are_one_line_each():
    model, x = LeNet().eval(), mnist_like()
    with pytest.raises(ValueError, match=r"interpolate=\(14, 14\).*\(28, 28\)") as info:
        explain(model, x, Y, method="GradCam", gc_layer="model.conv_2", interpolate=(14, 14))
    assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="not both") as info:
        explain(model, x, Y, method="GradCam", gc_layer="model.conv_2", upsample="bilinear",
                interpolate_mode="nearest")
    assert "\n" not in str(info.value)
    # interpolate_mode is upsample: the same map
    np.testing.assert_array_equal(
        explain(model, x, Y, method="SplitCAM", layer="conv_2", interpolate_mode="bicubic"),
        explain(model, x, Y, method="SplitCAM", layer="conv_2", upsample="bicubic"))


@pytest.mark.parametrize("method", ["Control Var. Sobel Filter", "Control Var. Random Uniform",
                                    "Lime", "KernelShap", "DeepLiftShap", "GuidedGradCam"])
def test_a_quantus_method_splitxai_lacks_is_one_line_pointing_to_quantus_explain(method):
    from quantus_adapters.registry import UnknownMethodError

    with pytest.raises(UnknownMethodError) as info:
        explain(LeNet().eval(), mnist_like(), Y, method=method)
    message = str(info.value)
    assert "\n" not in message
    assert f"method {method!r} is a method of quantus.explain" in message
    assert "explain_func=quantus.explain" in message
    assert "SplitCAM" in message  # and what splitxai offers instead


def softmax_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 5), nn.Softmax(dim=-1),
    ).eval()


def cifar_like(n: int = 3, size: int = 16) -> np.ndarray:
    return np.random.default_rng(2).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("method", ["Saliency", "Gradient", "IntegratedGradients"])
def test_softmax_false_explains_a_last_softmax_s_input_as_quantus_does(method):
    """quantus.explain(softmax=False) replaces a model's last nn.Softmax by nn.Identity."""
    model, x, y = softmax_cnn(), cifar_like(), np.array([0, 1, 4])
    expected, got = both(model, x, y, method=method, softmax=False)
    assert_same(expected, got)
    logits = nn.Sequential(*list(model)[:-1])
    assert_same(explain(logits, x, y, method=method), got)
    assert not np.allclose(explain(model, x, y, method=method), got)  # softmax=None keeps it
    assert isinstance(model[8], nn.Softmax)  # the caller's model is left as it was


def test_softmax_false_lets_the_split_methods_explain_a_softmax_model():
    model, x, y = softmax_cnn(), cifar_like(), np.array([0, 1, 4])
    logits = nn.Sequential(*list(model)[:-1])
    for method in ("SplitCAM", "SplitGrad", "SplitLRP"):
        expected = explain(logits, x, y, method=method, layer="3")
        np.testing.assert_array_equal(
            explain(model, x, y, method=method, layer="3", softmax=False), expected)
        np.testing.assert_array_equal(  # a layer given as the module itself
            explain(model, x, y, method=method, layer=model[3], softmax=False), expected)


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"method": "Saliency", "normalise": True}, "metric's options"),
    ({"method": "SplitCAM", "layer": "conv_2", "abs": True}, "metric's options"),
    ({"method": "IntegratedGradients", "pos_only": True}, "metric's options"),
    ({"method": "Saliency", "neg_only": True}, "metric's options"),
    ({"xai_lib": "zennit", "attributor": object, "composite": "epsilon_plus"},
     "explain_func=quantus.explain"),
])
def test_quantus_keywords_that_are_no_method_option_say_what_to_do(kwargs, says):
    """quantus.explain (0.6) ignores these keywords or runs Zennit with them; here each is
    one TypeError line naming the option and what to do instead."""
    with pytest.raises(TypeError) as info:
        explain(LeNet().eval(), mnist_like(), Y, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert says in message
    assert "does not accept the option(s)" in message


@pytest.mark.parametrize("layer", [
    {"gc_layer": "model._modules.get('conv_2')"},
    {"gc_layer": "model._modules['conv_2']"},
    {"gc_layer": "list(model.named_modules())[4][1]"},
    {"gc_layer": "model.conv_2"},
    {"xai_lib_kwargs": {"layer": "model.conv_2"}},
])
def test_quantus_s_layer_expressions_name_the_same_layer(layer):
    """quantus.explain evaluates a layer string with ``model`` bound; the same strings name
    the same layer here (followed, not evaluated)."""
    model, x = LeNet().eval(), mnist_like()
    kwargs = {"method": "LayerGradCam", "interpolate": (28, 28), **layer}
    expected = quantus.explain(model, x, Y, **kwargs)
    got = explain(model, x, Y, relu_attributions=False, **kwargs)
    assert_same(expected, got)
    np.testing.assert_array_equal(
        explain(model, x, Y, method="SplitCAM", **layer),
        explain(model, x, Y, method="SplitCAM", layer="conv_2"))


def test_an_indexed_sequential_layer_and_an_unfollowable_expression():
    model, x, y = softmax_cnn(), cifar_like(), np.array([0, 1, 4])
    np.testing.assert_array_equal(
        explain(model, x, y, method="GradCam", gc_layer="model[3]"),
        explain(model, x, y, method="GradCAM", layer="3"))
    np.testing.assert_array_equal(
        explain(model, x, y, method="GradCam", gc_layer="model[-6]"),
        explain(model, x, y, method="GradCAM", layer="3"))
    with pytest.raises(ValueError, match="named_modules") as info:  # never evaluated
        explain(model, x, y, method="GradCam", gc_layer="__import__('os').getcwd()")
    assert "\n" not in str(info.value)
