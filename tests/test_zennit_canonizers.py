"""SplitLRP with Zennit's canonizers: the modules they add are not the user's model."""

from __future__ import annotations

import warnings

import pytest
import torch
from zennit.attribution import Gradient

from zennit_split import SplitLRP

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, ResNet  # noqa: E402
from zennit.torchvision import ResNetCanonizer  # noqa: E402


def small_resnet() -> ResNet:
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _explain(model, **options):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Gradient(model, SplitLRP(**options)) as attributor:
            _, relevance = attributor(x, torch.eye(5)[[1, 2]])
    training = [w for w in caught if "training mode" in str(w.message)]
    return relevance, training


def test_an_eval_model_with_resnet_canonizer_gets_no_training_warning():
    model = small_resnet()
    _, training = _explain(model, canonizers=[ResNetCanonizer()])
    assert training == []
    assert not any(m.training for m in model.modules())


def test_a_training_model_is_warned_once_at_the_users_line_and_left_as_it_was():
    model = small_resnet().train()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    _, training = _explain(model, canonizers=[ResNetCanonizer()])
    assert len(training) == 1
    assert training[0].filename == __file__
    assert all(m.training for m in model.modules())
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name


def test_resnet_canonizer_keeps_the_even_residual_rule():
    # ResNetCanonizer writes `out += identity` as Sum(torch.stack([identity, out], -1)); the
    # split folds that back into an add (core.graph), so residual="even" still applies
    model = small_resnet()
    even, _ = _explain(model)
    canonized, _ = _explain(model, canonizers=[ResNetCanonizer()])
    proportional, _ = _explain(model, residual="proportional")
    scale = even.abs().max()
    torch.testing.assert_close(canonized, even, rtol=0, atol=1e-5 * scale)
    assert (proportional - even).abs().max() > 1e-2 * scale
