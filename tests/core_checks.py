"""Shared invariant checks for the core tests (docs/math.md sections 2-4).

The reference for activations and gradients is plain torch autograd on a deep COPY of the
model, with forward hooks on the copy only; the user's model never carries a hook.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

import core

STABILIZERS = ("scale", "shift", "none")
MAXPOOLS = ("convex", "wta")


def _tiny(t: torch.Tensor) -> float:
    return float(torch.finfo(t.dtype).tiny)


def max_abs(t: torch.Tensor) -> float:
    """``max |t|`` as a Python float (0 for empty tensors)."""
    return float(t.detach().abs().max()) if t.numel() else 0.0


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float,
                     scale: float | None = None, what: str = "") -> None:
    """``max |got - want| <= rel * scale`` with ``scale = max |want|`` by default."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    if scale is None:
        scale = max(max_abs(want), max_abs(got))
    err = max_abs(got - want)
    assert err <= rel * scale + _tiny(want), (
        f"{what}: max error {err:.3e} > {rel:.0e} * {scale:.3e}"
    )


def check_forward(model: nn.Module, x: torch.Tensor, rel: float = 1e-5,
                  stabilizers: Sequence[str] = STABILIZERS,
                  maxpools: Sequence[str] = ("convex",), **options) -> torch.Tensor:
    """Assert the forward invariant ``max |g - h - f| <= rel * max |g|`` for every option.

    Returns the model's output ``f``.
    """
    with torch.no_grad():
        f = model(x)
    for maxpool in maxpools:
        for stabilizer in stabilizers:
            sm = core.split(model, maxpool=maxpool, stabilizer=stabilizer, **options)
            g, h = sm(x)
            what = f"{type(model).__name__} maxpool={maxpool} stabilizer={stabilizer}"
            assert g.dtype == x.dtype and h.dtype == x.dtype, what
            assert torch.isfinite(g).all() and torch.isfinite(h).all(), what
            assert_rel_close(g - h, f, rel, scale=max_abs(g), what=what)
            assert torch.equal(sm.forward_pairs(x).d, f), f"{what}: d is not model(x)"
    return f


def check_nonnegative_streams(model: nn.Module, x: torch.Tensor, **options) -> None:
    """Without a stabiliser and with the ReLU input split, every split activation of every
    node is non-negative (the streams are sums of non-negative terms)."""
    sm = core.split(model, stabilizer="none", input_split="relu", **options)
    names = sm.layer_names()
    pairs = sm.pairs(x, names)
    for name in names:
        p = pairs[name]
        mass = max_abs(p.s)
        for stream, t in (("pos", p.pos), ("neg", p.neg)):
            low = float(t.min())
            assert low >= -1e-6 * mass, f"{name}.{stream} < 0 ({low:.3e}, mass {mass:.3e})"


def reference(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor,
              layers: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Activation and gradient of the target logit at each layer, by autograd on a copy.

    Layer names: a module name (its output, last call), ``"NAME:input"`` (its first input)
    or ``"input"``. Hooks clone the tensor so that later in-place ops do not alter it. A
    ``"NAME:input"`` gradient covers the module's own use of its input only: use it where that
    module is the input's only consumer (the split probes the whole node).
    """
    m = copy.deepcopy(model).eval()
    modules = dict(m.named_modules())
    acts: dict[str, torch.Tensor] = {}

    def post(layer):
        def hook(mod, args, out):
            acts[layer] = out.clone()
            return acts[layer].clone()
        return hook

    def pre(layer):
        def hook(mod, args):
            acts[layer] = args[0].clone()
            return (acts[layer].clone(),) + tuple(args[1:])
        return hook

    for layer in layers:
        if layer in ("input", ""):
            continue
        if layer.endswith(":input"):
            modules[layer[: -len(":input")]].register_forward_pre_hook(pre(layer))
        else:
            modules[layer].register_forward_hook(post(layer))
    xr = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = m(xr)
        for layer in layers:
            if layer in ("input", ""):
                acts[layer] = xr
        if isinstance(target, int):
            index = torch.full((x.shape[0], 1), target, dtype=torch.long)
        else:
            index = target.view(-1, 1).expand(x.shape[0], 1)
        sel = out.gather(1, index).sum()
        tensors = [acts[layer] for layer in layers]
        grads = torch.autograd.grad(sel, tensors, allow_unused=True)
    return {
        layer: (t.detach(), torch.zeros_like(t) if gr is None else gr.detach())
        for layer, t, gr in zip(layers, tensors, grads, strict=True)
    }


def check_probe(p: core.Probe, act: torch.Tensor, grad: torch.Tensor, alpha: float,
                what: str = "", rel: float = 1e-5, grad_rel: float = 1e-4) -> None:
    """The invariants of one probe against the autograd reference ``(act, grad)``."""
    for name in ("activation", "mass", "S", "Dg", "grad", "pos", "neg", "pos_g", "neg_g",
                 "pos_h", "neg_h", "g", "h"):
        t = getattr(p, name)
        assert t.shape == act.shape, f"{what}.{name}: shape {tuple(t.shape)}"
        assert t.dtype == act.dtype, f"{what}.{name}: dtype {t.dtype}"
        assert torch.isfinite(t).all(), f"{what}.{name} is not finite"
    assert_rel_close(p.activation, act, rel, what=f"{what} activation vs model")
    assert_rel_close(p.grad, grad, grad_rel, what=f"{what} grad vs autograd")
    mass = max(max_abs(p.pos), max_abs(p.neg))
    assert_rel_close(p.pos - p.neg, p.activation, rel, scale=mass, what=f"{what} pos - neg")
    sens = max(max_abs(p.g), max_abs(p.h), max_abs(p.grad))
    assert_rel_close(p.g - p.h, p.grad, rel, scale=sens, what=f"{what} g - h")
    assert_rel_close((p.pos_g - p.neg_g) / 2, p.g, rel, scale=sens, what=f"{what} g formula")
    assert_rel_close((p.pos_h - p.neg_h) / 2, p.h, rel, scale=sens, what=f"{what} h formula")
    # the sum of the shifted local sensitivities is a product of |W| and (1 - 2 alpha) >= 0
    assert float(p.S.min()) >= -rel * max_abs(p.S) - _tiny(p.S), f"{what}: S < 0"
    if alpha == 0.0:  # g and h are monotone in the split activations of every layer
        for name in ("pos_g", "neg_g", "pos_h", "neg_h"):
            low = float(getattr(p, name).min())
            assert low >= -rel * max_abs(p.S) - _tiny(p.S), f"{what}: {name} < 0 ({low:.3e})"
    if alpha == 0.5:
        assert_rel_close(p.g, grad / 2, grad_rel, what=f"{what} g at alpha 0.5")
        assert_rel_close(p.h, -grad / 2, grad_rel, what=f"{what} h at alpha 0.5")
        assert max_abs(p.S) == 0.0, f"{what}: S != 0 at alpha 0.5"


def check_float64_exact(sm: core.SplitModel, model: nn.Module, x: torch.Tensor, target: int,
                        alpha: float = 0.3, layers: Sequence[str] = ("input",),
                        grad_rtol: float = 1e-10) -> None:
    """In float64: ``g - h`` equals ``model(x)`` to 1e-12 and ``g - h`` of the input probe
    equals autograd's input gradient of the ``target`` logit (``grad_rtol``, atol 1e-12)."""
    g, h = sm(x)
    torch.testing.assert_close(g - h, model(x), rtol=0, atol=1e-12)
    probe = sm.sensitivities(x, target, list(layers), alpha=alpha)["input"]
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr)[:, target].sum(), xr)
    torch.testing.assert_close(probe.g - probe.h, grad, rtol=grad_rtol, atol=1e-12)


def check_sensitivities(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor,
                        layers: Sequence[str], alphas: Sequence[float] = (0.0, 0.4, 0.5),
                        rel: float = 1e-5, grad_rel: float = 1e-4,
                        **options) -> dict[str, core.Probe]:
    """Probe ``layers`` at each alpha and check every invariant; returns the last probes."""
    ref = reference(model, x, target, layers)
    sm = core.split(model, **options)
    probes: dict[str, core.Probe] = {}
    for alpha in alphas:
        probes = sm.sensitivities(x, target, layers=list(layers), alpha=alpha)
        assert set(probes) == set(layers)
        for layer in layers:
            act, grad = ref[layer]
            check_probe(probes[layer], act, grad, alpha, what=f"{layer!r} alpha={alpha}",
                        rel=rel, grad_rel=grad_rel)
    return probes


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(n, generator=gen) + 1.0)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model
