"""SplitLRP through Zennit with core's computation: conservation, the explicit reference,
layers, real architectures, the randomisation sanity check."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zennit.attribution import Gradient

import core
import core.zoo
from tests.lrp_reference import Residual, reference_forward, reference_split_lrp
from zennit_split import SplitLRP, split_lrp


def mlp(bias: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(16, 10, bias=bias)]
    if bias:
        layers.append(nn.BatchNorm1d(10))
    layers += [nn.ReLU(), nn.Linear(10, 8, bias=bias), nn.ReLU(), nn.Linear(8, 4, bias=bias)]
    return nn.Sequential(*layers)


def cnn(bias: bool = True) -> nn.Module:
    bn = [nn.BatchNorm2d(4)] if bias else []
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=bias), *bn, nn.ReLU(), nn.MaxPool2d(2),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=bias), nn.ReLU())),
        nn.Conv2d(4, 6, 3, stride=2, bias=bias), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3, bias=bias),
    )


def prepared(make, bias: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = make(bias)
    for module in model.modules():   # non-trivial BatchNorm statistics
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                module.weight.uniform_(-1.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def inputs_for(make, scale: float = 1.0, batch: int = 3) -> torch.Tensor:
    shape = (batch, 16) if make is mlp else (batch, 3, 10, 10)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)) * scale


def chain_layers(model: nn.Module) -> list[str]:
    """Names of the top-level modules (every one lies on the single path of the model)."""
    return [name for name, _ in model.named_children()]


OPTIONS = [
    {"maxpool": "wta", "stabilizer": "scale"},
    {"maxpool": "wta", "stabilizer": "scale", "activation_rule": "wta"},
    {"maxpool": "convex", "stabilizer": "scale"},
    {"maxpool": "wta", "stabilizer": "none"},
    {"maxpool": "wta", "stabilizer": "shift"},
    {"maxpool": "wta", "stabilizer": "scale", "input_split": "half"},
    {"maxpool": "wta", "stabilizer": "scale", "residual": "proportional"},
]


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o.values()))
def test_conservation_at_every_layer(make, options):
    model = prepared(make, bias=False)
    x = inputs_for(make, scale=30.0)           # large enough for the stabilisers to act
    targets = torch.tensor([0, 2, 1])
    layers = ["input", *chain_layers(model)]
    rel = split_lrp(model, x, targets, layers, **options)
    for name in layers:
        total = (rel[name].pos + rel[name].neg).flatten(1).sum(1)
        torch.testing.assert_close(total, torch.ones(3), rtol=1e-4, atol=1e-4,
                                   msg=f"relevance not conserved at {name!r}")
        torch.testing.assert_close(rel[name].comb, rel[name].pos - rel[name].neg)


def test_seeding_with_the_positive_output_gives_the_papers_total():
    model = prepared(cnn, bias=False)
    x = inputs_for(cnn)
    g, _ = core.split(model, maxpool="wta", merge_batchnorm=True)(x)
    seed = torch.zeros_like(g)
    seed[:, 1] = g[:, 1]
    with Gradient(model, SplitLRP(stream="pos")) as attributor:
        attributor(x, seed)
    rel = attributor.composite.relevance["input"]
    total = (rel.pos + rel.neg).flatten(1).sum(1)
    torch.testing.assert_close(total, g[:, 1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o.values()))
def test_equals_the_explicit_reference(make, options):
    model = prepared(make, bias=True).double()
    x = inputs_for(make, scale=30.0).double()
    seed = torch.randn(3, 4 if make is mlp else 3, dtype=torch.float64)
    layers = ["input", *chain_layers(model)]
    if make is mlp:
        layers.remove("1")      # the BatchNorm merged into "0": its output is "0"'s
    ref_options = {("maxout" if k == "activation_rule" else k): v for k, v in options.items()}
    ref_options.setdefault("residual", "even")
    ref = reference_split_lrp(model, x, seed, epsilon=1e-6, **ref_options)
    split_options = {k: v for k, v in options.items()
                     if k not in ("activation_rule", "residual")}
    ap, an, _ = reference_forward(model, x, **split_options)
    composite = SplitLRP(stream="comb", layer=layers[1:], **options)
    with Gradient(model, composite) as attributor:
        _, comb = attributor(x, seed)
    got = composite.relevance
    scale = ref["input"].pos.abs().max()
    for name in layers:
        for stream in ("pos", "neg"):
            torch.testing.assert_close(
                getattr(got[name], stream), getattr(ref[name], stream),
                rtol=1e-7, atol=1e-9 * scale, msg=f"{stream} relevance differs at {name!r}",
            )
    torch.testing.assert_close(comb, ref["input"].comb, rtol=1e-7, atol=1e-9 * scale)
    g, h = core.split(model, merge_batchnorm=True, **split_options)(x)
    torch.testing.assert_close(g, ap, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h, an, rtol=1e-9, atol=1e-9)


def test_float32_matches_the_float64_reference():
    model = prepared(cnn, bias=True)
    x = inputs_for(cnn)
    seed = torch.eye(3)[[0, 1, 2]]
    with Gradient(model, SplitLRP()) as attributor:
        _, rel = attributor(x, seed)
    ref = reference_split_lrp(model, x, seed)["input"].pos
    torch.testing.assert_close(rel.double(), ref, rtol=1e-3, atol=1e-5 * ref.abs().max())
    assert rel.dtype == torch.float32


def test_layer_relevance_of_a_named_module():
    model = prepared(cnn, bias=True)
    x = inputs_for(cnn)
    rel = split_lrp(model, x, 2, ["4.body.0", "5", "input"])
    assert rel["5"].pos.shape == (3, 6, 1, 1)
    assert rel["4.body.0"].neg.shape == (3, 4, 4, 4)
    ref = reference_split_lrp(model, x, torch.eye(3)[[2, 2, 2]])
    for name in ("4.body.0", "5", "input"):
        torch.testing.assert_close(rel[name].pos.double(), ref[name].pos,
                                   rtol=1e-3, atol=1e-5 * ref[name].pos.abs().max())


def _finite_nonzero(rel: torch.Tensor) -> None:
    assert torch.isfinite(rel).all()
    assert rel.abs().sum() > 0


def test_vgg16_small_input():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vgg16(num_classes=10).eval()
    x = torch.rand(1, 3, 32, 32)
    rel = split_lrp(model, x, 3, ["input", "features.26"])
    _finite_nonzero(rel["input"].pos)
    _finite_nonzero(rel["features.26"].pos)
    assert rel["features.26"].pos.shape == (1, 512, 2, 2)


def test_resnet18_small():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    composite = SplitLRP(stream="comb", layer="layer2.1")
    with Gradient(model, composite) as attributor:
        _, rel = attributor(x, torch.eye(10)[[7]])
    _finite_nonzero(rel)
    assert rel.shape == x.shape
    _finite_nonzero(composite.relevance["layer2.1"].neg)


def test_resnet20_asset():
    model = core.zoo.resnet20(pretrained=True)
    images, labels = core.zoo.cifar10_samples()
    x = core.zoo.normalize_cifar(images[:2])
    rel = split_lrp(model, x, labels[:2], ["input", "layer3.2"])
    _finite_nonzero(rel["input"].comb)
    _finite_nonzero(rel["layer3.2"].pos)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra = a.flatten(1).argsort(1).argsort(1).double()
    rb = b.flatten(1).argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def test_randomisation_sanity_check_is_computable():
    model = core.zoo.resnet20(pretrained=True)
    before = copy.deepcopy(model.state_dict())
    images, labels = core.zoo.cifar10_samples()
    x, y = images[2:3], labels[2:3]
    maps = split_lrp(model, x, y)["input"].pos.sum(1)
    randomised = copy.deepcopy(model)
    layers = [m for m in randomised.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-3:]
    torch.manual_seed(0)
    for layer in layers:
        nn.init.normal_(layer.weight, std=0.1)
    maps_random = split_lrp(randomised, x, y)["input"].pos.sum(1)
    _finite_nonzero(maps_random)
    assert not torch.allclose(maps, maps_random)
    rho = _spearman(maps, maps_random)
    assert torch.isfinite(rho).all() and (rho.abs() <= 1 + 1e-9).all()
    for key, value in model.state_dict().items():   # the original is untouched
        assert torch.equal(value, before[key])


def test_unsupported_module_is_named_and_model_left_clean():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    x = torch.randn(2, 4)
    with pytest.raises(core.UnsupportedOperation, match="Tanh"):
        with Gradient(model, SplitLRP()) as attributor:
            attributor(x, torch.eye(2)[[0, 1]])
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())


def test_context_with_plain_autograd():
    model = prepared(cnn, bias=True)
    x = inputs_for(cnn).requires_grad_()
    seed = torch.eye(3)[[2, 0, 1]]
    with SplitLRP(stream="neg").context(model) as hooked:
        (rel,) = torch.autograd.grad(hooked(x), x, seed)
    expected = split_lrp(model, x.detach(), seed, ["input"])["input"].neg
    torch.testing.assert_close(rel, expected)


def test_activation_rules_at_a_neuron_with_zero_positive_preactivation():
    # x = (1, -1): the first hidden neuron has z+ = 0, z- = 2, so a+ = max(z+, z-) = 2
    # (float64: in float32 core's (d, s)-form rule loses precision next to such a neuron)
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    model = model.double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-1.0, 1.0], [1.0, 1.0]]))
        model[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
    x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    totals = {}
    for rule in ("pass", "wta"):
        rel = split_lrp(model, x, torch.ones(1, 1, dtype=torch.float64), ["input", "1"],
                        stabilizer="none", activation_rule=rule)
        torch.testing.assert_close(rel["1"].pos, torch.tensor([[2 / 3, 1 / 3]]).double(),
                                   rtol=1e-5, atol=0)
        totals[rule] = float((rel["input"].pos + rel["input"].neg).sum())
    # "pass" hands a+'s relevance to z+ = 0, where it is lost; "wta" hands it to z-
    assert totals["pass"] == pytest.approx(1 / 3, rel=1e-5)
    assert totals["wta"] == pytest.approx(1.0, rel=1e-5)


def test_several_inputs_are_refused_with_core_named():
    """Zennit's attributors pass one input tensor: split_lrp given a tuple (was
    AttributeError 'tuple' object has no attribute 'shape') and layer 'input:1' (was 'not a
    module of the model') are one ValueError each, naming core's relevance, which takes
    several inputs."""
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.fc = nn.Linear(4, 5), nn.Linear(3, 5), nn.Linear(5, 2)

        def forward(self, x1, x2):
            return self.fc(torch.relu(self.a(x1)) + torch.relu(self.b(x2)))

    model = TwoInputs().eval()
    x1, x2 = torch.randn(2, 4), torch.randn(2, 3)
    fix = r"one input tensor; .*core\.split\(model\)\.relevance\(\(x1, x2\)"
    for inputs in ((x1, x2), [x1, x2]):
        with pytest.raises(ValueError, match=r"split_lrp got a \w+ of 2 inputs.*" + fix) as err:
            split_lrp(model, inputs, 0)
        assert "\n" not in str(err.value)
    for layers in ("input:1", ["input", "input:0"]):
        with pytest.raises(ValueError, match="names an input of several.*" + fix):
            split_lrp(model, x1, 0, layers)
    with pytest.raises(ValueError, match="'input:1' names an input of several.*" + fix):
        with Gradient(model, SplitLRP(layer="input:1")):
            pass
    rel = core.split(model).relevance((x1, x2), torch.eye(2)[[0, 1]])  # what it names
    assert len(rel["input"]) == 2
