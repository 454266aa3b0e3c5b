"""The ``s`` stream of a 1x1 convolution at stride 1 without padding is the matrix product
``|W| s`` over the channels on CPU (core.absops.is_channel_product), faster there than torch's
convolution, forward and backward. The values are those of the convolution with
``|W|`` (to rounding), ``d`` stays the model's own convolution bit for bit, and where the
product does not apply (channels-last, groups, half precision, padding) the convolution runs
as before."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import core
from core import absops

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


class _Ops(TorchDispatchMode):
    """The names of the aten operations that run."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_product_equals_the_convolution_with_abs_weight(n, batch, bias, dtype):
    torch.manual_seed(n * 10 + batch)
    s = torch.rand((batch, 5) + (4,) * n, dtype=dtype, requires_grad=True)
    w = torch.randn((7, 5) + (1,) * n, dtype=dtype)
    b = torch.rand(7, dtype=dtype) if bias else None
    assert absops.is_channel_product(s, w, 1, 0, 1)
    expected = CONV[n](s, w.abs(), b)
    grad = torch.randn_like(expected)
    (want,) = torch.autograd.grad(expected, s, grad)
    for kwargs in ({}, {"scratch": absops.SCRATCH}, {"is_abs": True}):
        weight = w.abs() if kwargs.get("is_abs") else w
        out = absops.abs_conv(s, weight, b, n, 1, 0, 1, 1, **kwargs)
        torch.testing.assert_close(out, expected, **TOL[dtype])
        (got,) = torch.autograd.grad(out, s, grad)
        torch.testing.assert_close(got, want, **TOL[dtype])
        with torch.no_grad():
            torch.testing.assert_close(absops.abs_conv(s, weight, b, n, 1, 0, 1, 1, **kwargs),
                                       expected, **TOL[dtype])
    # the s stream above the deepest probe: a placeholder whose backward is the product's
    out = absops.abs_conv(s, w, b, n, 1, 0, 1, 1, value=False, out_shape=expected.shape)
    (got,) = torch.autograd.grad(out, s, grad)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("case", ["channels_last", "groups", "bfloat16", "padding", "stride"])
def test_where_the_product_does_not_apply_the_convolution_runs(case):
    torch.manual_seed(1)
    s, w = torch.rand(2, 4, 5, 5), torch.randn(6, 4, 1, 1)
    stride, padding, groups = 1, 0, 1
    if case == "channels_last":
        s = s.to(memory_format=torch.channels_last)
    elif case == "groups":
        w, groups = torch.randn(6, 2, 1, 1), 2
    elif case == "bfloat16":
        s, w = s.bfloat16(), w.bfloat16()
    elif case == "padding":
        padding = 1
    else:
        stride = 2
    assert not absops.is_channel_product(s, w, stride, padding, groups)
    with _Ops() as ops:
        out = absops.abs_conv(s, w, None, 2, stride, padding, 1, groups)
    assert "convolution" in ops.names
    assert torch.equal(out, F.conv2d(s, w.abs(), None, stride, padding, 1, groups))


def test_split_runs_the_s_stream_of_a_1x1_layer_as_a_product():
    """A model with a 1x1 layer: its d stream is torch's convolution (the model's output bit
    for bit), its s stream and the backward of it are no convolution."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 4)).eval().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    sm = core.split(model)
    with torch.no_grad():
        sm.forward_pairs(x)  # the first call captures the model (by running it)
        with _Ops() as ops:
            pair = sm.forward_pairs(x)
    assert ops.names.count("convolution") == 3  # both streams of the 3x3 layer, d of the 1x1
    assert torch.equal(pair.d, model(x))
    # the s stream by its definition, written out: |W| s + |b| through every layer
    with torch.no_grad():
        s = F.conv2d(x.abs(), model[0].weight.abs(), model[0].bias.abs(), padding=1)
        z = model[0](x)
        s = s - z.clamp_max(0)
        z = model[2](z.relu())
        s = F.conv2d(s, model[2].weight.abs(), model[2].bias.abs()) - z.clamp_max(0)
        s = F.linear(s.flatten(1), model[5].weight.abs(), model[5].bias.abs())
    split = core.split(model, stabilizer="none")
    with torch.no_grad():
        torch.testing.assert_close(split.forward_pairs(x).s, s, rtol=1e-12, atol=1e-12)


def test_sensitivities_through_a_1x1_layer_equal_those_of_the_convolution(monkeypatch):
    """The backward of the s stream through a 1x1 layer is the product with ``|W|^T``: no
    convolution backward with ``|W|`` runs, and the sensitivities are those of the
    convolution path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 4)).eval().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    target = torch.tensor([0, 3])

    class _AbsBackward(TorchDispatchMode):
        """Counts convolution backwards with a non-negative 1x1 weight (the s stream's)."""
        found = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "convolution_backward":
                w = args[2]
                if w.shape[-2:] == (1, 1) and bool((w >= 0).all()):
                    type(self).found += 1
            return func(*args, **(kwargs or {}))

    with _AbsBackward():
        product = core.split(model).sensitivities(x, target, ["input", "1"], alpha=0.4)
    assert _AbsBackward.found == 0
    monkeypatch.setattr(absops, "is_channel_product", lambda *args: False)
    with _AbsBackward():
        convolution = core.split(model).sensitivities(x, target, ["input", "1"], alpha=0.4)
    assert _AbsBackward.found > 0  # the counter sees the convolution path
    assert set(product) == set(convolution) == {"input", "1"}
    for name, probe in product.items():
        for field in ("S", "Dg", "grad", "mass"):
            torch.testing.assert_close(getattr(probe, field), getattr(convolution[name], field),
                                       rtol=1e-12, atol=1e-12)
