"""LayerCAM and Grad-CAM++ (the CAM baselines Captum lacks) as Captum layer attributions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import (
    GradientAttribution,
    LayerActivation,
    LayerAttribution,
    LayerGradientXActivation,
    NoiseTunnel,
)
from torch import nn

from captum_split import GradCAMPlusPlus, LayerCAM


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    return model, torch.randn(2, 3, 64, 64), torch.tensor([1, 8])


class _Tempered(nn.Module):
    """Conv net whose forward takes the logit temperature as a second argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1)) / temperature


def _grad_act(model, layer, x, y):
    grad = LayerGradientXActivation(model, layer, multiply_by_inputs=False).attribute(
        x, target=y
    )
    return grad.detach(), LayerActivation(model, layer).attribute(x).detach()


@pytest.mark.parametrize("layer", ["layer3", "layer4.1.conv2"])
def test_layercam_is_relu_of_positive_gradient_times_activation(resnet18, layer):
    model, x, y = resnet18
    module = model.get_submodule(layer)
    grad, act = _grad_act(model, module, x, y)
    raw = (F.relu(grad) * act).sum(1, keepdim=True)
    lc = LayerCAM(model, module)
    cam = lc.attribute(x, target=y)
    assert cam.shape == (2, 1, *act.shape[2:])
    torch.testing.assert_close(cam, F.relu(raw))
    signed = LayerCAM(model, layer).attribute(x, target=y, relu_attributions=False)
    torch.testing.assert_close(signed, raw)
    if layer == "layer4.1.conv2":  # a conv output (before BN) has negative activations
        assert (F.relu(grad) * act).min() < 0
    per_channel = lc.attribute(x, target=y, attr_dim_summation=False, relu_attributions=False)
    torch.testing.assert_close(per_channel, F.relu(grad) * act)


def test_gradcampp_closed_form_before_global_pooling(resnet18):
    # layer4 feeds global average pooling and a linear layer: its gradient is constant over
    # space per channel, g_k, so alpha = 1 / (2 + sum(A_k) g_k) and w_k = h*w*relu(g_k)*alpha
    model, x, y = resnet18
    grad, act = _grad_act(model, model.layer4, x, y)
    g = grad[:, :, :1, :1]
    torch.testing.assert_close(grad, g.expand_as(grad))
    hw = act.shape[2] * act.shape[3]
    weights = hw * F.relu(g) / (2 + act.sum((2, 3), keepdim=True) * g)
    expected = F.relu((weights * act).sum(1, keepdim=True))
    cam = GradCAMPlusPlus(model, model.layer4).attribute(x, target=y)
    assert cam.shape == (2, 1, 2, 2)
    torch.testing.assert_close(cam, expected, rtol=1e-4, atol=1e-6)
    assert expected.max() > 0


def test_gradcampp_zero_gradient_channels_get_zero_weight():
    torch.manual_seed(4)
    model = _Tempered().eval()
    with torch.no_grad():
        model.fc.weight[:, : 2 * 36] = 0  # channels 0 and 1 do not reach the output
    x = torch.randn(2, 3, 6, 6)
    cam = GradCAMPlusPlus(model, model.relu).attribute(
        x, target=1, attr_dim_summation=False, relu_attributions=False
    )
    assert torch.isfinite(cam).all()
    assert torch.equal(cam[:, :2], torch.zeros_like(cam[:, :2]))
    assert cam[:, 2:].abs().sum() > 0


def test_captum_drop_in(resnet18):
    model, x, y = resnet18
    for cls in (LayerCAM, GradCAMPlusPlus):
        explainer = cls(model, model.layer3)
        assert isinstance(explainer, LayerAttribution)
        assert isinstance(explainer, GradientAttribution)
        assert explainer.multiplies_by_inputs is True
        assert explainer.has_convergence_delta() is False
        ref = explainer.attribute(x, target=y)
        with torch.no_grad():
            torch.testing.assert_close(explainer.attribute(x, target=y), ref)
            out = explainer.attribute((x,), target=y)
        assert isinstance(out, tuple)
        torch.testing.assert_close(out[0], ref)
        leaf = x.clone().requires_grad_()
        torch.testing.assert_close(explainer.attribute(leaf, target=y), ref)
        assert leaf.grad is None
        for nt_type in ("smoothgrad", "smoothgrad_sq", "vargrad")[: 3 if cls is LayerCAM else 1]:
            smooth = NoiseTunnel(explainer).attribute(
                x, nt_type=nt_type, nt_samples=2, stdevs=0.05, target=y
            )
            assert smooth.shape == ref.shape and torch.isfinite(smooth).all()
        up = LayerAttribution.interpolate(ref, (64, 64))
        assert up.shape == (2, 1, 64, 64)


def test_additional_forward_args_pass_through():
    torch.manual_seed(5)
    model = _Tempered().eval()
    x = torch.randn(3, 3, 6, 6)
    lc = LayerCAM(model, model.conv)
    base = lc.attribute(x, target=2)
    torch.testing.assert_close(lc.attribute(x, target=2, additional_forward_args=(4.0,)), base / 4)
    assert base.abs().sum() > 0


def test_bad_input_and_model_left_unchanged(resnet18):
    model, x, y = resnet18
    with pytest.raises(ValueError, match="not a submodule"):
        LayerCAM(model, nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="layer4"):
        GradCAMPlusPlus(model, "layer_4")
    with pytest.raises(TypeError, match="needs forward_func to be the nn.Module"):
        LayerCAM(lambda t: model(t), "layer4")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="out of range for a model with 10 outputs"):
        LayerCAM(model, model.layer3).attribute(x, target=10)
    with pytest.raises(ValueError, match="out of range"):
        GradCAMPlusPlus(model, model.layer3).attribute(x, target=torch.tensor([2, 12]))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
