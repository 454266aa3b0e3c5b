"""Reuse of a model's capture between ``core.split`` calls (core/reuse.py): a repeated split
of an unchanged model serves the kept capture and gives bit-for-bit the results of a fresh
one; any change that the capture depends on (a replaced submodule, an attribute, a hook, the
code, a tensor constant) captures afresh; the cache never keeps a model alive."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core
import core.capture
from core import reuse
from tests.core_checks import randomise_batchnorm


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 5)
        self.shift = torch.tensor(0.25)  # a tensor attribute: a constant of the trace
        self.double = False
        self.pool = 2  # specialised into the trace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.bn(self.conv(x)))
        z = self.block(z) + z + self.shift
        if self.double:
            z = z * 2
        z = F.max_pool2d(z, self.pool)
        return self.fc(z.mean((2, 3)))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_batchnorm(Net().eval())


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def traces(monkeypatch):
    """Counts the symbolic traces."""
    calls = []
    original = core.capture.trace

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(core.capture, "trace", counting)
    return calls


def _results(sm: core.SplitModel, x: torch.Tensor, *extra) -> list[torch.Tensor]:
    pair = sm.forward_pairs(x, *extra)
    probes = sm.sensitivities(x, torch.tensor([1, 3]), ["input", "bn", "block"], alpha=0.3,
                              extra_args=extra)
    rel = sm.relevance(x, torch.eye(5)[[1, 3]], layers=["block"], extra_args=extra)
    out = [pair.d, pair.s]
    for p in probes.values():
        out += [p.S, p.Dg, p.grad, p.activation, p.mass]
    return out + [rel["input"].pos, rel["input"].neg, rel["block"].comb]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("options", [{}, {"merge_batchnorm": True, "maxpool": "wta"}])
def test_a_repeated_split_reuses_the_capture_bit_for_bit(traces, options):
    model, x = _net(), _x()
    first = core.split(model, **options)
    assert len(traces) == 1
    again = core.split(model, **options)
    assert len(traces) == 1  # served from the cache
    assert again.capture.found is first.capture.found
    fresh = core.split(model, reuse_capture=False, **options)
    assert len(traces) == 2 and fresh.capture.found is not first.capture.found
    _assert_same(_results(again, x), _results(fresh, x))
    _assert_same(_results(first, x), _results(fresh, x))


def _changes():
    def replace_module(m):
        m.block[0] = nn.Conv2d(6, 6, 3, padding=1)

    def other_type(m):
        m.block[1] = nn.LeakyReLU(0.2)

    def stride(m):
        m.conv.stride = (2, 2)

    def pool(m):
        m.pool = 4

    def plain_flag(m):
        m.double = True

    def forward_hook(m):
        m.block.register_forward_hook(lambda mod, args, out: out * 0.5)

    def pre_hook(m):
        m.fc.register_forward_pre_hook(lambda mod, args: (args[0] + 1.0,))

    def tensor_in_place(m):
        m.shift.add_(3.0)  # torch.fx stored its value as a constant

    def tensor_replaced(m):
        m.shift = torch.tensor(-1.0)

    def instance_forward(m):
        m.forward = lambda x: type(m).forward(m, x) * 3

    return [replace_module, other_type, stride, pool, plain_flag, forward_hook, pre_hook,
            tensor_in_place, tensor_replaced, instance_forward]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_a_change_of_the_model_captures_afresh(change):
    model, x = _net(), _x()
    before = core.split(model)
    stale = _results(before, x)
    change(model)
    after = core.split(model)
    assert after.capture.found is not before.capture.found
    fresh = _results(core.split(model, reuse_capture=False), x)
    _assert_same(_results(after, x), fresh)
    assert any(u.shape != v.shape or not torch.equal(u, v)
               for u, v in zip(stale, fresh, strict=True))  # the change mattered
    with torch.no_grad():
        g, h = after(x)
        assert torch.allclose(g - h, model(x), rtol=1e-5, atol=1e-5 * g.abs().max().item())


def test_a_changed_method_of_the_class_captures_afresh(monkeypatch):
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def scale(self, z):
            return z * 2

        def forward(self, x):
            return self.scale(F.relu(self.fc(x)))

    model, x = Scaled().eval(), torch.randn(2, 4)
    before = core.split(model)
    monkeypatch.setattr(Scaled, "scale", lambda self, z: z * 5)
    after = core.split(model)
    assert after.capture.found is not before.capture.found
    with torch.no_grad():
        g, h = after(x)
        torch.testing.assert_close(g - h, model(x))


def test_the_weights_values_and_the_training_flag_do_not_matter(traces):
    model, x = _net(), _x()
    first = core.split(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # new weight values: read live by the graph
    model.train()
    again = core.split(model)
    model.eval()
    assert len(traces) == 1 and again.capture.found is first.capture.found
    _assert_same(_results(again, x), _results(core.split(model, reuse_capture=False), x))


def test_a_global_hook_changes_the_fingerprint():
    model = _net()
    key = reuse.Fingerprint(model).key
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert reuse.Fingerprint(model).key != key
    finally:
        handle.remove()
    assert reuse.Fingerprint(model).key == key


@pytest.mark.parametrize("register", [
    lambda m: m.register_forward_hook(lambda mod, a, o: None),
    lambda m: m.register_forward_hook(lambda mod, a, k, o: None, with_kwargs=True),
    lambda m: m.register_forward_pre_hook(lambda mod, a: None),
    lambda m: m.register_full_backward_hook(lambda mod, gi, go: None),
    lambda m: m.register_full_backward_pre_hook(lambda mod, go: None),
    lambda m: m.register_state_dict_pre_hook(lambda mod, prefix, keep_vars: None),
], ids=["forward", "forward_kwargs", "pre", "backward", "backward_pre", "state_dict"])
def test_every_module_hook_changes_the_fingerprint(register, request):
    """Modules without hooks are compared in one step (core/reuse.py): a hook of any kind on
    any module, a leaf included, is still seen, and its removal restores the fingerprint
    (a full backward hook leaves the module's ``_is_full_backward_hook`` flag set)."""
    for module in ("model", "block.1", "fc"):
        model = _net()
        key = reuse.Fingerprint(model).key
        handle = register(model if module == "model" else model.get_submodule(module))
        assert reuse.Fingerprint(model).key != key
        handle.remove()
        if request.node.callspec.id != "backward":
            assert reuse.Fingerprint(model).key == key


class Keyword(nn.Module):
    """Captured eagerly (a keyword argument), with a hook that is a method of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.conv.register_forward_hook(self.halve)

    def halve(self, module, args, out):
        return out * 0.5

    def forward(self, x, scale: float = 1.0):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)) * scale)


def test_eager_graphs_are_shared_between_splits(monkeypatch):
    model, x = Keyword().eval(), _x()
    core.split(model)(x, 2.0)
    recordings = []
    original = core.capture.record
    monkeypatch.setattr(core.capture, "record",
                        lambda *a, **k: recordings.append(1) or original(*a, **k))
    sm = core.split(model)
    assert sm.capture.cached == 1
    g, h = sm(x, 2.0)
    assert not recordings  # the graph of this signature was kept
    fresh = core.split(model, reuse_capture=False)
    g2, h2 = fresh(x, 2.0)
    assert recordings and torch.equal(g, g2) and torch.equal(h, h2)


def test_a_split_of_a_changed_model_keeps_its_recordings_to_itself():
    model, x = Keyword().eval(), _x()
    old = core.split(model)
    model.conv.padding = (0, 0)  # changed after the split: `old` is no longer shareable
    old(x, 2.0)
    assert old.capture.cached == 1
    model.conv.padding = (1, 1)  # back to the state `old` was made from
    assert core.split(model).capture.cached == 0


def test_the_options_keep_their_own_plans():
    class Gelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.out(F.gelu(self.fc(x)))

    model, x = Gelu().eval(), torch.randn(2, 4)
    with pytest.raises(core.UnsupportedOperation):
        core.split(model)
    with pytest.warns(UserWarning, match="froze"):
        frozen = core.split(model, nonlinear="freeze")
    with pytest.raises(core.UnsupportedOperation):
        core.split(model)  # the frozen plan is not served to nonlinear="error"
    with torch.no_grad():
        g, h = frozen(x)
        torch.testing.assert_close(g - h, model(x))


def test_output_selectors_are_kept_apart():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = self.fc(x)
            return y, -y

    model, x = Two().eval(), torch.randn(2, 4)
    g0, h0 = core.split(model, output=0)(x)
    g1, h1 = core.split(model, output=1)(x)
    with torch.no_grad():
        torch.testing.assert_close(g0 - h0, model(x)[0])
        torch.testing.assert_close(g1 - h1, model(x)[1])


def test_the_cache_keeps_no_model_alive():
    refs = []
    for make in (_net, Keyword):  # Keyword's hook is a method of the model (a cycle)
        model = make().eval()
        sm = core.split(model)
        sm(_x())
        core.split(model).sensitivities(_x(), 1, ["input"], alpha=0.4)
        refs.append(weakref.ref(model))
        del model, sm
    gc.collect()
    assert all(r() is None for r in refs)


def test_reuse_capture_false_keeps_nothing(traces):
    model = _net()
    core.split(model, reuse_capture=False)
    core.split(model, reuse_capture=False)
    assert len(traces) == 2
    core.split(model)
    core.split(model)
    assert len(traces) == 3
