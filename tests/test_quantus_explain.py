"""quantus_adapters.explain: shapes, keywords, batching, no caching, model left unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantus_adapters
from quantus_adapters import ConstantExplanationError, explain, refresh


class Counting(nn.Module):
    """A tiny CNN that records the batch size of every forward call."""

    def __init__(self, channels: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes))
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.head(self.features(x))


def make_model(seed: int = 0) -> Counting:
    torch.manual_seed(seed)
    return Counting().eval()


def batch(n: int = 3, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32)


@pytest.fixture
def test_plugin():
    """Register a run-time plugin whose methods return what each test asks for."""
    state: dict = {}

    def layer_map(model, inputs, targets, *, layer: str = "features.3", scale: float = 1.0):
        """LayerMap: a fixed 4x4 map per row (test method)."""
        state["inputs"], state["targets"] = inputs, targets
        base = torch.arange(16.0).reshape(1, 1, 4, 4) + targets.reshape(-1, 1, 1, 1)
        return base * scale

    def channels(model, inputs, targets):
        """Channels: the inputs themselves, (B, C, H, W) (test method)."""
        return inputs * 1.0

    def constant(model, inputs, targets, *, layer: str | None = None, value: float = 0.0):
        """Constant: a constant map (test method)."""
        return torch.full((inputs.shape[0], 1, 2, 2), value)

    def meddler(model, inputs, targets, *, fail: bool = False):
        """Meddler: changes the model, then maybe fails (test method)."""
        model.train(not model.training)
        model.features[0].register_forward_hook(lambda *a: None)
        model.features[0].weight.requires_grad_(False)
        model(inputs).sum().backward()
        if fail:
            raise RuntimeError("meddler failed midway")
        return inputs

    class Plugin:
        @quantus_adapters.hookimpl
        def splitxai_explainers(self):
            return {"TestLayerMap": layer_map, "TestChannels": channels,
                    "TestConstant": constant, "TestMeddler": meddler}

    quantus_adapters.register(Plugin(), name="test-explain")
    try:
        yield state
    finally:
        refresh()


@pytest.mark.parametrize("as_torch", [False, True])
def test_numpy_and_torch_inputs_give_float32_input_resolution(as_torch):
    model = make_model()
    x = batch(3, 12)
    inputs = torch.from_numpy(x) if as_torch else x
    targets = torch.tensor([0, 1, 2]) if as_torch else np.array([0, 1, 2])
    out = explain(model, inputs, targets, method="Saliency")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (3, 1, 12, 12)
    # Saliency (abs gradient) summed over channels, computed by hand
    xt = torch.from_numpy(x).requires_grad_(True)
    logits = model(xt)
    grad = torch.autograd.grad(logits[torch.arange(3), torch.tensor([0, 1, 2])].sum(), xt)[0]
    np.testing.assert_allclose(out, grad.abs().sum(1, keepdim=True).numpy(), rtol=1e-5,
                               atol=1e-7)


def test_layer_map_is_upsampled_bilinear_by_default(test_plugin):
    x = batch(2, 8)
    out = explain(make_model(), x, np.array([0, 2]), method="TestLayerMap")
    base = torch.arange(16.0).reshape(1, 1, 4, 4) + torch.tensor([0.0, 2.0]).reshape(-1, 1, 1, 1)
    expected = F.interpolate(base, size=(8, 8), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-6)
    nearest = explain(make_model(), x, np.array([0, 2]), method="TestLayerMap",
                      upsample="nearest")
    np.testing.assert_allclose(nearest, F.interpolate(base, size=(8, 8)).numpy())
    assert not np.allclose(nearest, out)
    with pytest.raises(ValueError, match="upsample='cubic'"):
        explain(make_model(), x, np.array([0, 2]), method="TestLayerMap", upsample="cubic")


def test_channel_maps_are_summed(test_plugin):
    x = batch(2, 6)
    out = explain(make_model(), x, [1, 1], method="TestChannels")
    np.testing.assert_allclose(out, x.sum(1, keepdims=True), rtol=1e-6)


def test_inputs_and_targets_reach_the_method_as_tensors(test_plugin):
    model = make_model().double()
    explain(model, batch(2, 8), np.array([1.0, 2.0]), method="TestLayerMap")
    assert test_plugin["inputs"].dtype == torch.float64  # the model's dtype
    assert test_plugin["targets"].dtype == torch.long
    assert test_plugin["targets"].tolist() == [1, 2]
    explain(model, batch(3, 8), 2, method="TestLayerMap")  # one int for every row
    assert test_plugin["targets"].tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="got 2 targets for a batch of 3"):
        explain(model, batch(3, 8), [0, 1], method="TestLayerMap")
    with pytest.raises(ValueError, match="class indices"):
        explain(model, batch(2, 8), [0.5, 1], method="TestLayerMap")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        explain(model, batch(2, 8)[0], [0], method="TestLayerMap")


def test_quantus_keywords_are_accepted(test_plugin):
    x = batch(2, 8)
    plain = explain(make_model(), x, [0, 1], method="TestLayerMap", scale=2.0)
    quantus_style = explain(
        make_model(), x, [0, 1], method="TestLayerMap", device="cpu", softmax=False,
        channel_first=True, xai_lib="captum", reduce_axes=(1,), keepdims=True,
        xai_lib_kwargs={"scale": 2.0},
    )
    np.testing.assert_array_equal(plain, quantus_style)
    with pytest.raises(ValueError, match="softmax=True"):
        explain(make_model(), x, [0, 1], method="TestLayerMap", softmax=True)
    with pytest.raises(TypeError, match="both directly and in xai_lib_kwargs"):
        explain(make_model(), x, [0, 1], method="TestLayerMap", scale=1.0,
                xai_lib_kwargs={"scale": 2.0})


def test_channel_last_inputs(test_plugin):
    x = batch(2, 6)
    out = explain(make_model(), np.moveaxis(x, 1, -1), [0, 1], method="TestChannels",
                  channel_first=False)
    assert out.shape == (2, 6, 6, 1)
    np.testing.assert_allclose(out[..., 0], x.sum(1), rtol=1e-6)


def test_unknown_option_names_it_and_the_method():
    with pytest.raises(TypeError, match=r"'Saliency'.*\['colour'\].*abs"):
        explain(make_model(), batch(1, 8), [0], method="Saliency", colour="red")


def test_one_batched_call_per_batch():
    model = make_model()
    explain(model, batch(4, 8), [0, 1, 2, 0], method="Saliency")
    assert model.calls == [4]
    model.calls.clear()
    explain(model, batch(4, 8), [0, 1, 2, 0], method="InputXGradient")
    assert model.calls == [4]


def test_no_caching_across_models_or_mutations():
    model = make_model()
    x, y = batch(2, 8), [0, 1]
    first = explain(model, x, y, method="Saliency")
    with torch.no_grad():
        model.head[2].weight.mul_(-3.0)  # mutate in place: same object, same id
    second = explain(model, x, y, method="Saliency")
    assert not np.allclose(first, second)
    mutated = copy.deepcopy(model)  # what Quantus's randomisation metrics pass
    with torch.no_grad():
        mutated.features[0].weight.normal_()
    third = explain(mutated, x, y, method="Saliency")
    assert not np.allclose(second, third)
    np.testing.assert_array_equal(explain(model, x, y, method="Saliency"), second)


@pytest.mark.parametrize("training", [False, True])
def test_model_ends_in_eval_mode_and_is_otherwise_unchanged(training):
    model = make_model().train(training)
    state = copy.deepcopy(model.state_dict())
    for method in ("Saliency", "GuidedBackprop", "DeepLift", "Occlusion"):
        explain(model, batch(2, 8), [0, 1], method=method)
        assert not any(m.training for m in model.modules())  # as quantus.explain leaves it
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
        assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


@pytest.mark.parametrize("fail", [False, True])
def test_model_is_restored_after_a_meddling_method(test_plugin, fail):
    model = make_model()
    if fail:
        with pytest.raises(RuntimeError, match="meddler failed midway"), \
                pytest.warns(RuntimeWarning, match="'TestMeddler' changed the model"):
            explain(model, batch(2, 8), [0, 1], method="TestMeddler", fail=True)
    else:
        with pytest.warns(RuntimeWarning, match="'TestMeddler' changed the model"):
            explain(model, batch(2, 8), [0, 1], method="TestMeddler")
    assert all(not m.training for m in model.modules())
    assert not model.features[0]._forward_hooks
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_constant_map_names_method_and_layer(test_plugin):
    with pytest.raises(ConstantExplanationError, match=r"'TestConstant'.*'features\.0'.*"
                       r"constant map.*every value is 0"):
        explain(make_model(), batch(2, 8), [0, 1], method="TestConstant", layer="features.0")
    with pytest.raises(ConstantExplanationError, match=r"'TestConstant'.*default.*constant"):
        explain(make_model(), batch(2, 8), [0, 1], method="TestConstant", value=1.0)
    with pytest.raises(ConstantExplanationError, match="non-finite"):
        explain(make_model(), batch(2, 8), [0, 1], method="TestConstant", value=float("nan"))
    with pytest.raises(ConstantExplanationError, match=r"'TestLayerMap'.*'features\.3'"):
        explain(make_model(), batch(1, 8), [0], method="TestLayerMap", scale=0.0)


def test_random_baseline_is_seeded_and_positive():
    a = explain(make_model(), batch(2, 8), [0, 1], method="Random", seed=3)
    b = explain(make_model(), batch(2, 8), [0, 1], method="Random", seed=3)
    c = explain(make_model(), batch(2, 8), [0, 1], method="Random", seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert (a >= 0).all() and (a < 1).all()


@pytest.mark.parametrize("method", [
    "Saliency", "InputXGradient", "IntegratedGradients", "GradientShap", "GuidedBackprop",
    "Deconvolution", "DeepLift", "Occlusion", "FeatureAblation", "Random",
])
def test_baselines_shape_and_completeness(method):
    model = make_model()
    x = batch(2, 8)
    # completeness below needs a fine path: Captum's 50 Gauss-Legendre steps, not the
    # 10 trapezoid steps of quantus.explain that the method takes by default
    options = ({"n_steps": 50, "integration_method": "gausslegendre"}
               if method == "IntegratedGradients" else {})
    out = explain(model, x, [0, 2], method=method, **options)
    assert out.shape == (2, 1, 8, 8) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.std() > 0
    if method in ("IntegratedGradients", "DeepLift"):
        # completeness from the zero baseline: the map sums to f(x) - f(0)
        with torch.no_grad():
            xt = torch.from_numpy(x)
            delta = model(xt)[[0, 1], [0, 2]] - model(torch.zeros_like(xt))[[0, 1], [0, 2]]
        np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), delta.numpy(), rtol=2e-2,
                                   atol=1e-4)
    if method == "Occlusion":  # window 4 over all channels, stride 1
        xt = torch.from_numpy(x[:1]).clone()
        with torch.no_grad():
            full = model(xt)[0, 0]
            xt[:, :, :4, :4] = 0
            drop = full - model(xt)[0, 0]
        # the top-left pixel is covered by exactly one window position; Captum gives the
        # drop to each of the 3 channels, which explain sums
        np.testing.assert_allclose(out[0, 0, 0, 0], 3 * drop.item(), rtol=1e-4, atol=1e-6)


def test_quantus_model_wrapper_and_bad_model():
    import quantus

    model = make_model()
    wrapped = quantus.helpers.model.pytorch_model.PyTorchModel(model, channel_first=True)
    x = batch(2, 8)
    np.testing.assert_array_equal(explain(wrapped, x, [0, 1], method="Saliency"),
                                  explain(model, x, [0, 1], method="Saliency"))
    with pytest.raises(TypeError, match="torch.nn.Module, got function"):
        explain(lambda t: t, x, [0, 1], method="Saliency")


def test_occlusion_takes_quantus_style_window_tuples():
    model, x = make_model(), batch(1, 8)
    per_channel = explain(model, x, [0], method="Occlusion", window=(1, 4, 4),
                          stride=(1, 2, 2))
    xt = torch.from_numpy(x).clone()
    with torch.no_grad():
        full = model(xt)[0, 0]
        xt[:, 0, :4, :4] = 0  # channel 0 only
        drop0 = full - model(xt)[0, 0]
        xt = torch.from_numpy(x).clone()
        xt[:, 1, :4, :4] = 0
        drop1 = full - model(xt)[0, 0]
        xt = torch.from_numpy(x).clone()
        xt[:, 2, :4, :4] = 0
        drop2 = full - model(xt)[0, 0]
    # pixel (0, 0) lies in one window per channel; explain sums the channels
    np.testing.assert_allclose(per_channel[0, 0, 0, 0], (drop0 + drop1 + drop2).item(),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method, dtype", [("Random", np.float64), ("FeatureAblation", np.float64),
                                           ("Saliency", np.float64), ("Occlusion", np.float32)])
def test_a_float64_model_gets_float64_maps_except_occlusion(method, dtype):
    """Random drew float32 maps for a float64 model; Captum's Occlusion divides by its window
    counts in float32 (documented)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3)).double().eval()
    out = explain(model, torch.rand(2, 3, 8, 8, dtype=torch.float64), [0, 1], method=method)
    assert out.dtype == dtype and out.shape == (2, 1, 8, 8)
