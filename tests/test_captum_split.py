"""SplitCAM and SplitGrad as Captum attributions: exact relations, batching, Captum drop-in."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from captum.attr import (
    GradientAttribution,
    LayerActivation,
    LayerAttribution,
    LayerGradCam,
    LayerGradientXActivation,
    NoiseTunnel,
    Saliency,
)
from captum.metrics import infidelity, sensitivity_max
from torch import nn

import core.zoo
from captum_split import SplitCAM, SplitGrad


@functools.cache
def _resnet20():
    x, y = core.zoo.cifar10_samples()
    return core.zoo.resnet20(pretrained=True), core.zoo.normalize_cifar(x[:3]), y[:3]


@functools.cache
def _resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    return model, torch.randn(2, 3, 32, 32), torch.tensor([3, 7])


@functools.cache
def _vgg16():
    torch.manual_seed(1)
    model = torchvision.models.vgg16(num_classes=10).eval()
    return model, torch.randn(2, 3, 32, 32), torch.tensor([2, 5])


MODELS = {"resnet20": _resnet20, "resnet18": _resnet18, "vgg16": _vgg16}
# (model, mid layer or last convolution)
CASES = [
    ("resnet20", "layer2.1.conv2"),
    ("resnet20", "layer3.2.conv2"),
    ("resnet18", "layer2"),
    ("resnet18", "layer4.1.conv2"),
    ("vgg16", "features.15"),
    ("vgg16", "features.28"),
]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, scale: float = 0.0) -> None:
    """Equal up to float32 rounding, relative to the largest entry (or ``scale``)."""
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), scale, 1e-12)
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= rtol * scale, float((a - b).abs().max()) / scale


class _TinyNet(nn.Module):
    """A small CNN with a second forward argument (the logit temperature)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.gap(self.relu2(self.conv2(x))).flatten(1)
        return self.fc(x) / temperature


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(3)
    return _TinyNet().eval(), torch.randn(3, 3, 8, 8), torch.tensor([0, 4, 2])


# ---------------------------------------------------------------- exact relations
@pytest.mark.parametrize(("name", "layer"), CASES)
def test_alpha_half_is_half_gradient_times_activation(name, layer):
    model, x, y = MODELS[name]()
    module = model.get_submodule(layer)
    cam = SplitCAM(model, module, alpha=0.5, stream="g", sign=None).attribute(x, target=y)
    gxa = LayerGradientXActivation(model, module).attribute(x, target=y)
    assert cam.shape == (x.shape[0], 1, *gxa.shape[2:])
    _close(cam, 0.5 * gxa.sum(1, keepdim=True))
    if name == "resnet20":  # the same layer given by name; SplitGrad at the layer
        grad = LayerGradientXActivation(model, module, multiply_by_inputs=False).attribute(
            x, target=y
        )
        sg = SplitGrad(model, layer, alpha=0.5).attribute(x, target=y)
        _close(sg, 0.5 * grad.mean(1, keepdim=True))


@pytest.mark.parametrize("name", ["resnet20", "vgg16"])
def test_splitgrad_alpha_half_is_half_saliency(name):
    model, x, y = MODELS[name]()
    sg = SplitGrad(model, alpha=0.5, stream="g", sign=None).attribute(x, target=y)
    grad = Saliency(model).attribute(x.clone().requires_grad_(), target=y, abs=False)
    assert sg.shape == x.shape  # like Saliency: channels are not averaged
    _close(sg, 0.5 * grad)


def test_stream_difference_is_gradient_times_activation_at_any_alpha():
    model, x, y = _resnet20()
    kwargs = dict(alpha=0.3, sign=None)
    g = SplitCAM(model, "layer2", stream="g", **kwargs).attribute(x, target=y)
    h = SplitCAM(model, "layer2", stream="h", **kwargs).attribute(x, target=y)
    gxa = LayerGradientXActivation(model, model.layer2).attribute(x, target=y).sum(1, True)
    assert not torch.allclose(g, 0.5 * gxa, rtol=1e-3)  # alpha < 0.5 really shifts
    # g - h == grad holds to the rounding of the (larger) g and h maps
    _close(g - h, gxa, rtol=1e-5, scale=float(g.abs().max()))
    sg = SplitGrad(model, "layer2", stream="g", **kwargs).attribute(x, target=y)
    sh = SplitGrad(model, "layer2", stream="h", **kwargs).attribute(x, target=y)
    grad = LayerGradientXActivation(model, model.layer2, multiply_by_inputs=False)
    _close(
        sg - sh, grad.attribute(x, target=y).mean(1, keepdim=True), scale=float(sg.abs().max())
    )


def test_signs_at_alpha_half_add_up_to_unified():
    # at alpha 0.5, S = 0, so d+g = g-sensitivity = -d-g and the two signed maps add up to eq. 7
    model, x, y = _resnet20()
    maps = {
        s: SplitCAM(model, "layer3.0", alpha=0.5, sign=s).attribute(x, target=y)
        for s in (None, "+", "-")
    }
    _close(maps["+"] + maps["-"], maps[None], rtol=1e-4)
    assert not torch.allclose(maps["+"], maps[None])


def test_alpha_zero_signed_maps_are_nonnegative(tiny):
    # g and h are monotone: at alpha 0 the sensitivities are their true gradients (>= 0), and
    # without stabilisation the split streams a+, a- are >= 0
    model, x, y = tiny
    for stream in "gh":
        for sign in "+-":
            kwargs = dict(alpha=0.0, stream=stream, sign=sign, stabilizer="none")
            cam = SplitCAM(model, "relu1", **kwargs).attribute(x, target=y)
            grad = SplitGrad(model, "conv2", **kwargs).attribute(x, target=y)
            assert cam.min() >= 0 and cam.max() > 0
            assert grad.min() >= 0 and grad.max() > 0


def test_relu_and_channel_summation_flags(tiny):
    model, x, y = tiny
    sc = SplitCAM(model, model.conv2, alpha=0.4)
    plain = sc.attribute(x, target=y)
    assert plain.min() < 0  # no ReLU by default
    _close(sc.attribute(x, target=y, relu_attributions=True), plain.clamp(min=0))
    per_channel = sc.attribute(x, target=y, attr_dim_summation=False)
    assert per_channel.shape == (3, 8, 4, 4)
    _close(per_channel.sum(1, keepdim=True), plain)
    sg = SplitGrad(model, model.conv2)
    _close(sg.attribute(x, target=y, abs=True), sg.attribute(x, target=y).abs())


def test_layer_input_and_two_dimensional_layer(tiny):
    model, x, y = tiny
    at_input = SplitCAM(model, "relu2", alpha=0.5).attribute(
        x, target=y, attribute_to_layer_input=True
    )
    _close(at_input, SplitCAM(model, "conv2", alpha=0.5).attribute(x, target=y))
    # a (B, C) layer: Captum's LayerGradCam gives (B, 1); so does SplitCAM
    cam = SplitCAM(model, model.fc, alpha=0.5).attribute(x, target=y)
    ref = LayerGradCam(model, model.fc).attribute(x, target=y)
    assert cam.shape == ref.shape == (3, 1)
    _close(cam, 0.5 * ref)


# ---------------------------------------------------------------- batching
def test_batch_equals_row_by_row():
    model, x, y = _resnet20()
    # the "scale" stabiliser acts per row: rows stay independent
    explainer = SplitCAM(model, "layer2.1", alpha=0.4, sign="+", stabilizer="scale")
    batch = explainer.attribute(x, target=y)
    rows = torch.cat([explainer.attribute(x[i : i + 1], target=int(y[i])) for i in range(3)])
    _close(batch, rows, rtol=1e-4)
    # one int target for all rows == the same target given per row
    sg = SplitGrad(model, "layer2.1", sign="-")
    _close(sg.attribute(x, target=3), sg.attribute(x, target=[3, 3, 3]))


# ---------------------------------------------------------------- Captum drop-in
def test_base_classes_and_properties(tiny):
    model, _, _ = tiny
    cam, grad = SplitCAM(model, model.conv2), SplitGrad(model)
    for a in (cam, grad):
        assert isinstance(a, LayerAttribution) and isinstance(a, GradientAttribution)
        assert a.has_convergence_delta() is False
        assert hasattr(type(a).attribute, "__wrapped__")  # captum.log.log_usage
    assert cam.multiplies_by_inputs is True and grad.multiplies_by_inputs is False
    assert cam.layer is model.conv2 and cam.layer_name == "conv2"


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel(tiny, nt_type):
    model, x, y = tiny
    sc = SplitCAM(model, model.conv2)
    torch.manual_seed(0)
    smooth = NoiseTunnel(sc).attribute(
        x, nt_type=nt_type, nt_samples=4, stdevs=0.1, target=y
    )
    assert smooth.shape == (3, 1, 4, 4) and torch.isfinite(smooth).all()
    # the same noise by hand
    torch.manual_seed(0)
    noisy = x.repeat_interleave(4, 0) + torch.normal(0, torch.full((12, 3, 8, 8), 0.1))
    per = sc.attribute(noisy, target=y.repeat_interleave(4)).view(3, 4, 1, 4, 4)
    expected = {
        "smoothgrad": per.mean(1),
        "smoothgrad_sq": per.pow(2).mean(1),
        "vargrad": per.pow(2).mean(1) - per.mean(1).pow(2),
    }[nt_type]
    _close(smooth, expected, rtol=1e-4)
    sg = NoiseTunnel(SplitGrad(model)).attribute(x, nt_type=nt_type, nt_samples=2, target=y)
    assert sg.shape == x.shape


def test_sensitivity_max_and_infidelity(tiny):
    model, x, y = tiny
    sens = sensitivity_max(SplitGrad(model).attribute, x, target=y, n_perturb_samples=3)
    assert sens.shape == (3,) and torch.isfinite(sens).all() and (sens > 0).all()
    sens_cam = sensitivity_max(
        SplitCAM(model, "conv2").attribute, x, target=y, n_perturb_samples=3
    )
    assert sens_cam.shape == (3,) and (sens_cam >= 0).all()

    def perturb(inputs):
        noise = 0.05 * torch.randn_like(inputs)
        return noise, inputs - noise

    layer_map = SplitCAM(model, "conv2", alpha=0.5).attribute(x, target=y)
    attributions = LayerAttribution.interpolate(layer_map, (8, 8)).repeat(1, 3, 1, 1)
    infid = infidelity(model, perturb, x, attributions, target=y, n_perturb_samples=4)
    assert infid.shape == (3,) and torch.isfinite(infid).all()


def test_grad_modes_and_input_requires_grad(tiny):
    model, x, y = tiny
    sc = SplitCAM(model, "conv2")
    ref = sc.attribute(x, target=y)
    with torch.no_grad():
        _close(sc.attribute(x, target=y), ref)
        out = sc.attribute((x,), target=y)  # a 1-tuple in, a 1-tuple out
        assert isinstance(out, tuple) and len(out) == 1
        _close(out[0], ref)
    leaf = x.clone().requires_grad_()
    out = sc.attribute(leaf, target=y)
    _close(out, ref)
    assert leaf.grad is None and not out.requires_grad
    sg = SplitGrad(model).attribute((leaf,), target=y)
    assert isinstance(sg, tuple) and sg[0].shape == x.shape  # like Saliency
    assert leaf.grad is None


def test_additional_forward_args_pass_through(tiny):
    model, x, y = tiny
    sc = SplitCAM(model, "conv2")
    base = sc.attribute(x, target=y)
    _close(sc.attribute(x, target=y, additional_forward_args=1.0), base)
    _close(sc.attribute(x, target=y, additional_forward_args=(4.0,)), base / 4, rtol=1e-4)
    sg = SplitGrad(model, alpha=0.5)
    sal = Saliency(model).attribute(
        x.clone().requires_grad_(), target=y, abs=False, additional_forward_args=(2.0,)
    )
    _close(sg.attribute(x, target=y, additional_forward_args=(2.0,)), 0.5 * sal)


def test_splitgrad_takes_saliencys_arguments_positionally(tiny):
    """``attribute(inputs, target, abs, additional_forward_args)`` in Saliency's order; the
    rest keyword-only; an unknown keyword or a misplaced argument is a TypeError."""
    import inspect

    model, x, y = tiny
    ours = list(inspect.signature(SplitGrad.attribute).parameters)[:5]
    assert ours == list(inspect.signature(Saliency.attribute).parameters)
    sg = SplitGrad(model, alpha=0.5)
    sal = Saliency(model).attribute(x.clone().requires_grad_(), y, True, (2.0,))
    _close(sg.attribute(x, y, True, (2.0,)), 0.5 * sal)
    _close(sg.attribute(x, y, False, (2.0,)),
           sg.attribute(x, target=y, abs=False, additional_forward_args=(2.0,)))
    with pytest.raises(TypeError, match="unexpected keyword argument 'abs_value'"):
        sg.attribute(x, target=y, abs_value=True)
    with pytest.raises(TypeError, match=r"SplitGrad: abs must be True or False; got tuple"):
        sg.attribute(x, y, (2.0,))  # the order before: additional_forward_args third
    with pytest.raises(TypeError, match="positional argument"):
        SplitGrad(model, "conv2").attribute(x, y, False, None, True)  # keyword-only now
    at_input = SplitGrad(model, "relu2", alpha=0.5).attribute(
        x, y, attribute_to_layer_input=True)
    _close(at_input, SplitGrad(model, "conv2", alpha=0.5).attribute(x, y))


def test_model_is_left_unchanged(tiny):
    model, x, y = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    SplitCAM(model, "conv2", sign="+").attribute(x, target=y)
    with pytest.raises(ValueError):
        SplitCAM(model, "conv2").attribute(x, target=9)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


def test_activations_match_captum(tiny):
    # sign None multiplies by the model's own activation, as Captum's LayerActivation sees it
    model, x, y = tiny
    act = LayerActivation(model, model.conv2).attribute(x)
    sg = SplitGrad(model, model.conv2, alpha=0.3)
    sens_only = SplitCAM(model, model.conv2, alpha=0.3).attribute(
        x, target=y, attr_dim_summation=False
    )
    probe = sg.split_model.sensitivities(x, y, layers=["conv2"], alpha=0.3)["conv2"]
    _close(sens_only, probe.g * act)


# ---------------------------------------------------------------- bad input
def test_bad_layer_stream_sign(tiny):
    model, x, y = tiny
    with pytest.raises(ValueError, match="not a submodule"):
        SplitCAM(model, nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="conv2"):  # suggests the close name
        SplitCAM(model, "conv_2")
    with pytest.raises(ValueError, match="needs a layer"):
        SplitCAM(model, None)
    with pytest.raises(ValueError, match="stream"):
        SplitCAM(model, "conv2", stream="G")
    with pytest.raises(ValueError, match="sign"):
        SplitGrad(model, sign="pos")
    with pytest.raises(ValueError, match="maxpool"):
        SplitGrad(model, maxpool="max")
    with pytest.raises(ValueError, match="alpha"):
        SplitCAM(model, "conv2", alpha=0.7)
    with pytest.raises(ValueError, match="shift points"):
        SplitCAM(model, "conv2", alpha={"conv_2": 0.3})
    with pytest.raises(TypeError, match="nn.Module"):
        SplitCAM(lambda t: model(t), "conv2")
    unused = _TinyNet().eval()
    unused.extra = nn.ReLU()
    with pytest.raises(ValueError, match="never calls it"):
        SplitCAM(unused, "extra")


class _NoSplit:
    """Stands in for the split model: any call means work was started."""

    def sensitivities(self, *args, **kwargs):
        raise AssertionError("the split ran before the arguments were checked")


def test_bad_target_fails_before_any_work(tiny, monkeypatch):
    model, x, y = tiny
    sc = SplitCAM(model, "conv2")
    real = sc.split_model
    monkeypatch.setattr(sc, "split_model", _NoSplit())
    for bad, err, msg in [
        (-1, ValueError, "negative"),
        (torch.tensor([0, -2, 1]), ValueError, "negative"),
        ([1, 2], ValueError, "2 targets for a batch of 3"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer"),
        ((1, 2), ValueError, "tuple"),
        (True, TypeError, "bool"),
    ]:
        with pytest.raises(err, match=msg):
            sc.attribute(x, target=bad)
    with pytest.raises(TypeError, match="got builtins.str. Pass a torch.Tensor"):
        sc.attribute((x, "x"), target=y)
    with pytest.raises(TypeError, match="floating-point"):
        sc.attribute(x.to(torch.int64), target=y)
    with pytest.raises(ValueError, match="attribute_to_layer_input"):
        SplitGrad(model).attribute(x, target=y, attribute_to_layer_input=True)
    # a class index past the output: found by core after the forward, before any backward
    monkeypatch.setattr(sc, "split_model", real)
    with pytest.raises(ValueError, match="out of range"):
        sc.attribute(x, target=5)
    # target=None, as in Captum, for one score per row only: known after the forward
    with pytest.raises(ValueError, match=r"target=None explains a model with one score per "
                                         r"row.*this one is \(3, 5\)\. Pass target="):
        sc.attribute(x)


# ---------------------------------------------------------------- the model as it is now
def _copy_of_tiny(tiny):
    import copy

    model, x, y = tiny
    return copy.deepcopy(model), x, y


def test_a_model_changed_after_the_explainer_is_explained_as_it_is_now(tiny):
    model, x, y = _copy_of_tiny(tiny)
    by_name, by_module = SplitCAM(model, "conv2", alpha=0.5), SplitCAM(model, model.conv2,
                                                                     alpha=0.5)
    torch.manual_seed(5)
    other = _TinyNet().eval()
    model.load_state_dict(other.state_dict())  # weights loaded (in place)
    for explainer in (by_name, by_module):
        want = 0.5 * LayerGradientXActivation(model, model.conv2).attribute(x, target=y)
        _close(explainer.attribute(x, target=y), want.sum(1, keepdim=True))
    model.conv2 = nn.Conv2d(6, 8, 3, padding=1)  # a module replaced
    model.conv2.eval()
    want = 0.5 * LayerGradientXActivation(model, model.conv2).attribute(x, target=y)
    _close(by_name.attribute(x, target=y), want.sum(1, keepdim=True))
    assert by_name.layer is model.conv2  # Captum's attribute follows
    with pytest.raises(ValueError, match="not a submodule of the given _TinyNet"):
        by_module.attribute(x, target=y)  # found by identity: the old conv2 is gone
    grad = SplitGrad(model, alpha=0.5)
    model.fc = nn.Linear(8, 5).eval()
    sal = Saliency(model).attribute(x.clone().requires_grad_(), target=y, abs=False)
    _close(grad.attribute(x, target=y), 0.5 * sal)


def test_the_freeze_warning_is_given_once_while_the_model_is_unchanged():
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)).eval()
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="froze 1"):
        explainer = SplitGrad(model, nonlinear="freeze")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explainer.attribute(x, target=1)
        explainer.attribute(x, target=2)
    assert not [w for w in caught if "froze" in str(w.message)]
    model[1] = nn.SiLU()  # other operations frozen: told once more
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explainer.attribute(x, target=1)
        explainer.attribute(x, target=1)
    froze = [str(w.message) for w in caught if "froze" in str(w.message)]
    assert len(froze) == 1 and "silu" in froze[0].lower()


def test_a_compiled_model_is_explained_through_the_module_it_wraps(tiny):
    model, x, y = _copy_of_tiny(tiny)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model)
    with pytest.warns(UserWarning, match="OptimizedModule"):
        grad = SplitGrad(compiled, alpha=0.5)
    _close(grad.attribute(x, target=y), SplitGrad(model, alpha=0.5).attribute(x, target=y))
    want = SplitCAM(model, "conv2").attribute(x, target=y)
    for layer in (model.conv2, "conv2", "_orig_mod.conv2"):
        with pytest.warns(UserWarning, match="OptimizedModule"):
            cam = SplitCAM(compiled, layer)
        assert cam.layer_name == "conv2"
        _close(cam.attribute(x, target=y), want)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("wrap", ["compile", "DataParallel"])
def test_every_adapter_reads_a_wrapped_models_layer_names_the_same_way(tiny, wrap):
    """LayerCAM, GradCAMPlusPlus and the plugin's CAMs refused 'conv2' of a compiled or
    DataParallel model (only '_orig_mod.conv2' / 'module.conv2' or the module worked), where
    SplitCAM and SplitGrad took both: all now resolve through _utils.resolve_layer. A wrong
    'module.conv3' was reported as 'conv3', the prefix dropped."""
    import warnings

    from captum_split import GradCAMPlusPlus, LayerCAM
    from captum_split import plugin as captum_plugin

    model, x, y = _copy_of_tiny(tiny)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # the eager backend: dynamo's wrapper, without inductor's compile time
    wrapper = torch.compile(model, backend="eager") if wrap == "compile" \
        else nn.DataParallel(model)
    prefix = "_orig_mod" if wrap == "compile" else "module"
    table = captum_plugin.splitxai_explainers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the model is wrapped by ..."
        for cls in (SplitCAM, SplitGrad, LayerCAM, GradCAMPlusPlus):
            want = cls(model, "conv2").attribute(x, target=y)
            for layer in ("conv2", f"{prefix}.conv2", model.conv2):
                explainer = cls(wrapper, layer)
                assert explainer.layer is model.conv2
                _close(explainer.attribute(x, target=y), want)
        for cls in (SplitCAM, SplitGrad, LayerCAM, GradCAMPlusPlus):
            # a wrong name is reported as typed (was 'conv3' for 'module.conv3'), the close
            # names given the same way
            for wrong, close in (("conv3", "conv2"), (f"{prefix}.conv3", f"{prefix}.conv2"),
                                 (f"{prefix}.conv3:0", f"{prefix}.conv2")):
                with pytest.raises(ValueError) as err:
                    cls(wrapper, wrong)
                assert str(err.value).startswith(
                    f"{cls.__name__}: layer {wrong!r} is not a module of the model (_TinyNet)")
                assert f". Did you mean {close!r}, " in str(err.value)
            with pytest.raises(ValueError, match="layer is the model itself"):
                cls(wrapper, prefix)
        for key in ("SplitCAM", "LayerCAM", "GradCAMPlusPlus"):
            with pytest.raises(ValueError, match=rf"^{key}: layer '{prefix}\.conv3' is not a "
                                                 rf"module .*Did you mean '{prefix}\.conv2', "):
                table[key](wrapper, x, y, layer=f"{prefix}.conv3")
        for key in ("SplitCAM", "LayerCAM", "GradCAM", "GradCAMPlusPlus"):
            want = table[key](model, x, y, layer="conv2")
            for layer in ("conv2", f"{prefix}.conv2", None):  # None: the last convolution
                _close(table[key](wrapper, x, y, layer=layer), want)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class _Mix(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class _TwoInputLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.mix, self.fc = _Mix(), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mix(torch.relu(self.a(x)), self.b(x)).mean((2, 3)))


def test_layer_input_of_a_layer_with_several_tensors_is_refused():
    model, x = _TwoInputLayer().eval(), torch.randn(2, 3, 6, 6)
    explainer = SplitCAM(model, "mix", alpha=0.5)
    want = 0.5 * LayerGradientXActivation(model, model.mix).attribute(x, target=1)
    _close(explainer.attribute(x, target=1), want.sum(1, keepdim=True))
    for method in (explainer, SplitGrad(model, model.mix)):
        with pytest.raises(ValueError) as err:
            method.attribute(x, target=1, attribute_to_layer_input=True)
        message = str(err.value)
        assert "\n" not in message and "needs a layer with one input tensor; 'mix' is " \
            "called with 2 (graph node 'relu', 'b')" in message
        assert "attribute_to_layer_input=False" in message


@pytest.mark.parametrize("method", ["SplitCAM", "SplitGrad", "LayerCAM", "GradCAMPlusPlus"])
def test_a_nan_target_or_an_empty_batch_is_one_clear_value_error(tiny, method):
    import captum_split

    model, x, y = tiny
    explainer = getattr(captum_split, method)(model, model.conv2)
    cases = {
        "target contains NaN": (x, float("nan")),
        "target contains NaN ": (x, torch.tensor([0.0, float("nan"), 1.0])),
        "inputs has an empty batch": (x[:0], 1),
        "inputs has an empty batch ": (x[:0], []),
    }
    for expected, (inputs, target) in cases.items():
        with pytest.raises(ValueError) as err:
            explainer.attribute(inputs, target=target)
        message = str(err.value)
        assert message.startswith(f"{method}: {expected.strip()}") and "\n" not in message


# ------------------------------------------------------------------ tuple output elements
class _Halves(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.chunk(2, 1)


class _TupleNet(nn.Module):
    """Two modules with tuple outputs: a leaf (max pooling with its indices) and a forward
    returning ``x.chunk``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.halves = _Halves()
        self.fc = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, _ = self.pool(torch.relu(self.conv(x)))
        a, b = self.halves(values)
        return self.fc(torch.relu(2 * a - b).flatten(1))


def _element_reference(model, x, y, module, index):
    """Autograd on element ``index`` of ``module``'s tuple output: (gradient, value)."""
    kept = []
    handle = module.register_forward_hook(lambda m, args, out: kept.append(out[index]))
    try:
        scores = model(x.clone().requires_grad_(True))[torch.arange(len(y)), y]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(scores.sum(), kept[0])
    return grad, kept[0].detach()


def test_an_element_of_a_tuple_output_is_explained_by_its_name():
    """'NAME:i' (the name core's message for a tuple output asks for) was refused by every
    adapter as 'not a module of the model'; SplitCAM keeps its exact identity on it."""
    import torch.nn.functional as F

    from captum_split import GradCAMPlusPlus, LayerCAM
    from captum_split import plugin as captum_plugin

    model = _TupleNet().double().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 4, 2])
    for name, module, index in (("halves:0", model.halves, 0), ("halves:1", model.halves, 1),
                                ("pool:0", model.pool, 0)):
        grad, act = _element_reference(model, x, y, module, index)
        gxa = (grad * act).sum(1, keepdim=True)
        cam = SplitCAM(model, name, alpha=0.5)
        assert cam.layer is module and cam.layer_name == name
        _close(cam.attribute(x, target=y), 0.5 * gxa, rtol=1e-12)
        g = SplitCAM(model, name, alpha=0.3).attribute(x, target=y)
        h = SplitCAM(model, name, alpha=0.3, stream="h").attribute(x, target=y)
        _close(g - h, gxa, rtol=1e-12)
        _close(SplitGrad(model, name, alpha=0.5).attribute(x, target=y),
               0.5 * grad.mean(1, keepdim=True), rtol=1e-12)
        layer_cam = (F.relu(grad) * act).sum(1, keepdim=True).relu()
        _close(LayerCAM(model, name).attribute(x, target=y), layer_cam, rtol=1e-12)
        _close(captum_plugin.splitxai_explainers()["LayerCAM"](model, x, y, layer=name),
               layer_cam, rtol=1e-12)
        if name.startswith("halves"):  # Captum's tuple path (all elements) agrees
            for cls in (LayerCAM, GradCAMPlusPlus):
                _close(cls(model, name).attribute(x, target=y),
                       cls(model, "halves").attribute(x, target=y)[index], rtol=1e-12)
    compiled = torch.compile(model, backend="eager")
    want = SplitCAM(model, "halves:1").attribute(x, target=y)
    with pytest.warns(UserWarning, match="OptimizedModule"):
        _close(SplitCAM(compiled, "_orig_mod.halves:1").attribute(x, target=y), want)
    _close(LayerCAM(compiled, "_orig_mod.halves:1").attribute(x, target=y),
           LayerCAM(model, "halves:1").attribute(x, target=y))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.halves._forward_hooks and not model.pool._forward_hooks


def test_an_element_name_where_it_cannot_be_explained_is_one_clear_value_error():
    from captum_split import GradCAMPlusPlus, LayerCAM
    from captum_split import plugin as captum_plugin

    model = _TupleNet().eval()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    for cls in (SplitCAM, SplitGrad, LayerCAM, GradCAMPlusPlus):
        with pytest.raises(ValueError) as err:
            cls(model, "halves:0").attribute(x, target=y, attribute_to_layer_input=True)
        assert "\n" not in str(err.value)
        assert str(err.value).endswith(
            "'halves:0' is an element of the output of 'halves'; pass layer 'halves' to "
            "explain its input, or attribute_to_layer_input=False to explain 'halves:0'.")
    for cls in (LayerCAM, GradCAMPlusPlus):
        with pytest.raises(ValueError, match=r"'pool:1' is torch.int64, not an activation "
                                             r"\(e.g. pooling indices\); pass 'pool:0'\.$"):
            cls(model, "pool:1").attribute(x, target=y)
        with pytest.raises(ValueError, match=r"'halves:2' does not exist \('halves' outputs 2 "
                                             r"values\); pass 'halves:0', 'halves:1'\.$"):
            cls(model, "halves:2").attribute(x, target=y)
        with pytest.raises(ValueError, match=r"'conv:0' names element 0 of a tuple output, "
                                             r"but 'conv' outputs a Tensor; pass layer 'conv'"):
            cls(model, "conv:0").attribute(x, target=y)
    with pytest.raises(ValueError, match=r"^GradCAM: layer 'halves:0' is an element .*Captum's "
                                         r"LayerGradCam cannot select; use LayerCAM"):
        captum_plugin.splitxai_explainers()["GradCAM"](model, x, y, layer="halves:0")


def test_a_tuple_output_with_indices_by_its_bare_name_is_one_clear_value_error():
    """LayerCAM and GradCAMPlusPlus on 'pool' (MaxPool2d with return_indices) failed deep in
    Captum's autograd ('One of the differentiated Tensors does not require grad'); now the
    message of SplitCAM and core (checks.tuple_output), naming the element to pass."""
    from captum_split import GradCAMPlusPlus, LayerCAM
    from captum_split import plugin as captum_plugin

    model = _TupleNet().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    for cls in (LayerCAM, GradCAMPlusPlus):
        for layer in ("pool", model.pool):
            with pytest.raises(ValueError) as err:
                cls(model, layer).attribute(x, target=y)
            assert str(err.value) == (
                f"{cls.__name__}: layer 'pool' outputs a tuple of 2 values, not one tensor; "
                "pass one of its activations as the layer: 'pool:0'")
        assert not model.pool._forward_hooks and not model.pool._forward_pre_hooks
        # the input of the layer is one tensor, and a tuple of activations is Captum's
        assert cls(model, "pool").attribute(x, target=y, attribute_to_layer_input=True) \
            .shape == (2, 1, 8, 8)
        assert len(cls(model, "halves").attribute(x, target=y)) == 2
    with pytest.raises(ValueError, match=r"^LayerCAM: layer 'pool' outputs a tuple"):
        captum_plugin.splitxai_explainers()["LayerCAM"](model, x, y, layer="pool")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class _EagerTupleNet(_TupleNet):
    """_TupleNet with a branch on a value, so that it is captured by running it: its shift
    points, and so the names in an alpha dict, are known only at attribute()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if bool(out.sum() != 1e9) else -out


def test_errors_of_the_split_name_the_method_in_its_words():
    """Errors raised by core reached SplitCAM / SplitGrad users unprefixed and asking to
    'probe' names ("layer 'halves' outputs a tuple ...; probe its activations by name"),
    an alpha dict naming unknown shift points of an eagerly captured model too, and
    attribute_to_layer_input on a layer with several inputs lost its SeveralInputsError
    type; every message now starts with the method and asks for a layer, type kept."""
    import core

    model, eager = _TupleNet().eval(), _EagerTupleNet().eval()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    for cls in (SplitCAM, SplitGrad):
        method = cls.__name__
        for layer, expected in (
            ("halves", "layer 'halves' outputs a tuple of 2 values, not one tensor; pass one of "
                       "its activations as the layer: 'halves:0', 'halves:1'"),
            ("pool", "layer 'pool' outputs a tuple of 2 values, not one tensor; pass one of its "
                     "activations as the layer: 'pool:0'"),
            ("pool:1", "layer 'pool:1' is a Tensor that the split does not carry as a pair (e.g. "
                       "pooling indices), not an activation; pass a layer that is one"),
            ("halves:5", "layer 'halves:5' names element 5 of the output of 'halves', but the "
                         "forward never takes that element out on its own (halves(...)[5]); pass "
                         "layer 'halves' or a module that reads the element"),
        ):
            with pytest.raises(ValueError) as err:
                cls(model, layer).attribute(x, target=y)
            assert str(err.value) == f"{method}: {expected}"
        explainer = cls(eager, "conv", alpha={"conv": 0.2})  # known at attribute() only
        assert explainer.split_model.capture.symbolic is None
        with pytest.raises(ValueError) as err:
            explainer.attribute(x, target=y)
        assert str(err.value).startswith(f"{method}: alpha names unknown shift points ['conv']")
        assert "probe" not in str(err.value)
    # the type and its further arguments are kept
    mix = _TwoInputLayer().eval()
    for cls in (SplitCAM, SplitGrad):
        with pytest.raises(core.SeveralInputsError) as err:
            cls(mix, "mix").attribute(torch.randn(2, 3, 6, 6), target=1,
                                      attribute_to_layer_input=True)
        assert str(err.value).startswith(f"{cls.__name__}: attribute_to_layer_input=True")
        assert err.value.module == "mix" and err.value.sources == ("graph node 'relu'", "'b'")
    silu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Flatten(), nn.Linear(64, 2)).eval()
    with pytest.raises(core.UnsupportedOperation) as err:
        SplitCAM(silu, "0").attribute(torch.randn(2, 3, 6, 6), target=1)
    assert str(err.value).startswith("SplitCAM: ")
    with pytest.raises(core.UnsupportedOperation, match="^SplitGrad: .*TorchScript"):
        SplitGrad(torch.jit.script(silu))


def test_with_caller_prefixes_the_message_in_place():
    from core.errors import SeveralInputsError, caller, with_caller

    err = SeveralInputsError("layer 'mix:input': ...", "mix", ("'a'", "'b'"))
    assert with_caller(err, "SplitCAM") is err and with_caller(err, "SplitCAM") is err
    assert type(err) is SeveralInputsError and err.args == ("SplitCAM: layer 'mix:input': ...",)
    assert (err.module, err.sources) == ("mix", ("'a'", "'b'"))
    with pytest.raises(OSError) as raised, caller("SplitGrad"):
        raise OSError(2, "No such file")  # args[0] is no message: a note instead
    assert raised.value.args == (2, "No such file") and raised.value.__notes__ == ["in SplitGrad"]
    with pytest.raises(KeyError) as raised, caller("SplitGrad"):
        raise KeyError("conv")
    assert raised.value.args == ("SplitGrad: conv",)


@pytest.mark.parametrize("method", ["SplitCAM", "LayerCAM", "GradCAMPlusPlus"])
@pytest.mark.parametrize("flag", ["attribute_to_layer_input", "relu_attributions",
                                  "attr_dim_summation"])
def test_a_flag_that_is_not_a_bool_is_one_type_error(tiny, method, flag):
    """relu_attributions and attr_dim_summation (and LayerCAM's / GradCAMPlusPlus's
    attribute_to_layer_input) took any value as true or false: a tensor or a dict one
    position off was silently read as a flag."""
    import captum_split

    model, x, y = tiny
    explainer = getattr(captum_split, method)(model, "conv2")
    for value in (None, 1, torch.tensor(True), {}):
        with pytest.raises(TypeError) as err:
            explainer.attribute(x, y, None, **{flag: value})
        assert str(err.value) == (
            f"{method}: {flag} must be True or False; got {type(value).__name__}. Check the "
            "order of positional arguments, or pass it by keyword.")


def _cancelling_model(a: float, k: float, units: int = 2) -> nn.Module:
    """ReLU units of activation ``a`` (for an input of ones), then two layers of +-k weights
    whose rows cancel (the output is 0): the S stream at the units is 2 k^2 at alpha=0,
    finite, while the model's gradient there is 0."""
    first = nn.Linear(1, units, bias=False)
    mid, last = nn.Linear(units, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        first.weight.fill_(a)
        mid.weight.copy_(torch.tensor([1.0, -1.0]).repeat(2, units // 2) * k)
        last.weight.copy_(torch.tensor([[k, -k], [k, -k]]))
    return nn.Sequential(first, nn.ReLU(), mid, nn.ReLU(), last).eval()


def test_a_map_that_overflows_from_finite_factors_is_refused_naming_the_layer():
    """SplitCAM returned NaN/inf (densenet121 with conv weights x3, alpha <= 0.3 at
    features.denseblock3: sensitivities 2e35 times activations 1e19) where the probe was
    finite; SplitGrad's channel mean of finite sensitivities can overflow the same way."""
    model, x = _cancelling_model(1e19, 1e10), torch.ones(1, 1)
    probe = core.split(model).sensitivities(x, 0, ["1"], alpha=0.0)["1"]
    assert torch.isfinite(probe.S).all() and torch.isfinite(probe.activation).all()
    with pytest.raises(core.SplitOverflowError,
                       match=r"SplitCAM: the map at layer '1' overflowed torch\.float32 at "
                             r"alpha=0 .*larger alpha.*float64"):
        SplitCAM(model, "1", alpha=0.0).attribute(x, target=0)
    assert torch.isfinite(SplitCAM(model, "1", alpha=0.5).attribute(x, target=0)).all()
    model = _cancelling_model(1.0, 1e19, units=4)  # S = 2e38, pos_g = 0 or 2e38 per unit
    probe = core.split(model).sensitivities(x, 0, ["1"], alpha=0.0)["1"]
    assert torch.isfinite(probe.pos_g).all() and probe.pos_g.max() > 1e38
    with pytest.raises(core.SplitOverflowError, match=r"SplitGrad: the map at layer '1'"):
        SplitGrad(model, "1", alpha=0.0, sign="+").attribute(x, target=0)
