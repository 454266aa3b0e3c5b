"""The LRP baseline on a wrapped torchvision ResNet canonizes its residual adds too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zennit_split import lrp_gamma

torchvision = pytest.importorskip("torchvision")


class _Wrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _small_resnet() -> nn.Module:
    torch.manual_seed(0)
    block = torchvision.models.resnet.BasicBlock
    model = torchvision.models.ResNet(block, [1, 1, 1, 1], num_classes=5).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("wrap", [_Wrapper, lambda net: nn.Sequential(nn.Identity(), net)])
def test_lrp_of_a_wrapped_resnet_is_that_of_the_resnet(wrap):
    # the canonizer was chosen by the root's type: a wrapped ResNet's residual adds got the
    # plain gradient, which copies the relevance into both branches (ResNet-18: 0.86 -> 192)
    model = _small_resnet()
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 3])
    plain = lrp_gamma(model, x, target)
    wrapped = lrp_gamma(wrap(model).eval(), x, target)
    assert plain.sum((1, 2, 3)).abs().max() < 1.5  # one-hot seed: at most about 1 per sample
    torch.testing.assert_close(wrapped, plain)
