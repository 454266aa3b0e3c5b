"""SplitCAM on models shaped like the helper models of Captum's LayerGradCam tests (issue 11).

Captum's ``tests/attr/layer/test_grad_cam.py`` runs ten cases on small helper models with
optional forward arguments (``forward(self, x, x2=None)``, ``add_input=None``,
``multidim_output=False``), two-tensor inputs, a module with a tuple output, frozen
parameters, layer inputs and ReLU'd attributions. These models are written here from that
contract (not copied); the expected values are the exact identity SplitCAM states: at
``alpha=0.5``, stream ``g``, no sign, SplitCAM is half of ``LayerGradientXActivation`` summed
over channels (ReLU'd after, with ``relu_attributions``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradientXActivation
from torch import nn

from captum_split import SplitCAM


class PairRelu(nn.Module):
    """Two inputs, two outputs: a module with a tuple output."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.relu(a), F.relu(b)


class ThreeLayer(nn.Module):
    """An MLP with an optional added input and an output-shape flag."""

    def __init__(self, pair_module: bool = False) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.linear0 = nn.Linear(3, 3)
        self.linear1 = nn.Linear(3, 4)
        self.pair_module = pair_module
        self.pair = PairRelu()
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(4, 2)
        with torch.no_grad():  # positive hidden units for positive inputs
            self.linear0.weight.abs_()
            self.linear1.weight.abs_()

    def forward(self, x, add_input=None, multidim_output: bool = False):
        if add_input is not None:
            x = x + add_input
        hidden = self.linear1(self.linear0(x))
        if self.pair_module:
            first, second = self.pair(hidden, self.relu(hidden) - 0.5)
            hidden = first + second
        else:
            hidden = self.relu(hidden)
        out = self.linear2(hidden)
        if multidim_output:
            return torch.stack([out, 2 * out], dim=1)
        return out


class OneConv(nn.Module):
    """One convolution, a ReLU and a linear head; an optional second input is added."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.relu1 = nn.ReLU()
        self.fc1 = nn.Linear(8, 4)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x, x2=None):
        if x2 is not None:
            x = x + x2
        x = self.relu1(self.conv1(x))
        x = x.view(-1, 8)
        return self.fc2(self.relu2(self.fc1(x)))


def _frozen() -> OneConv:
    model = OneConv()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _negative_input() -> torch.Tensor:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    x[0, 0, 1, 1] = -4.0
    return x


_IMAGE = torch.arange(16.0).view(1, 1, 4, 4)
CASES = {
    "non_conv": (ThreeLayer, "linear0", torch.tensor([[0.0, 100.0, 0.0]]), {}),
    "tuple_output_module": (lambda: ThreeLayer(pair_module=True), "pair",
                            torch.tensor([[0.0, 6.0, 0.0]]), {}),
    "conv": (OneConv, "conv1", _IMAGE, {}),
    "conv_no_grad": (_frozen, "conv1", _IMAGE, {}),
    "conv_relu": (OneConv, "relu1", _IMAGE, {}),
    "conv_layer_input": (OneConv, "conv1", _negative_input(),
                         {"attribute_to_layer_input": True}),
    "conv_layer_input_relu": (OneConv, "conv1", _negative_input(),
                              {"attribute_to_layer_input": True, "relu_attributions": True}),
    "two_inputs": (OneConv, "conv1", (_IMAGE, torch.ones(1, 1, 4, 4)), {}),
    "additional_input": (ThreeLayer, "linear1", torch.tensor([[1.0, -2.0, 3.0]]),
                         {"additional_forward_args": (torch.tensor([[0.5, 0.5, -4.0]]),)}),
    "flag_argument": (ThreeLayer, "relu", torch.tensor([[2.0, -1.0, 5.0]]),
                      {"additional_forward_args": (None, False)}),
}


def _tuple(v):
    return v if isinstance(v, tuple) else (v,)


@pytest.mark.parametrize("case", list(CASES))
def test_splitcam_is_half_gradient_times_activation_on_captum_style_models(case):
    make, layer_name, inputs, options = CASES[case]
    model = make().eval()
    layer = model.get_submodule(layer_name)
    relu = options.get("relu_attributions", False)
    gxa_options = {k: v for k, v in options.items() if k != "relu_attributions"}
    expected = LayerGradientXActivation(model, layer).attribute(inputs, target=0,
                                                                **gxa_options)
    cam = SplitCAM(model, layer, alpha=0.5).attribute(inputs, target=0, **options)
    got, want = _tuple(cam), _tuple(expected)
    assert len(got) == len(want), case
    for g, w in zip(got, want, strict=True):
        w = 0.5 * w.sum(1, keepdim=True)
        if relu:
            w = torch.relu(w)
        assert g.shape == w.shape, case
        torch.testing.assert_close(g, w.detach(), rtol=1e-5, atol=1e-5 * float(w.abs().max()))
    assert float(sum(g.abs().sum() for g in got)) > 0, f"{case}: an all-zero map tests nothing"
