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
    got = explain(model, x, Y, **kwargs)  # the alias is LayerGradCam as Captum defaults it
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
    got = explain(model, x, Y, **kwargs)  # the alias is LayerGradCam as Captum defaults it
    assert_same(expected, got)
    np.testing.assert_array_equal(
        explain(model, x, Y, method="SplitCAM", **layer),
        explain(model, x, Y, method="SplitCAM", layer="conv_2"))


def test_an_indexed_sequential_layer_and_an_unfollowable_expression():
    model, x, y = softmax_cnn(), cifar_like(), np.array([0, 1, 4])
    np.testing.assert_array_equal(
        explain(model, x, y, method="GradCam", gc_layer="model[3]"),
        explain(model, x, y, method="GradCAM", layer="3", relu_attributions=False))
    np.testing.assert_array_equal(
        explain(model, x, y, method="GradCam", gc_layer="model[-6]"),
        explain(model, x, y, method="GradCAM", layer="3", relu_attributions=False))
    with pytest.raises(ValueError, match="named_modules") as info:  # never evaluated
        explain(model, x, y, method="GradCam", gc_layer="__import__('os').getcwd()")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["Saliency", "Gradient", "IntegratedGradients",
                                    "InputXGradient", "GradientShap", "Occlusion",
                                    "FeatureAblation", "Deconvolution", "DeepLift"])
def test_the_same_algorithm_gives_quantus_s_array(method):
    """Type, shape, dtype and values as quantus.explain's (Occlusion: one channel, where
    splitxai's all-channel window is Quantus's (1, 4, 4))."""
    expected, got = both(LeNet().eval(), mnist_like(), Y, method=method)
    assert_same(expected, got)


@pytest.mark.parametrize("kwargs", [
    {"reduce_axes": ()}, {"reduce_axes": (1, 2, 3)}, {"reduce_axes": (-1,)},
    {"reduce_axes": [1], "keepdims": False}, {"reduce_axes": (2,), "keepdims": False},
    {"device": "cpu"}, {"softmax": False}, {"channel_first": True}, {"xai_lib": "captum"},
    {"xai_lib_kwargs": {}},
])
def test_quantus_keywords_give_quantus_s_array(kwargs):
    model, x, y = softmax_cnn()[:-1], cifar_like(), np.array([0, 1, 4])
    for method in ("Saliency", "Gradient", "InputXGradient"):
        expected, got = both(model, x, y, method=method, **kwargs)
        assert_same(expected, got)


@pytest.mark.parametrize("targets", [3, np.int64(3), np.array(3), torch.tensor(3), [3, 3, 3],
                                     np.array([3, 3, 3]), torch.tensor([3, 3, 3])])
def test_targets_as_quantus_takes_them(targets):
    model, x = softmax_cnn()[:-1], cifar_like()
    expected, got = both(model, x, targets, method="Saliency")
    assert_same(expected, got)
    expected, got = both(model, torch.from_numpy(x), targets, method="Gradient")  # torch inputs
    assert_same(expected, got)


def test_float64_and_integer_numpy_inputs_are_cast_as_quantus_does():
    model, x, y = softmax_cnn()[:-1], cifar_like(), np.array([0, 1, 4])
    assert_same(*both(model, x.astype(np.float64), y, method="Saliency"))
    assert_same(*both(model, (x * 10).astype(np.int64), y, method="Gradient"))


@pytest.mark.parametrize(("x", "y", "error", "says"), [
    (cifar_like()[:0], np.array([], dtype=int), ValueError, "empty batch"),
    (cifar_like(), np.array([0, 1]), ValueError, "2 targets for a batch of 3"),
    (cifar_like(), np.array([0.5, 1.0, 2.0]), ValueError, "fractional"),
    (cifar_like()[0], np.array([0, 1, 2]), ValueError, r"\(B, C, H, W\)"),
    (cifar_like().reshape(3, -1), np.array([0, 1, 2]), ValueError, r"\(B, C, H, W\)"),
])
def test_bad_inputs_are_one_line_where_quantus_raises_deep_inside_captum(x, y, error, says):
    """quantus.explain fails on each (an AssertionError or RuntimeError from Captum or
    torch); splitxai raises one line that names the problem."""
    model = softmax_cnn()[:-1]
    with pytest.raises(Exception):  # noqa: B017,PT011 - quantus's own failure, any type
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantus.explain(model, x, y, method="Saliency")
    with pytest.raises(error, match=says) as info:
        explain(model, x, y, method="Saliency")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["SplitCAM", "SplitGrad", "SplitLRP"])
def test_split_methods_return_what_quantus_explain_returns(method):
    """A float32 NumPy array (B, 1, H, W) at the input's resolution; reduce_axes, keepdims
    and channel-last inputs as for quantus.explain's maps."""
    model, x = LeNet().eval(), mnist_like()
    out = explain(model, x, Y, method=method, layer="conv_2", device="cpu", softmax=False)
    assert type(out) is np.ndarray
    assert out.shape == (4, 1, 28, 28)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    flat = explain(model, x, Y, method=method, layer="conv_2", keepdims=False)
    np.testing.assert_array_equal(flat, out[:, 0])
    last = explain(model, np.moveaxis(x, 1, -1), Y, method=method, layer="conv_2",
                   channel_first=False)
    np.testing.assert_array_equal(last, np.moveaxis(out, 1, -1))
    by_int = explain(model, x, 3, method=method, layer="conv_2")
    np.testing.assert_array_equal(by_int[1], out[1])  # row 1's target is 3


def test_a_quantus_metric_runs_with_quantus_s_gradcam_recipe():
    """Quantus's metric with its GradCam explain_func_kwargs, through splitxai: the scores
    equal those with quantus.explain (relu_attributions=False, Captum's default)."""
    model, x = LeNet().eval(), mnist_like()
    recipe = {"method": "LayerGradCam", "gc_layer": "model._modules.get('conv_2')",
              "interpolate": (28, 28)}
    scores = []
    for fn, extra in ((quantus.explain, {}), (explain, {})):
        metric = quantus.PixelFlipping(features_in_step=196, perturb_baseline="black",
                                       disable_warnings=True, display_progressbar=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores.append(metric(model=model, x_batch=x, y_batch=Y, device="cpu",
                                 explain_func=fn, explain_func_kwargs={**recipe, **extra}))
    np.testing.assert_allclose(np.asarray(scores[1]), np.asarray(scores[0]), rtol=1e-5,
                               atol=1e-6)
