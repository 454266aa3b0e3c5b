"""The adapters (captum_split, zennit_split, quantus_adapters.explain) on real architectures.

Found by running SplitCAM, SplitGrad and SplitLRP over torchvision and timm models with
random weights; each test is one bug, on a small representative model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import core
import quantus_adapters
from captum_split import SplitCAM

torchvision = pytest.importorskip("torchvision")


class AuxHead(nn.Module):
    """A classifier whose last convolution (in ``named_modules()`` order) belongs to an
    auxiliary head that only runs in training mode, as GoogLeNet's ``aux2`` and Inception-v3's
    ``AuxLogits``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)
        self.aux = nn.Conv2d(4, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(x))
        out = self.fc(torch.relu(self.conv2(a)).mean((2, 3)))
        if self.training:
            return out + self.aux(a).mean((2, 3))
        return out


@pytest.mark.parametrize("method", ["SplitCAM", "GradCAM", "LayerCAM", "GradCAMPlusPlus"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.filterwarnings("ignore:AuxHead is in training mode")
def test_default_cam_layer_is_a_convolution_that_runs(method: str, train: bool) -> None:
    # the default layer was the last convolution in named_modules() order, 'aux', which
    # the eval forward never calls: SplitCAM raised "layer 'aux' ... never calls it", the
    # Captum CAMs failed inside Captum. It is now the last convolution that the forward runs.
    torch.manual_seed(0)
    model = AuxHead().train(train)
    x, y = torch.randn(2, 3, 8, 8), np.array([1, 3])
    got = quantus_adapters.explain(model, x, y, method=method)
    want = quantus_adapters.explain(model, x, y, method=method, layer="conv2")
    assert got.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(got, want)


def test_default_cam_layer_googlenet() -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model("googlenet", weights=None, init_weights=False).eval()
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1] == "aux2.conv.conv"
    x, y = torch.randn(2, 3, 64, 64), np.array([1, 2])
    for method in ("SplitCAM", "GradCAM"):
        got = quantus_adapters.explain(model, x, y, method=method)
        want = quantus_adapters.explain(model, x, y, method=method,
                                        layer="inception5b.branch4.1.conv")
        assert got.shape == (2, 1, 64, 64) and np.isfinite(got).all()
        np.testing.assert_array_equal(got, want)


class PooledConvHead(nn.Module):
    """Features, global pooling, then a 1x1 convolution as the classifier (timm's DLA ``fc``,
    DPN ``classifier``): the last convolution outputs ``(B, C, 1, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Conv2d(6, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(a.mean((2, 3), keepdim=True)).flatten(1)


@pytest.mark.parametrize("method", ["SplitCAM", "GradCAM", "LayerCAM", "GradCAMPlusPlus"])
def test_default_cam_layer_is_not_a_classifier_on_pooled_features(method: str) -> None:
    # the default was the classifier 'fc' on the pooled (B, 6, 1, 1) features: the map was
    # one value per image, upsampled to a constant over every image. It is now the last
    # convolution with more than one spatial position, 'conv2'.
    torch.manual_seed(0)
    model = PooledConvHead().eval()
    x, y = torch.randn(2, 3, 8, 8), np.array([1, 3])
    got = quantus_adapters.explain(model, x, y, method=method)
    want = quantus_adapters.explain(model, x, y, method=method, layer="conv2")
    np.testing.assert_array_equal(got, want)
    assert (got.reshape(2, -1).std(1) > 0).all()


def test_default_cam_layer_timm_dla() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("dla46_c", pretrained=False).eval()
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1] == "fc"
    x, y = torch.randn(2, 3, 64, 64), np.array([1, 2])
    got = quantus_adapters.explain(model, x, y, method="SplitCAM")
    want = quantus_adapters.explain(model, x, y, method="SplitCAM", layer="level5.root.conv")
    np.testing.assert_array_equal(got, want)
    assert (got.reshape(2, -1).std(1) > 1e-3 * np.abs(got).max()).all()


class _SqueezeExcite(nn.Module):
    """A ReLU convolution scaled by a sigmoid gate whose ``fc`` sees only pooled values."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c(x))
        a = a * torch.sigmoid(self.fc(a.mean((2, 3), keepdim=True)))
        return self.head(a.mean((2, 3)))


def test_a_layer_that_reaches_the_output_only_through_a_frozen_gate_is_refused():
    # the SE block's fc under nonlinear="freeze" (regnet_y, rexnet, tresnet): was torch's
    # "element 0 of tensors does not require grad and does not have a grad_fn", also as
    # "SplitCAM: element 0 ..." / "SplitGrad: ..."
    torch.manual_seed(0)
    model, x = _SqueezeExcite().eval(), torch.randn(2, 3, 8, 8)
    sm = core.split(model, nonlinear="freeze")
    for layers in (["fc"], ["c", "fc"]):
        with pytest.raises(core.UnsupportedOperation, match="'fc' reaches the model's output "
                           "only through operations frozen"):
            sm.sensitivities(x, torch.tensor([0, 1]), layers)
    with pytest.raises(core.UnsupportedOperation, match="^SplitCAM: 'fc' reaches"):
        SplitCAM(model, model.fc, nonlinear="freeze").attribute(x, target=0)
    probe = sm.sensitivities(x, torch.tensor([0, 1]), ["c"])["c"]  # the scaled path is split
    assert torch.isfinite(probe.g).all() and probe.g.abs().sum() > 0
