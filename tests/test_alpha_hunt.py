"""Alpha shift: the class-blind warning's text, the checks of alpha, rows of alpha="auto"."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import core
from core.shift import SplitClassBlindWarning


def _deep_mlp(width: int = 16, depth: int = 6, classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, width), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(3.0)  # a large |W| product: the shift part dominates at alpha 0
    return model


@pytest.mark.parametrize("alpha, label", [(0.0, "alpha=0"), ({"default": 0.0}, "alpha={")])
def test_class_blind_warning_names_the_alpha(alpha, label):
    model = _deep_mlp()
    sm = core.split(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sm.sensitivities(torch.randn(3, 8), 1, ["1"], alpha=alpha)
    blind = [w.message for w in caught if isinstance(w.message, SplitClassBlindWarning)]
    assert len(blind) == 1
    text = str(blind[0])
    assert "'1'" in text and label in text, text
    assert blind[0].alpha == core.shift.alpha_label(alpha)


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


@pytest.mark.parametrize("alpha, words", [
    ({1: 0.3, "zz": 0.4}, "names"),                # was: '<' not supported between str and int
    ({"1": 0.7}, "alpha['1']=0.7"),                # was: alpha=0.7 (which point?)
    ({"default": float("nan")}, "alpha['default']"),
])
def test_a_bad_mapping_is_one_line_naming_its_point(alpha, words):
    from captum_split import SplitCAM

    model = _small_cnn()
    x = torch.randn(2, 3, 8, 8)
    for call in (lambda: core.split(model).sensitivities(x, 0, ["1"], alpha=alpha),
                 lambda: SplitCAM(model, "1", alpha=alpha).attribute(x, target=0)):
        with pytest.raises((TypeError, ValueError)) as err:
            call()
        text = str(err.value)
        assert "\n" not in text and words in text and "not supported between" not in text, text


class _SequenceFirst(nn.Module):
    """Tokens laid out (T, B, D) between two ReLUs, as in a ``batch_first=False`` block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 6)
        h = torch.relu(self.a(x).transpose(0, 1))
        h = torch.relu(self.b(h))
        return self.c(h.mean(0))


def test_auto_rows_are_independent_when_the_batch_is_not_the_first_dimension():
    model = _SequenceFirst().eval()
    sm = core.split(model)
    x, y = torch.randn(3, 5, 6), torch.tensor([0, 1, 2])
    batch = sm.sensitivities(x, y, ["input", "a"], alpha="auto")
    for layer in ("input", "a"):
        for i in range(3):
            alone = sm.sensitivities(x[i:i + 1], y[i:i + 1], [layer], alpha="auto")[layer]
            torch.testing.assert_close(batch[layer].g[i], alone.g[0], rtol=1e-5, atol=1e-8)
    # the other rows do not move row 0 (they moved it by 1.1e-4 of 1.1e-2)
    x2 = x.clone()
    x2[1:] *= 50
    other = sm.sensitivities(x2, y, ["input"], alpha="auto")["input"]
    torch.testing.assert_close(other.g[0], batch["input"].g[0], rtol=1e-5, atol=1e-8)
    # one alpha per row of the batch (they were one per token: shape (5,))
    assert all(v.shape == (3,) for k, v in batch["input"].alphas.items() if k != "output")


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(5, 6)
        self.c, self.d = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.c(torch.relu(self.a(x) + self.b(y)))))


def test_shift_diagnostics_takes_several_inputs_as_sensitivities_does():
    sm = core.split(_TwoInputs().eval())
    x = (torch.randn(3, 4), torch.randn(3, 5))
    y = torch.tensor([0, 1, 2])
    # was: AttributeError: 'tuple' object has no attribute 'shape'
    rows = core.shift_diagnostics(sm, x, y, ["a", "input"], alphas=(0.4, "auto"))
    assert [(r.layer, r.alpha) for r in rows] == [
        ("a", "0.4"), ("input", "0.4"), ("input:1", "0.4"),
        ("a", "auto"), ("input", "auto"), ("input:1", "auto")]
    probe = sm.sensitivities(x, y, ["a"], alpha=0.4)["a"]
    assert rows[0].ratio == core.shift.shift_ratio(probe)
    assert all(r.ratio >= 0 for r in rows)


@pytest.mark.parametrize("option, words", [
    ("alpha=0.7", "[0, 0.5]"),
    ('alpha={"default": 0.9}', "alpha['default']=0.9"),
    ("alpha=Auto", None),  # accepted as --alpha Auto is
])
def test_explain_option_alpha_is_checked_before_the_model_and_data(option, words, monkeypatch,
                                                                     capsys, tmp_path):
    from quantus_adapters import cli
    from quantus_adapters.benchmark.zoo.spec import ModelSpec

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the bad alpha was refused")

    # was: the digits CNN was trained (32 s) and the error came at the first image
    monkeypatch.setattr(ModelSpec, "from_options", no_model)
    code = cli.main(["explain", "--data", "digits", "--methods", "SplitCAM", "--option", option,
                     "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    if words is None:
        assert "the model was built" in err  # got past the check of alpha
        return
    assert code == 2 and words in err and "the model was built" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def _overflowing_mlp() -> tuple[nn.Module, torch.Tensor]:
    """A 6-layer ReLU MLP and an input with a finite output whose float32 gradient streams
    overflow at layer '5' (weights 1e-10 below it, 1e14 above)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 6), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Linear(6, 6), nn.ReLU()]
    layers.append(nn.Linear(6, 3))
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for i, m in enumerate(model):
            if isinstance(m, nn.Linear):
                m.weight.mul_(1e-10 if i < 6 else 1e14)
                m.bias.zero_()
    return model, torch.rand(2, 4) * 1e10


def test_auto_overflow_above_the_input_is_a_split_overflow_error():
    model, x = _overflowing_mlp()
    sm = core.split(model)
    # was: RuntimeError "alpha='auto': the model's gradient at shift point '3' was not
    # recorded; the gradient pass must run before the S pass" (from the rerun that names
    # where the overflow began)
    for alpha in (0.4, "auto"):
        with pytest.raises(core.SplitOverflowError, match="first at '5'"):
            sm.sensitivities(x, 0, ["5"], alpha=alpha)


def test_shift_diagnostics_takes_one_layer_and_one_alpha_as_sensitivities_does():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                          nn.Linear(6, 3)).eval()
    sm = core.split(model)
    x = torch.randn(3, 4)
    # was: layers="input" read as ['i', 'n', ...] ("layer 'i' is not a module"), alphas="auto"
    # as 'a', 'u', ... ("alpha='a' is not valid") and alphas=0.4 "'float' object is not
    # iterable"
    for layers, alphas, expect in (("input", "auto", [("input", "auto")]),
                                   (["1"], 0.4, [("1", "0.4")]),
                                   ("3", {"default": 0.45}, [("3", "{default: 0.45}")])):
        rows = core.shift_diagnostics(sm, x, 0, layers, alphas=alphas)
        assert [(r.layer, r.alpha) for r in rows] == expect


@pytest.mark.parametrize("method", ["SplitCAM", "SplitGrad"])
def test_last_alphas_are_not_those_of_an_earlier_call_after_a_failed_one(method):
    import captum_split

    model = _small_cnn()
    explainer = getattr(captum_split, method)(model, "1")
    explainer.attribute(torch.randn(2, 3, 8, 8), target=[0, 1])
    assert explainer.last_alphas["1"].shape == (2,)
    with pytest.raises(ValueError, match="out of range"):
        explainer.attribute(torch.randn(3, 3, 8, 8), target=7)
    # was: the 2-row alphas of the call before, read as this call's
    assert explainer.last_alphas == {}


def test_auto_overflow_advises_no_alpha_and_names_the_stream():
    # the gradient stream overflows here, at alpha='auto' too: the message said "the S stream
    # grows ..." and "Use a larger alpha (closer to 0.5), alpha='auto' or float64" although
    # alpha was 'auto' already
    model, x = _overflowing_mlp()
    with pytest.raises(core.SplitOverflowError) as info:
        core.split(model).sensitivities(x, 0, ["5"], alpha="auto")
    message = str(info.value)
    assert "alpha=auto" in message or "alpha='auto'" in message
    assert "larger alpha" not in message and "Use float64" in message
    with pytest.raises(core.SplitOverflowError, match="larger alpha"):
        core.split(model).sensitivities(x, 0, ["5"], alpha=0.4)


def test_a_bad_alpha_is_refused_before_the_model_runs():
    # a model captured by running it (control flow on values) ran its forward at the first
    # sensitivities call before alpha=0.7 was refused
    calls: list[int] = []

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return torch.relu(self.a(x)) if x.sum() > 0 else self.b(x)

    sm = core.split(Branchy().eval())
    before = len(calls)
    with pytest.raises(ValueError, match="alpha"):
        sm.sensitivities(torch.rand(2, 4), 0, ["input"], alpha=0.7)
    assert len(calls) == before
