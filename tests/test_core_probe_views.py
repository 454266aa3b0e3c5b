"""A probe whose value is a view of the model's input (``Flatten``, ``unsqueeze``) gets its
gradient: autograd sends a view's gradient to its base, and the probe was refused as if
frozen (found by helper-59)."""

import pytest
import torch
from torch import nn

import core


class _Unsqueeze(nn.Module):
    """A 1-D signal made a one-channel sequence in forward: ``conv(x.unsqueeze(1))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x.unsqueeze(1))).flatten(1))


def _grad_at(head: nn.Module, a: torch.Tensor, target: int) -> torch.Tensor:
    a = a.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(head(a)[:, target].sum(), a)
    return g


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_sensitivities_at_a_flatten_of_the_input(alpha):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(),
                          nn.Linear(5, 2)).double().eval()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    p = core.split(model).sensitivities(x, 1, ["0"], alpha=alpha)["0"]
    assert p.exact
    torch.testing.assert_close(p.grad, _grad_at(model[1:], model[0](x), 1),
                               rtol=1e-10, atol=1e-12)


def test_split_cam_at_the_input_of_a_layer_fed_a_view_of_the_input():
    from captum.attr import LayerGradientXActivation

    from captum_split import SplitCAM

    torch.manual_seed(0)
    model = _Unsqueeze().double().eval()
    x = torch.randn(2, 8, dtype=torch.float64)
    y = torch.tensor([0, 1])
    cam = SplitCAM(model, model.conv, alpha=0.5).attribute(x, target=y,
                                                           attribute_to_layer_input=True)
    gxa = LayerGradientXActivation(model, model.conv).attribute(
        x, target=y, attribute_to_layer_input=True)
    torch.testing.assert_close(cam, gxa.sum(1, keepdim=True) / 2, rtol=1e-10, atol=1e-12)


class _ListInput(nn.Module):
    """A module called with a list of tensors (``torch.cat(ab, 1)`` inside)."""

    def forward(self, ab: list) -> torch.Tensor:
        return torch.cat(ab, 1)


class _TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 3, padding=1)
        self.cat = _ListInput()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = self.cat([torch.relu(self.a(x)), torch.relu(self.b(x))])
        return self.fc(joined.mean((2, 3)))


def test_the_input_of_a_layer_called_with_a_list_is_refused_for_what_it_is():
    # was: "layer 'cat:input' is a module of the model, but its forward never calls it", which
    # is false and names an internal 'cat:input' the user never wrote
    from captum_split import SplitCAM

    model = _TwoBranches().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^SplitCAM: the input of layer 'cat' is not one "
                                         r"tensor .*list or tuple"):
        SplitCAM(model, model.cat).attribute(x, target=0, attribute_to_layer_input=True)
    assert SplitCAM(model, model.cat).attribute(x, target=0).shape == (2, 1, 8, 8)
