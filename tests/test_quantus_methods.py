"""quantus_adapters.explain across methods: gradient modes, layers, Quantus's defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from quantus_adapters import explain


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 3),
    )
    model[1].running_mean.uniform_(-0.3, 0.3)
    model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def batch(n: int = 2, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


TARGETS = np.array([1, 2])


@pytest.mark.parametrize("method", ["SplitLRP", "LRP"])
def test_zennit_methods_work_under_no_grad(method):
    model, x = small_cnn(), batch()
    expected = explain(model, x, TARGETS, method=method)
    with torch.no_grad():
        got = explain(model, x, TARGETS, method=method)
    np.testing.assert_array_equal(got, expected)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["SplitLRP", "LRP", "SplitCAM", "Saliency",
                                    "IntegratedGradients"])
def test_inference_mode_is_refused_with_one_line(method):
    model, x = small_cnn(), batch()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode") as info:
        explain(model, x, TARGETS, method=method)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{method}: ")
    assert "outside inference mode" in message


@pytest.mark.parametrize("method", ["SplitLRP", "LRP", "SplitCAM"])
def test_a_layer_module_is_the_layer_of_that_name(method):
    model, x = small_cnn(), batch()
    by_name = explain(model, x, TARGETS, method=method, layer="4")
    by_module = explain(model, x, TARGETS, method=method, layer=model[4])
    np.testing.assert_array_equal(by_module, by_name)


@pytest.mark.parametrize("method", ["SplitLRP", "LRP", "SplitCAM"])
def test_a_layer_of_another_type_is_one_type_error_line(method):
    with pytest.raises(TypeError, match="layer") as info:
        explain(small_cnn(), batch(), TARGETS, method=method, layer=3)
    assert "\n" not in str(info.value)
    assert "module name" in str(info.value)


@pytest.mark.parametrize("method", ["SplitLRP", "LRP", "SplitCAM", "SplitGrad"])
def test_a_layer_without_spatial_axes_is_named(method):
    model = small_cnn()
    for layer in ("8", model[8]):  # the Linear layer, by name and as a module
        with pytest.raises(ValueError, match=r"layer='8'.*\(B, C, h, w\)") as info:
            explain(model, batch(), TARGETS, method=method, layer=layer)
        assert "\n" not in str(info.value)


def _seeded(call):
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - Captum's GradientShap draws with the legacy NumPy RNG
    return call()


@pytest.mark.parametrize("method", ["IntegratedGradients", "Saliency", "Gradient",
                                    "InputXGradient", "DeepLift", "GradientShap"])
def test_a_method_with_a_quantus_name_gives_quantus_explain_s_result(method):
    quantus = pytest.importorskip("quantus")
    model, x = small_cnn(), batch(size=6)
    expected = _seeded(lambda: quantus.explain(model, x, TARGETS, method=method))
    got = _seeded(lambda: explain(model, x, TARGETS, method=method))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_integrated_gradients_takes_captum_s_steps_and_rule_when_asked():
    captum_attr = pytest.importorskip("captum.attr")
    model, x = small_cnn(), batch(size=6)
    inputs = torch.from_numpy(x).requires_grad_(True)
    captum_default = captum_attr.IntegratedGradients(model).attribute(
        inputs, target=torch.from_numpy(TARGETS)).sum(1, keepdim=True).detach().numpy()
    got = explain(model, x, TARGETS, method="IntegratedGradients", n_steps=50,
                  integration_method="gausslegendre")
    np.testing.assert_allclose(got, captum_default, rtol=1e-5,
                               atol=1e-6 * np.abs(captum_default).max())
    assert not np.allclose(explain(model, x, TARGETS, method="IntegratedGradients"), got)


@pytest.mark.parametrize("method", ["IntegratedGradients", "DeepLift", "GradientShap"])
def test_quantus_s_baseline_option_is_captum_s_baselines(method):
    """``quantus.explain`` reads ``baseline`` (singular) for these methods: the same option
    gives the same result here; given with ``baselines`` too it is one TypeError line."""
    quantus = pytest.importorskip("quantus")
    model, x = small_cnn(), batch(size=6)
    base = torch.full((2, 3, 6, 6), 0.25)
    expected = _seeded(lambda: quantus.explain(model, x, TARGETS, method=method,
                                               baseline=base))
    got = _seeded(lambda: explain(model, x, TARGETS, method=method, baseline=base))
    zero = _seeded(lambda: explain(model, x, TARGETS, method=method))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert not np.allclose(got, zero)  # the baseline was used
    with pytest.raises(TypeError, match="both") as info:
        explain(model, x, TARGETS, method=method, baseline=base, baselines=base)
    assert "\n" not in str(info.value)
