"""Mechanics of the SplitLRP composite: registration, attributors, hooks, model left unchanged.

The relevance computation is replaced here by a stand-in (the explicit float64 reference of
``tests/lrp_reference.py``), so that these tests check the composite alone; the real
computation of ``core`` is tested in ``test_zennit_lrp.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zennit.attribution import Gradient, IntegratedGradients, SmoothGrad
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import COMPOSITES
from zennit.core import Composite

import zennit_split
from tests.lrp_reference import reference_split_lrp
from zennit_split import SplitLRP


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 5),
    ).eval()


class _StandIn:
    """Records the calls and answers with the explicit reference (float64, cast back)."""

    calls: list = []

    def __init__(self, model, **options):
        self.model = model
        self.options = options

    relevance = None  # set below


class _Cast:
    def __init__(self, rel, dtype):
        self.pos, self.neg = rel.pos.to(dtype), rel.neg.to(dtype)
        self.comb = self.pos - self.neg


def _reference_relevance(self, x, seed, layers=(), epsilon=1e-6, activation_rule="pass",
                         residual="even", extra_args=()):
    _StandIn.calls.append({"x": x.clone(), "seed": seed.clone(), "layers": layers,
                           "options": self.options, "epsilon": epsilon,
                           "activation_rule": activation_rule, "residual": residual})
    ref = reference_split_lrp(self.model, x, seed, epsilon=epsilon,
                              maxpool=self.options["maxpool"],
                              stabilizer=self.options["stabilizer"],
                              input_split=self.options["input_split"],
                              maxout=activation_rule, residual=residual)
    names = ["input", *layers]
    return {name: _Cast(ref[name], x.dtype) for name in names}


_StandIn.relevance = _reference_relevance


@pytest.fixture
def stand_in(monkeypatch):
    _StandIn.calls = []
    monkeypatch.setattr(zennit_split.composite.core, "split", _StandIn, raising=False)
    return _StandIn


def _snapshot(model: nn.Module) -> dict:
    hooks = {}
    for name, module in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs"):
            hooks[(name, attr)] = dict(getattr(module, attr, {}))
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": {k: (v.requires_grad, v.grad) for k, v in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "hooks": hooks,
        "types": [type(m) for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict, x: torch.Tensor, out: torch.Tensor):
    after = _snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    assert before["params"] == after["params"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["types"] == after["types"]
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_registered_in_zennit_composites():
    assert COMPOSITES["split_lrp"] is SplitLRP
    assert issubclass(SplitLRP, Composite)
    composite = SplitLRP()
    assert composite.stream == "pos" and composite.epsilon == 1e-6
    assert composite.maxpool == "wta" and composite.stabilizer == "scale"
    with_canonizers = SplitLRP(canonizers=[SequentialMergeBatchNorm()])
    assert len(with_canonizers.canonizers) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stream": "g"}, "stream='g'"),
        ({"maxpool": "max"}, "maxpool='max'"),
        ({"stabilizer": "clip"}, "stabilizer='clip'"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"input_split": "abs"}, "input_split"),
        ({"activation_rule": "max"}, "activation_rule"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SplitLRP(**kwargs)


def test_unknown_layer_is_named():
    model = small_cnn()
    with pytest.raises(ValueError, match="features.26"):
        with SplitLRP(layer="features.26").context(model):
            pass
    assert not model._forward_hooks


@pytest.mark.parametrize("stream", ["pos", "neg", "comb"])
def test_gradient_returns_the_relevance_of_the_stream(stand_in, stream):
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    seed = torch.eye(5)[[1, 3]]
    with Gradient(model, SplitLRP(stream=stream)) as attributor:
        out, rel = attributor(x, seed)
    with torch.no_grad():
        assert torch.equal(out, model(x))
    (call,) = stand_in.calls
    assert torch.equal(call["seed"], seed)           # the attributor's seed, unchanged
    assert torch.equal(call["x"], x)
    assert call["options"]["merge_batchnorm"] is True
    ref = reference_split_lrp(model, x, seed)["input"]
    expected = {"pos": ref.pos, "neg": ref.neg, "comb": ref.comb}[stream].float()
    torch.testing.assert_close(rel, expected)
    assert rel.abs().sum() > 0


def test_options_reach_the_split(stand_in):
    model = small_cnn()
    composite = SplitLRP(epsilon=1e-3, maxpool="convex", stabilizer="shift", layer="4",
                         input_split="half", activation_rule="wta", nonlinear="freeze")
    with Gradient(model, composite) as attributor:
        attributor(torch.randn(1, 3, 8, 8), torch.eye(5)[[0]])
    (call,) = stand_in.calls
    assert call["options"] == {"maxpool": "convex", "stabilizer": "shift",
                               "input_split": "half", "merge_batchnorm": True,
                               "nonlinear": "freeze"}
    assert composite.nonlinear == "freeze"
    assert call["epsilon"] == 1e-3 and call["layers"][0] == "4"
    assert call["activation_rule"] == "wta"
    assert set(composite.relevance) == {"input", "4"}
    assert composite.relevance["4"].pos.shape == (1, 6, 4, 4)


def test_smoothgrad_and_integrated_gradients(stand_in):
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    seed = torch.eye(5)[[0, 2]]
    torch.manual_seed(1)
    with SmoothGrad(model, SplitLRP(), noise_level=0.1, n_iter=3) as attributor:
        _, smooth = attributor(x, seed)
    noisy = [call["x"] for call in stand_in.calls]
    assert len(noisy) == 3 and torch.equal(noisy[-1], x)
    expected = sum(reference_split_lrp(model, xn, seed)["input"].pos for xn in noisy) / 3
    torch.testing.assert_close(smooth, expected.float())

    stand_in.calls.clear()
    with IntegratedGradients(model, SplitLRP(), n_iter=4) as attributor:
        _, integrated = attributor(x, seed)
    steps = [call["x"] for call in stand_in.calls]
    assert len(steps) == 4
    for k, step in enumerate(steps, start=1):
        torch.testing.assert_close(step, x * k / 4)
    # zennit's IntegratedGradients: mean over the path of the modified gradient, times x
    mean = sum(reference_split_lrp(model, s, seed)["input"].pos for s in steps) / 4
    torch.testing.assert_close(integrated, (mean * x.double()).float())


def test_inactive_gives_the_plain_gradient(stand_in):
    model = small_cnn()
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    composite = SplitLRP()
    with composite.context(model), composite.inactive():
        (grad,) = torch.autograd.grad(model(x)[0, 2], x)
    (expected,) = torch.autograd.grad(model(x)[0, 2], x)
    torch.testing.assert_close(grad, expected)
    assert not stand_in.calls


def test_plain_forward_and_no_grad_are_untouched(stand_in):
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    with SplitLRP().context(model):
        out = model(x)
        with torch.no_grad():
            out_ng = model(x.requires_grad_())
    assert out.grad_fn is not None and torch.equal(out, out_ng)
    assert not stand_in.calls


def test_model_unchanged_after_use_and_after_an_exception(stand_in, monkeypatch):
    model = small_cnn()
    model.register_forward_hook(lambda m, i, o: None)      # a hook of the user's own
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x)
    before = _snapshot(model)
    composite = SplitLRP(canonizers=[SequentialMergeBatchNorm()])
    with Gradient(model, composite) as attributor:
        attributor(x, torch.eye(5)[[0, 1]])
    assert_unchanged(model, before, x, out)

    class Boom(RuntimeError):
        pass

    def explode(*args, **kwargs):
        raise Boom("stand-in failure")

    monkeypatch.setattr(stand_in, "relevance", explode)
    with pytest.raises(Boom):
        with Gradient(model, SplitLRP(canonizers=[SequentialMergeBatchNorm()])) as attributor:
            attributor(x, torch.eye(5)[[0, 1]])
    assert_unchanged(model, before, x, out)
    with pytest.raises(KeyError):
        with SplitLRP().context(model):
            raise KeyError("user code fails inside the context")
    assert_unchanged(model, before, x, out)


def test_canonizers_are_applied_inside_and_reverted(stand_in, monkeypatch):
    model = small_cnn()
    weight = model[0].weight.detach().clone()
    seen = {}

    def record(self, x, seed, **kwargs):
        seen["weight"] = self.model[0].weight.detach().clone()
        return _reference_relevance(self, x, seed, **kwargs)

    monkeypatch.setattr(stand_in, "relevance", record)
    with Gradient(model, SplitLRP(canonizers=[SequentialMergeBatchNorm()])) as attributor:
        attributor(torch.randn(1, 3, 8, 8), torch.eye(5)[[0]])
    assert not torch.equal(seen["weight"], weight)   # BatchNorm merged while registered
    assert torch.equal(model[0].weight, weight)


def test_several_inputs_or_outputs_are_refused(stand_in):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x, y):
            return self.lin(x + y)

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x), x

    x = torch.randn(1, 4, requires_grad=True)
    with SplitLRP().context(TwoInputs()) as model, pytest.raises(
            ValueError, match=r"2 arguments.*one input tensor.*core\.split\(model\)\.relevance"):
        model(x, x)
    with SplitLRP().context(TwoOutputs()) as model, pytest.raises(TypeError, match="tuple"):
        model(x)


def test_nested_forward_does_not_recurse(stand_in, monkeypatch):
    model = small_cnn()

    def relevance_calling_the_model(self, x, seed, **kwargs):
        with torch.enable_grad():
            out = self.model(x.requires_grad_())          # the root hook must stay out
        assert out.grad_fn is not None
        assert type(out.grad_fn).__name__ != "_SplitLRPFunctionBackward"
        return _reference_relevance(self, x.detach(), seed, **kwargs)

    monkeypatch.setattr(stand_in, "relevance", relevance_calling_the_model)
    with Gradient(model, SplitLRP()) as attributor:
        _, rel = attributor(torch.randn(1, 3, 8, 8), torch.eye(5)[[0]])
    assert torch.isfinite(rel).all()


def test_deepcopy_of_composite_model_is_clean():
    model = small_cnn()
    with SplitLRP().context(model):
        pass
    clone = copy.deepcopy(model)
    assert not clone._forward_hooks


def test_inactive_is_read_during_the_backward_pass(stand_in):
    # zennit's contract: a forward under the active composite, then a backward pass inside
    # composite.inactive(), gives the plain gradient
    model = small_cnn()
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    composite = SplitLRP()
    with composite.context(model):
        out = model(x)
        with composite.inactive():
            (grad,) = torch.autograd.grad(out[0, 2], x)
    (expected,) = torch.autograd.grad(model(x)[0, 2], x)
    torch.testing.assert_close(grad, expected)
    assert not stand_in.calls


def test_create_graph_is_refused_with_a_reason(stand_in):
    model = small_cnn()
    with Gradient(model, SplitLRP(), create_graph=True) as attributor:
        with pytest.raises(RuntimeError, match="not a differentiable function.*create_graph"):
            attributor(torch.randn(1, 3, 8, 8), torch.eye(5)[[0]])


def test_input_by_keyword_is_explained():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_cnn()

        def forward(self, image):
            return self.net(image)

    model = Keyword().eval()
    x = torch.randn(2, 3, 8, 8)
    seed = torch.eye(5)[[1, 3]]
    composite = SplitLRP()
    with composite.context(model):
        xr = x.clone().requires_grad_()
        (by_keyword,) = torch.autograd.grad(model(image=xr), xr, seed)
        xr = x.clone().requires_grad_()
        (positional,) = torch.autograd.grad(model(xr), xr, seed)
    torch.testing.assert_close(by_keyword, positional)
    with Gradient(model.net, SplitLRP()) as attributor:
        _, expected = attributor(x, seed)
    torch.testing.assert_close(by_keyword, expected)
    assert by_keyword.abs().sum() > 0


def test_changes_made_inside_the_context_are_kept():
    # eval semantics hold per forward, not per registration: a checkpoint loaded, train()
    # called or a module replaced between forwards inside the context stays, and the next
    # backward pass explains the changed model
    model, checkpoint = small_cnn(), small_cnn()
    with torch.no_grad():
        for p in checkpoint.parameters():
            p.mul_(1.5)
        checkpoint[1].running_mean.uniform_(-1, 1)
        checkpoint[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    seed = torch.eye(5)[[0, 4]]
    composite = SplitLRP()
    with Gradient(model, composite) as attributor:
        attributor(x, seed)
        model.load_state_dict(checkpoint.state_dict())
        model[8] = nn.Linear(6, 5)
        _, relevance = attributor(x, seed)
        model.train()
        _, in_training = attributor(x, seed)          # explained with eval semantics
    for key, value in checkpoint.state_dict().items():
        if not key.startswith("8."):
            assert torch.equal(model.state_dict()[key], value), key
    assert all(m.training for m in model.modules())
    fresh = copy.deepcopy(model).eval()
    with Gradient(fresh, SplitLRP()) as attributor:
        _, expected = attributor(x, seed)
    torch.testing.assert_close(relevance, expected)
    torch.testing.assert_close(in_training, expected)


def test_composites_removed_in_any_order_keep_the_training_flags(stand_in):
    model = small_cnn().train()
    x = torch.randn(2, 3, 8, 8)
    first, second = SplitLRP(), SplitLRP()
    first.register(model)
    second.register(model)
    xr = x.clone().requires_grad_()
    with pytest.raises(ValueError, match="two SplitLRP composites"):
        torch.autograd.grad(model(xr), xr, torch.eye(5)[[0, 1]])
    first.remove()
    second.remove()
    assert all(m.training for m in model.modules())
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_a_forward_that_raises_leaves_the_model_as_it_was(stand_in):
    model = small_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with SplitLRP().context(model):
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 5, 8, 8, requires_grad=True))   # wrong channel count
        assert all(m.training for m in model.modules())
        model(torch.randn(2, 3, 8, 8))   # a plain forward in training mode: eval semantics
    assert all(m.training for m in model.modules())
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("split_outside", [False, True])
def test_another_composite_on_the_model_is_refused_by_name(stand_in, split_outside):
    # nested with a rule composite, Zennit's rules ran on no gradient (a TypeError inside
    # zennit's hook: None / Tensor); SplitLRP goes past the model's graph, so it refuses
    from zennit.composites import EpsilonPlus

    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    before = _snapshot(model)
    with torch.no_grad():
        out = model(x)
    outer, inner = (SplitLRP(), EpsilonPlus()) if split_outside else (EpsilonPlus(), SplitLRP())
    with outer.context(model):
        with pytest.raises(ValueError, match=r"'0' \(ZPlus\) has hooks of another Zennit"):
            with Gradient(model, inner) as attributor:
                attributor(x, torch.eye(5)[[0, 1]])
    assert_unchanged(model, before, x, out)
    with Gradient(model, SplitLRP()) as attributor:   # alone it works again
        _, relevance = attributor(x, torch.eye(5)[[0, 1]])
    assert relevance.shape == x.shape


def test_two_split_lrps_on_one_model_are_refused(stand_in):
    # the one registered last answered either attributor's backward pass: the outer
    # attributor (stream "pos") silently returned the inner composite's "neg" relevance
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    with Gradient(model, SplitLRP(stream="pos")) as outer:
        with SplitLRP(stream="neg").context(model):
            with pytest.raises(ValueError, match="two SplitLRP composites"):
                outer(x, torch.eye(5)[[0, 1]])
        _, relevance = outer(x, torch.eye(5)[[0, 1]])   # alone again: its own stream
    with Gradient(model, SplitLRP(stream="pos")) as alone:
        _, expected = alone(x, torch.eye(5)[[0, 1]])
    assert torch.equal(relevance, expected)
