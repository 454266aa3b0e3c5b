"""Difference models of appendix D: architectures, constraints, guarantees, DCGrad plugin."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pluggy
import pytest
import torch

import core.dc.models as dc
from core.dc.explain import input_gradients, target_gradients
from quantus_adapters.dc_plugin import dc_grad

GEN_SEED = 1234


def class_gradients(fn, x: torch.Tensor) -> torch.Tensor:
    """(B, K, ...) gradients of every output of ``fn`` w.r.t. ``x`` (rows independent)."""
    with torch.no_grad():
        k = fn(x[:1]).shape[1]
    repeated = x.detach().repeat_interleave(k, dim=0).requires_grad_(True)
    out = fn(repeated).unflatten(0, (-1, k))  # (B, K copies, K logits)
    return torch.autograd.grad(out.diagonal(dim1=1, dim2=2).sum(), repeated)[0].unflatten(
        0, (-1, k)
    )


def scramble(model: torch.nn.Module, seed: int = GEN_SEED) -> torch.nn.Module:
    """Random raw parameters of both signs and random BN statistics, then eval mode.

    The positivity transform, not the initialisation, must then enforce the guarantees.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                scale = 2.0 / (p.numel() // p.shape[0])
            else:
                scale = 0.2 if name.endswith("bias") else 1.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
    return model.eval()


def streams(model: torch.nn.Module):
    """(name, callable on that stream's own input) of every constrained stream."""
    if dc.is_difference_model(model):
        return [("g", model.g), ("h", model.h)]
    return [("model", model)]


def midpoint_gap(fn, n: int = 12, seed: int = 0) -> torch.Tensor:
    """``f((x+y)/2) - (f(x)+f(y))/2`` for ``n`` random pairs in [0, 1] (<= 0 if convex)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.rand(n, 1, 28, 28, generator=gen, dtype=torch.float64)
    # sparse, digit-like inputs too: the corners of the unit cube matter for Maxout kinks
    y[: n // 2] = (y[: n // 2] > 0.7).double()
    with torch.no_grad():
        out = fn(torch.cat([x, y, (x + y) / 2]))
    fx, fy, fm = out.split(n)
    return fm - (fx + fy) / 2, out.abs().max()


# ----------------------------------------------------------------------- architectures


def test_mlp_architecture_matches_appendix_d1():
    model = dc.mlp_maxout("None")
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, dc.ConstrainedLinear)]
    # rank-2 Maxout: every hidden layer computes 2 * 800 pre-activations
    assert shapes == [(1600, 784), (1600, 800), (1600, 800), (10, 800)]
    bns = [m for m in model.modules() if isinstance(m, dc.ConstrainedBatchNorm1d)]
    assert [b.num_features for b in bns] == [1600, 1600, 1600]
    maxouts = [m for m in model.modules() if isinstance(m, dc.Maxout)]
    assert [m.rank for m in maxouts] == [2, 2, 2]


def test_cnn_architecture_matches_appendix_d1():
    model = dc.cnn_maxout("None")
    convs = [m for m in model.modules() if isinstance(m, dc.ConstrainedConv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 64, 3, 1), (32, 128, 3, 1), (64, 256, 3, 1), (128, 256, 3, 1)
    ]
    assert sum(isinstance(m, dc.ConstrainedBatchNorm2d) for m in model.modules()) == 4
    fcs = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, dc.ConstrainedLinear)]
    assert fcs == [(2048, 6272), (512, 1024), (10, 256)]
    out = model.eval()(torch.rand(2, 784))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("mode", dc.MODES)
def test_modes_build_and_expose_streams(mode):
    model = dc.mlp_maxout(mode).eval()
    x = torch.rand(3, 1, 28, 28)
    out = model(x)
    assert out.shape == (3, 10)
    torch.testing.assert_close(model(x.reshape(3, 784)), out, rtol=0, atol=0)
    assert model.mode == mode
    if mode in dc.DIFFERENCE_MODES:
        restriction, inverted = dc.DIFFERENCE_MODES[mode]
        assert dc.is_difference_model(model)
        assert model.inverted is inverted
        assert model.g.mode == model.h.mode == restriction
        h_in = 1 - x if inverted else x
        # forward is exactly g - h as defined
        assert torch.equal(out, model.g(x) - model.h(h_in))
        # the two streams are initialised independently
        assert not torch.equal(model.g.layers.fc2.weight, model.h.layers.fc2.weight)
    else:
        assert not dc.is_difference_model(model)
        assert not hasattr(model, "g")


def test_constraint_placement():
    mon, ic, free = dc.mlp_maxout("Mon"), dc.mlp_maxout("IC"), dc.mlp_maxout("None")
    mon_linear = [m for m in mon.modules() if isinstance(m, dc.ConstrainedLinear)]
    ic_linear = [m for m in ic.modules() if isinstance(m, dc.ConstrainedLinear)]
    assert all(m.constrain_weight and m.constrain_bias for m in mon_linear)
    assert not ic_linear[0].constrain_weight
    assert all(m.constrain_weight for m in ic_linear[1:])
    assert all(not m.constrain_weight and not m.constrain_bias
               for m in free.modules() if isinstance(m, dc.ConstrainedLinear))
    assert all(m.constrained for m in mon.modules() if isinstance(m, dc.ConstrainedBatchNorm1d))
    assert not any(m.constrained for m in free.modules()
                   if isinstance(m, dc.ConstrainedBatchNorm1d))


@pytest.mark.parametrize("positivity", sorted(dc.POSITIVITY_TRANSFORMS))
def test_positivity_transforms_and_initialisation(positivity):
    sigma = 0.01
    model = dc.mlp_maxout("Mon", positivity=positivity, init_std=sigma)
    layer = model.layers.fc2
    effective = layer.effective_weight().detach()
    # effective weights start at |N(0, sigma)|: mean sigma * sqrt(2 / pi), nothing negative
    assert effective.min() >= 0
    assert abs(effective.mean().item() - sigma * (2 / torch.pi) ** 0.5) < 0.05 * sigma
    assert abs(effective.std().item() - sigma * (1 - 2 / torch.pi) ** 0.5) < 0.05 * sigma
    bn = model.layers.bn1
    torch.testing.assert_close(bn.effective_weight().detach(), torch.ones(1600))
    # whatever the raw values, the applied parameters are non-negative
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
        bn.weight.normal_()
        bn.bias.normal_()
    for tensor in (layer.effective_weight(), layer.effective_bias(), bn.effective_weight(),
                   bn.effective_bias()):
        assert tensor.min() >= 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown mode 'DX'.*DICIN"):
        dc.mlp_maxout("DX")
    with pytest.raises(ValueError, match="positivity.*softplus"):
        dc.cnn_maxout("Mon", positivity="abs")
    model = dc.mlp_maxout("None").eval()
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\) or \(B, 784\)"):
        model(torch.rand(2, 3, 28, 28))
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(2, 784, dtype=torch.long))
    assert dc.normalize_mode("diff.none") == "DiffNone"
    assert dc.normalize_mode("dicin") == "DICIN"


# -------------------------------------------------------------------------- guarantees


@pytest.mark.parametrize("mode", ["Mon", "DM", "DMIN"])
def test_monotone_streams_have_non_negative_input_gradients(mode):
    model = dc.mlp_maxout(mode)
    x = torch.rand(6, 1, 28, 28)
    for stage in ("init", "scrambled"):
        if stage == "scrambled":
            scramble(model)
        model.eval()
        for name, stream in streams(model):
            grads = class_gradients(stream, x)
            assert grads.min() >= 0, (stage, name)
            assert grads.max() > 0, (stage, name)  # not trivially zero
            # and directly: adding ink never lowers a logit of a Mon stream
            with torch.no_grad():
                bump = stream((x + 0.3 * torch.rand_like(x)).clamp(max=1)) - stream(x)
            assert bump.min() >= -1e-5 * stream(x).abs().max(), (stage, name)


@pytest.mark.parametrize("mode", ["IC", "Mon", "DIC", "DICIN", "DMIN"])
def test_convex_streams_satisfy_midpoint_inequality(mode):
    model = scramble(dc.mlp_maxout(mode).double())
    for name, stream in streams(model):
        gap, scale = midpoint_gap(stream)
        assert gap.max() <= 1e-10 * scale, name
        assert gap.min() < -1e-6 * scale, name  # strictly convex somewhere: not affine


def test_unconstrained_model_breaks_both_guarantees():
    """The checks above can fail: a scrambled 'None' model is neither monotone nor convex."""
    model = scramble(dc.mlp_maxout("None").double())
    grads = class_gradients(model, torch.rand(6, 1, 28, 28, dtype=torch.float64))
    assert grads.min() < 0
    gap, scale = midpoint_gap(model)
    assert gap.max() > 1e-6 * scale


@pytest.mark.parametrize("mode", ["IC", "Mon"])
def test_cnn_guarantees(mode):
    model = scramble(dc.cnn_maxout(mode).double())
    gap, scale = midpoint_gap(model, n=3)
    assert gap.max() <= 1e-10 * scale
    if mode == "Mon":
        x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
        grads = class_gradients(lambda v: model(v)[:, :2], x)
        assert grads.min() >= 0 and grads.max() > 0


def test_eval_mode_rows_are_independent_but_train_mode_is_not():
    """The guarantees are per sample in eval mode; batch norm in train mode couples rows."""
    model = dc.mlp_maxout("DIC")
    x = torch.rand(8, 784)
    model.eval()
    # float32 batched and single-row kernels differ in rounding only (~1e-5 on logits ~1)
    torch.testing.assert_close(model(x)[:2], model(x[:2]), rtol=1e-4, atol=1e-4)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x)[:2], model(x[:2]), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------- DCGrad plugin


@pytest.fixture(scope="module")
def dicin():
    torch.manual_seed(0)
    return scramble(dc.mlp_maxout("DICIN"))


def test_dcgrad_streams(dicin):
    x = torch.rand(4, 1, 28, 28)
    targets = torch.tensor([0, 3, 7, 9])
    g = dc_grad(dicin, x, targets)
    h = dc_grad(dicin, x, targets, stream="h")
    diff = dc_grad(dicin, x, targets, stream="diff")
    assert g.shape == h.shape == diff.shape == x.shape
    # reference: autograd on the streams themselves
    all_g = class_gradients(dicin.g, x)
    all_h = class_gradients(dicin.h, 1 - x)
    rows = torch.arange(4)
    torch.testing.assert_close(g, all_g[rows, targets])
    torch.testing.assert_close(h, all_h[rows, targets])
    # f(x) = g(x) - h(1 - x): df/dx = dg/dx + dh/du
    torch.testing.assert_close(diff, g + h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(target_gradients(dicin, x, 3, "g")[1], g[1])
    torch.testing.assert_close(input_gradients(dicin, x, "h")[rows, targets], h)


def test_dcgrad_leaves_the_model_unchanged():
    model = dc.mlp_maxout("DM").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dc_grad(model, torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 3]), stream="h")
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="targets must lie"):
        dc_grad(model, torch.rand(2, 1, 28, 28), torch.tensor([1, 10]))
    assert model.training and all(m.training for m in model.modules())


def test_dcgrad_takes_whole_float_labels_and_refuses_fractional_ones(dicin):
    x = torch.rand(2, 1, 28, 28)
    ints = dc_grad(dicin, x, torch.tensor([1, 2]))
    assert torch.equal(dc_grad(dicin, x, np.array([1.0, 2.0])), ints)  # Quantus's y_batch
    with pytest.raises(ValueError, match="fractional"):
        dc_grad(dicin, x, np.array([0.7, 2.0]))  # was read as class 0
    with pytest.raises(ValueError, match="negative"):
        dc_grad(dicin, x, [1, -1])


def test_dcgrad_clear_errors(dicin):
    x, t = torch.rand(2, 1, 28, 28), torch.tensor([1, 2])
    with pytest.raises(TypeError, match=r"no \.g/\.h streams.*Saliency"):
        dc_grad(dc.mlp_maxout("IC"), x, t)
    with pytest.raises(TypeError, match="unknown option.*alpha"):
        dc_grad(dicin, x, t, alpha=0.3)
    with pytest.raises(ValueError, match="stream=.* is not one of"):
        dc_grad(dicin, x, t, stream="pos")


def test_dcgrad_is_registered_through_the_entry_point():
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="splitxai")}
    assert names.get("dc") == "quantus_adapters.dc_plugin"

    class Spec:
        @pluggy.HookspecMarker("splitxai")
        def splitxai_explainers(self):
            """Methods of a plugin."""

    manager = pluggy.PluginManager("splitxai")
    manager.add_hookspecs(Spec)
    manager.load_setuptools_entrypoints("splitxai", name="dc")
    methods = {}
    for result in manager.hook.splitxai_explainers():
        methods.update(result)
    assert methods["DCGrad"] is dc_grad
    assert dc_grad.__doc__.splitlines()[0].startswith("DCGrad:")
