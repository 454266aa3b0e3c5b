"""Rules of max pooling and of the max/min family: pooling windows, reductions over whole
dimensions, the elementwise max and min of two activations (docs/math.md section 2, eq. 17).

Convex mode (``maxpool="convex"``): ``max_j (a_j+ - a_j-) = max_j {a_j+ + sum_{i != j} a_i-}
- sum_i a_i-``, so ``d' = max(d)`` and ``s' = max(d) + sum(s - d)`` over the window, which
keeps g and h convex and monotone; winner-takes-all (``"wta"``): ``s'`` is ``s`` at the
arg-max of ``d``. A min is ``-max(-x)``. Indices returned to the model are its own (the
arg-max of ``d``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.absops import placeholder
from core.pair import Pair, lift
from core.registry import Ctx, Rule, RuleFn, register, unsupported

_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_ADAPTIVE_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}
_AVG_POOL_BACKWARD = {2: torch.ops.aten.avg_pool2d_backward, 3: torch.ops.aten.avg_pool3d_backward}


def _windows_of_avg_pool(d: torch.Tensor, n: int, window: tuple, dilation, out_shape) -> bool:
    """Whether an average pooling (divisor 1) has the max pooling's windows: no dilation and
    the same output shape (computed on a meta tensor)."""
    if n not in _AVG_POOL or any(v != 1 for v in _tuple(dilation, n)):
        return False
    kernel, stride, padding, ceil_mode = window
    try:
        out = _AVG_POOL[n](torch.empty(d.shape, device="meta"), kernel, stride, padding,
                           ceil_mode, True, 1)
    except RuntimeError:
        return False
    return tuple(out.shape) == tuple(out_shape)


def sum_pool(x: torch.Tensor, n: int, kernel, stride, padding, dilation, out_shape,
             ceil_mode: bool = False) -> torch.Tensor:
    """Windowed sums with zero padding, matching the windows of a max pooling."""
    kernel, stride = _tuple(kernel, n), _tuple(stride, n)
    padding, dilation = _tuple(padding, n), _tuple(dilation, n)
    if _windows_of_avg_pool(x, n, (kernel, stride, padding, ceil_mode), dilation, out_shape):
        return _AVG_POOL[n](x, kernel, stride, padding, ceil_mode, True, 1)
    extra = []
    for i in range(n):
        size = x.shape[-n + i]
        need = (out_shape[-n + i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1
        extra.append(max(0, need - (size + 2 * padding[i])))
    if any(extra):
        pad: list[int] = []
        for e in reversed(extra):
            pad += [0, e]
        x = F.pad(x, pad)
    channels = x.shape[-n - 1]
    weight = torch.ones((channels, 1) + kernel, dtype=x.dtype, device=x.device)
    flat = x.reshape((-1,) + tuple(x.shape[-n - 1:]))
    out = _CONV[n](flat, weight, None, stride, padding, dilation, channels)
    return out.reshape(tuple(x.shape[: -n - 1]) + tuple(out.shape[1:]))


def _gather(s: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    lead = s.shape[: -n]
    return s.reshape(lead + (-1,)).gather(-1, idx.reshape(lead + (-1,))).view(idx.shape)


def _mass_vjp(g: torch.Tensor, d: torch.Tensor, idx: torch.Tensor, n: int, window: tuple
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The transpose of ``s' = maxpool(d) + sumpool(s - d)`` at ``g``: ``ds = sumpool^T(g)``
    and ``dd = scatter(g at the arg-max idx) - ds``, written into one new tensor each (the
    pooling's backward gives ``ds`` in the standard or a channels-last layout, whose pooled
    dimensions flatten into one as a view)."""
    kernel, stride, padding, ceil_mode = window
    ds = _AVG_POOL_BACKWARD[n](g, d, kernel, stride, padding, ceil_mode, True, 1)
    dd = ds.neg()
    flat = dd.view(dd.shape[:-n] + (-1,))
    flat.scatter_add_(-1, idx.reshape(flat.shape[:-1] + (-1,)),
                      g.reshape(flat.shape[:-1] + (-1,)))
    return ds, dd


class _ConvexMass(torch.autograd.Function):
    """``s' = maxpool(d) + sumpool(s - d)`` of a convex max pooling with the windows of an
    average pooling, the maximum read at the model's arg-max ``idx``. Its backward
    (:func:`_mass_vjp`) makes two tensors where autograd made five (the transposed pool, its
    negative, the scatter's zeros, the scatter and their sum): at VGG16's first pooling at
    batch 8, each is 98 MiB of fresh memory."""

    @staticmethod
    def forward(ctx, s, d, idx, n, window):  # noqa: D102
        ctx.save_for_backward(d, idx)
        ctx.n, ctx.window = n, window
        kernel, stride, padding, ceil_mode = window
        rest = _AVG_POOL[n](s - d, kernel, stride, padding, ceil_mode, True, 1)
        return rest.add_(_gather(d, idx, n))

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        d, idx = ctx.saved_tensors
        return (*_mass_vjp(grad, d, idx, ctx.n, ctx.window), None, None, None)


def _has_minus_infinity(t: torch.Tensor) -> bool:
    """Whether ``t`` holds ``-inf``: its minimum first (one pass, no temporary; 10x faster
    than ``isneginf(t).any()`` on CPU), elementwise only where that minimum is NaN."""
    if t.numel() == 0:
        return False
    low = float(t.detach().amin())
    return low == -math.inf or (math.isnan(low) and bool(torch.isneginf(t).any()))


def _max_pool(ctx: Ctx, p: Pair, n: int, kernel, stride, padding, dilation, ceil_mode,
              indices: bool = False) -> Any:
    """The pooled pair; with ``indices``, also the arg-max of ``d`` (the model's own)."""
    stride = kernel if (stride is None or stride == [] or stride == ()) else stride
    pool = _MAXPOOL[n]
    d, idx = pool(p.d, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    if ctx.maxpool == "wta":
        pair = Pair(d, _gather(p.s, idx, n))
        return (pair, idx) if indices else pair
    window = (kernel, stride, padding, ceil_mode)
    if _has_minus_infinity(p.d):  # -inf pads of a "same" max pooling: no mass
        diff = torch.where(torch.isneginf(p.d), 0.0, p.s - p.d)
    elif _windows_of_avg_pool(p.d, n, window, dilation, d.shape) and p.s.shape == p.d.shape:
        s = None if ctx.mass else placeholder(
            lambda g: _mass_vjp(g, p.d, idx, n, window), p.s, p.d, shape=d.shape)
        pair = Pair(d, _ConvexMass.apply(p.s, p.d, idx, n, window) if s is None else s)
        return (pair, idx) if indices else pair
    else:
        diff = p.s - p.d
    # the same values as d, but a new tensor: built from d itself, s would let a probe of d
    # through autograd pick up the s path
    winner = _gather(p.d, idx, n)
    rest = sum_pool(diff, n, kernel, stride, padding, dilation, d.shape, ceil_mode)
    pair = Pair(d, winner + rest)
    return (pair, idx) if indices else pair


@register(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, lrp="maxpool", mass_linear=True)
def maxpool_module(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``nn.MaxPool1d/2d/3d``. Convex (section 3.4, eq. 17): ``d' = maxpool(d)``,
    ``s' = maxpool(d) + sumpool(s - d)``; winner-takes-all: ``s'`` is ``s`` at the window's
    arg-max of ``d``. With ``return_indices=True`` the indices are the model's own (the
    arg-max of ``d``)."""
    m = ctx.module
    n = int(type(m).__name__[-2])
    return _max_pool(ctx, args[0], n, m.kernel_size, m.stride, m.padding, m.dilation,
                     m.ceil_mode, bool(m.return_indices))


def maxpool_function(n: int, indices: bool = False) -> RuleFn:
    """``F.max_pool{n}d`` (``indices``: ``F.max_pool{n}d_with_indices``, which returns them
    whatever its ``return_indices``)."""

    def rule(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
        names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                 "return_indices"]
        b = dict(zip(names, args, strict=False)) | kwargs
        return _max_pool(ctx, b["input"], n, b["kernel_size"], b.get("stride"), b.get("padding", 0),
                         b.get("dilation", 1), b.get("ceil_mode", False),
                         indices or bool(b.get("return_indices", False)))

    return rule


def _adaptive_max(ctx: Ctx, p: Pair, n: int, output_size, indices: bool = False) -> Any:
    """The pooled pair; with ``indices``, also the arg-max of ``d`` (the model's own)."""
    sizes = tuple(p.d.shape[-n:])
    wanted = zip(_tuple(output_size, n), sizes, strict=True)
    out = tuple(o if o is not None else s for o, s in wanted)
    if ctx.maxpool == "wta" or indices:
        d, idx = _ADAPTIVE_MAX[n](p.d, out, return_indices=True)
    if ctx.maxpool == "wta":
        pair = Pair(d, _gather(p.s, idx, n))
        return (pair, idx) if indices else pair
    if any(s % o for s, o in zip(sizes, out, strict=True)):
        raise unsupported(
            ctx, f"adaptive max pooling from {sizes} to {out} (uneven windows) in convex mode",
            "Use maxpool='wta', or an input size divisible by the output size.",
        )
    kernel = tuple(s // o for s, o in zip(sizes, out, strict=True))
    pair = _max_pool(ctx, p, n, kernel, kernel, 0, 1, False)
    return (pair, idx) if indices else pair


@register(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
          lrp="maxpool", mass_linear=True)
def adaptive_maxpool_module(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``nn.AdaptiveMaxPool1d/2d/3d``: :func:`maxpool_module` over the adaptive windows.
    Convex: ``d' = maxpool(d)``, ``s' = maxpool(d) + sumpool(s - d)`` with
    ``kernel = stride = input size / output size`` (even windows only); winner-takes-all:
    ``s'`` is ``s`` at the window's arg-max of ``d`` (any windows)."""
    m = ctx.module
    return _adaptive_max(ctx, args[0], int(type(m).__name__[-2]), m.output_size,
                         bool(m.return_indices))


def adaptive_maxpool_function(n: int, indices: bool = False) -> RuleFn:
    """``F.adaptive_max_pool{n}d`` (``indices``: ``F.adaptive_max_pool{n}d_with_indices``)."""

    def rule(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
        b = dict(zip(["input", "output_size", "return_indices"], args, strict=False)) | kwargs
        return _adaptive_max(ctx, b["input"], n, b["output_size"],
                             indices or bool(b.get("return_indices", False)))

    return rule


@register(torch.amax, "amax", lrp="maxpool", mass_linear=True)
def amax_rule(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``x.amax(dim, keepdim)`` / ``torch.amax``: max pooling over whole dimensions (a
    channel max, as in CBAM-style spatial attention). Convex (eq. 17): ``d' = max(d)``,
    ``s' = max(d) + sum(s - d)`` over the reduced elements (a ``-inf`` element, the pad of
    a "same" max, adds nothing); winner-takes-all: ``s'`` is ``s``
    at the arg-max of ``d``. At ties the gradient of ``max(d)`` is shared evenly among the
    tied elements, as autograd's of ``amax`` and of ``max()`` over everything
    (:func:`_reduce_max`)."""
    return _reduce_max(ctx, args, kwargs, spread=True)


def _reduce_max(ctx: Ctx, args: tuple, kwargs: dict, spread: bool) -> Pair:
    """:func:`amax_rule`; ``spread=False``: a tie's gradient all at the arg-max, as
    autograd's of ``max(dim)``, whose indices the model gets."""
    b = dict(zip(["input", "dim", "keepdim"], args, strict=False)) | kwargs
    p, dim, keepdim = b["input"], b.get("dim", ()), bool(b.get("keepdim", False))
    n = p.d.dim()
    dims = sorted({int(i) % n for i in ((dim,) if isinstance(dim, int) else (dim or range(n)))})
    kept = [i for i in range(n) if i not in dims]
    lead = [p.d.shape[i] for i in kept]

    def rows(t: torch.Tensor) -> torch.Tensor:  # the reduced elements on the last axis
        return t.permute(kept + dims).reshape(lead + [-1])

    d, s = rows(p.d), rows(p.s)
    idx = d.argmax(-1, keepdim=True)

    def top() -> torch.Tensor:  # max(d), its gradient as autograd's of the model's op
        return d.amax(-1) if spread else d.gather(-1, idx).squeeze(-1)

    winner = top()
    # s' takes the maximum again (as _max_pool does): built on ``winner`` itself, a probe of
    # d' would pick up the s path through autograd
    if ctx.maxpool == "wta":
        mass = s.gather(-1, idx).squeeze(-1)
    else:  # -inf pads (F.pad before a "same" max) carry no mass, as in _max_pool
        diff = torch.where(torch.isneginf(d), 0.0, s - d) if _has_minus_infinity(d) else s - d
        mass = top() + diff.sum(-1)
    shape = [1 if i in dims else p.d.shape[i] for i in range(n)] if keepdim else lead
    return Pair(winner.reshape(shape), mass.reshape(shape))


def _two(ctx: Ctx, args: tuple, kwargs: dict, what: str) -> tuple[Pair, Pair]:
    b = dict(zip(["input", "other"], args, strict=False)) | kwargs
    a, other = b["input"], b["other"]
    if not isinstance(other, (Pair, torch.Tensor)):
        raise unsupported(ctx, f"{what} with {type(other).__name__} {other!r}",
                          "Pass a tensor, or use clamp for a number.")
    return lift(a), lift(other)


@register(torch.maximum, "maximum", lrp="maxpool", mass_linear=True)
def maximum(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """The elementwise ``max(a, b)``: a max pooling over the window ``{a, b}`` (eq. 17),
    ``d' = max(d_a, d_b)``, convex: ``s' = max(d_a, d_b) + (s_a - d_a) + (s_b - d_b)``
    (g and h stay convex and monotone); winner-takes-all: ``s' = s`` of the larger ``d``.
    A constant ``c`` enters as ``(c, |c|)``; where it is ``-inf`` (``max(a, -inf) = a``),
    ``s' = s_a``."""
    a, b = _two(ctx, args, kwargs, "maximum")
    d = torch.maximum(a.d, b.d)
    if ctx.maxpool == "wta":
        return Pair(d, torch.where(a.d >= b.d, a.s, b.s))
    # s' from its own maximum: built on ``d`` itself, a probe of d' would pick up the s path
    s = torch.maximum(a.d, b.d) + (a.s - a.d) + (b.s - b.d)
    return Pair(d, _neutral_bounds(args, kwargs, a, b, s, torch.isneginf))


def _neutral_bounds(args: tuple, kwargs: dict, a: Pair, b: Pair, s: torch.Tensor,
                    neutral: Any) -> torch.Tensor:
    """``s`` with the mass of the other operand where a constant operand is the neutral
    element of the max or min (``-inf``, ``inf``: ``neutral`` tells where), whose ``(c, |c|)``
    would add ``inf - inf``."""
    raw = dict(zip(["input", "other"], args, strict=False)) | kwargs
    for value, own, other in ((raw["input"], a, b), (raw["other"], b, a)):
        if (isinstance(value, torch.Tensor) and value.is_floating_point()
                and bool(neutral(value).any())):
            s = torch.where(neutral(own.d), other.s, s)
    return s


@register(torch.minimum, "minimum", lrp="maxpool", mass_linear=True)
def minimum(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """The elementwise ``min(a, b) = -max(-a, -b)`` (see :func:`maximum`): ``d' = min(d_a,
    d_b)``, convex: ``s' = (s_a + d_a) + (s_b + d_b) - min(d_a, d_b)``; winner-takes-all:
    ``s' = s`` of the smaller ``d``. Where a constant is ``inf`` (``min(a, inf) = a``),
    ``s' = s_a``."""
    a, b = _two(ctx, args, kwargs, "minimum")
    d = torch.minimum(a.d, b.d)
    if ctx.maxpool == "wta":
        return Pair(d, torch.where(a.d <= b.d, a.s, b.s))
    s = (a.s + a.d) + (b.s + b.d) - torch.minimum(a.d, b.d)
    return Pair(d, _neutral_bounds(args, kwargs, a, b, s, torch.isposinf))


def _extreme(ctx: Ctx, args: tuple, kwargs: dict, of_two: RuleFn, reduce: RuleFn,
             arg: Any, result: Any) -> Any:
    """``torch.max`` / ``torch.min``: of two tensors (``of_two``), over everything or over
    ``dim`` (``reduce``, with the indices ``arg`` of ``d``: the model's own)."""
    b = dict(zip(["input", "dim", "keepdim"], args, strict=False)) | kwargs
    dim = b.get("dim", b.get("other"))
    if isinstance(dim, (torch.Tensor, Pair)):
        return of_two(ctx, (b["input"], dim), {})
    if dim is None:  # over everything: autograd spreads a tie's gradient
        return reduce(ctx, (b["input"],), {}, True)
    keepdim = bool(b.get("keepdim", False))
    # with indices, autograd puts a tie's gradient at the index returned, not spread
    values = reduce(ctx, (b["input"], dim, keepdim), {}, False)
    return result((values, arg(b["input"].d, dim, keepdim=keepdim)))


@register(torch.max, "max", lrp="maxpool", mass_linear=True)
def max_rule(ctx: Ctx, args: tuple, kwargs: dict) -> Any:
    """``x.max()`` and ``x.max(dim, keepdim)`` / ``torch.max``: :func:`amax_rule` for the
    values; the indices (the arg-max of ``d``) are the model's own. ``max(a, b)`` of two
    tensors is :func:`maximum`."""
    return _extreme(ctx, args, kwargs, maximum, _reduce_max, torch.argmax,
                    torch.return_types.max)


@register(torch.amin, "amin", lrp="maxpool", mass_linear=True)
def amin_rule(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``x.amin(dim, keepdim) = -amax(-x)`` (see :func:`amax_rule`): ``d' = amin(d)``,
    convex: ``s' = sum(s + d) - amin(d)`` over the window; winner-takes-all: ``s`` at the
    arg-min of ``d``."""
    return _reduce_min(ctx, args, kwargs, spread=True)


def _reduce_min(ctx: Ctx, args: tuple, kwargs: dict, spread: bool) -> Pair:
    """:func:`amin_rule` (``spread`` as for :func:`_reduce_max`)."""
    b = dict(zip(["input", "dim", "keepdim"], args, strict=False)) | kwargs
    p = b["input"]
    out = _reduce_max(ctx, (Pair(-p.d, p.s), b.get("dim", ()), bool(b.get("keepdim", False))),
                      {}, spread)
    return Pair(-out.d, out.s)


@register(torch.min, "min", lrp="maxpool", mass_linear=True)
def min_rule(ctx: Ctx, args: tuple, kwargs: dict) -> Any:
    """``x.min()``, ``x.min(dim, keepdim)`` (:func:`amin_rule`, the indices are the arg-min
    of ``d``) and ``min(a, b)`` of two tensors (:func:`minimum`)."""
    return _extreme(ctx, args, kwargs, minimum, _reduce_min, torch.argmin,
                    torch.return_types.min)


for _n in (1, 2, 3):
    register(getattr(F, f"max_pool{_n}d"), getattr(torch, f"max_pool{_n}d"))(
        Rule(maxpool_function(_n), lrp="maxpool", mass_linear=True))
    register(getattr(F, f"adaptive_max_pool{_n}d"))(
        Rule(adaptive_maxpool_function(_n), lrp="maxpool", mass_linear=True))
    register(getattr(F, f"max_pool{_n}d_with_indices"))(
        Rule(maxpool_function(_n, indices=True), lrp="maxpool", mass_linear=True))
    register(getattr(F, f"adaptive_max_pool{_n}d_with_indices"))(
        Rule(adaptive_maxpool_function(_n, indices=True), lrp="maxpool", mass_linear=True))
