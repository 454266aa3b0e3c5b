"""The canonizer of the bundled ResNet-20's blocks, and the LRP baseline that chooses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.layer import Sum

import core.zoo
import zennit_split.helpers
from zennit_split import gamma_composite, lrp_gamma
from zennit_split.canonizers import CifarBasicBlockCanonizer, CifarResNetCanonizer

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
              "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@pytest.fixture(scope="module")
def samples():
    x, y = core.zoo.cifar10_samples()
    return core.zoo.normalize_cifar(x[:2]), y[:2]


def _snapshot(model: nn.Module) -> dict:
    """Everything of the model the canonizer must leave as it was."""
    return {
        "modules": [(name, m) for name, m in model.named_modules()],
        "params": [(name, p, p.detach().clone()) for name, p in model.named_parameters()],
        "buffers": [(name, b.clone()) for name, b in model.named_buffers()],
        "vars": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "hooks": sum(len(getattr(m, d, {})) for m in model.modules() for d in HOOK_DICTS),
        "training": [m.training for m in model.modules()],
        "bn_eps": [m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"]  # no canonizer_sum submodule left
    assert after["vars"] == before["vars"]  # no instance forward left
    assert [(n, id(p)) for n, p, _ in after["params"]] == [
        (n, id(p)) for n, p, _ in before["params"]]
    for (name, _, now), (_, _, then) in zip(after["params"], before["params"], strict=True):
        assert torch.equal(now, then), name
    for (name, now), (_, then) in zip(after["buffers"], before["buffers"], strict=True):
        assert torch.equal(now, then), name
    assert after["hooks"] == before["hooks"] == 0
    assert after["training"] == before["training"]
    assert after["bn_eps"] == before["bn_eps"]
    for block in model.modules():
        if isinstance(block, core.zoo.BasicBlock):
            assert "forward" not in vars(block)
            assert block.forward.__func__ is core.zoo.BasicBlock.forward


def test_the_block_canonizer_routes_each_residual_add_through_a_sum_with_the_same_output(
        samples):
    x, _ = samples
    model = core.zoo.resnet20()
    with torch.no_grad():
        reference = model(x)
    before = _snapshot(model)
    seen = []
    with Gradient(model, gamma_composite(canonizers=[CifarBasicBlockCanonizer()])):
        sums = [m for m in model.modules() if isinstance(m, Sum)]
        handles = [s.register_forward_hook(lambda *_: seen.append(1)) for s in sums]
        with torch.no_grad():
            canonized = model(x)
        for handle in handles:
            handle.remove()
    assert len(sums) == 9 and len(seen) == 9  # every block's add, through its Sum
    assert torch.equal(canonized, reference)  # a sum of two rounds once, like the add
    _assert_unchanged(model, before)


def test_the_resnet_canonizer_merges_batchnorm_with_the_output_kept_and_undone(samples):
    x, _ = samples
    model = core.zoo.resnet20()
    with torch.no_grad():
        reference = model(x)
    before = _snapshot(model)
    with Gradient(model, gamma_composite(canonizers=[CifarResNetCanonizer()])):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 19 and all(m.bias is not None for m in convs)  # BatchNorm merged
        assert sum(isinstance(m, Sum) for m in model.modules()) == 9
        with torch.no_grad():
            canonized = model(x)
    # float rounding of the merged weights (zennit 0.5.1 also keeps each merged BatchNorm's
    # eps, a factor 1 - 5e-6 per layer): 2.3e-5 of the largest logit, the same as with
    # SequentialMergeBatchNorm alone
    scale = reference.abs().max()
    torch.testing.assert_close(canonized, reference, rtol=0, atol=1e-4 * scale)
    # the block canonizer is undone here; the BatchNorm merge is Zennit's own, which in
    # zennit 1.0 leaves the merged tensors behind after a bare Gradient context (splitxai's
    # lrp_gamma puts them back): the whole model is checked through lrp_gamma
    assert sum(isinstance(m, Sum) for m in model.modules()) == 0
    for block in model.modules():
        if isinstance(block, core.zoo.BasicBlock):
            assert "forward" not in vars(block) and "canonizer_sum" not in vars(block)
    fresh = core.zoo.resnet20()
    before = _snapshot(fresh)
    lrp_gamma(fresh, x, 3)
    _assert_unchanged(fresh, before)


def test_default_canonizers_find_the_blocks_also_wrapped():
    choose = zennit_split.helpers._default_canonizers
    model = core.zoo.resnet20(pretrained=False)
    for wrapped in (model, nn.Sequential(nn.Identity(), model)):
        (canonizer,) = choose(wrapped)
        assert isinstance(canonizer, CifarResNetCanonizer)
    (plain,) = choose(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert type(plain) is SequentialMergeBatchNorm
    torchvision = pytest.importorskip("torchvision")
    from zennit.torchvision import ResNetCanonizer

    both = nn.Sequential(torchvision.models.resnet18(), model)
    assert [type(c) for c in choose(both)] == [ResNetCanonizer, CifarBasicBlockCanonizer]


def test_lrp_baseline_on_resnet20_conserves_relevance_and_leaves_the_model(samples):
    # the in-place `out += shortcut(x)` passed the plain gradient, which copies the relevance
    # into both branches: per-image sums of 8.1 - 13.2 for a one-hot seed; with the canonizer
    # 0.13 - 0.45 (the biases of the merged BatchNorms take the rest)
    x, y = samples
    model = core.zoo.resnet20()
    before = _snapshot(model)
    relevance = lrp_gamma(model, x, y)
    sums = relevance.sum((1, 2, 3))
    assert ((sums > 0.05) & (sums < 1.0)).all(), sums
    _assert_unchanged(model, before)
    wrapped = lrp_gamma(nn.Sequential(nn.Identity(), model).eval(), x, y)
    torch.testing.assert_close(wrapped, relevance)


def test_quantus_method_lrp_gets_the_canonizer_too(samples):
    quantus_adapters = pytest.importorskip("quantus_adapters")
    x, y = samples
    model = core.zoo.resnet20()
    maps = quantus_adapters.explain(model, x.numpy(), y.numpy(), method="LRP")
    sums = maps.reshape(len(maps), -1).sum(1)  # summed over channels: the same totals
    assert ((sums > 0.05) & (sums < 1.0)).all(), sums
