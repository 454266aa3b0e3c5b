"""The sensitivities skip work that their backward pass does not need, without changing a bit:
the s values above their deepest probe (mass-linear rules only) and autograd below their
lowest probes (the probes' pairs become leaves)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core
from core.interpreter import SplitInterpreter
from tests.core_checks import randomise_batchnorm

FIELDS = ("activation", "mass", "S", "Dg", "grad")


class Block(nn.Module):
    def __init__(self, gate: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(4)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.bn(self.conv(x)), 0.1)
        if self.gate:
            y = y * y  # a product of two activations: its backward reads s
        return x + y


def _model(gate: bool) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), Block(), nn.MaxPool2d(2),
                          Block(gate), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    return randomise_batchnorm(model.eval())


@pytest.mark.parametrize("alpha", [0.3, "auto"])
def test_skipping_the_mass_above_the_probes_changes_no_bit(monkeypatch, alpha):
    model, x = _model(False), torch.randn(3, 2, 8, 8)
    sm = core.split(model)
    call = sm.prepare(x)
    layers = ["2", "input"]
    free = call.interpreter.mass_free([call.node_of(n) for n in layers])
    assert call.node_of("4") in free and call.node_of("2") not in free
    fast = sm.sensitivities(x, torch.tensor([0, 2, 4]), layers, alpha=alpha)
    monkeypatch.setattr(SplitInterpreter, "mass_free", lambda self, probes: set())
    full = sm.sensitivities(x, torch.tensor([0, 2, 4]), layers, alpha=alpha)
    for layer in layers:
        for field in ("activation", "mass", "S", "Dg", "grad"):
            assert torch.equal(getattr(fast[layer], field), getattr(full[layer], field)), field


def test_a_product_above_the_probe_keeps_the_mass_values():
    model, x = _model(True), torch.randn(2, 2, 8, 8)
    call = core.split(model).prepare(x)
    assert call.interpreter.mass_free([call.node_of("2")]) == set()
    assert call.interpreter.mass_free([call.node_of("5")])  # above the product: skipped


# --------------------------------------------------------------------------- leaves
def _with_and_without_leaves(monkeypatch, sm, x, target, layers, alpha):
    """The probes with the probes as leaves and as the present code computes them (one
    autograd graph from the input), and how many forward passes the former took."""
    runs = []
    run = SplitInterpreter.run

    def counting(self, *args, **kwargs):
        runs.append(1)
        return run(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(SplitInterpreter, "run", counting)
        fast = sm.sensitivities(x, target, layers, alpha=alpha)
    with monkeypatch.context() as patch:
        patch.setattr(SplitInterpreter, "grad_free", lambda self, probes: (set(), set()))
        full = sm.sensitivities(x, target, layers, alpha=alpha)
    return fast, full, len(runs)


def _assert_same_probes(fast, full, layers):
    for layer in layers:
        for mine, theirs in zip(*(p if isinstance(p, tuple) else (p,)
                                  for p in (fast[layer], full[layer])), strict=True):
            for field in FIELDS:
                assert torch.equal(getattr(mine, field), getattr(theirs, field)), (layer, field)
            assert mine.alphas.keys() == theirs.alphas.keys()


def _torchvision(name):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    return randomise_batchnorm(getattr(tvm, name)(weights=None).eval())


def _timm(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return randomise_batchnorm(timm.create_model(name, pretrained=False, num_classes=10).eval())


LEAF_CASES = [
    ("resnet18", _torchvision, ["layer2"]),
    ("resnet18", _torchvision, ["layer2", "layer3.0.conv1"]),  # one probe above the other
    ("vgg11_bn", _torchvision, ["features.14"]),
    ("densenet121", _torchvision, ["features.denseblock2"]),
    ("mobilenet_v2", _torchvision, ["features.7", "features.3"]),
    ("shufflenet_v2_x1_0", _torchvision, ["stage3"]),
    ("googlenet", _torchvision, ["inception4a"]),
    ("resnet18d", _timm, ["layer2"]),
    ("dla34", _timm, ["level3"]),
]


@pytest.mark.parametrize("alpha", [0.4, "auto"])
@pytest.mark.parametrize("name,build,layers", LEAF_CASES,
                         ids=[f"{c[0]}-{len(c[2])}" for c in LEAF_CASES])
def test_probes_as_leaves_change_no_bit(monkeypatch, name, build, layers, alpha):
    model = build(name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sm = core.split(model)
    call = sm.prepare(x)
    leaves, detached = call.interpreter.grad_free([call.node_of(n) for n in layers])
    assert leaves and len(detached) > len(leaves)  # the test is not vacuous
    fast, full, runs = _with_and_without_leaves(monkeypatch, sm, x, torch.tensor([1, 7]),
                                                layers, alpha)
    assert runs == 1
    _assert_same_probes(fast, full, layers)


class Half(nn.Module):
    def forward(self, parts: tuple) -> torch.Tensor:
        return parts[0]  # an element of a tuple: the tensor of the tuple's node


class Shared(nn.Module):
    """Probes whose tensors are also the values of nodes they depend on: an identity
    module whose input also feeds a residual sum, and an element of a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.first = Half()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.conv(x))
        y = F.relu(self.drop(z)) + z  # the gradient at drop's tensor is the one at z's
        parts = y.chunk(2, dim=1)
        return self.fc(torch.cat([self.first(parts), parts[0]], dim=1).mean((2, 3)))


@pytest.mark.parametrize("layers,runs", [(["drop"], 2), (["first"], 2), (["conv", "drop"], 1)])
def test_a_probe_that_shares_its_tensor_runs_without_leaves(monkeypatch, layers, runs):
    torch.manual_seed(0)
    model, x = Shared().eval(), torch.randn(2, 2, 6, 6)
    sm = core.split(model)
    fast, full, taken = _with_and_without_leaves(monkeypatch, sm, x, 2, layers, 0.3)
    assert taken == runs  # a shared tensor: the forward runs again without leaves
    _assert_same_probes(fast, full, layers)
