"""Constants derived from a module's tensors (a BatchNorm's ``|k|`` and ``|t|``) are kept
between calls (:data:`core.derived.DERIVED`) and never used stale: a statistic written in
place, a parameter replaced by another object, new values through ``.data`` (torch's version
counter does not see them), a forward in training mode (which updates the running
statistics without the version counter either), a merged bias changed, a model moved to
another dtype all give the values of a split made afresh."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import core
from core.derived import DERIVED, Derived
from tests.core_checks import randomise_batchnorm


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    model(torch.rand(1, 3, 9, 9))
    randomise_batchnorm(model)
    return model.eval()


def _s(model: nn.Module, x: torch.Tensor, **options) -> torch.Tensor:
    return core.split(model, **options).forward_pairs(x).s


def _fresh_s(model: nn.Module, x: torch.Tensor, **options) -> torch.Tensor:
    """The mass of a split that cannot see any kept constant (a copy of the model)."""
    import copy

    twin = copy.deepcopy(model)
    return core.split(twin, reuse_capture=False, **options).forward_pairs(x).s


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("change", ["in_place", "new_object", "data", "data_in_place",
                                    "training_forward", "merged_bias"])
def test_a_changed_batchnorm_is_never_served_stale(change, merge):
    model, x = _model(), torch.rand(2, 3, 9, 9)
    before = _s(model, x, merge_batchnorm=merge)
    bn = model[1]
    with torch.no_grad():
        if change == "in_place":
            bn.running_var.mul_(4.0)
        elif change == "new_object":
            bn.weight = nn.Parameter(bn.weight.detach() * -3.0)
        elif change == "data":
            bn.bias.data = bn.bias.data + 2.0
        elif change == "data_in_place":
            bn.running_mean.data.add_(0.5)
        elif change == "training_forward":
            model.train()
            model(torch.rand(4, 3, 9, 9) * 5.0)
            model.eval()
        else:
            model[0].bias.add_(1.5)
    after = _s(model, x, merge_batchnorm=merge)
    assert not torch.equal(before, after)
    assert torch.equal(after, _fresh_s(model, x, merge_batchnorm=merge))


def test_kept_constants_follow_a_dtype_change_and_the_merge_option():
    model, x = _model(), torch.rand(2, 3, 9, 9)
    plain, merged = _s(model, x), _s(model, x, merge_batchnorm=True)
    assert torch.equal(_s(model, x), plain)  # served again, the same bits
    assert torch.equal(_s(model, x, merge_batchnorm=True), merged)
    model.double()
    s64 = _s(model, x.double())
    assert s64.dtype == torch.float64
    assert torch.equal(s64, _fresh_s(model, x.double()))


def test_an_entry_goes_with_its_module():
    store, calls = Derived(), []

    def use(module: nn.Module) -> torch.Tensor:
        var = module.running_var
        return store.get(module, "k", (var,), lambda: calls.append(1) or var.abs())

    module = nn.BatchNorm1d(3)
    use(module)
    use(module)
    assert len(calls) == 1
    with torch.no_grad():
        module.running_var.add_(1.0)
    assert torch.equal(use(module), torch.full((3,), 2.0))
    assert len(calls) == 2 and module in store
    module.running_var.data.mul_(2.0)  # not seen by the version counter
    assert torch.equal(use(module), torch.full((3,), 4.0))
    module.running_var.data[0] = float("nan")  # never equal to itself: computed each time
    use(module)
    use(module)
    assert len(calls) == 5
    del module
    gc.collect()
    assert len(store) == 0


def test_a_split_keeps_constants_per_batchnorm_of_the_model():
    model, x = _model(), torch.rand(1, 3, 9, 9)
    core.split(model).forward_pairs(x)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bn in DERIVED for bn in bns)
