"""Donation: without autograd, a ReLU, a BatchNorm or a sum writes its pair into the tensors of
its first argument where nothing else reads them, and the stabiliser scales a fresh ``s`` in
place. The results are bit for bit those of the out-of-place rules (computed here under
``torch.enable_grad()``, where nothing is donated), and no tensor that anything else holds
(the user's input, a value with two uses, a recorded activation) is written."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import core
from core.absops import eval_batch_norm_
from tests.core_checks import randomise_batchnorm


def _pairs(sm: core.SplitModel, x: torch.Tensor, grad: bool) -> core.Pair:
    with torch.set_grad_enabled(grad):
        p = sm.forward_pairs(x)
    return core.Pair(p.d.detach(), p.s.detach())


def _donees(sm: core.SplitModel, x: torch.Tensor) -> int:
    return sum(step.donee for step in sm.prepare(x).interpreter.steps.values())


def _assert_same(sm: core.SplitModel, x: torch.Tensor) -> None:
    kept = x.clone()
    donated, plain = _pairs(sm, x, False), _pairs(sm, x, True)
    assert torch.equal(donated.d, plain.d)
    assert torch.equal(donated.s, plain.s)
    assert torch.equal(x, kept)  # the user's input is never written


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenet_v2", "vgg11_bn"])
def test_donation_changes_no_bit_on_torchvision_models(name):
    torch.manual_seed(0)
    model = randomise_batchnorm(getattr(torchvision.models, name)(weights=None).eval())
    sm, x = core.split(model), torch.randn(2, 3, 40, 40)
    assert _donees(sm, x) > 0
    _assert_same(sm, x)


@pytest.mark.parametrize("options", [{"stabilizer": "scale", "threshold": 1e-3},
                                     {"stabilizer": "shift", "threshold": 1e-3},
                                     {"merge_batchnorm": True}, {"maxpool": "wta"}])
def test_options_change_no_bit(options):
    """Both stabilisers firing at every unit (in place), BatchNorm merging, max pooling."""
    torch.manual_seed(1)
    model = randomise_batchnorm(torchvision.models.resnet18(weights=None).eval())
    _assert_same(core.split(model, **options), torch.randn(2, 3, 40, 40))


def test_channels_last_and_float64_change_no_bit():
    torch.manual_seed(2)
    model = randomise_batchnorm(torchvision.models.resnet18(weights=None).eval())
    x = torch.randn(2, 3, 40, 40)
    _assert_same(core.split(model), x.to(memory_format=torch.channels_last))
    _assert_same(core.split(model.double()), x.double())


class Shared(nn.Module):
    """Values with several uses: none of them may be written by the rule of one use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))           # two uses: the ReLU below and the sum
        z = F.relu(y) + y
        w = self.bn2(self.conv2(z))
        w = w + w                           # one node, used twice by one call
        v = F.relu(x) + x                   # the input and a value of it
        return w.flatten(1).sum(1, keepdim=True) + v.flatten(1).sum(1, keepdim=True)


def test_values_with_several_uses_are_not_donated():
    torch.manual_seed(3)
    model = randomise_batchnorm(Shared().eval())
    sm, x = core.split(model), torch.randn(2, 3, 6, 6)
    steps = sm.prepare(x).interpreter.steps
    donees = {step.node.name for step in steps.values() if step.donee}
    # bn, bn2: the only use of a convolution; add, add_2: of a ReLU (relu(y) + y: the
    # ReLU's own result is written, not y). Not relu (y has two uses), add_1 (w + w),
    # relu_1 (of the input)
    assert donees == {"bn", "bn2", "add", "add_2"}
    _assert_same(sm, x)
    with torch.no_grad():
        assert torch.allclose(sm.forward_pairs(x).d, model(x), atol=1e-5)


def test_a_recorded_activation_is_not_written_by_the_next_rule():
    torch.manual_seed(4)
    model = randomise_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                              nn.Flatten(), nn.LazyLinear(3)).eval())
    x = torch.randn(2, 3, 7, 7)
    model(x)
    seen = {}
    handle = model[0].register_forward_hook(lambda m, i, o: seen.setdefault("conv", o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    sm = core.split(model)
    probes = sm.sensitivities(x, 0, ["0", "1"], alpha=0.3)
    assert torch.equal(probes["0"].activation, seen["conv"])  # not the BatchNorm's output
    with torch.no_grad():
        assert torch.equal(probes["1"].activation, model[1](seen["conv"]))


@pytest.mark.parametrize("shape", [(4, 5), (2, 5, 7), (2, 5, 4, 3), (2, 5, 2, 3, 2)])
def test_eval_batch_norm_in_place_is_the_batch_norm(shape):
    torch.manual_seed(5)
    x = torch.randn(shape)
    mean, var = torch.randn(5), torch.rand(5) + 0.1
    weight, bias = torch.randn(5), torch.randn(5)
    for w, b in [(weight, bias), (None, None), (weight, None)]:
        expected = F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5)
        y = x.clone()
        assert eval_batch_norm_(y, mean, var, w, b, 1e-5) is y
        assert torch.equal(y, expected)


def test_eval_batch_norm_in_place_refuses_what_its_kernel_cannot_write():
    mean, var = torch.zeros(5), torch.ones(5)
    strided = torch.randn(2, 5, 4, 4).to(memory_format=torch.channels_last)
    before = strided.clone()
    assert eval_batch_norm_(strided, mean, var, None, None, 1e-5) is None
    assert torch.equal(strided, before)
    assert eval_batch_norm_(torch.randn(2, 5).double(), mean, var, None, None, 1e-5) is None


class Units(nn.Module):
    """Activations other than ReLU (fresh results: stabilised in place, donated onwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.leaky, self.six, self.rrelu = nn.LeakyReLU(0.2), nn.ReLU6(), nn.RReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.six(self.bn(self.conv(x)))
        y = self.bn2(F.hardtanh(self.leaky(y), -0.5, 2.0))
        y = torch.abs(self.rrelu(y)) + F.leaky_relu(y, 0.3)
        return F.relu6(y).flatten(1).sum(1, keepdim=True)


def test_other_activations_change_no_bit():
    torch.manual_seed(6)
    model = randomise_batchnorm(Units().eval())
    sm, x = core.split(model, threshold=1e-2), torch.randn(2, 3, 6, 6)
    assert _donees(sm, x) == 3  # bn (of conv), bn2 (of hardtanh), the sum (of abs)
    _assert_same(sm, x)
