"""The alpha shift (core/shift.py): Theorem 9's gradient/shift parts, alpha="auto", the warning."""

import warnings

import pytest
import torch
from torch import nn

import core
from core import shift


def _chain() -> nn.Sequential:
    """x -> W1 -> ReLU ("1") -> W2 -> ReLU ("3") -> W3, small dyadic weights (exact in float64)."""
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False),
                        nn.ReLU(), nn.Linear(2, 2, bias=False)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0], [-2.0, 1.0]]))
        net[4].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.5]]))
    return net


def test_gradient_part_plus_shift_part_is_the_map_exactly():
    net = _chain()
    sm = core.split(net)
    x = torch.tensor([[2.0, 1.0], [0.5, -1.25]], dtype=torch.float64)
    for alpha in (0.0, 0.25, 0.375, 0.5, {"3": 0.25, "default": 0.125}):
        probes = sm.sensitivities(x, 0, layers=["input", "1", "3"], alpha=alpha)
        for p in probes.values():
            assert torch.equal(p.grad_part + p.shift_part, p.g)
            for stream in ("g", "h"):
                for sign in (None, "+", "-"):
                    grad_part, rest = p.parts(stream, sign)
                    name = {None: stream, "+": f"pos_{stream}", "-": f"neg_{stream}"}[sign]
                    assert torch.equal(grad_part + rest, getattr(p, name))
                    assert torch.equal(grad_part.abs(), (p.grad / 2).abs())
    # Theorem 9 by hand at the input of row 0 (masks m1 = [1, 1], m2 = [1, 0]):
    # shift part = -1/2 [f3 f_out |W3_t| m2- W2 + f1 f3 f_out (|W3_t| |W2|) m1- W1] = -1/2 f3 f_out
    # * (|W3_t| * [0, 1]) @ W2 = -1/2 f3 f_out * [0, 2] @ [[1, -1], [-2, 1]] = f3 f_out * [2, -1]
    p = sm.sensitivities(x[:1], 0, layers=["input"], alpha={"3": 0.25, "default": 0.125})["input"]
    f3, f_out = 1 - 2 * 0.25, 1 - 2 * 0.125
    assert torch.equal(p.shift_part, torch.tensor([[2.0, -1.0]], dtype=torch.float64) * f3 * f_out)
    assert torch.equal(p.grad_part, torch.tensor([[0.5, -0.5]], dtype=torch.float64))
    # at alpha = 0.5 the shift part vanishes and the map is half the gradient
    p = sm.sensitivities(x, 0, layers=["input", "1"], alpha=0.5)["1"]
    assert torch.equal(p.shift_part, torch.zeros_like(p.g))


def test_auto_alphas_known_answer_and_deterministic():
    # r = 0.1. Output: f = min(1, r) = 0.1 (alpha 0.45). ReLU "3": gradient |W3_0| has mean 1.5,
    # S arriving 0.1 |W3_0| mean 0.15: f = min(1, 0.1 * 1.5 / 0.15) = 1 (alpha 0). ReLU "1": the
    # gradient is W2^T (W3_0 * m2) = [1, -1] (mean 1), S arriving 0.1 |W2|^T |W3_0| = 0.1 [5, 3]
    # (mean 0.4): f = 0.1 / 0.4 = 0.25 (alpha 0.375). Input: gradient [1, -1] (mean 1), S
    # arriving 0.25 * 0.1 * [5, 3] (mean 0.1): f = 1 (alpha 0).
    assert shift.AUTO_RATIO == 0.1
    net = _chain()
    sm = core.split(net)
    x = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    first = sm.sensitivities(x, 0, layers=["input"], alpha="auto")["input"]
    alphas = first.alphas
    assert alphas["output"] == pytest.approx(0.45)
    assert float(alphas["3"]) == pytest.approx(0.0, abs=1e-12)
    assert float(alphas["1"]) == pytest.approx(0.375, abs=1e-12)
    assert float(alphas["input"]) == pytest.approx(0.0, abs=1e-12)
    # the same map as the fixed per-point alphas it chose
    fixed = {"output": 0.45, "3": 0.0, "1": 0.375, "input": 0.0}
    same = sm.sensitivities(x, 0, layers=["input"], alpha=fixed)["input"]
    assert torch.allclose(first.g, same.g, rtol=1e-12, atol=1e-15)
    assert torch.allclose(first.S, same.S, rtol=1e-12, atol=1e-15)
    # deterministic, and per row: a row's alphas and map do not depend on the other rows
    again = sm.sensitivities(x, 0, layers=["input"], alpha="auto")["input"]
    assert torch.equal(first.g, again.g)
    batch = torch.cat([x, torch.tensor([[0.5, 3.0]], dtype=torch.float64)])
    both = sm.sensitivities(batch, 0, layers=["input"], alpha="auto")["input"]
    assert torch.equal(both.g[:1], first.g)
    assert both.alphas["1"].shape == (2,)


def test_bad_alpha_values_are_refused_with_one_line():
    for bad in ("automatic", -0.1, 0.51, True, [0.4]):
        with pytest.raises((TypeError, ValueError), match="alpha"):
            shift.check_alpha(bad)
    with pytest.raises(ValueError, match="outside"):
        shift.check_alpha(0.7)


@pytest.fixture(scope="module")
def resnet():
    model = core.zoo.resnet20().eval()
    x, y = core.zoo.cifar10_samples()
    return model, x[:4], y[:4]


def test_class_blind_warning_once_per_layer(resnet):
    model, x, y = resnet
    model = core.zoo.resnet20().eval()  # a model no other test has warned about
    sm = core.split(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sm.sensitivities(x, y, layers=["layer1.1"], alpha=0.4)
        sm.sensitivities(x, y, layers=["layer1.1"], alpha=0.4)
        sm.sensitivities(x, y, layers=["layer1.1", "layer2.1"], alpha=0.3)
        sm.sensitivities(x, y, layers=["layer1.1", "layer2.1"], alpha=0.5)
        sm.sensitivities(x, y, layers=["layer1.1", "layer2.1"], alpha="auto")
        core.split(model).sensitivities(x, y, layers=["layer1.1"], alpha=0.4)  # same model
    blind = [w for w in caught if issubclass(w.category, core.SplitClassBlindWarning)]
    assert len(blind) == 2
    assert "'layer1.1'" in str(blind[0].message) and "'layer2.1'" in str(blind[1].message)
    assert "does not depend on the target class" in str(blind[0].message)


@pytest.mark.parametrize("alpha,lost", [(0.4, False), (0.3, True)])
def test_class_blind_warning_says_when_the_gradient_part_is_lost_to_rounding(resnet, alpha,
                                                                              lost):
    """Past 1/eps of the dtype the gradient part is below rounding: the g and h maps no
    longer differ by gradient x activation (resnet20, layer1.1: ratio about 1.3e3 at alpha
    0.4, 3e7 at 0.3; float32 1/eps is 8.4e6)."""
    model, x, y = resnet
    model = core.zoo.resnet20().eval()  # a model no other test has warned about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        core.split(model).sensitivities(x, y, layers=["layer1.1"], alpha=alpha)
    (blind,) = [w for w in caught if issubclass(w.category, core.SplitClassBlindWarning)]
    ratio = blind.message.ratio
    assert (ratio > 1 / torch.finfo(torch.float32).eps) == lost
    assert ("lost to rounding" in str(blind.message)) == lost


def test_shift_diagnostics_ratio_and_class_dependence(resnet):
    model, x, y = resnet
    sm = core.split(model)
    rows = core.shift_diagnostics(sm, x, y, ["layer1.1"], alphas=(0.5, 0.4, "auto"))
    by_alpha = {r.alpha: r for r in rows}
    assert by_alpha["0.5"].ratio == 0.0
    assert by_alpha["0.4"].ratio > shift.CLASS_BLIND_RATIO
    assert by_alpha["0.4"].class_corr > 0.99  # the same map for two classes
    assert by_alpha["auto"].ratio < 2.0
    assert by_alpha["auto"].class_corr < 0.9
    # auto chooses alphas only where the backward to the layer passes: not below layer1.1
    assert "output" in by_alpha["auto"].alphas and "input" not in by_alpha["auto"].alphas


def test_auto_through_captum_and_quantus(resnet):
    pytest.importorskip("captum")
    import quantus_adapters
    from captum_split import SplitCAM, SplitGrad

    model, x, y = resnet
    cam = SplitCAM(model, "layer2.1", alpha="auto")
    a = cam.attribute(x, target=y)
    assert a.shape == (4, 1, 16, 16) and torch.isfinite(a).all()
    assert cam.last_alphas["output"] == pytest.approx(0.45)
    assert cam.last_alphas["relu_17"].shape == (4,)
    probe = core.split(model).sensitivities(x, y, ["layer2.1"], alpha="auto")["layer2.1"]
    assert torch.allclose(a, (probe.g * probe.activation).sum(1, keepdim=True))
    grad = SplitGrad(model, "layer2.1", alpha="auto").attribute(x, target=y)
    assert torch.allclose(grad, probe.g.mean(1, keepdim=True))
    with pytest.raises(ValueError, match="SplitCAM: alpha='automatic'"):
        SplitCAM(model, "layer2.1", alpha="automatic")
    maps = quantus_adapters.explain(model, x.numpy(), y.numpy(), method="SplitCAM",
                                    layer="layer2.1", alpha="auto")
    assert maps.shape == (4, 1, 32, 32)


def test_benchmark_alpha_auto_and_class_specificity(resnet):
    pytest.importorskip("quantus")
    import quantus_adapters
    from quantus_adapters.benchmark import cli, protocol

    assert protocol.check_alpha("auto", "--alphas") == "auto"
    assert protocol.check_alpha("0.45") == 0.45
    with pytest.raises(ValueError, match="--alphas 'autox'"):
        protocol.check_alpha("autox", "--alphas")
    assert "auto" in cli.DEFAULT_ALPHAS
    specs = [s for s in protocol.default_methods(alpha="auto", quick=True)
             if s.method in ("SplitCAM", "SplitGrad")]
    assert specs and all("α=auto" in s.label and s.options["alpha"] == "auto" for s in specs)
    # Table 1's class specificity (Quantus RandomLogit, SSIM): the class-blind alpha 0.4 at
    # layer1.1 gives (nearly) the same map for another class, "auto" does not
    model, x, y = resnet
    xs, ys = x.numpy(), y.numpy()
    scores = {}
    for alpha in (0.4, "auto"):
        kwargs = {"method": "SplitCAM", "layer": "layer1.1", "alpha": alpha}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", core.SplitClassBlindWarning)
            a = quantus_adapters.explain(model, xs, ys, **kwargs)
            scores[alpha] = protocol.evaluate_metric(
                "RandLogit", model, xs, ys, a, None, False, protocol.ProtocolSettings(),
                explain_kwargs=kwargs)
    assert scores[0.4].shape == (4,)
    assert scores[0.4].mean() > 0.95
    assert scores["auto"].mean() < scores[0.4].mean() - 0.2


def test_class_blind_warning_points_at_the_users_line(resnet):
    """From core and through an adapter (SplitCAM's attribute, Captum's log_usage wrapper)
    the warning names the caller's file, not the library's."""
    pytest.importorskip("captum")
    from captum_split import SplitCAM

    model, x, y = resnet
    for explain in (
        lambda m: core.split(m).sensitivities(x, y, layers=["layer1.1"], alpha=0.4),
        lambda m: SplitCAM(m, "layer1.1", alpha=0.4).attribute(x, target=y),
    ):
        fresh = core.zoo.resnet20().eval()  # not warned about before
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            explain(fresh)
        (blind,) = [w for w in caught if issubclass(w.category, core.SplitClassBlindWarning)]
        assert blind.filename == __file__
