"""Safety of the split (issue 2, items 5-8): the user's model is never modified, no weight
copies, targets, batch independence, dtypes, training mode, clear errors, stabilisers and
input splits that change split activations only, overflow detection."""

from __future__ import annotations

import dataclasses
import gc
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

import core
from tests.core_checks import (
    STABILIZERS,
    assert_rel_close,
    check_forward,
    max_abs,
    randomise_batchnorm,
)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)) + x)


class Net(nn.Module):
    """Conv, BN, max pooling, a residual block, dropout and an MLP head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.block = Block(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 4 * 4, 16),
                                  nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return randomise_batchnorm(Net(), seed).eval()


LAYERS = ["input", "stem", "stem.3", "block", "block.conv", "head.3", "head.4:input"]


# --------------------------------------------------------------------------- the model is kept
def _hooks(m: nn.Module) -> dict:
    return {name: getattr(m, name).copy() for name in dir(m)
            if name.endswith("hooks") and isinstance(getattr(m, name, None), dict)}


def _snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: (p.detach().clone(), p.requires_grad, p.grad, p.data_ptr(), p._version)
                   for n, p in model.named_parameters()},
        "buffers": {n: (b.clone(), b.data_ptr(), b._version) for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: _hooks(m) for n, m in model.named_modules()},
        "modules": {n: id(m) for n, m in model.named_modules()},
        "forward": {n: m.forward for n, m in model.named_modules()},
        "globals": _global_hooks(),
    }


def _global_hooks() -> tuple:
    mod = nn.modules.module
    return tuple(len(getattr(mod, name)) for name in dir(mod) if name.startswith("_global_") and
                 isinstance(getattr(mod, name), dict))


def _assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = _snapshot(model)
    assert now["modules"] == snap["modules"]
    for name, (value, requires_grad, grad, ptr, version) in snap["params"].items():
        p = dict(model.named_parameters())[name]
        assert torch.equal(p.detach(), value), f"parameter {name} changed"
        assert (p.requires_grad, p.grad, p.data_ptr(), p._version) == (
            requires_grad, grad, ptr, version), f"parameter {name}: flags/grad/storage changed"
    for name, (value, ptr, version) in snap["buffers"].items():
        b = dict(model.named_buffers())[name]
        assert torch.equal(b, value) and b.data_ptr() == ptr and b._version == version, name
    assert now["training"] == snap["training"]
    for name, hooks in snap["hooks"].items():
        assert {k: list(v) for k, v in now["hooks"][name].items()} == {
            k: list(v) for k, v in hooks.items()}, f"hooks of {name!r} changed"
    assert now["forward"] == snap["forward"]
    assert now["globals"] == snap["globals"]


def _use_everything(model: nn.Module, x: torch.Tensor) -> None:
    for stabilizer in STABILIZERS:
        for maxpool in ("convex", "wta"):
            sm = core.split(model, maxpool=maxpool, stabilizer=stabilizer,
                            merge_batchnorm=stabilizer == "shift")
            sm(x)
            sm.pairs(x, LAYERS)
            sm.sensitivities(x, torch.tensor([0, 3]), LAYERS, alpha=0.3)
            sm.sensitivities(x, 1, LAYERS, alpha={"default": 0.2, "output": 0.5})


def test_model_is_never_modified():
    model = _net()
    model.stem[0].weight.requires_grad_(False)  # a frozen layer stays frozen
    calls = []
    model.block.register_forward_hook(lambda *a: calls.append("hook"))
    model.head[2].register_forward_pre_hook(lambda *a: None)
    snap = _snapshot(model)
    _use_everything(model, torch.randn(2, 3, 8, 8))
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("bad", ["unsupported", "target", "layer", "shape", "alpha", "nan",
                                 "overflow"])
def test_model_is_never_modified_after_an_exception(bad):
    model = _net()
    if bad == "unsupported":
        model.head[3] = nn.SiLU()
    model.train()  # the flag must survive the error, too
    model.head[4].register_forward_hook(lambda *a: None)
    snap = _snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {"unsupported": core.UnsupportedOperation, "shape": RuntimeError,
                    "overflow": core.SplitOverflowError}.get(bad, ValueError)
        with pytest.raises(expected):
            if bad == "unsupported":
                core.split(model)
            sm = core.split(model)
            if bad == "target":
                sm.sensitivities(x, torch.tensor([0, 5]), LAYERS)
            elif bad == "layer":
                sm.sensitivities(x, 0, ["block.nope"])
            elif bad == "shape":
                sm.sensitivities(torch.randn(2, 4, 8, 8), 0, LAYERS)
            elif bad == "alpha":
                sm.sensitivities(x, 0, LAYERS, alpha=0.7)
            elif bad == "nan":
                sm(torch.full((2, 3, 8, 8), float("nan")))
            elif bad == "overflow":
                core.split(model, stabilizer="none")(x.clamp(-1, 1) * 3e37)
    _assert_unchanged(model, snap)


def _tensors(obj, seen: set, depth: int = 0):
    """Tensors reachable from the split's own state (containers, dataclasses, fx nodes)."""
    if id(obj) in seen or depth > 6 or isinstance(obj, nn.Module):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen, depth + 1)
    elif isinstance(obj, list | tuple | set):
        for v in obj:
            yield from _tensors(v, seen, depth + 1)
    elif dataclasses.is_dataclass(obj) or isinstance(obj, core.SplitModel):
        for v in vars(obj).values():
            yield from _tensors(v, seen, depth + 1)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_split_is_a_view_without_weight_copies():
    torch.manual_seed(0)
    model = tvm.vgg16(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        f = model(x)  # warm up the allocator and thread pools
    gc.collect()
    before = _resident_bytes()
    sm = core.split(model)
    g, h = sm(x)
    gc.collect()
    grown = _resident_bytes() - before
    assert grown < 0.1 * param_bytes, f"resident memory grew by {grown / 2**20:.0f} MiB"
    assert_rel_close(g - h, f, 1e-5, scale=max_abs(g))
    ptrs = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    own = sum(t.numel() * t.element_size() for t in _tensors(sm, set())
              if t.data_ptr() not in ptrs)
    assert own < 0.01 * param_bytes, f"the split holds {own} bytes of tensors"


def test_input_is_not_modified_and_gets_no_gradient():
    model = _net(1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    before = x.detach().clone()
    sm = core.split(model)
    g, h = sm(x)
    probes = sm.sensitivities(x, 0, LAYERS, alpha=0.3)
    assert torch.equal(x.detach(), before) and x.grad is None and x._version == 0
    assert not g.requires_grad and not probes["input"].S.requires_grad


def test_empty_batch_is_rejected_clearly():
    with pytest.raises(ValueError, match="empty|batch"):
        core.split(_net())(torch.randn(0, 3, 8, 8))


def test_only_the_opt_in_cache_keeps_absolute_weights():
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    weights = sum(m.weight.numel() * 4 for m in model.modules()
                  if isinstance(m, nn.Conv2d | nn.Linear))
    ptrs = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    for cache, low, high in ((False, 0, 0), (True, weights, weights)):
        sm = core.split(model, cache_abs_weights=cache)
        sm(x)
        own = sum(t.numel() * t.element_size() for t in _tensors(sm, set())
                  if t.data_ptr() not in ptrs)
        assert low <= own <= high, (cache, own, weights)


def test_the_cache_follows_weight_changes_made_through_torch():
    """An optimiser step, ``load_state_dict``, an in-place change under ``no_grad`` and a
    replaced parameter each give the |W| of the new weights (the split without the cache)."""
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    target = torch.tensor([1, 3])
    cached = core.split(model, cache_abs_weights=True)
    cached.sensitivities(x, target, ["input"])  # fills the cache
    other = _net(5)
    changes = [
        lambda: torch.optim.SGD(model.parameters(), lr=0.5).step(),
        lambda: model.load_state_dict(other.state_dict()),
        lambda: [p.neg_() for p in model.parameters() if p.dim() > 1],
        lambda: setattr(model.block.conv, "weight", nn.Parameter(-model.block.conv.weight)),
    ]
    model.zero_grad()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for change in changes:
        with torch.no_grad():
            change()
        fresh = core.split(model).sensitivities(x, target, ["input"])["input"]
        kept = cached.sensitivities(x, target, ["input"])["input"]
        assert torch.equal(kept.S, fresh.S) and torch.equal(kept.grad, fresh.grad)
        with torch.no_grad():
            assert torch.equal(cached(x)[0], core.split(model)(x)[0])


# --------------------------------------------------------------------------- targets and batches
def test_int_target_equals_per_row_tensor_target():
    model, x = _net(1), torch.randn(3, 3, 8, 8)
    sm = core.split(model)
    by_int = sm.sensitivities(x, 2, LAYERS, alpha=0.3)
    for target in (torch.tensor([2, 2, 2]), torch.tensor(2), torch.tensor([2]),
                   torch.tensor([2, 2, 2], dtype=torch.int32)):
        by_tensor = sm.sensitivities(x, target, LAYERS, alpha=0.3)
        for layer in LAYERS:
            for field in ("activation", "mass", "S", "Dg", "grad"):
                assert torch.equal(getattr(by_int[layer], field),
                                   getattr(by_tensor[layer], field)), (layer, field, target)


@pytest.mark.parametrize("stabilizer", STABILIZERS)
def test_batch_rows_are_independent(stabilizer):
    model = _net(2)
    x = torch.randn(3, 3, 8, 8)
    x[1] *= 100  # one row with large streams: the stabiliser must act per row
    target = torch.tensor([4, 0, 2])
    sm = core.split(model, stabilizer=stabilizer)
    g, h = sm(x)
    probes = sm.sensitivities(x, target, LAYERS, alpha=0.25)
    for i in range(3):
        gi, hi = sm(x[i:i + 1])
        assert_rel_close(g[i:i + 1], gi, 1e-5, what=f"g row {i}")
        assert_rel_close(h[i:i + 1], hi, 1e-5, what=f"h row {i}")
        row = sm.sensitivities(x[i:i + 1], int(target[i]), LAYERS, alpha=0.25)
        for layer in LAYERS:
            for field in ("activation", "mass", "S", "Dg", "grad"):
                assert_rel_close(getattr(probes[layer], field)[i:i + 1],
                                 getattr(row[layer], field), 1e-5,
                                 what=f"{layer}.{field} row {i}")


def test_dtype_follows_the_input():
    model = _net(3).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    check_forward(model, x, rel=1e-12)
    g, h = core.split(model)(x)
    assert g.dtype == h.dtype == torch.float64
    probes = core.split(model).sensitivities(x, 1, LAYERS, alpha=0.4)
    for layer, p in probes.items():
        for field in ("activation", "mass", "S", "Dg", "grad", "pos", "g", "h"):
            assert getattr(p, field).dtype == torch.float64, (layer, field)
        assert p.activation.device == x.device
    float32 = core.split(_net(3)).sensitivities(x.float(), 1, LAYERS, alpha=0.4)
    for layer in LAYERS:
        assert_rel_close(float32[layer].grad.double(), probes[layer].grad, 1e-4, what=layer)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_device_follows_the_input(device):
    model = _net(3)
    x = torch.randn(2, 3, 8, 8)
    on_cpu = core.split(model).sensitivities(x, 1, LAYERS, alpha=0.4)
    moved = _net(3).to(device)
    g, h = core.split(moved)(x.to(device))
    assert g.device.type == device and h.device.type == device
    probes = core.split(moved).sensitivities(x.to(device), torch.tensor([1, 1]), LAYERS, 0.4)
    for layer in LAYERS:
        for field in ("activation", "mass", "S", "Dg", "grad"):
            got = getattr(probes[layer], field)
            assert got.device.type == device, (layer, field)
            assert_rel_close(got.cpu(), getattr(on_cpu[layer], field), 1e-4,
                             what=f"{device} {layer}.{field}")


def test_training_mode_model_warns_and_uses_eval_semantics():
    model = _net(4)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)  # eval mode
    model.train()
    snap = _snapshot(model)
    with pytest.warns(UserWarning, match="training mode"):
        g, h = core.split(model)(x)
    assert_rel_close(g - h, expected, 1e-5, scale=max_abs(g))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per model: not again for a new split
        probes = core.split(model).sensitivities(x, 0, ["block"], alpha=0.4)
    with pytest.warns(UserWarning, match="eval"):
        core.split(_net(4).train())(x)  # another model warns
    eval_probes = core.split(_net(4)).sensitivities(x, 0, ["block"], alpha=0.4)
    assert torch.equal(probes["block"].grad, eval_probes["block"].grad)
    _assert_unchanged(model, snap)  # still in training mode, running stats untouched
    assert model.training and model.stem[1].training


# --------------------------------------------------------------------------- unsupported ops
class Gated(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.fc1(x))
        b = self.fc2(a)
        if self.kind == "product":
            b = a * b
        elif self.kind == "sigmoid":
            b = torch.sigmoid(b)
        elif self.kind == "softmax":
            b = F.softmax(b, dim=1)
        elif self.kind == "division":
            b = b / (a + 1)
        elif self.kind == "control":
            if b.sum() > 0:  # data-dependent control flow
                b = -b
        return self.out(b)


@pytest.mark.parametrize("module,name", [(nn.SiLU(), "SiLU"), (nn.GELU(), "GELU"),
                                         (nn.Sigmoid(), "Sigmoid"), (nn.Softmax(1), "Softmax"),
                                         (nn.Tanh(), "Tanh"), (nn.Hardshrink(), "Hardshrink"),
                                         (nn.ELU(), "ELU"), (nn.LayerNorm(16), "LayerNorm"),
                                         (nn.BatchNorm1d(16, track_running_stats=False),
                                          "without running statistics")])
def test_unsupported_modules_are_named(module, name):
    model = _net()
    model.head[3] = module
    with pytest.raises(core.UnsupportedOperation, match=rf"'head\.3'.*{name}") as err:
        core.split(model)(torch.randn(2, 3, 8, 8))
    # a fix is suggested: the option that freezes smooth operations, or what to replace
    assert ("nonlinear='freeze'" in str(err.value)) != (name in ("Hardshrink",
                                                              "without running statistics"))
    assert "Replace" in str(err.value) or "use " in str(err.value) or "nonlinear=" in str(
        err.value)


@pytest.mark.parametrize("kind,pattern", [
    ("sigmoid", "sigmoid"), ("softmax", "softmax"),
    ("division", "division"),
])
def test_unsupported_functional_ops_are_named(kind, pattern):
    model = Gated(kind).eval()
    x = torch.randn(2, 4)
    with pytest.raises(core.UnsupportedOperation, match=pattern) as err:
        core.split(model)(x)
    assert "graph node" in str(err.value)


def test_tuple_outputs_are_rejected_unless_one_is_selected():
    class Two(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(core.UnsupportedOperation, match="single output.*output="):
        core.split(Two().eval())(torch.randn(2, 3))
    pool = nn.Sequential(nn.MaxPool2d(2, return_indices=True)).eval()
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(core.UnsupportedOperation, match="single output.*output="):
        core.split(pool)(x)
    g, h = core.split(pool, output=0)(x)  # the values; the indices are the model's own
    torch.testing.assert_close(g - h, pool(x)[0])


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    model = _net()
    sm = core.split(model)
    x = torch.randn(2, 3, 8, 8)
    for value in (float("nan"), float("inf"), -float("inf")):
        bad = x.clone()
        bad[1, 0, 2, 2] = value
        with pytest.raises(ValueError, match="NaN or Inf"):
            sm(bad)
        with pytest.raises(ValueError, match="NaN or Inf"):
            sm.sensitivities(bad, 0)
    with pytest.raises(RuntimeError, match=r"'stem\.0'"):  # wrong channel count
        sm(torch.randn(2, 4, 8, 8))
    with pytest.raises(RuntimeError, match=r"'head\.2'"):  # wrong spatial size for the head
        sm(torch.randn(2, 3, 10, 10))
    with pytest.raises(TypeError, match="floating point.*further arguments of the forward"):
        sm(torch.ones(2, 3, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        sm(x.numpy())
    for target, error, pattern in [
        (5, ValueError, "out of range"), (-1, ValueError, "negative"),
        (torch.tensor([0, 9]), ValueError, "out of range"),
        (torch.tensor([0, 1, 2]), ValueError, "3 targets for a batch of 2"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer"), (1.5, TypeError, "integer"),
    ]:
        with pytest.raises(error, match=pattern):
            sm.sensitivities(x, target)
    with pytest.raises(ValueError, match="Did you mean 'block.conv'"):
        sm.sensitivities(x, 0, ["block.cnv"])
    for alpha in (-0.1, 0.6, {"stem.2": 1.0}):
        with pytest.raises(ValueError, match=r"outside \[0, 0.5\]"):
            sm.sensitivities(x, 0, alpha=alpha)
    for option in (dict(maxpool="avg"), dict(stabilizer="clip"), dict(input_split="abs")):
        with pytest.raises(ValueError, match="is not one of"):
            core.split(model, **option)


# --------------------------------------------------------------------------- value-only options
def test_stabilisers_change_split_activations_not_sensitivities():
    model = _net(5)
    x = torch.randn(2, 3, 8, 8) * 20  # large enough for the stabilisers to act
    target = torch.tensor([1, 3])
    runs = {s: core.split(model, stabilizer=s).sensitivities(x, target, LAYERS, alpha=0.3)
            for s in STABILIZERS}
    for s in ("scale", "shift"):
        changed = [layer for layer in LAYERS
                   if not torch.allclose(runs[s][layer].pos, runs["none"][layer].pos)]
        assert changed, f"stabilizer {s!r} changed no split activation"
        for layer in LAYERS:
            a, b = runs[s][layer], runs["none"][layer]
            assert torch.equal(a.activation, b.activation)
            assert_rel_close(a.pos - a.neg, b.pos - b.neg, 1e-5,
                             scale=max(max_abs(a.pos), max_abs(b.pos)), what=layer)
            for field in ("S", "Dg", "grad", "g", "h", "pos_g", "neg_h"):
                assert_rel_close(getattr(a, field), getattr(b, field), 1e-6,
                                 what=f"{s} {layer}.{field}")


def test_input_split_relu_vs_half():
    model = _net(6)
    x = torch.randn(2, 3, 8, 8)
    relu = core.split(model, input_split="relu").sensitivities(x, 2, LAYERS, alpha=0.2)
    half = core.split(model, input_split="half").sensitivities(x, 2, LAYERS, alpha=0.2)
    torch.testing.assert_close(relu["input"].pos, F.relu(x), rtol=0, atol=0)
    torch.testing.assert_close(relu["input"].neg, F.relu(-x), rtol=0, atol=0)
    torch.testing.assert_close(half["input"].pos, x / 2, rtol=0, atol=0)
    torch.testing.assert_close(half["input"].neg, -x / 2, rtol=0, atol=0)
    for layer in LAYERS:
        for field in ("S", "Dg", "grad"):
            assert_rel_close(getattr(half[layer], field), getattr(relu[layer], field), 1e-6,
                             what=f"{layer}.{field}")
    check_forward(model, x, input_split="half")


# --------------------------------------------------------------------------- overflow
def _deep_mlp(depth: int = 48, width: int = 64) -> nn.Sequential:
    torch.manual_seed(7)
    layers: list[nn.Module] = [nn.Linear(8, width), nn.ReLU()]
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")  # activations stay O(1)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 3)).eval()


def test_overflow_of_the_sensitivity_stream_is_reported():
    model = _deep_mlp()
    x = torch.randn(2, 8)
    sm = core.split(model)
    g, h = sm(x)  # the stabilised forward stays finite
    assert torch.isfinite(g).all() and torch.isfinite(h).all()
    with pytest.raises(core.SplitOverflowError, match=r"(?s)at '(0|input)'.*alpha.*float64"):
        sm.sensitivities(x, 0, ["0", "input"], alpha=0.0)
    deep = sm.sensitivities(x, 0, ["90", "95"], alpha=0.0)  # near the output: finite
    for p in deep.values():
        assert torch.isfinite(p.S).all() and torch.isfinite(p.Dg).all()
    for p in sm.sensitivities(x, 0, ["0", "input"], alpha=0.4).values():  # a larger alpha
        assert torch.isfinite(p.S).all() and torch.isfinite(p.Dg).all()
    p64 = core.split(model.double()).sensitivities(x.double(), 0, ["input"], alpha=0.0)["input"]
    assert torch.isfinite(p64.S).all() and max_abs(p64.S) > 1e38  # float64 holds it


def test_overflow_of_the_forward_streams_is_reported():
    model = _deep_mlp()
    x = torch.randn(2, 8)
    with pytest.raises(core.SplitOverflowError, match=r"overflowed torch\.float32 at '\d+'"):
        core.split(model, stabilizer="none")(x)


def test_sensitivities_report_overflow_of_the_forward_streams():
    model = _deep_mlp()
    with pytest.raises(core.SplitOverflowError, match="overflowed"):
        core.split(model, stabilizer="none").sensitivities(torch.randn(2, 8), 0, ["95"], 0.4)


def test_g_minus_h_that_misses_the_output_warns_once():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    model = _deep_mlp(depth=5)
    f = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", core.SplitPrecisionWarning)
        g, h = core.split(model)(x)  # the default stabiliser keeps the streams small
    assert (g - h - f).abs().max() <= 1e-3 * f.abs().max()
    # without a stabiliser the streams outgrow the output beyond float32's precision
    with pytest.warns(core.SplitPrecisionWarning, match="misses the output of Sequential"):
        g, h = core.split(model, stabilizer="none")(x)
    assert (g - h - f).abs().max() > 1e-3 * f.abs().max()  # the warning told the truth
    with warnings.catch_warnings():
        warnings.simplefilter("error", core.SplitPrecisionWarning)
        core.split(model, stabilizer="none")(x)  # once per model
        wide = _deep_mlp(depth=5).double()
        wide.load_state_dict(model.state_dict())
        g, h = core.split(wide, stabilizer="none")(x.double())  # float64 carries it
    f = wide(x.double())
    assert (g - h - f).abs().max() <= 1e-3 * f.abs().max()


def test_probe_streams_stay_finite_above_half_the_range():
    """pos_g = (S + Dg) / 2 was inf for S = Dg = 2e38 (float32, finite): a SplitGrad or
    SplitCAM with sign '+' read inf from a finite probe. Halves are added now, the same
    numbers below half the range."""
    big = torch.tensor([2e38, 1.5, -3.0])
    probe = core.Probe(activation=big, mass=big.abs(), S=big.abs(), Dg=big, grad=big * 0)
    for name in ("pos", "neg", "pos_g", "neg_g", "pos_h", "neg_h"):
        assert torch.isfinite(getattr(probe, name)).all(), name
    assert probe.pos_g.tolist() == [big[0].item(), 1.5, 0.0]
    assert probe.neg_g.tolist() == [0.0, 0.0, 3.0] and probe.pos.tolist()[1:] == [1.5, 0.0]
