"""Captum parity of SplitCAM, SplitGrad, LayerCAM and GradCAMPlusPlus (signatures, inputs, flags).

Compared with Captum's own ``LayerGradCam``, ``LayerGradientXActivation`` and ``Saliency`` on
the same small model.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam, LayerGradientXActivation
from torch import nn

from captum_split import GradCAMPlusPlus, LayerCAM, SplitCAM, SplitGrad

LAYER_METHODS = (SplitCAM, SplitGrad, LayerCAM, GradCAMPlusPlus)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.gap(a).flatten(1))


class _TwoInputs(nn.Module):
    """A model with two tensor inputs (image and a per-channel offset)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _Net()

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return self.net(x + offset)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(1)
    return _Net().eval(), torch.randn(2, 3, 6, 6), torch.tensor([0, 2])


@pytest.mark.parametrize("cls", LAYER_METHODS)
def test_constructor_positional_parameters_are_captums(cls, net):
    model, x, y = net
    names = list(inspect.signature(cls.__init__).parameters)[1:4]
    assert names == list(inspect.signature(LayerGradCam.__init__).parameters)[1:4]
    explainer = cls(model, model.conv2, None)  # LayerGradCam(forward_func, layer, device_ids)
    assert explainer.device_ids is None
    if cls in (SplitCAM, SplitGrad):
        with pytest.raises(TypeError):  # the split options are keyword-only
            cls(model, model.conv2, None, 0.4)


@pytest.mark.parametrize("cls", (SplitCAM, LayerCAM, GradCAMPlusPlus))
def test_attribute_parameters_follow_layer_grad_cam(cls):
    ours = list(inspect.signature(cls.attribute).parameters)
    theirs = list(inspect.signature(LayerGradCam.attribute).parameters)
    assert ours == theirs


def test_grad_kwargs(net):
    model, x, y = net
    for cls in (LayerCAM, GradCAMPlusPlus):
        ref = cls(model, model.conv2).attribute(x, target=y)
        out = cls(model, model.conv2).attribute(x, target=y, grad_kwargs={"retain_graph": True})
        torch.testing.assert_close(out, ref)
    cam = SplitCAM(model, model.conv2)
    torch.testing.assert_close(cam.attribute(x, target=y, grad_kwargs={}),
                               cam.attribute(x, target=y))
    for cls in (SplitCAM, SplitGrad):
        with pytest.raises(ValueError, match="grad_kwargs"):
            cls(model, model.conv2).attribute(x, target=y, grad_kwargs={"create_graph": True})


@pytest.mark.parametrize("cls", LAYER_METHODS)
def test_numpy_inputs_ask_for_a_tensor(cls, net):
    model, x, y = net
    with pytest.raises(TypeError, match=r"numpy\.ndarray\. Pass a torch\.Tensor"):
        cls(model, model.conv2).attribute(x.numpy(), target=y)
    with pytest.raises(TypeError, match="Pass a torch.Tensor"):
        cls(model, model.conv2).attribute((x.numpy(),), target=y)
    assert isinstance(x.numpy(), np.ndarray)


@pytest.mark.parametrize("cls", LAYER_METHODS)
def test_float64_inputs_on_a_float32_model_name_both_dtypes(cls, net):
    model, x, y = net
    with pytest.raises(TypeError, match=r"torch\.float64 but the model's parameters are "
                                        r"torch\.float32"):
        cls(model, model.conv2).attribute(x.double(), target=y)


def test_tuple_inputs(net):
    model, x, y = net
    two = _TwoInputs().eval()
    offset = torch.randn(2, 3, 1, 1).expand(2, 3, 6, 6).contiguous()
    # the Captum-based CAMs take several input tensors as Captum does
    for cls in (LayerCAM, GradCAMPlusPlus):
        out = cls(two, two.net.conv2).attribute((x, offset), target=y)
        ref = cls(model, model.conv2).attribute(x + offset, target=y)
        assert isinstance(out, tuple) and len(out) == 1
        torch.testing.assert_close(out[0], ref.detach())
    # the split methods: a 1-tuple in, a 1-tuple out ...
    out = SplitCAM(model, model.conv2).attribute((x,), target=y)
    assert isinstance(out, tuple) and len(out) == 1
    # ... and several input tensors, each split: a layer map, or one input map per tensor
    cam = SplitCAM(two, two.net.conv2, alpha=0.5).attribute((x, offset), target=y)
    assert isinstance(cam, tuple) and len(cam) == 1
    torch.testing.assert_close(
        cam[0], SplitCAM(model, model.conv2, alpha=0.5).attribute(x + offset, target=y))
    grads = SplitGrad(two, alpha=0.5).attribute((x, offset), target=y)
    leaves = (x.clone().requires_grad_(), offset.clone().requires_grad_())
    score = two(*leaves).gather(1, y[:, None]).sum()
    expected = torch.autograd.grad(score, leaves)
    assert isinstance(grads, tuple) and len(grads) == 2
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, 0.5 * want)
    with pytest.raises(TypeError, match=r"inputs\[1\] is torch\.float64"):
        SplitCAM(two, two.net.conv2).attribute((x, offset.double()), target=y)


def test_multiplies_by_inputs_means_what_it_means_in_captum(net):
    model, x, y = net
    gxa = LayerGradientXActivation(model, model.conv2)
    cam = SplitCAM(model, model.conv2, alpha=0.5)
    assert cam.multiplies_by_inputs is gxa.multiplies_by_inputs is True
    torch.testing.assert_close(cam.attribute(x, target=y),
                               0.5 * gxa.attribute(x, target=y).sum(1, keepdim=True).detach())
    assert SplitGrad(model).multiplies_by_inputs is False  # a sensitivity, as Saliency
    assert LayerCAM(model, model.conv2).multiplies_by_inputs is True


def test_autograd_history_as_documented(net):
    model, x, y = net
    captum_map = LayerGradCam(model, model.conv2).attribute(x, target=y)
    assert captum_map.requires_grad  # Captum's maps keep the activations' history ...
    for cls in (LayerCAM, GradCAMPlusPlus):  # ... and so do ours built on Captum
        assert cls(model, model.conv2).attribute(x, target=y).requires_grad
    for cls in (SplitCAM, SplitGrad):  # the split maps are detached (documented)
        assert not cls(model, model.conv2).attribute(x, target=y).requires_grad


def test_training_mode_warns_once_per_model(net):
    model = _Net().train()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # a new explainer per call, as a Quantus loop does
            SplitCAM(model, model.conv2).attribute(x, target=0)
    training = [w for w in caught if "training mode" in str(w.message)]
    assert len(training) == 1
