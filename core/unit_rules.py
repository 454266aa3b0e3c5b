"""Rules of the ReLU-type units: piecewise-linear activations, each reduced to ReLUs
(docs/math.md section 2; registered in :mod:`core.registry`'s table like every rule).

With the split pair ``(d, s)`` of the input ``z``, a ReLU gives ``d' = relu(d)``,
``s' = s + relu(-d)``; a clamp, a LeakyReLU or PReLU (an affine map plus a scaled ReLU), a
softshrink or a threshold is a sum of such terms and of constants ``c``, which enter as
``(c, |c|)``. All are shift points (``activation=True``) through which SplitLRP passes
relevance (``lrp="activation"``).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core import frozen
from core.absops import add_negative_part
from core.max_rules import maximum, minimum
from core.pair import Pair, contains_pair
from core.registry import Ctx, register, static_args, unsupported


def clamp_pair(p: Pair, lo: float | None, hi: float | None, d: torch.Tensor) -> Pair:
    """``clamp(z, lo, hi)`` split through ``lo + relu(z - lo) - relu(z - hi)``.

    ``d`` is the model's own result; ``s`` is the mass of that ReLU form. An infinite bound
    (``lo = -inf``, ``hi = inf``) clamps nothing and is left out, as None.
    """
    lo = None if lo == -math.inf else lo
    hi = None if hi == math.inf else hi
    if lo is None and hi is None:
        return Pair(d, p.s)
    if hi is None:  # lo + relu(z - lo)
        if lo == 0:
            return Pair(d, p.s - p.d.clamp_max(0))
        return Pair(d, p.s + 2 * abs(lo) + F.relu(lo - p.d))
    if lo is None:  # z - relu(z - hi)
        return Pair(d, 2 * p.s + abs(hi) + F.relu(hi - p.d))
    return Pair(d, 2 * p.s + (2 * abs(lo) + abs(hi)) + F.relu(lo - p.d) + F.relu(hi - p.d))


@register(nn.ReLU, torch.relu, torch.relu_, F.relu, F.relu_, "relu", "relu_",
          lrp="activation", activation=True, relu=True, mass_linear=True, fresh=True,
          inplace=True)
def relu(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """ReLU: g stream Maxout ``a+ = max(z+, z-)``, h stream identity ``a- = z-``:
    ``d' = relu(z)``, ``s' = s + relu(-z)``."""
    p = args[0]
    if ctx.donated:  # the same bits, written into the argument's tensors
        s = p.s.sub_(p.d.clamp_max(0))  # s - min(z, 0) = s + relu(-z)
        return Pair(p.d.relu_(), s)
    d = F.relu(p.d)
    return Pair(d, add_negative_part(p.s, p.d, d, ctx.mass))


def _number(v: Any) -> float | None:
    if v is None:
        return None
    return float(v.item() if isinstance(v, torch.Tensor) else v)


@register(torch.clamp, torch.clip, "clamp", "clamp_", "clip", "clip_", lrp="activation",
          activation=True, mass_linear=True)
def clamp(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``clamp(z, lo, hi) = lo + relu(z - lo) - relu(z - hi)`` with constant bounds (``clip``,
    ``clamp_min``, ``clamp_max``); ``s'`` as in :func:`clamp_pair`. Bounds that are tensors
    of several elements (per channel): ``min(max(z, lo), hi)``, ``s'`` as in :func:`maximum`
    and :func:`minimum`."""
    names = ["input", "min", "max"]
    bound = dict(zip(names, args, strict=False)) | kwargs
    if contains_pair((bound.get("min"), bound.get("max"))):
        raise unsupported(ctx, "clamp with an activation as bound",
                          "Write torch.maximum(z, a) / torch.minimum(z, b).")
    p, low, high = bound["input"], bound.get("min"), bound.get("max")
    if any(isinstance(v, torch.Tensor) and v.numel() != 1 for v in (low, high)):
        q = p if low is None else maximum(ctx, (p, low), {})
        q = q if high is None else minimum(ctx, (q, high), {})
        return Pair(torch.clamp(p.d, low, high), q.s)
    lo, hi = _number(low), _number(high)
    if lo is not None and hi is not None and lo > hi:
        raise unsupported(ctx, f"clamp with min {lo} > max {hi}", "Use min <= max.")
    return clamp_pair(p, lo, hi, torch.clamp(p.d, low, high))


@register(torch.clamp_min, "clamp_min", "clamp_min_", lrp="activation", activation=True,
          mass_linear=True)
def clamp_min(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``x.clamp_min(lo) = lo + relu(z - lo)``: ``s' = s + 2|lo| + relu(lo - z)``."""
    return clamp(ctx, (args[0], args[1] if len(args) > 1 else kwargs["min"], None), {})


@register(torch.clamp_max, "clamp_max", "clamp_max_", lrp="activation", activation=True,
          mass_linear=True)
def clamp_max(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``x.clamp_max(hi) = z - relu(z - hi)``: ``s' = 2 s + |hi| + relu(hi - z)``."""
    return clamp(ctx, (args[0], None, args[1] if len(args) > 1 else kwargs["max"]), {})


@register(F.hardtanh, F.hardtanh_, lrp="activation", activation=True, mass_linear=True,
          fresh=True)
def hardtanh(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``F.hardtanh(z, lo, hi) = clamp(z, lo, hi)``:
    ``s' = 2 s + 2|lo| + |hi| + relu(lo - z) + relu(hi - z)``."""
    names = ["input", "min_val", "max_val"]
    bound = dict(zip(names, args, strict=False)) | kwargs
    lo, hi = float(bound.get("min_val", -1.0)), float(bound.get("max_val", 1.0))
    p = bound["input"]
    return clamp_pair(p, lo, hi, F.hardtanh(p.d, lo, hi))


@register(F.relu6, lrp="activation", activation=True, mass_linear=True, fresh=True)
def relu6(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``F.relu6(z) = relu(z) - relu(z - 6)``: ``s' = 2 s + 6 + relu(-z) + relu(6 - z)``."""
    p = args[0] if args else kwargs["input"]
    return clamp_pair(p, 0.0, 6.0, F.relu6(p.d))


def _hardsigmoid_pair(p: Pair) -> Pair:
    # hardsigmoid(z) = clamp(u, 0, 1) with u = z / 6 + 1/2: d_u = d / 6 + 1/2, s_u = s / 6 + 1/2
    u = Pair(p.d / 6 + 0.5, p.s / 6 + 0.5)
    return clamp_pair(u, 0.0, 1.0, F.hardsigmoid(p.d))


@register(nn.Hardsigmoid, F.hardsigmoid, lrp="activation", activation=True, mass_linear=True)
def hardsigmoid(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``F.hardsigmoid`` / ``nn.Hardsigmoid``: ``clamp(u, 0, 1)`` of ``u = z / 6 + 1/2``
    (``d_u = d / 6 + 1/2``, ``s_u = s / 6 + 1/2``): ``d' = hardsigmoid(d)``,
    ``s' = 2 s_u + 1 + relu(-d_u) + relu(1 - d_u)`` (:func:`clamp_pair`)."""
    p = args[0] if args else kwargs["input"]
    return _hardsigmoid_pair(p)


@register(nn.Hardswish, F.hardswish, lrp="activation", activation=True)
def hardswish(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``F.hardswish`` / ``nn.Hardswish``: the product ``z * hardsigmoid(z)`` (exact,
    :mod:`core.products`): ``d' = hardswish(d)``, ``s' = s * s_hardsigmoid``.

    ``d'`` is torch's own ``F.hardswish(d)`` with torch's own backward (``z / 3 + 1/2``
    between the kinks): the product form ``z * F.hardsigmoid(z)`` differentiates through
    torch's hardsigmoid backward, whose ``1/6`` is a float32 constant also in float64, and
    missed the model's gradient by 1e-8 of its size there."""
    p = args[0] if args else kwargs["input"]
    gate = _hardsigmoid_pair(p)
    value = frozen.frozen_value(F.hardswish(p.d), p.d, F.hardswish)
    return Pair(value, p.s * gate.s)


@register(torch.abs, torch.absolute, torch.abs_, operator.abs, "abs", "abs_", "absolute",
          "absolute_", "__abs__", lrp="activation",
          activation=True, mass_linear=True, fresh=True)
def absolute(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``|z| = relu(z) + relu(-z)``: ``d' = |d|``, ``s' = (s + relu(-d)) + (s + relu(d))
    = 2 s + |d|``."""
    p = args[0] if args else kwargs["input"]
    return Pair(torch.abs(p.d), 2 * p.s + torch.abs(p.d))


@register(nn.Hardtanh, lrp="activation", activation=True, mass_linear=True,  # and nn.ReLU6
          fresh=True)
def hardtanh_module(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``nn.Hardtanh`` and ``nn.ReLU6``: a clamp (see :func:`hardtanh`)."""
    m, p = ctx.module, args[0]
    return clamp_pair(p, float(m.min_val), float(m.max_val), F.hardtanh(p.d, m.min_val, m.max_val))


def _leaky(p: Pair, slope: float) -> Pair:
    # leaky(z) = (1 - slope) relu(z) + slope z
    return Pair(F.leaky_relu(p.d, slope), abs(1 - slope) * (p.s + F.relu(-p.d)) + abs(slope) * p.s)


@register(F.leaky_relu, F.leaky_relu_, lrp="activation", activation=True, mass_linear=True,
          fresh=True)
def leaky_relu(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``F.leaky_relu(z, m) = (1 - m) relu(z) + m z``:
    ``s' = |1 - m| (s + relu(-z)) + |m| s``."""
    names = ["input", "negative_slope"]
    bound = dict(zip(names, args, strict=False)) | kwargs
    return _leaky(bound["input"], float(bound.get("negative_slope", 0.01)))


@register(nn.LeakyReLU, lrp="activation", activation=True, mass_linear=True, fresh=True)
def leaky_relu_module(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``nn.LeakyReLU`` (see :func:`leaky_relu`)."""
    return _leaky(args[0], float(ctx.module.negative_slope))


@register(nn.RReLU, F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_, lrp="activation",
          activation=True, mass_linear=True, fresh=True)
def rrelu(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``F.rrelu`` / ``nn.RReLU`` with eval semantics: a LeakyReLU with the mean slope
    ``m = (lower + upper) / 2`` (see :func:`leaky_relu`; the random slopes of training mode
    are not used, as dropout is the identity)."""
    if ctx.module is not None:
        lower, upper, p = ctx.module.lower, ctx.module.upper, args[0]
    else:
        names = ["input", "lower", "upper", "training", "inplace"]
        bound = dict(zip(names, args, strict=False)) | kwargs
        static_args(ctx, (bound.get("lower"), bound.get("upper")), "rrelu")
        lower, upper, p = bound.get("lower", 1 / 8), bound.get("upper", 1 / 3), bound["input"]
    return _leaky(p, (float(lower) + float(upper)) / 2)


def _prelu(ctx: Ctx, p: Pair, weight: torch.Tensor) -> Pair:
    static_args(ctx, weight, "prelu")
    a = weight.detach()
    d = F.prelu(p.d, a)
    # the slopes along dimension 1 (the channels), or one slope for every element
    a = a.reshape([-1] + [1] * (p.d.dim() - 2)) if p.d.dim() >= 2 else a.reshape(())
    return Pair(d, (1 - a).abs() * (p.s + F.relu(-p.d)) + a.abs() * p.s)


@register(F.prelu, torch.prelu, "prelu", lrp="activation", activation=True, mass_linear=True)
def prelu(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``F.prelu(z, a) = (1 - a) relu(z) + a z`` with a slope ``a`` per channel (dimension 1)
    or one for all, of any sign: ``s' = |1 - a| (s + relu(-z)) + |a| s`` (a LeakyReLU per
    channel, :func:`leaky_relu`). A slope that is an activation is a product: refused."""
    bound = dict(zip(["input", "weight"], args, strict=False)) | kwargs
    return _prelu(ctx, bound["input"], bound["weight"])


@register(nn.PReLU, lrp="activation", activation=True, mass_linear=True)
def prelu_module(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``nn.PReLU`` with its learned slopes (see :func:`prelu`)."""
    return _prelu(ctx, args[0], ctx.module.weight)


def _softshrink(p: Pair, lam: float) -> Pair:
    return Pair(F.softshrink(p.d, lam), 2 * p.s + 2 * lam + F.relu(lam - p.d) + F.relu(p.d + lam))


@register(F.softshrink, lrp="activation", activation=True, mass_linear=True)
def softshrink(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``F.softshrink(z, l) = relu(z - l) - relu(-z - l)`` (``l >= 0``):
    ``s' = 2 s + 2 l + relu(l - z) + relu(z + l)``."""
    bound = dict(zip(["input", "lambd"], args, strict=False)) | kwargs
    static_args(ctx, bound.get("lambd"), "softshrink")
    return _softshrink(bound["input"], float(bound.get("lambd", 0.5)))


@register(nn.Softshrink, lrp="activation", activation=True, mass_linear=True)
def softshrink_module(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``nn.Softshrink`` (see :func:`softshrink`)."""
    return _softshrink(args[0], float(ctx.module.lambd))


@register(F.threshold, lrp="activation", activation=True, mass_linear=True)
def threshold(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``F.threshold(z, t, t) = clamp(z, min=t)``: ``s' = s + 2|t| + relu(t - z)``; other
    values are discontinuous."""
    names = ["input", "threshold", "value"]
    bound = dict(zip(names, args, strict=False)) | kwargs
    t, v = float(bound["threshold"]), float(bound["value"])
    if t != v:
        raise unsupported(ctx, f"threshold({t}, value={v})",
                          "Only threshold == value is continuous.")
    p = bound["input"]
    return clamp_pair(p, t, None, F.threshold(p.d, t, v))


@register(nn.Threshold, lrp="activation", activation=True, mass_linear=True)
def threshold_module(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``nn.Threshold(t, t)`` (see :func:`threshold`)."""
    return threshold(ctx, (args[0], ctx.module.threshold, ctx.module.value), {})
