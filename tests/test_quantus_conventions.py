"""``quantus_adapters.explain`` follows Quantus 0.6's own ``quantus.explain`` conventions.

Device, eval mode at the end, ``reduce_axes``/``keepdims``, Quantus's method names and
``gc_layer``, the float64 path, and what a plugin may return (NumPy or torch, never
channel-last).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import quantus_adapters
from quantus_adapters import explain


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.moved_to: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def to(self, *args, **kwargs):  # records Quantus-style moves
        self.moved_to.append(args[0] if args else kwargs.get("device"))
        return super().to(*args, **kwargs)


def _batch(n: int = 2, size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).random((n, 3, size, size), dtype=np.float32)


@pytest.fixture(scope="module")
def plugin():
    """Run-time methods that return what the tests ask for."""
    state: dict = {}

    def echo(model, inputs, targets, *, kind: str = "tensor", scale: float = 1.0):
        """Echo: the inputs times scale, as a tensor, NumPy array or channel-last (test)."""
        state["dtype"], state["device"] = inputs.dtype, inputs.device
        out = inputs * scale
        if kind == "numpy":
            return out.numpy()
        if kind == "channel_last":
            return out.permute(0, 2, 3, 1)
        return out

    def small(model, inputs, targets):
        """Small: a 2x2 layer map with values beyond float32's range (test)."""
        base = torch.arange(4.0, dtype=inputs.dtype).reshape(1, 1, 2, 2) + 1
        return base.expand(inputs.shape[0], 1, 2, 2) * 1e39

    def failing(model, inputs, targets):
        """Failing: raises (test)."""
        raise RuntimeError("failing on purpose")

    class Plugin:
        @quantus_adapters.hookimpl
        def splitxai_explainers(self):
            return {"ConvEcho": echo, "ConvSmall": small, "ConvFailing": failing}

    quantus_adapters.register(Plugin(), name="test-conventions")
    try:
        yield state
    finally:
        quantus_adapters.refresh()


def test_device_moves_model_and_inputs_as_quantus_does(plugin):
    model = _Net().eval()
    explain(model, _batch(), [0, 1], method="ConvEcho", device="cpu")
    assert model.moved_to == ["cpu"] and plugin["device"] == torch.device("cpu")
    model.moved_to.clear()
    explain(model, _batch(), [0, 1], method="ConvEcho")  # no device: the model stays put
    assert model.moved_to == []


def test_model_ends_in_eval_mode_also_when_the_method_fails(plugin):
    model = _Net().train()
    explain(model, _batch(), [0, 1], method="ConvEcho")
    assert not model.training
    model.train()
    with pytest.raises(RuntimeError, match="on purpose"):
        explain(model, _batch(), [0, 1], method="ConvFailing")
    assert not any(m.training for m in model.modules())


def test_reduce_axes_and_keepdims(plugin):
    x = _batch()
    model = _Net().eval()
    full = explain(model, x, [0, 1], method="ConvEcho", reduce_axes=())
    np.testing.assert_allclose(full, x, rtol=1e-6)
    flat = explain(model, x, [0, 1], method="ConvEcho", reduce_axes=(1,), keepdims=False)
    np.testing.assert_allclose(flat, x.sum(1), rtol=1e-6)
    rows = explain(model, x, [0, 1], method="ConvEcho", reduce_axes=(1, 3))
    np.testing.assert_allclose(rows, x.sum((1, 3), keepdims=True), rtol=1e-5)
    last = explain(model, np.moveaxis(x, 1, -1), [0, 1], method="ConvEcho",
                   channel_first=False, reduce_axes=(-1,))
    np.testing.assert_allclose(last, np.moveaxis(x, 1, -1).sum(-1, keepdims=True), rtol=1e-6)
    with pytest.raises(ValueError, match="batch"):
        explain(model, x, [0, 1], method="ConvEcho", reduce_axes=(0, 1))


def test_quantus_method_names_are_aliases():
    model = _Net().eval()
    x = _batch()
    gradient = explain(model, x, [0, 1], method="Gradient", reduce_axes=())
    np.testing.assert_array_equal(
        gradient, explain(model, x, [0, 1], method="Saliency", abs=False, reduce_axes=()))
    assert (gradient < 0).any()  # signed, as Quantus's "Gradient"
    grad_cam = explain(model, x, [0, 1], method="GradCam", gc_layer="model.features.2")
    np.testing.assert_array_equal(  # Captum's LayerGradCam default, as quantus.explain
        grad_cam, explain(model, x, [0, 1], method="GradCAM", layer="features.2",
                          relu_attributions=False))
    assert (grad_cam < 0).any()  # signed: "GradCAM" alone applies Grad-CAM's ReLU
    assert (explain(model, x, [0, 1], method="GradCAM", layer="features.2") >= 0).all()
    with pytest.raises(TypeError, match="contradict"):
        explain(model, x, [0, 1], method="Gradient", abs=True)


def test_float64_model_reduces_and_resizes_in_float64(plugin):
    model = _Net().double().eval()
    out = explain(model, _batch(), [0, 1], method="ConvSmall")
    assert out.dtype == np.float64 and np.isfinite(out).all()
    assert out.max() > 3.5e39  # beyond float32 (3.4e38): resized without overflow
    small = explain(model, _batch(), [0, 1], method="ConvEcho")
    assert plugin["dtype"] == torch.float64 and small.dtype == np.float64


def test_plugins_may_return_numpy_but_not_channel_last(plugin):
    model = _Net().eval()
    x = _batch()
    np.testing.assert_array_equal(explain(model, x, [0, 1], method="ConvEcho", kind="numpy"),
                                  explain(model, x, [0, 1], method="ConvEcho"))
    with pytest.raises(ValueError, match="channel-last"):
        explain(model, x, [0, 1], method="ConvEcho", kind="channel_last")
