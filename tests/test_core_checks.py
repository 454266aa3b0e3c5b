"""The shared argument checks of core.checks, and that core and the adapters use them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import core
from core import checks


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return _Net().eval()


# --------------------------------------------------------------------------- options
def test_option_accepts_and_returns_the_value() -> None:
    assert checks.option("maxpool", "wta", ("convex", "wta")) == "wta"
    assert checks.option("sign", None, (None, "+", "-")) is None


@pytest.mark.parametrize("value", ["WTA", "", None, 1, ["wta"], torch.tensor(1.0)])
def test_option_refuses_with_the_name_and_the_choices(value) -> None:
    with pytest.raises(ValueError, match=r"SplitLRP: maxpool=.* is not one of 'convex', 'wta'"):
        checks.option("maxpool", value, ("convex", "wta"), "SplitLRP")


def test_option_no_coercion_between_types() -> None:
    with pytest.raises(ValueError):
        checks.option("k", True, (1, 2))
    with pytest.raises(ValueError):
        checks.option("sign", "None", (None, "+"))


# --------------------------------------------------------------------------- layers
def test_layer_name_by_module_and_by_name(net) -> None:
    assert checks.layer_name(net, net.head) == "head"
    assert checks.layer_name(net, "features.0") == "features.0"
    assert checks.layer_name(net, None, allow_input=True) == "input"
    assert checks.layer_name(net, "", allow_input=True) == "input"


def test_layer_name_suggests_close_names(net) -> None:
    with pytest.raises(ValueError, match=r"LRP: layer 'feature.0' .* Did you mean 'features.0'"):
        checks.layer_name(net, "feature.0", "LRP")
    with pytest.raises(ValueError) as err:
        checks.layer_name(net, "zzzzzz")
    assert "Did you mean" not in str(err.value)


def test_layer_name_refusals(net) -> None:
    with pytest.raises(ValueError, match="needs a layer"):
        checks.layer_name(net, None, "SplitCAM")
    with pytest.raises(ValueError, match="the model itself"):
        checks.layer_name(net, net)
    with pytest.raises(ValueError, match="not a submodule"):
        checks.layer_name(net, nn.ReLU())
    with pytest.raises(TypeError, match="module name"):
        checks.layer_name(net, 3)


def test_close_names() -> None:
    assert checks.close_names("layer3.1.conv", ["layer3.1.conv1", "fc", ""]) == (
        " Did you mean 'layer3.1.conv1'?"
    )
    assert checks.close_names("x", []) == ""


# --------------------------------------------------------------------------- targets
@pytest.mark.parametrize("target", [2, np.int64(2), [2, 2, 2], torch.tensor(2),
                                    torch.tensor([2, 2, 2]), np.array([2, 2, 2])])
def test_targets_accepted_forms(target) -> None:
    index = checks.targets(target, 3)
    assert index.dtype == torch.long and index.tolist() == [2, 2, 2]


@pytest.mark.parametrize(("target", "error", "pattern"), [
    (None, ValueError, "needs target="),
    ((1, 2), ValueError, "tuple targets"),
    (True, TypeError, "not a bool"),
    ([1, True, 0], TypeError, "not a bool"),
    ("cat", TypeError, "got str"),
    (torch.tensor([True, False, True]), TypeError, "class indices"),
    (torch.tensor([1.0, 1.0, 2.0]), TypeError, "integer class indices"),
    (1.0, TypeError, "integer class indices"),
    ([0, 1], ValueError, "got 2 targets for a batch of 3"),
    ([], ValueError, "got 0 targets for a batch of 3"),  # torch reads [] as float32
    (np.array([], dtype=np.float64), ValueError, "got 0 targets for a batch of 3"),
    (-1, ValueError, "negative"),
    (10**20, ValueError, "target 100000000000000000000 is out of range"),  # was "Overflow
    ([0, -(10**20), 1], ValueError, "target -1000.* is out of range"),  # when unpacking"
])
def test_targets_refused(target, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        checks.targets(target, 3, "SplitCAM")


def test_targets_of_more_than_one_index_per_row_are_refused() -> None:
    # a (2, 3) tensor for 6 rows was flattened and taken as one index per row
    for target in (torch.zeros(2, 3, dtype=torch.long), np.zeros((3, 2), dtype=np.int64),
                   [[0, 1, 2], [0, 1, 2]]):
        with pytest.raises(ValueError, match=r"target of shape \(\d, \d\) holds more than one"):
            checks.targets(target, 6, "SplitCAM")
    for target in (torch.arange(6)[:, None], torch.arange(6)[None], [[i] for i in range(6)]):
        assert checks.targets(target, 6).tolist() == list(range(6))


def test_targets_whole_floats_only_where_asked() -> None:
    assert checks.targets(np.array([1.0, 2.0]), 2, whole_floats=True).tolist() == [1, 2]
    with pytest.raises(ValueError, match="fractional"):
        checks.targets([0.5, 1.0], 2, whole_floats=True)


def test_target_range_and_logits() -> None:
    checks.target_range(torch.tensor([0, 4]), 5)
    with pytest.raises(ValueError, match="target 5 is out of range for a model with 5 outputs"):
        checks.target_range(torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError, match=r"\(batch, classes\)"):
        checks.logits(torch.zeros(2, 3, 4))


# --------------------------------------------------------------------------- users
def test_core_and_adapters_give_the_same_messages(net) -> None:
    """The split, Captum's SplitCAM, Zennit's SplitLRP and Quantus's explain share the checks."""
    from captum_split import SplitCAM
    from quantus_adapters.explain import explain
    from zennit_split import SplitLRP, split_lrp

    x = torch.rand(2, 3, 8, 8)
    sm = core.split(net)
    with pytest.raises(ValueError, match=r"Did you mean .*'features\.0'"):
        sm.sensitivities(x, 0, layers=["features.O"])
    with pytest.raises(ValueError, match="SplitCAM: layer 'features.O'.*'features.0'"):
        SplitCAM(net, "features.O")
    with pytest.raises(ValueError, match="SplitLRP: layer 'features.O'.*'features.0'"):
        split_lrp(net, x, 0, ["features.O"])
    with pytest.raises(ValueError, match="SplitLRP: maxpool='max' is not one of"):
        SplitLRP(maxpool="max")
    with pytest.raises(ValueError, match="maxpool='max' is not one of"):
        core.split(net, maxpool="max")
    with pytest.raises(ValueError, match="target 7 is out of range for a model with 5"):
        sm.sensitivities(x, 7)
    with pytest.raises(ValueError, match="target 7 is out of range for a model with 5"):
        SplitCAM(net, "features.1").attribute(x, target=7)
    with pytest.raises(ValueError, match="got 3 targets for a batch of 2"):
        explain(net, x, np.array([0, 1, 2]), method="SplitCAM", layer="features.1")
    with pytest.raises(ValueError, match="upsample='cubic' is not one of"):
        explain(net, x, np.array([0, 1]), method="SplitCAM", upsample="cubic")


def test_a_segmentation_output_is_refused_with_the_reduction_that_works():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(2, 5, 8, 8\).*output=lambda out: out.sum"):
        core.split(model).sensitivities(x, 1, ["input"])
    # the advice works: one score per class, the gradient of that class's total score
    sm = core.split(model, output=lambda out: out.sum((2, 3)))
    probe = sm.sensitivities(x, 1, ["input"])["input"]
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr)[:, 1].sum(), xr)
    torch.testing.assert_close(probe.grad, grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- batch rows
class _FlattensTheBatch(nn.Module):
    """``x.reshape(1, -1)`` before a Linear: one output row for the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(1, -1))


class _AveragesTheBatch(nn.Module):
    """``out.mean(0, keepdim=True)``: the batch averaged into one row."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)).mean(0, keepdim=True)


def test_output_rows() -> None:
    checks.output_rows(torch.zeros(2, 3), 2)
    checks.output_rows(torch.zeros(2, 3, 4, 4), 2)
    with pytest.raises(ValueError, match=r"Zennit: the model output has shape \(1, 3\) for a "
                                         r"batch of 2 inputs.*x\.flatten\(1\)"):
        checks.output_rows(torch.zeros(1, 3), 2, "Zennit")
    with pytest.raises(ValueError, match=r"shape \(\) for a batch of 2"):
        checks.output_rows(torch.zeros(()), 2)
    with pytest.raises(ValueError, match="for a batch of 2 inputs"):
        checks.logits(torch.zeros(1, 3), batch=2)


@pytest.mark.parametrize("model_class", [_FlattensTheBatch, _AveragesTheBatch])
def test_a_forward_that_mixes_the_batch_is_refused_wherever_targets_are_read(model_class):
    """Was a RuntimeError of gather ('Size does not match at dimension 0') in the
    sensitivities, an autograd shape mismatch in Zennit, and a silent relevance."""
    from captum_split.cams import LayerCAM
    from zennit_split import lrp_gamma, split_lrp

    torch.manual_seed(0)
    model = model_class().eval()
    x = torch.randn(2, 4)
    message = r"output has shape \(1, 3\) for a batch of 2 inputs"
    with pytest.raises(ValueError, match=message):
        core.split(model).sensitivities(x, 0)
    with pytest.raises(ValueError, match=message):
        core.split(model).relevance(x, torch.ones(1, 3))
    with pytest.raises(ValueError, match=message):
        split_lrp(model, x, 0)
    with pytest.raises(ValueError, match=message):
        split_lrp(model, x, torch.ones(1, 3))
    with pytest.raises(ValueError, match=message):
        lrp_gamma(model, x, 0)
    with pytest.raises(ValueError, match="LayerCAM: the model " + message):
        LayerCAM(model, model.fc).attribute(x, target=0)


# --------------------------------------------------------------------------- numbers, NaN
def test_number() -> None:
    assert checks.number("theta", 1, 0.0, 1.0, low_open=True) == 1.0
    assert checks.number("eps", torch.tensor(0.5), 0.0) == 0.5
    with pytest.raises(ValueError, match=r"^X: theta is NaN; pass a number in \(0, 1\]\.$"):
        checks.number("theta", float("nan"), 0.0, 1.0, "X", low_open=True)
    with pytest.raises(ValueError, match=r"theta=0.0 is outside \(0, 1\]\. note"):
        checks.number("theta", 0.0, 0.0, 1.0, low_open=True, note=" note")
    with pytest.raises(ValueError, match=r"epsilon=-1 is outside \[0, inf\)"):
        checks.number("epsilon", -1, 0.0)
    with pytest.raises(TypeError, match="epsilon must be a number; got bool"):
        checks.number("epsilon", True, 0.0)
    with pytest.raises(TypeError, match="got str"):
        checks.number("epsilon", "0.1", 0.0)


def test_finite() -> None:
    checks.finite("seed", torch.ones(2))
    checks.finite("index", torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="^Z: seed contains NaN or Inf values; do this$"):
        checks.finite("seed", torch.tensor([1.0, float("inf")]), "Z", fix="do this")


NAN = float("nan")


def test_nan_options_are_refused_by_name(net) -> None:
    """Were accepted (threshold, the Zennit composite's epsilon until its backward, the
    gamma of LRP) or refused as out of range ('alpha=nan is outside [0, 0.5]') or as an
    overflow (a NaN seed: 'SplitLRP relevance overflowed ... Use float64')."""
    from captum_split.cams import GradCAMPlusPlus
    from zennit_split import SplitLRP, lrp_gamma, split_lrp

    x = torch.rand(2, 3, 8, 8)
    sm = core.split(net)
    with pytest.raises(ValueError, match=r"^theta is NaN; pass a number in \(0, 1\]"):
        core.split(net, theta=NAN)
    with pytest.raises(ValueError, match=r"^threshold is NaN; pass a number in \[0, inf\)"):
        core.split(net, threshold=NAN)
    with pytest.raises(ValueError, match=r"^alpha is NaN; pass a number in \[0, 0.5\]"):
        sm.sensitivities(x, 0, alpha=NAN)
    with pytest.raises(ValueError, match=r"^alpha\['input'\] is NaN"):  # names the entry
        sm.sensitivities(x, 0, alpha={"default": 0.4, "input": NAN})
    with pytest.raises(ValueError, match=r"^epsilon is NaN"):
        sm.relevance(x, torch.ones(2, 5), epsilon=NAN)
    seed = torch.ones(2, 5)
    seed[0, 1] = NAN
    with pytest.raises(ValueError, match="^seed contains NaN or Inf values"):
        sm.relevance(x, seed)
    with pytest.raises(ValueError, match="^the seed contains NaN or Inf values"):
        split_lrp(net, x, seed)
    with pytest.raises(ValueError, match="^the seed contains NaN or Inf values"):
        lrp_gamma(net, x, seed)
    with pytest.raises(ValueError, match="^SplitLRP: epsilon is NaN"):
        SplitLRP(epsilon=NAN)
    with pytest.raises(ValueError, match="^LRP: gamma is NaN"):
        lrp_gamma(net, x, 0, gamma=NAN)
    with pytest.raises(TypeError, match="^LRP: inputs must be one tensor.*got a tuple"):
        lrp_gamma(net, (x, x), 0)  # was AttributeError: 'tuple' object has no attribute
    with pytest.raises(ValueError, match="^GradCAMPlusPlus: eps is NaN"):
        GradCAMPlusPlus(net, "features.1", eps=NAN)
    with pytest.raises(ValueError, match="^input contains NaN or Inf values"):
        sm.sensitivities(x * NAN, 0)
