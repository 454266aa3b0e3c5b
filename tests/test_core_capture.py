"""Capture (issue 11, point 1): models that symbolic tracing cannot follow split exactly --
control flow on shapes and values, optional and keyword arguments, several inputs, structured
outputs, module hooks, wrapped models -- and capture never changes the model."""

from __future__ import annotations

import collections
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core
from tests.core_checks import assert_rel_close, check_float64_exact, max_abs


def _grads(model: nn.Module, inputs: tuple, target: int, **kwargs) -> tuple:
    xs = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    out = model(*xs, **kwargs)
    return torch.autograd.grad(out[:, target].sum(), xs)


def _check_exact(sm: core.SplitModel, model: nn.Module, x, *extra, rel: float = 1e-5,
                 **kwargs) -> None:
    with torch.no_grad():
        f = model(*(x if isinstance(x, tuple) else (x,)), *extra, **kwargs)
    g, h = sm(x, *extra, **kwargs)
    assert_rel_close(g - h, f, rel, scale=max_abs(g))


# --------------------------------------------------------------------------- control flow
class ValueBranch(nn.Module):
    """Python control flow on tensor values and on shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.a(x))
        if z.sum() > 3:  # value dependent
            z = -z
        if x.shape[0] > 2:  # shape dependent
            z = z * 2
        for _ in range(int(x.shape[1] // 2)):
            z = z + 0.5
        return self.b(z)


def test_control_flow_on_values_and_shapes_splits_exactly():
    torch.manual_seed(0)
    model = ValueBranch().eval()
    sm = core.split(model)
    for scale, batch in ((0.01, 2), (10.0, 2), (10.0, 4)):  # both branches, both shapes
        x = torch.randn(batch, 4) * scale
        _check_exact(sm, model, x)
        probes = sm.sensitivities(x, 1, ["input", "a"], alpha=0.5)
        (grad,) = _grads(model, (x,), 1)
        assert_rel_close(probes["input"].grad, grad, 1e-5)
        assert_rel_close(probes["input"].g, grad / 2, 1e-5)
    # the value-dependent graph is recorded again for every call, never cached
    assert sm.capture.cached == 0


# --------------------------------------------------------------------------- arguments
class Optional(nn.Module):
    """Optional tensor input, a keyword flag and a scale with defaults."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, x2=None, *, scale: float = 1.0, pool: bool = True):
        if x2 is not None:
            x = x + x2
        z = F.relu(self.conv(x)) * scale
        z = z.mean((2, 3)) if pool else z[:, :, 0, 0]
        return self.fc(z)


def test_optional_and_keyword_arguments_and_several_inputs():
    torch.manual_seed(1)
    model = Optional().eval()
    sm = core.split(model)
    x, x2 = torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 5)
    _check_exact(sm, model, x)
    _check_exact(sm, model, x, scale=3.0, pool=False)
    _check_exact(sm, model, x, x2)  # x2 as a constant argument
    _check_exact(sm, model, (x, x2))  # both inputs split
    probes = sm.sensitivities((x, x2), 2, ["input", "input:1", "conv"], alpha=0.5)
    grads = _grads(model, (x, x2), 2)
    assert isinstance(probes["input"], tuple) and len(probes["input"]) == 2
    for probe, grad in zip(probes["input"], grads, strict=True):
        assert_rel_close(probe.grad, grad, 1e-5)
        assert_rel_close(probe.g - probe.h, grad, 1e-5)
    assert torch.equal(probes["input:1"].grad, probes["input"][1].grad)
    pairs = sm.pairs((x, x2), ["input"])["input"]
    assert torch.equal(pairs[1].d, x2)
    # model(x) uses the symbolic graph; the other calls one recording per signature
    assert sm.prepare(x).captured.mechanism == "symbolic"
    assert sm.capture.cached == 3
    sm((x * 2, x2))
    assert sm.capture.cached == 3


# --------------------------------------------------------------------------- outputs
@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    features: torch.Tensor


class Structured(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        z = self.body(x)
        y = self.head(z)
        if self.kind == "tuple":
            return y, z
        if self.kind == "dict":
            return {"logits": y, "features": z}
        return Output(y, z)


@pytest.mark.parametrize("kind,output", [("tuple", 0), ("dict", "logits"),
                                         ("dataclass", "logits"),
                                         ("dataclass", lambda o: o.logits * 2)])
def test_structured_outputs_need_and_take_a_selector(kind, output):
    torch.manual_seed(2)
    model = Structured(kind).eval()
    x = torch.randn(3, 4)
    with pytest.raises(core.UnsupportedOperation, match="output="):
        core.split(model)(x)
    sm = core.split(model, output=output)
    g, h = sm(x)
    with torch.no_grad():
        out = model(x)
    want = {"tuple": lambda: out[0], "dict": lambda: out["logits"],
            "dataclass": lambda: out.logits}[kind]()
    if callable(output):
        want = want * 2
    assert_rel_close(g - h, want, 1e-5, scale=max_abs(g))
    probe = sm.sensitivities(x, 0, ["body"], alpha=0.5)["body"]
    assert probe.activation.shape == (3, 8)



def test_a_namedtuple_output_is_selected_by_field_and_bad_selectors_are_named():
    """``output="logits"`` on a namedtuple gave a raw 'tuple indices must be integers'
    TypeError; an index out of range or a missing key a bare IndexError / KeyError."""
    Out = collections.namedtuple("Out", "logits features")
    model = Structured("tuple").eval()
    model.forward = lambda x: Out(*Structured.forward(model, x))
    x = torch.randn(3, 4)
    g, h = core.split(model, output="logits", reuse_capture=False)(x)
    with torch.no_grad():
        assert_rel_close(g - h, model(x).logits, 1e-5, scale=max_abs(g))
    with pytest.raises(TypeError, match=r"fields \['logits', 'features'\]"):
        core.split(model, output="nope", reuse_capture=False)(x)
    with pytest.raises(IndexError, match="Out of 2 elements"):
        core.split(model, output=5, reuse_capture=False)(x)
    with pytest.raises(KeyError, match="its keys: \\['logits', 'features'\\]"):
        core.split(Structured("dict").eval(), output="nope")(x)

class TupleLayer(nn.Module):
    def forward(self, a, b):
        return F.relu(a), F.relu(b)


class UsesTupleLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.pair = TupleLayer()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        z = self.lin(x)
        a, b = self.pair(z, z - 1)
        return self.out(a + b)


def test_a_module_with_a_tuple_output_is_probed_per_element():
    torch.manual_seed(3)
    model = UsesTupleLayer().eval()
    x = torch.randn(2, 3)
    sm = core.split(model)
    probes = sm.sensitivities(x, 1, ["pair", "pair:1"], alpha=0.5)
    assert isinstance(probes["pair"], tuple) and len(probes["pair"]) == 2
    z = model.lin(x).detach().requires_grad_(True)
    a, b = F.relu(z), F.relu(z - 1)
    a.retain_grad(), b.retain_grad()
    model.out(a + b)[:, 1].sum().backward()
    assert_rel_close(probes["pair"][0].grad, a.grad, 1e-6)
    assert_rel_close(probes["pair:1"].grad, b.grad, 1e-6)
    # SplitLRP reports one relevance per name: the tuple's elements are named
    with pytest.raises(ValueError, match="'pair' outputs a tuple of 2 values.*'pair:0', 'pair:1'"):
        sm.relevance(x, torch.ones(2, 2), ["pair"])
    assert sm.relevance(x, torch.ones(2, 2), ["pair:1"])["pair:1"].pos.shape == (2, 4)


# --------------------------------------------------------------------------- hooks
def _small() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("where", ["root", "leaf", "pre"])
def test_module_hooks_run_in_the_split(where):
    model = _small()
    if where == "root":
        model.register_forward_hook(lambda m, args, out: out * 2 + 1)
    elif where == "leaf":
        model[1].register_forward_hook(lambda m, args, out: out - 0.5)
    else:
        model[2].register_forward_pre_hook(lambda m, args: (args[0] * 3,))
    x = torch.randn(5, 4)
    sm = core.split(model)
    _check_exact(sm, model, x)
    probe = sm.sensitivities(x, 0, ["input"], alpha=0.5)["input"]
    (grad,) = _grads(model, (x,), 0)
    assert_rel_close(probe.grad, grad, 1e-5)


# --------------------------------------------------------------------------- model unchanged
class Counter(nn.Module):
    """A forward that updates buffers: a call counter and an EMA of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x, flag: bool = False):
        self.calls += 1
        self.ema.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return self.fc(F.relu(x))


@pytest.mark.parametrize("flag", [False, True])  # symbolic, eager capture
def test_a_forward_that_updates_buffers_does_so_on_a_copy(flag):
    torch.manual_seed(5)
    model = Counter().eval()
    before = {n: (b.clone(), b._version, b.data_ptr()) for n, b in model.named_buffers()}
    x = torch.randn(2, 4)
    sm = core.split(model)
    args = (flag,) if flag else ()
    sm(x, *args)
    sm.sensitivities(x, 1, ["fc", "input"], extra_args=args)
    sm.relevance(x, torch.eye(3)[[1, 1]], extra_args=args)
    for name, b in model.named_buffers():
        value, version, ptr = before[name]
        assert torch.equal(b, value) and b._version == version and b.data_ptr() == ptr, name


class Trainable(Counter):
    """A forward that reads ``self.training`` and writes an attribute and a buffer."""

    def forward(self, x, flag: bool = False):
        if self.training:
            self.saw_training = True
            x = x * 2
        self.calls += 1
        self.last = x.shape[0]
        return self.fc(F.relu(x))


@pytest.mark.parametrize("reuse", [True, False])
def test_tracing_a_model_in_training_mode_runs_in_eval_mode_and_leaves_it_unchanged(reuse):
    """Symbolic capture traces an eval-mode copy of the module tree (core.twin.module_twin):
    the model's flags, attributes and buffers (values and version counters) stay as they
    were."""
    model = Trainable().train()
    model.fc.eval()  # mixed flags are kept module by module
    before = {n: (b.clone(), b._version) for n, b in model.named_buffers()}
    sm = core.split(model, reuse_capture=reuse)
    assert sm.capture.symbolic is not None
    assert model.training and not model.fc.training
    assert "saw_training" not in vars(model) and "last" not in vars(model)
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name][0]) and b._version == before[name][1], name
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(sm.forward_pairs(x).d, model.fc(F.relu(x)))  # eval branch


class Keeper(nn.Module):
    """A forward that writes Python and tensor attributes and a submodule's attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.seen = 0
        self.scale = torch.ones(4)

    def forward(self, x, flag: bool = False):
        self.seen += 1
        self.last = x.shape
        self.scale.mul_(2)
        self.fc.touched = True
        return self.fc(F.relu(x))


@pytest.mark.parametrize("flag", [False, True])  # symbolic, eager capture
@pytest.mark.parametrize("reuse", [True, False])
def test_a_forward_that_writes_attributes_does_so_on_a_copy(flag, reuse):
    torch.manual_seed(6)
    model = Keeper().eval()
    x = torch.randn(2, 4)
    sm = core.split(model, reuse_capture=reuse)
    args = (flag,) if flag else ()
    sm(x, *args)
    sm.sensitivities(x, 1, ["fc", "input"], extra_args=args)
    assert model.seen == 0 and "last" not in vars(model) and "touched" not in vars(model.fc)
    assert torch.equal(model.scale, torch.ones(4))


def test_a_forward_replaced_on_the_instance_runs_on_the_copy():
    """``model.forward = model.other`` (a bound method) and a closure over the model: the
    module calls reach the twins (a closure's calls were attributed to no layer), the split
    is exact and the user's model is not written."""
    torch.manual_seed(5)
    for replace in ("method", "closure"):
        model = Keeper().double().eval()
        if replace == "method":
            model.forward = model.forward  # bound to the model, stored on the instance
        else:
            model.forward = lambda x, m=model: Keeper.forward(m, x) * 3
        x = torch.randn(2, 4, dtype=torch.float64)
        sm = core.split(model)
        g, h = sm(x)
        want = model.fc(F.relu(x)) * (3 if replace == "closure" else 1)
        torch.testing.assert_close(g - h, want, rtol=1e-12, atol=1e-12)
        sens = sm.sensitivities(x, 1, ["fc"])
        assert sens["fc"].grad.shape == (2, 3)
        if replace == "method":  # the closure writes the user's model itself (documented)
            assert model.seen == 0 and "touched" not in vars(model.fc)


class Masked(nn.Module):
    """Tensor arguments that are not split: a mask and indices."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, mask, index=None):
        y = F.relu(x) * mask
        if index is not None:
            y = y.index_select(1, index)
        return self.fc(y)


def test_tensor_arguments_are_read_at_every_call():
    """A mask or indices passed with the input are read at every call, not baked into the
    graph recorded at the first call (which gave the first call's numbers for the next
    masks)."""
    torch.manual_seed(7)
    model = Masked().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    sm = core.split(model)
    for _ in range(3):
        mask = (torch.rand(3, 4) > 0.5).double()
        index = torch.randperm(4)
        _check_exact(sm, model, x, mask, index=index, rel=1e-12)
        _check_exact(sm, model, x, mask, rel=1e-12)
        sens = sm.sensitivities(x, 2, ["input"], extra_args=(mask,), kwargs={"index": index})
        want = _grads(model, (x,), 2, mask=mask, index=index)[0]
        torch.testing.assert_close(sens["input"].grad, want, rtol=1e-10, atol=1e-12)
    assert sm.capture.cached == 2  # one graph per signature, not per mask
    # an argument that is the input itself is the split input (relu(x) * x), not a constant
    _check_exact(sm, model, x, x, rel=1e-12)
    sens = sm.sensitivities(x, 2, ["input"], extra_args=(x,))
    xx = x.clone().requires_grad_(True)
    want = torch.autograd.grad(model(xx, xx)[:, 2].sum(), xx)[0]
    torch.testing.assert_close(sens["input"].grad, want, rtol=1e-10, atol=1e-12)
    _check_exact(sm, model, x, torch.ones_like(x), rel=1e-12)


# --------------------------------------------------------------------------- wrappers, errors
def test_wrapped_models_are_split_through_the_module_they_wrap():
    model = _small()
    x = torch.randn(2, 4)
    for wrapper in (nn.DataParallel(model), torch.compile(model)):
        with pytest.warns(UserWarning, match="wrapped"):
            sm = core.split(wrapper)
        assert sm.model is model
        _check_exact(sm, model, x)



def test_hooks_on_a_wrapper_are_refused_not_left_out():
    """A hook on the DataParallel / torch.compile wrapper runs around it, and the split
    took the wrapped module: g - h was model(x) without the hook (off by 0.5 of its size)."""
    from zennit.attribution import Gradient

    from zennit_split import SplitLRP

    model = _small()
    x = torch.randn(2, 4)
    for wrap in (nn.DataParallel, torch.compile):
        for kind in ("forward_hooks", "forward_pre_hooks"):
            wrapper = wrap(model)
            if kind == "forward_hooks":
                wrapper.register_forward_hook(lambda m, i, o: o * 2)
            else:
                wrapper.register_forward_pre_hook(lambda m, i: (i[0] * 3,))
            with pytest.raises(core.UnsupportedOperation, match=f"wrapper has {kind}: "):
                core.split(wrapper)
        # SplitLRP's own hooks on the wrapper are no user's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Gradient(wrap(model), SplitLRP()) as attributor:
                _, relevance = attributor(x, torch.eye(3)[[0, 2]])
        assert torch.isfinite(relevance).all()


def test_a_wrapper_inside_the_model_is_named():
    """A DataParallel inside the model was refused as 'not piecewise linear'."""

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.DataParallel(nn.Linear(4, 4))
            self.b = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(core.UnsupportedOperation,
                       match=r"'a' \(DataParallel\): a DataParallel inside the model .* "
                             r"Wrap the whole model"):
        core.split(Inner().eval())(torch.randn(2, 4))


def test_unsupported_kinds_of_models_and_inputs_name_the_cause():
    model = _small()
    x = torch.randn(2, 4)
    with pytest.raises(core.UnsupportedOperation, match="TorchScript"):
        core.split(torch.jit.script(model))
    with pytest.raises(ValueError, match="meta"):
        core.split(nn.Linear(4, 3, device="meta"))
    lazy = nn.Sequential(nn.LazyLinear(6), nn.ReLU(), nn.Linear(6, 3))
    message = r"\['0.weight', '0.bias'\] are not initialised.*model\(x\)"
    with pytest.raises(ValueError, match=message):
        core.split(lazy)
    lazy(x)  # the first forward gives the lazy module its shapes
    _check_exact(core.split(lazy), lazy, x)
    sm = core.split(model)
    with pytest.raises(ValueError, match="meta"):
        sm(torch.empty(2, 4, device="meta"))
    with torch.inference_mode():
        frozen = torch.randn(2, 4)
        with pytest.raises(RuntimeError, match="inference_mode"):
            sm(x)
    with pytest.raises(RuntimeError, match="inference"):
        sm(frozen)


def test_non_finite_model_output_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():  # every hidden unit at 40: the output overflows, whatever the seed
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[2].weight.fill_(3e38)
    x = torch.full((2, 4), 10.0)
    with pytest.raises(ValueError, match="output is not finite"):
        core.split(model)(x)


class MultiArgError(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code, self.detail = code, detail


def test_errors_keep_their_type_and_arguments():
    from core.interpreter import SplitInterpreter
    from core.registry import Rule

    model = _small()
    sm = core.split(model)
    call = sm.prepare(torch.randn(2, 4))
    interp: SplitInterpreter = call.interpreter
    step = next(s for s in interp.steps.values() if s.rule is not None)

    def boom(ctx, args, kwargs):
        raise MultiArgError(7, "detail")

    broken = dataclasses.replace(step, rule=Rule(boom))
    with pytest.raises(MultiArgError) as err:
        interp.run_rule(broken, (), {})
    assert err.value.args == (7, "detail") and err.value.code == 7
    assert any(step.where in note for note in err.value.__notes__)
    with pytest.raises(RuntimeError) as err:  # a wrong input size: the layer is named
        sm(torch.randn(2, 5))
    assert "'0'" in " ".join(getattr(err.value, "__notes__", []))
    assert "while" not in str(err.value.args[0])


def test_training_mode_is_explained_with_eval_semantics_in_eager_capture():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5),
                          nn.Flatten(), nn.Linear(27, 2))
    model[1].running_mean.normal_()
    model.eval()
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        want = model(x)
    model.train()
    model.register_forward_hook(lambda m, a, out: out)  # forces the eager capture
    buffers = {n: (b.clone(), b._version) for n, b in model.named_buffers()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = core.split(model)
        g, h = sm(x)
        sm.sensitivities(x, 1, ["1"])
        sm.relevance(x, torch.eye(2)[[0, 1]])
    assert_rel_close(g - h, want, 1e-5, scale=max_abs(g))
    assert all(m.training for m in model.modules())
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name][0]) and b._version == buffers[name][1], name


def test_huge_inputs_raise_instead_of_returning_non_finite_streams():
    model = _small()
    sm = core.split(model)
    with pytest.raises((ValueError, core.SplitOverflowError), match="not finite|overflowed"):
        sm(torch.full((2, 4), 3e38))


@pytest.mark.slow
def test_splitlrp_overflow_names_the_layer_instead_of_returning_nan():
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = tvm.resnet152(weights=None).eval()
    x, seed = torch.randn(1, 3, 64, 64), torch.eye(1000)[[3]]
    # the "shift" stabiliser's pairs (d/2, -d/2) make eq. 9's ratios overflow float32 here
    sm = core.split(model, merge_batchnorm=True, stabilizer="shift")
    with pytest.raises(core.SplitOverflowError, match=r"SplitLRP relevance overflowed.*'layer"):
        sm.relevance(x, seed)
    # "scale" (the default) keeps the parts non-negative in SplitLRP: the relevance is
    # finite and conserved (it overflowed too while a lowered mass could fall below |d|)
    r = core.split(model, merge_batchnorm=True).relevance(x, seed)["input"]
    assert abs(float((r.pos + r.neg).sum()) - 1.0) < 1e-3


class ItemAssignment(nn.Module):
    """``attn[:, 1:, 1:] = attn[:, 1:, 1:] + ...`` as in MViTv2's relative positions, a
    constant written into an activation and an activation into a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 9)
        self.b = nn.Linear(4, 9)
        self.fc = nn.Linear(9 + 9 + 6, 3)

    def forward(self, x):
        attn = self.a(x).view(-1, 3, 3)
        r = torch.relu(self.b(x)).view(-1, 3, 3)
        attn[:, 1:, 1:] = attn[:, 1:, 1:] + 2 * r[:, :2, :2]   # a pair into a pair
        attn[:, 0] = 0.5                                        # a constant into a pair
        base = torch.ones(x.shape[0], 6, dtype=x.dtype)
        base[:, ::2] = r[:, 0]                                  # a pair into a constant
        return self.fc(torch.cat([attn.flatten(1), r.flatten(1), base], 1))


def test_item_assignment_is_recorded_and_split_exactly():
    torch.manual_seed(3)
    model = ItemAssignment().double().eval()
    x = torch.randn(4, 4, dtype=torch.float64)
    sm = core.split(model)
    check_float64_exact(sm, model, x, 2)


class DisjointViews(nn.Module):
    """Writes into one of several views of one tensor and reads the others afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.fc = nn.Linear(15, 2)

    def forward(self, x):
        t = self.qkv(x).view(-1, 3, 4)
        q, k, v = t[:, 0], t[:, 1], t[:, 2]               # rows of one storage
        u = self.qkv(x)
        a, b = u[:, ::2], u[:, 1::2]                      # interleaved columns
        q[:, 0] = 0.0                                     # the writes touch q and a only
        a[:, 1:] = 2 * a[:, 1:]
        kept = [q + k, torch.relu(v - q), torch.relu(b), a.sum(1, keepdim=True)]
        return self.fc(torch.cat(kept, 1))


def test_views_whose_elements_an_item_assignment_did_not_write_stay_usable():
    torch.manual_seed(4)
    model = DisjointViews().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    sm = core.split(model)
    check_float64_exact(sm, model, x, 1, alpha=0.2)


def test_a_view_taken_before_an_item_assignment_is_refused():
    class StaleView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            z = self.a(x)
            tail = z[:, 1:]          # a view of z ...
            z[:, 1] = 0.0            # ... whose values this write changes
            return self.fc(torch.cat([z[:, :1], tail], 1))

    model = StaleView().eval()
    with pytest.raises(core.UnsupportedOperation, match="written in place"):
        core.split(model)(torch.randn(2, 4))


# --------------------------------------------------------------------------- several inputs
class _Mix(nn.Module):
    """A bilinear-like module with two tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ self.w) * b


class _TwoArgNet(nn.Module):
    """``mix`` takes two input-dependent tensors, ``gate`` one and an unsplit mask."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(3, 4)
        self.mix, self.gate, self.out = _Mix(), _Gate(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        z = self.mix(torch.relu(self.l1(x)), self.l2(x))
        if mask is not None:
            z = self.gate(z, mask)
        return self.out(torch.relu(z))


class _Gate(nn.Module):
    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return z * mask


@pytest.mark.parametrize("capture", ["symbolic", "eager"])
def test_a_module_with_several_tensor_inputs_keeps_them_and_refuses_its_input_probe(capture):
    torch.manual_seed(0)
    model = _TwoArgNet().double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    extra = () if capture == "symbolic" else (torch.tensor([1.0, 0.0, 1.0, 1.0]).double(),)
    sm = core.split(model)
    assert sm.prepare(x, extra).captured.mechanism == capture
    assert "mix" in sm.layer_names(x, *extra) and "mix:input" not in sm.layer_names(x, *extra)
    # the sensitivities at and below the module flow through both of its inputs
    probes = sm.sensitivities(x, 1, layers=["mix", "l1", "l2", "input"], alpha=0.5,
                              extra_args=extra)
    a = torch.relu(model.l1(x)).detach().requires_grad_()
    b = model.l2(x).detach().requires_grad_()
    z = model.mix(a, b)
    z_leaf = z.detach().requires_grad_()
    tail = (lambda t: model.gate(t, extra[0])) if extra else (lambda t: t)
    grad_z, = torch.autograd.grad(model.out(torch.relu(tail(z_leaf)))[:, 1].sum(), z_leaf)
    grad_a, grad_b = torch.autograd.grad(z, [a, b], grad_z)
    torch.testing.assert_close(probes["mix"].grad, grad_z, rtol=0, atol=1e-12)
    torch.testing.assert_close(probes["mix"].g, grad_z / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(probes["l2"].grad, grad_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(probes["input"].grad, _grads(model, (x, *extra), 1)[0],
                               rtol=0, atol=1e-12)
    assert probes["l1"].grad.abs().sum() > 0 and probes["l2"].grad.abs().sum() > 0
    # its input is no single tensor: refused with one line naming the module and its sources
    with pytest.raises(core.SeveralInputsError) as err:
        sm.sensitivities(x, 1, layers=["mix:input"], extra_args=extra)
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert "module 'mix' is called with 2 tensors" in message and "'l2'" in message
    assert "the module's output 'mix'" in message
    assert err.value.module == "mix" and len(err.value.sources) == 2
    if extra:  # a mask passed along is not an input: gate's input is z
        assert "gate:input" in sm.layer_names(x, *extra)
        gate_in = sm.sensitivities(x, 1, layers=["gate:input"], extra_args=extra)["gate:input"]
        torch.testing.assert_close(gate_in.activation, z.detach(), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- addmm, export
class _AddMM(nn.Module):
    """A Linear written as ``torch.addmm(b, x, W.t())`` (and its variants)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.hidden = nn.Linear(4, 6)
        self.weight = nn.Parameter(torch.randn(3, 6))
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.hidden(x))
        if self.form == "function":
            return torch.addmm(self.bias, a, self.weight.t())
        if self.form == "scaled":
            return torch.addmm(self.bias, a, self.weight.t(), beta=-0.5, alpha=2.0)
        if self.form == "method":
            return self.bias.expand(a.shape[0], 3).addmm(a, self.weight.t())
        # both matrices activations, the bias an activation too: the product rule
        return torch.addmm(a[:, :3], a[:, :3], a[:, 3:].t() @ a[:, 3:])


@pytest.mark.parametrize("form", ["function", "scaled", "method", "activations"])
def test_addmm_splits_exactly(form):
    """Was 'addmm is not piecewise linear or has no split-pair rule'."""
    torch.manual_seed(0)
    model = _AddMM(form).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    check_float64_exact(core.split(model), model, x, target=1)
    relevance = core.split(model).relevance(x, torch.ones(5, 3, dtype=torch.float64))
    assert torch.isfinite(relevance["input"].comb).all()


def test_an_operation_without_a_rule_is_named_with_what_to_do():
    class Sine(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sin(x)

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(4, 3, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x.unsqueeze(1))[0][:, 0]

    with pytest.raises(core.UnsupportedOperation,
                       match=r"graph node 'sin' \(call_function sin\): sin is not piecewise "
                             r"linear or has no split-pair rule\. Express it .* register a "
                             r"split-pair rule for it with core\.registry\.register"):
        core.split(Sine())
    with pytest.raises(core.UnsupportedOperation,
                       match=r"module 'rnn' \(RNN\): RNN .*Replace it .*core\.registry\.register"):
        core.split(Recurrent())


def test_torch_export_programs_are_refused_naming_the_cause():
    """``ExportedProgram.module()`` was 'Module [GraphModuleImpl] is missing the required
    "forward" function' (a NotImplementedError from the split's module twin)."""
    model = _small()
    x = torch.randn(2, 4)
    program = torch.export.export(model, (x,))
    fix = r"Pass the original nn.Module \(the model given to torch.export.export\)"
    with pytest.raises(core.UnsupportedOperation, match=r"torch\.export program.*ATen.*" + fix):
        core.split(program.module())
    with pytest.raises(core.UnsupportedOperation, match=r"torch\.export program.*" + fix):
        core.split(torch.export.unflatten(program))
    with pytest.raises(TypeError, match=r"got ExportedProgram\. " + fix):
        core.split(program)


def test_a_symbolically_traced_graph_module_splits():
    """Was the same NotImplementedError: the twin of an fx.GraphModule got a fresh class
    without the instance's forward."""
    model = _small().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    traced = torch.fx.symbolic_trace(model)
    check_float64_exact(core.split(traced), traced, x, target=0)


# --------------------------------------------------------------------------- tuple outputs
class _Halves(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.chunk(2, 1)


class _ChunkedNet(nn.Module):
    """A module whose output is one tuple-valued graph node (``x.chunk``), and a leaf module
    with a tuple output (max pooling with its indices)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.halves = _Halves()
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, _ = self.pool(torch.relu(self.conv(x)))
        a, b = self.halves(values)
        return self.head((a - b).flatten(1))


def test_a_tuple_output_probed_by_its_bare_name_says_which_names_to_probe():
    """'halves' was an AttributeError ('tuple' object has no attribute 's') in the
    sensitivities and a garbage relevance (the integers 0 and 1); 'halves:0' was refused as
    'never calls it'; 'pool:1' (indices) was an AttributeError."""
    from zennit_split import split_lrp

    torch.manual_seed(0)
    model = _ChunkedNet().double().eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    sm = core.split(model)
    seed = torch.ones(2, 3, dtype=torch.float64)
    for name, message in (("halves", r"'halves:0', 'halves:1'$"), ("pool", r"'pool:0'$")):
        full = f"layer '{name}' outputs a tuple of 2 values, not one tensor; probe its " \
               f"activations by name: {message}"
        with pytest.raises(ValueError, match=full):
            sm.sensitivities(x, 0, [name])
        with pytest.raises(ValueError, match=full):
            sm.relevance(x, seed, [name])
        with pytest.raises(ValueError, match=full):
            sm.pairs(x, [name])
    with pytest.raises(ValueError, match="'pool:1' is a Tensor .*not an activation"):
        sm.sensitivities(x, 0, ["pool:1"])
    with pytest.raises(ValueError, match=r"'net\.head' outputs one tensor, not a tuple"):
        _probe_a_row(model, x)  # out[0] of a tensor output is a row, not an element
    # the names that the message gives work, and agree with the model
    probes = sm.sensitivities(x, 1, ["halves:0", "halves:1", "pool:0", "input"], alpha=0.5)
    for name, part in (("halves:0", slice(0, 2)), ("halves:1", slice(2, 4))):
        values = probes["pool:0"].activation[:, part]
        torch.testing.assert_close(probes[name].activation, values, rtol=0, atol=0)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr)[:, 1].sum(), xr)
    torch.testing.assert_close(probes["input"].grad, grad, rtol=0, atol=1e-12)
    relevance = sm.relevance(x, seed, ["halves:0"])
    assert relevance["halves:0"].pos.shape == (2, 2, 4, 4)
    zennit = split_lrp(model, x, 1, ["halves:0", "halves:1"])
    assert zennit["halves:1"].pos.shape == (2, 2, 4, 4)


def _probe_a_row(model: nn.Module, x: torch.Tensor) -> None:
    """Probe 'net.head:0' of a model that takes row 0 of a module's tensor output."""

    class RowOfHead(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.net(x)
            return out + out[0]

    core.split(RowOfHead(model).eval()).sensitivities(x, 0, ["net.head:0"])



class _PoolsByType(nn.Module):
    """Python that asks whether max pooling returned a tuple (module and functional)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.adaptive = nn.AdaptiveMaxPool2d(3, return_indices=True)
        self.head = nn.Linear(4 * 9 * 3, 2)

    def forward(self, x):
        z = F.relu(self.conv(x))
        outs = [self.pool(z), self.adaptive(z), F.max_pool2d(z, 2, return_indices=True)]
        outs = [o[0] if isinstance(o, tuple) and len(o) == 2 else o for o in outs]
        return self.head(torch.cat([o.flatten(1) for o in outs], 1))


def test_max_pooling_with_indices_is_a_tuple_while_tracing():
    """Symbolic tracing gave such pooling one proxy, for which ``isinstance(out, tuple)`` is
    False: the traced graph flattened the (values, indices) pair and the split raised
    "AttributeError: 'tuple' object has no attribute 'd'"."""
    torch.manual_seed(0)
    model = _PoolsByType().eval()
    x = torch.randn(2, 3, 6, 6)
    sm = core.split(model)
    g, h = sm(x)
    assert sm.prepare(x).captured.mechanism == "symbolic"
    with torch.no_grad():
        assert_rel_close(g - h, model(x), 1e-5, scale=max_abs(g))
    probes = sm.sensitivities(x, 1, ["pool:0", "adaptive:0"], alpha=0.5)
    assert probes["adaptive:0"].activation.shape == (2, 4, 3, 3)


class _TypeTests(nn.Module):
    """Python that tests the type of a traced value: a proxy while tracing, a tensor in the
    eager forward."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = F.relu(self.fc(x))
        tests = {"isinstance": lambda: isinstance(y, torch.Tensor),
                 "type": lambda: type(y) is torch.Tensor,
                 "is_tensor": lambda: torch.is_tensor(y),
                 "size": lambda: isinstance(y.shape, torch.Size),
                 "parameter": lambda: isinstance(self.fc.weight, nn.Parameter)}
        if tests[self.kind]():
            y = y * 3
        return self.head(y)


@pytest.mark.parametrize("kind", ["isinstance", "type", "is_tensor", "size", "parameter"])
def test_a_forward_that_tests_types_splits_as_it_runs(kind):
    """The traced graph took the other branch (a proxy is no tensor) and was split
    silently: g - h missed model(x) by 0.2-0.8 of its size. The traced graph is checked once
    against the forward, and this one is recorded eagerly."""
    torch.manual_seed(0)
    model = _TypeTests(kind).eval()
    x = torch.randn(3, 4)
    sm = core.split(model)
    g, h = sm(x)
    with torch.no_grad():
        assert_rel_close(g - h, model(x), 1e-5, scale=max_abs(g))
    assert sm.prepare(x).captured.mechanism == "eager"
    probe = sm.sensitivities(x, 1, ["input"], alpha=0.5)["input"]
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr)[:, 1].sum(), xr)
    torch.testing.assert_close(probe.grad, grad)

class PooledIndices(nn.Module):
    """A leaf module with a tuple output (values, pooling indices); ``branch`` adds control
    flow on a value (eager capture)."""

    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.branch = branch
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        z = F.relu(self.conv(x))
        if self.branch and z.sum() > -1e9:
            z = z * 1.0
        p, _ = self.pool(z)
        return self.fc(p.flatten(1))


@pytest.mark.parametrize("branch", [False, True])  # symbolic, eager capture
def test_elements_of_a_tuple_output_are_checked_in_both_captures(branch):
    """The pooled values probe exactly; the bare name, the indices and a missing element
    are one ValueError each (in eager capture they were a KeyError 'getitem_1' and 'never
    calls it')."""
    torch.manual_seed(9)
    model = PooledIndices(branch).double().eval()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    sm = core.split(model)
    probe = sm.sensitivities(x, 1, ["pool:0"], alpha=0.5)["pool:0"]
    with torch.no_grad():
        pooled = model.pool(F.relu(model.conv(x)))[0]
    torch.testing.assert_close(probe.activation, pooled, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="'pool' outputs a tuple of 2 values.*'pool:0'"):
        sm.sensitivities(x, 1, ["pool"])
    with pytest.raises(ValueError, match="'pool:1'.*not an activation"):
        sm.sensitivities(x, 1, ["pool:1"])
    if branch:  # the eager capture holds the elements as nodes
        with pytest.raises(ValueError, match="no element 5"):
            sm.sensitivities(x, 1, ["pool:5"])


class WritesItsInput(nn.Module):
    """A forward that writes into its input: item assignment or an in-place method."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "item":
            x[:, 0] = x[:, 0] * 0.5
        else:
            x.sub_(0.3)
        return self.fc(F.relu(x))


@pytest.mark.parametrize("how", ["item", "inplace"])
def test_a_forward_that_writes_into_its_input_splits_once_and_leaves_the_input(how):
    """The recording ran the forward on the caller's tensor: the write was applied to it,
    and the split then applied it again (g - h off by 0.05 on outputs of size 0.3). The
    caller's tensor keeps its values, g - h is model(x) and the gradient autograd's."""
    torch.manual_seed(6)
    model, x0 = WritesItsInput(how).double().eval(), torch.randn(2, 4, dtype=torch.float64)
    expected = model(x0.clone())
    sm = core.split(model)
    for _ in range(2):  # the first call captures, the second reuses the capture
        x = x0.clone()
        g, h = sm(x)
        assert torch.equal(x, x0)
        torch.testing.assert_close(g - h, expected, rtol=0, atol=1e-12)
    x = x0.clone()
    probe = sm.sensitivities(x, 1, ["input"], alpha=0.5)["input"]
    xr = x0.clone().requires_grad_(True)
    model(xr.clone())[:, 1].sum().backward()
    assert torch.equal(x, x0)
    torch.testing.assert_close(probe.grad, xr.grad, rtol=1e-12, atol=1e-12)


def test_a_global_forward_hook_is_refused_on_the_traced_path_too():
    """``sm(x)`` of a plain model uses the symbolic graph, which bypasses hooks: a global
    forward hook was neither run nor refused there (g - h off by 1.85 of 2.6)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: o * 2 if isinstance(m, nn.Linear) else None)
    try:
        with pytest.raises(core.UnsupportedOperation, match="global module hooks"):
            core.split(model)(torch.randn(2, 4))
    finally:
        handle.remove()
    g, h = core.split(model)(x := torch.randn(2, 4))
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("recorded", [False, True])
def test_a_forward_replaced_on_a_leaf_module_is_followed(recorded):
    """``model[1].forward = ...`` on a torch.nn module (as accelerate's hooks do): the
    module's class rule was applied and the replacement ignored (g - h off by 0.13)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    model[1].forward = lambda t: F.leaky_relu(t, 0.3)
    handle = model.register_forward_pre_hook(lambda m, a: None) if recorded else None
    x = torch.randn(2, 4, dtype=torch.float64)
    try:
        sm = core.split(model)
        g, h = sm(x)
        probe = sm.sensitivities(x, 1, ["input"], alpha=0.5)["input"]
    finally:
        if handle is not None:
            handle.remove()
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
    xr = x.clone().requires_grad_(True)
    model(xr)[:, 1].sum().backward()
    torch.testing.assert_close(probe.grad, xr.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("deprecated", ["weight_norm", "spectral_norm"])
def test_the_deprecated_weight_reparametrizations_are_refused(deprecated):
    """Their pre-hook sets ``weight`` as a plain attribute at each forward, which the split
    read stale (g - h off by 9.5 of 9.8 before a first forward); the parametrizations
    versions split exactly."""
    torch.manual_seed(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation warning
        old = getattr(nn.utils, deprecated)(nn.Linear(6, 3))
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), old).eval()
    with pytest.raises(core.UnsupportedOperation,
                       match=f"parametrizations.{deprecated}") as info:
        core.split(model)(torch.randn(2, 4))
    assert "module '2'" in str(info.value)
    new = getattr(nn.utils.parametrizations, deprecated)(nn.Linear(6, 3))
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), new).eval()
    x = torch.randn(2, 4)
    g, h = core.split(model)(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-5)


class WritesConstants(nn.Module):
    """``zero_()`` / ``fill_()`` on a slice of an activation or on all of it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin, self.fc = nn.Linear(6, 6), nn.Linear(6, 3)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.lin(x)) * 1.0  # a tensor of its own (autograd's reference)
        if self.how == "zero slice":
            y[:, 3:5].zero_()
        elif self.how == "fill slice":
            y[:, 1:2].fill_(0.7)
        else:
            y = y.zero_() + x
        return self.fc(y)


@pytest.mark.parametrize("how", ["zero slice", "fill slice", "zero all"])
def test_zero_and_fill_write_constants(how):
    """They were refused as operations without a rule; they write a constant."""
    torch.manual_seed(9)
    model, x = WritesConstants(how).double().eval(), torch.randn(2, 6, dtype=torch.float64)
    sm = core.split(model)
    g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
    probe = sm.sensitivities(x, 1, ["input"], alpha=0.5)["input"]
    xr = x.clone().requires_grad_(True)
    model(xr)[:, 1].sum().backward()
    torch.testing.assert_close(probe.grad, xr.grad, rtol=1e-12, atol=1e-12)


class _AutocastInside(nn.Module):
    """Mixed precision entered by the forward (fx tracing drops the context manager)."""

    def __init__(self, module_call: bool) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 3)
        self.module_call = module_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = F.relu(self.a(x)) if self.module_call else F.relu(x @ self.a.weight.T)
        return self.b(y.float())


@pytest.mark.parametrize("module_call", [False, True])
def test_autocast_inside_the_forward_is_refused(module_call):
    """The split left the forward's torch.autocast out: g - h off by 4e-3 of model(x)."""
    torch.manual_seed(0)
    with pytest.raises(core.UnsupportedOperation, match="torch.autocast that the forward"):
        core.split(_AutocastInside(module_call).eval())(torch.randn(4, 16))


def test_autocast_around_the_call_applies_to_the_split():
    """An autocast around the call runs the split's operations in its dtype too: g - h is
    model(x) to bfloat16's rounding of the streams, traced or recorded."""

    class Eager(nn.Sequential):
        def forward(self, x):
            return super().forward(x) if isinstance(x, torch.Tensor) else x

    torch.manual_seed(0)
    x = torch.randn(4, 16)
    for cls in (nn.Sequential, Eager):
        model = cls(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g, h = core.split(model)(x)
            f = model(x)
        assert g.dtype == torch.bfloat16
        scale = float(torch.maximum(g.abs(), h.abs()).max())
        assert float((g - h - f).abs().max()) <= 2 * 2 ** -8 * scale
