"""Forward rules of the split pair in sum/difference form (docs/math.md section 2).

Every rule states its formula for ``d`` and ``s`` (the paper's eqs. 2-3 for affine maps and ReLU,
eq. 17 for max pooling).

Every rule maps the split pairs of a node's inputs to the split pair of its output. ``d`` is
always computed by the model's own (out-of-place) operation, so ``g - h`` reproduces the
model; ``s`` follows the rule of the operation. A rule has the signature
``rule(ctx, args, kwargs) -> value`` and is registered, with its metadata (what SplitLRP
does with it, whether it is a ReLU-type unit and shift point), in the rule table of
:mod:`core.registry` -- see there for how to add an operation: one decorated function here.

The ReLU-type units are in :mod:`core.unit_rules`, max pooling and the max/min family in
:mod:`core.max_rules`, the operations that ``nonlinear="freeze"`` splits in
:mod:`core.frozen_rules`; this module holds structure, arithmetic, affine maps, selections,
padding, interpolation and the table of the remaining operations.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# importing max_rules and unit_rules registers their rules
from core import frozen, frozen_rules, max_rules, products, unit_rules  # noqa: F401
from core.absops import (
    abs_conv,
    abs_linear,
    batch_norm_eval,
    channel_affine,
    eval_batch_norm_,
    placeholder,
)
from core.derived import DERIVED
from core.pair import Pair, detached, lift
from core.pointwise import pointwise_conv, subsample, subsampling
from core.record import assign
from core.registry import (
    TABLE,
    Ctx,
    FunctionName,
    Rule,
    RuleFn,
    register,
    static_args,
    unsupported,
)

__all__ = ["TABLE", "Ctx", "Rule", "register", "unsupported", "lookup", "is_query"]



# --------------------------------------------------------------------------- structure
def same(fn: Callable[..., Any]) -> RuleFn:
    """A positive linear or structural op ``P`` (views, slicing, average pooling, sums):
    ``d' = P d``, ``s' = P s``."""

    def rule(ctx: Ctx, args: tuple, kwargs: dict) -> Any:
        p, rest = args[0], args[1:]
        static_args(ctx, (rest, kwargs), getattr(fn, "__name__", str(fn)))
        d = fn(p.d, *rest, **kwargs)
        s = fn(p.s, *rest, **kwargs)
        if isinstance(d, torch.Tensor):
            return Pair(d, s)
        if isinstance(d, (tuple, list)):  # chunk, split, unbind
            return type(d)(Pair(a, b) for a, b in zip(d, s, strict=True))
        return d

    return rule


def method(name: str) -> RuleFn:
    """``same`` for a tensor method; ``*_as`` arguments that are pairs use their ``d``."""

    def call(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return getattr(t, name)(*args, **kwargs)

    call.__name__ = name
    plain = same(call)

    def rule(ctx: Ctx, args: tuple, kwargs: dict) -> Any:
        if name.endswith("_as"):
            args = (args[0],) + tuple(a.d if isinstance(a, Pair) else a for a in args[1:])
            if not isinstance(args[0], Pair):  # a constant (a frozen gate) shaped like a pair
                return call(*args, **kwargs)
        return plain(ctx, args, kwargs)

    return rule


def constant_like(fn: Callable[..., Any]) -> RuleFn:
    """``torch.zeros_like(x)``, ``x.new_ones(...)``...: a constant that depends on the shape
    of ``x`` only, computed from ``d``; it is not a pair (no gradient flows through it)."""

    def rule(ctx: Ctx, args: tuple, kwargs: dict) -> Any:
        args = tuple(a.d if isinstance(a, Pair) else a for a in args)
        return fn(*args, **kwargs)

    return rule


@register(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
          nn.FeatureAlphaDropout, nn.Identity, lrp="structural", mass_linear=True)
def identity(ctx: Ctx, args: tuple, kwargs: dict) -> Any:
    """Dropout modules (eval semantics) and ``nn.Identity``: ``(d', s') = (d, s)``."""
    return args[0]


@register(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
          F.feature_alpha_dropout, lrp="structural", mass_linear=True)
def dropout_function(ctx: Ctx, args: tuple, kwargs: dict) -> Any:
    """Functional dropout called with ``training=False`` (``training=self.training`` under
    eval semantics): the identity, ``(d', s') = (d, s)``. ``training=True`` -- the default of
    the functional form -- drops random elements in eval mode too and is refused."""
    values = dict(zip(("input", "p", "training"), args, strict=False)) | kwargs
    if values.get("training", True) and values.get("p", 0.5) > 0:
        raise unsupported(ctx, "functional dropout with training=True (its default)",
                          "It drops random elements at every call, also in eval mode; pass "
                          "training=self.training.")
    return values["input"]


@register(FunctionName("torchvision.ops.stochastic_depth.stochastic_depth"),
          lrp="structural", mass_linear=True)
def stochastic_depth(ctx: Ctx, args: tuple, kwargs: dict) -> Any:
    """torchvision's stochastic depth (``torch.fx.wrap``-ped, so a call in traced graphs) with
    eval semantics: the identity, ``(d', s') = (d, s)``; in training mode it drops random
    rows and is refused."""
    values = dict(zip(("input", "p", "mode", "training"), args, strict=False)) | kwargs
    if values.get("training", True) and values.get("p", 0.0) > 0:
        raise unsupported(ctx, "stochastic depth in training mode (random rows dropped)",
                          "Splits run with eval semantics; call the function with "
                          "training=self.training.")
    return values["input"]


@register(operator.getitem, lrp="index", mass_linear=True)
def getitem(ctx: Ctx, args: tuple, kwargs: dict) -> Any:
    """Indexing: ``d' = d[i]``, ``s' = s[i]`` for a pair; the element for a tuple of pairs."""
    obj, index = args
    if isinstance(obj, Pair):
        static_args(ctx, index, "indexing")
        return Pair(obj.d[index], obj.s[index])
    return obj[index]


@register(getattr, lrp="structural", mass_linear=True)
def getattr_rule(ctx: Ctx, args: tuple, kwargs: dict) -> Any:
    """``getattr(x, "shape")`` and friends; tensor-valued attributes (``x.T``) as ``same``;
    a field of a structured result (``x.max(1).values``) is that field."""
    obj, name = args[0], args[1]
    if not isinstance(obj, Pair):
        return getattr(obj, name)
    d = getattr(obj.d, name)
    if isinstance(d, torch.Tensor):
        return Pair(d, getattr(obj.s, name))
    return d


def concat(fn: Callable[..., torch.Tensor]) -> RuleFn:
    """``torch.cat`` / ``torch.stack``: ``d' = cat(d_k)``, ``s' = cat(s_k)``; a constant ``c``
    joins as the pair ``(c, |c|)``."""

    def rule(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
        parts = [lift(p) for p in args[0]]
        return Pair(
            fn([p.d for p in parts], *args[1:], **kwargs),
            fn([p.s for p in parts], *args[1:], **kwargs),
        )

    return rule


# --------------------------------------------------------------------------- arithmetic
def _is_const(v: Any) -> bool:
    return not isinstance(v, Pair)


def _abs(c: Any) -> Any:
    return c.abs() if isinstance(c, torch.Tensor) else abs(c)


@register(operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__",
          "__iadd__", lrp="sum", signs=(1, 1), mass_linear=True, fresh=True, inplace=True)
def add(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``a + alpha b``: ``d' = d_a + alpha d_b``, ``s' = s_a + |alpha| s_b``; a constant ``c``
    adds ``c`` to ``d`` and ``|c|`` to ``s``. Two sequences (``x.chunk(3, 1) + (z,)``) are
    concatenated: their pairs are the elements of the result."""
    a, b = args[0], args[1]
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return a + b
    alpha = kwargs.get("alpha", 1)
    if _is_const(a):  # c + pair
        a, b, alpha, swap = b, a, 1, alpha
        return Pair(torch.add(b, a.d, alpha=swap), a.s * abs(swap) + _abs(b))
    if _is_const(b):
        return Pair(torch.add(a.d, b, alpha=alpha), a.s + _abs(b) * abs(alpha))
    if ctx.donated and _fits(a.d, b.d) and _fits(a.s, b.s):  # a's tensors are this call's
        return Pair(a.d.add_(b.d, alpha=alpha), a.s.add_(b.s, alpha=abs(alpha)))
    return Pair(torch.add(a.d, b.d, alpha=alpha), _mass_sum(ctx, a.s, b.s, abs(alpha)))


def _fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a + b`` has the shape and dtype of ``a`` (it can be written into ``a``)."""
    if not isinstance(b, torch.Tensor):
        return False
    if b.dtype == a.dtype and b.shape == a.shape:  # the common case, without torch's checks
        return True
    return (torch.broadcast_shapes(a.shape, b.shape) == a.shape
            and torch.result_type(a, b) == a.dtype)


def _mass_sum(ctx: Ctx, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``a + alpha b`` (``alpha >= 0``) of two ``s`` streams; a placeholder where no value is
    read (``ctx.mass`` false)."""
    if not ctx.mass:
        out = placeholder(lambda g: (g, g if alpha == 1 else g * alpha), a, b)
        if out is not None:
            return out
    return torch.add(a, b, alpha=alpha)


@register(operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_", "__sub__",
          "__isub__", lrp="sum", signs=(1, -1), mass_linear=True)
def sub(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``a - alpha b``: ``d' = d_a - alpha d_b``, ``s' = s_a + |alpha| s_b``; a constant ``c``
    adds ``-c`` to ``d`` and ``|c|`` to ``s``."""
    a, b = args[0], args[1]
    alpha = kwargs.get("alpha", 1)
    if _is_const(a):
        return Pair(torch.sub(a, b.d, alpha=alpha), b.s * abs(alpha) + _abs(a))
    if _is_const(b):
        return Pair(torch.sub(a.d, b, alpha=alpha), a.s + _abs(b) * abs(alpha))
    return Pair(torch.sub(a.d, b.d, alpha=alpha), _mass_sum(ctx, a.s, b.s, abs(alpha)))


@register(torch.rsub, "__rsub__", lrp="sum", signs=(-1, 1), mass_linear=True)
def rsub(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``torch.rsub(a, b) = b - a`` (see :func:`sub`)."""
    return sub(ctx, (args[1], args[0]), kwargs)


@register(operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", "__mul__",
          "__rmul__", "__imul__", lrp="product", mass_linear=True)
def mul(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """Multiplication by a constant (``d' = c d``, ``s' = |c| s``) or of two activations
    (the product rule of :mod:`core.products`: ``d' = d_a d_b``, ``s' = s_a s_b``)."""
    a, b = args[0], args[1]
    if isinstance(a, Pair) and isinstance(b, Pair):
        return products.product(a, b, torch.mul)
    if _is_const(a):
        a, b = b, a
    static_args(ctx, b, "multiplication")
    return Pair(torch.mul(a.d, b), a.s * _abs(b))


@register(operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_",
          "__truediv__", "__itruediv__", freezes=frozen_rules.division_check, mass_linear=True)
def div(ctx: Ctx, args: tuple, kwargs: dict) -> Any:
    """Division by a constant ``c``: ``d' = d / c``, ``s' = s / |c|``; by an activation only
    with ``nonlinear="freeze"``: the divisor is frozen, ``a / b = a * (1 / b)`` with ``1 / b``
    a constant. A ``rounding_mode`` (floor, trunc) of an activation is refused."""
    a, b = args[0], args[1]
    if isinstance(a, Pair) and kwargs.get("rounding_mode") is not None:
        raise unsupported(ctx, f"division with rounding_mode={kwargs['rounding_mode']!r}",
                          "Rounding is piecewise constant, not linear: divide without "
                          "rounding_mode.")
    if isinstance(b, Pair):
        value = torch.div(a.d if isinstance(a, Pair) else a, b.d, **kwargs)
        if not isinstance(a, Pair):
            return value.detach()
        inverse = 1 / b.d.detach()
        return Pair(frozen.frozen_value(value, a.d, lambda t: t * inverse), a.s * inverse.abs())
    if _is_const(a):
        raise unsupported(ctx, "division by an activation", "Only division by constants is linear.")
    static_args(ctx, b, "division")
    return Pair(torch.div(a.d, b, **kwargs), a.s / _abs(b))


@register(operator.neg, torch.neg, torch.negative, torch.neg_, "neg", "neg_", "negative",
          "negative_", "__neg__", lrp="structural", mass_linear=True)
def neg(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``-x`` swaps the streams: ``d -> -d``, ``s -> s`` (``x.neg_()`` alike: the graph
    gives in-place operations their eager aliasing, core.graph.resolve_inplace)."""
    return Pair(torch.neg(args[0].d), args[0].s)


@register(torch.diff, "diff", mass_linear=True)
def diff(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``torch.diff(x, n, dim, prepend, append)``, the ``n``-th forward difference along
    ``dim`` of ``x`` joined with ``prepend`` / ``append`` (pairs, or constants ``c`` as the
    pair ``(c, |c|)``): ``d' = diff(d)``; one difference ``a_{i+1} - a_i`` has the
    coefficients ``+1, -1``, so ``s' = s_{i+1} + s_i``, applied ``n`` times."""
    names = ("input", "n", "dim", "prepend", "append")
    bound = dict(zip(names, args, strict=False)) | kwargs
    n, dim = bound.get("n", 1), bound.get("dim", -1)
    static_args(ctx, (n, dim), "diff")
    ends = [None if bound.get(k) is None else lift(bound[k]) for k in ("prepend", "append")]
    p = bound["input"]
    d = torch.diff(p.d, n, dim, *(None if e is None else e.d for e in ends))
    head = [] if ends[0] is None else [ends[0].s]
    tail = [] if ends[1] is None else [ends[1].s]
    s = torch.cat([*head, p.s, *tail], dim)
    for _ in range(n):
        length = s.shape[dim] - 1
        s = s.narrow(dim, 1, length) + s.narrow(dim, 0, length)
    return Pair(d, s)


@register(operator.matmul, torch.matmul, torch.mm, "matmul", "__matmul__", lrp="product",
          mass_linear=True)
def matmul(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """Matrix product with a constant matrix (either side: ``|W|`` for ``s``) or of two
    activations (the product rule: ``d' = d_a @ d_b``, ``s' = s_a @ s_b``)."""
    a, b = args[0], args[1]
    if isinstance(a, Pair) and isinstance(b, Pair):
        return products.product(a, b, torch.matmul)
    if isinstance(a, Pair):
        return Pair(torch.matmul(a.d, b), torch.matmul(a.s, ctx.weight_abs(b)))
    return Pair(torch.matmul(a, b.d), torch.matmul(ctx.weight_abs(a), b.s))


@register(torch.addmm, "addmm", lrp="product", mass_linear=True,
          factors=((1, "mat1"), (2, "mat2")))
def addmm(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``torch.addmm(x, a, b, beta=beta, alpha=alpha) = beta x + alpha a @ b`` (a Linear
    written as ``torch.addmm(bias, x, W.t())``): ``d' = addmm(d_x, d_a, d_b, beta, alpha)``,
    ``s' = addmm(s_x, s_a, s_b, |beta|, |alpha|)``, with a constant ``c`` as ``(c, |c|)``
    (``|W|`` for a constant matrix) and the product rule where both matrices are
    activations. SplitLRP treats it as ``matmul`` does: where both matrices are activations
    each gets half of the relevance that reaches the product (``beta x + alpha a @ b``
    written out); the added ``x`` keeps its epsilon-rule share."""
    return _added_product(ctx, torch.addmm, ("input", "mat1", "mat2"), args, kwargs)


@register(torch.addmv, "addmv", lrp="product", mass_linear=True,
          factors=((1, "mat"), (2, "vec")))
def addmv(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``torch.addmv(x, A, v, beta=beta, alpha=alpha) = beta x + alpha A @ v``:
    ``d' = addmv(d_x, d_A, d_v, beta, alpha)``, ``s' = addmv(s_x, s_A, s_v, |beta|,
    |alpha|)`` (as :func:`addmm`)."""
    return _added_product(ctx, torch.addmv, ("input", "mat", "vec"), args, kwargs)


@register(torch.baddbmm, "baddbmm", lrp="product", mass_linear=True,
          factors=((1, "batch1"), (2, "batch2")))
def baddbmm(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``torch.baddbmm(x, A, B, beta=beta, alpha=alpha) = beta x + alpha bmm(A, B)``:
    ``d' = baddbmm(d_x, d_A, d_B, beta, alpha)``, ``s' = baddbmm(s_x, s_A, s_B, |beta|,
    |alpha|)`` (as :func:`addmm`)."""
    return _added_product(ctx, torch.baddbmm, ("input", "batch1", "batch2"), args, kwargs)


@register(torch.addbmm, "addbmm", lrp="product", mass_linear=True,
          factors=((1, "batch1"), (2, "batch2")))
def addbmm(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``torch.addbmm(x, A, B, beta=beta, alpha=alpha) = beta x + alpha sum_i A_i @ B_i``:
    ``d' = addbmm(d_x, d_A, d_B, beta, alpha)``, ``s' = addbmm(s_x, s_A, s_B, |beta|,
    |alpha|)`` (as :func:`addmm`)."""
    return _added_product(ctx, torch.addbmm, ("input", "batch1", "batch2"), args, kwargs)


def _added_product(ctx: Ctx, fn: Callable[..., torch.Tensor], names: tuple[str, str, str],
                   args: tuple, kwargs: dict) -> Pair:
    """``fn(x, a, b, beta=beta, alpha=alpha) = beta x + alpha a * b`` for a bilinear ``*``
    with non-negative coefficients: ``d'`` is ``fn`` of the ``d`` streams, ``s'`` of the
    ``s`` streams with ``|beta|``, ``|alpha|``; a constant ``c`` enters as ``(c, |c|)``
    (``|W|`` for a constant matrix)."""
    b = dict(zip(names, args, strict=False)) | kwargs
    beta, alpha = b.get("beta", 1), b.get("alpha", 1)
    static_args(ctx, (beta, alpha), fn.__name__)
    x, m1, m2 = (b[n] for n in names)
    d = fn(*(v.d if isinstance(v, Pair) else v for v in (x, m1, m2)), beta=beta, alpha=alpha)
    s1 = m1.s if isinstance(m1, Pair) else ctx.weight_abs(m1)
    s2 = m2.s if isinstance(m2, Pair) else ctx.weight_abs(m2)
    sx = x.s if isinstance(x, Pair) else _abs(x)
    return Pair(d, fn(sx, s1, s2, beta=abs(beta), alpha=abs(alpha)))


@register(torch.bmm, "bmm", lrp="product", mass_linear=True)
def bmm(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``torch.bmm``: batched :func:`matmul` (``d' = d_a @ d_b``, ``s' = s_a @ s_b``; a
    constant ``W`` enters ``s`` as ``|W|``)."""
    return matmul(ctx, args, kwargs)


@register(torch.einsum, lrp="product")
def einsum(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``torch.einsum(eq, a, b)`` of two operands (a pair and a constant, or two pairs):
    ``d' = einsum(eq, d_a, d_b)``, ``s' = einsum(eq, s_a, s_b)``; a constant ``c`` enters as
    the pair ``(c, |c|)``."""
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if len(operands) != 2:
        raise unsupported(ctx, f"einsum of {len(operands)} operands", "Use two operands.")
    a, b = (v if isinstance(v, Pair) else Pair(v, v.abs()) for v in operands)
    return products.product(a, b, products.einsum_op(equation))


@register(operator.pow, torch.pow, torch.Tensor.__pow__, "pow", "__pow__", lrp="product",
          freezes=frozen_rules.power_check, exponent=frozen_rules.integer_exponent)
def power(ctx: Ctx, args: tuple, kwargs: dict) -> Any:
    """``a ** n``: a whole ``n >= 1`` (``2`` or ``2.0``) is a repeated product
    (``d' = d ** n``, ``s' = s ** n``); other exponents only with ``nonlinear="freeze"`` (the
    result is a constant)."""
    b = dict(zip(["input", "exponent"], args, strict=False)) | kwargs
    p, n = b["input"], b["exponent"]
    static_args(ctx, n, "power")
    if frozen_rules.whole_exponent(n) is not None:
        return products.power(p, n)
    return torch.pow(p.d, n).detach()


@register(torch.square, "square", lrp="product", exponent=lambda node: 2)
def square(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``x.square()``: the product of a pair with itself: ``d' = d ** 2``, ``s' = s ** 2``."""
    return products.power(args[0], 2)


@register(torch.addcmul, "addcmul", lrp="product", mass_linear=True,
          factors=((1, "tensor1"), (2, "tensor2")))
def addcmul(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``torch.addcmul(x, a, b, value=v) = x + v * a * b``: a sum with the product rule,
    ``d' = addcmul(d_x, d_a, d_b, v)``, ``s' = s_x + |v| s_a s_b`` (constants as ``|c|``).
    SplitLRP treats it as ``mul`` does: where both factors are activations each gets half
    of the relevance that reaches the product (``x + v * a * b`` written out); the added
    ``x`` keeps its epsilon-rule share."""
    b = dict(zip(["input", "tensor1", "tensor2"], args, strict=False)) | kwargs
    value = b.get("value", 1)
    static_args(ctx, value, "addcmul")
    x, a, c = (v if isinstance(v, Pair) else lift(v) for v in
               (b["input"], b["tensor1"], b["tensor2"]))
    return Pair(torch.addcmul(x.d, a.d, c.d, value=value),
                torch.addcmul(x.s, a.s, c.s, value=abs(value)))


# --------------------------------------------------------------------------- affine maps
def _module_params(ctx: Ctx, m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None,
                                                     torch.Tensor | None]:
    """Detached ``W``, ``b`` and the ``|b|`` of the ``s`` stream (none when merged away)."""
    w, b = detached(m.weight), detached(m.bias)
    return w, b, None if (b is None or ctx.skip_bias) else b.abs()


@register(nn.Linear, mass_linear=True, merge="affine", fresh=True)
def linear_module(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``nn.Linear`` (eqs. 2-3): ``d' = W d + b``, ``s' = |W| s + |b|``."""
    m, p = ctx.module, args[0]
    if ctx.skip_bias and p.d.dim() != 2:
        # a BatchNorm normalises dim 1, a Linear's features are the last dim: they are one
        # per-channel map only on (batch, features) tensors
        raise unsupported(
            ctx, f"a BatchNorm merged into a Linear on a {p.d.dim()}-D input "
            "(merge_batchnorm=True, which SplitLRP always uses)",
            "The BatchNorm normalises dim 1, the Linear maps the last dim, so the two are not "
            "one affine layer. Use core.split(model) without merge_batchnorm "
            "(core.split(model).relevance(...) for SplitLRP).")
    w, b, bias_abs = _module_params(ctx, m)
    if ctx.cached_abs:
        s = abs_linear(p.s, ctx.weight_abs(m.weight), bias_abs, ctx.mass, is_abs=True)
    else:
        s = abs_linear(p.s, w, bias_abs, ctx.mass, scratch=ctx.scratch)
    return Pair(F.linear(p.d, w, b), s)


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, mass_linear=True, merge="affine", fresh=True)
def conv_module(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``nn.Conv1d/2d/3d`` (any stride, padding mode, dilation, groups):
    ``d' = conv(d, W) + b``, ``s' = conv(s, |W|) + |b|`` (a strided ``1x1`` one through
    the strided slice of its input, :mod:`core.pointwise`)."""
    m, p = ctx.module, args[0]
    w, b, bias_abs = _module_params(ctx, m)
    n = len(m.kernel_size)
    index = subsampling(m.kernel_size, m.stride, m.padding, p.d)
    if index is not None:  # a strided 1x1 convolution: its backward through the slice
        d = pointwise_conv(p.d, w, b, m.stride, m.dilation, m.groups, index)
        source, stride, padding = subsample(p.s, index), 1, 0
    else:
        d = m._conv_forward(p.d, w, b)
        source, stride, padding = p.s, m.stride, m.padding
        if m.padding_mode != "zeros":
            source = F.pad(source, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            padding = 0
    weight = ctx.weight_abs(m.weight) if ctx.cached_abs else w
    s = abs_conv(source, weight, bias_abs, n, stride, padding, m.dilation, m.groups,
                 value=ctx.mass, is_abs=ctx.cached_abs, out_shape=d.shape, scratch=ctx.scratch)
    return Pair(d, s)


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, mass_linear=True,
          fresh=True)
def conv_transpose_module(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``nn.ConvTranspose1d/2d/3d`` (zero padding mode): ``d' = convT(d, W) + b``,
    ``s' = convT(s, |W|) + |b|``; an ``output_size`` given to the forward sets the output
    padding, as in the module."""
    m, p = ctx.module, args[0]
    n = len(m.kernel_size)
    size = args[1] if len(args) > 1 else kwargs.get("output_size")
    static_args(ctx, size, "the output_size of a transposed convolution")
    out_pad = m._output_padding(p.d, size, m.stride, m.padding, m.kernel_size, n, m.dilation)
    fn = _CONV_T[n]
    w, b, bias_abs = _module_params(ctx, m)
    opts = dict(stride=m.stride, padding=m.padding, output_padding=out_pad, groups=m.groups,
                dilation=m.dilation)
    return Pair(fn(p.d, w, b, **opts), fn(p.s, ctx.weight_abs(m.weight), bias_abs, **opts))


def functional_affine(fn: Callable[..., torch.Tensor]) -> RuleFn:
    """``F.linear`` / ``F.conv*`` with constant ``W`` and ``b``: ``d' = W d + b``,
    ``s' = |W| s + |b|``."""

    def rule(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
        kwargs = dict(kwargs)
        p, w = args[0], args[1] if len(args) > 1 else kwargs.pop("weight")
        rest = list(args[2:])
        b = rest.pop(0) if rest else kwargs.pop("bias", None)
        static_args(ctx, (w, b, rest, kwargs), getattr(fn, "__name__", "affine"))
        b_abs = None if (b is None or ctx.skip_bias) else _abs(b)
        s = fn(p.s, ctx.weight_abs(w), b_abs, *rest, **kwargs)
        return Pair(fn(p.d, w, b, *rest, **kwargs), s)

    return rule


def _mass_map(mean, var, weight, bias, merged_bias, eps: float) -> tuple[torch.Tensor, ...]:
    """``|k|`` and ``|t|`` of a BatchNorm's ``s'`` (see :func:`batchnorm_module`; ``t`` holds
    the merged bias ``k b``), the mean 0 and variance 1 of :func:`channel_affine`, and ``k``
    (the backward of ``d'``)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    if merged_bias is not None:
        shift = shift + scale * merged_bias
    k = scale.abs()
    return k, shift.abs(), torch.zeros_like(k), torch.ones_like(k), scale


def _bn_affine(ctx: Ctx, p: Pair, mean, var, weight, bias, eps: float) -> Pair:
    """A BatchNorm with these statistics and parameters on a pair; with ``ctx.module`` they
    are the module's own, and on the CPU the mass map is kept with it between calls
    (:data:`core.derived.DERIVED`; on a GPU the comparison that serves it would wait for
    the device at every BatchNorm, so it is computed anew)."""
    if mean is None or var is None:
        raise unsupported(
            ctx, "batch normalisation without running statistics",
            "Batch statistics couple the rows of a batch; use track_running_stats=True.",
        )
    sources = (mean, var, weight, bias, ctx.merged_bias)
    mean, var, weight, bias, merged = (detached(t) for t in sources)
    if ctx.module is None or mean.device.type != "cpu":  # comparing syncs a GPU: recompute
        k, t, zero, one, scale = _mass_map(mean, var, weight, bias, merged, eps)
    else:
        k, t, zero, one, scale = DERIVED.get(
            ctx.module, ("batchnorm", eps, merged is not None), sources,
            lambda: _mass_map(mean, var, weight, bias, merged, eps))
    d = eval_batch_norm_(p.d, mean, var, weight, bias, eps) if ctx.donated else None
    if d is None:
        d = batch_norm_eval(p.d, mean, var, weight, bias, eps, scale)
    return Pair(d, channel_affine(p.s.expand_as(d), k, t, ctx.mass, inplace=ctx.donated,
                                  moments=(zero, one)))


def _without_running_statistics(node: Any, module: nn.Module | None) -> str | None:
    if module is None or module.running_mean is not None:
        return None
    return ("batch normalisation without running statistics uses batch statistics, which "
            "couple the rows of a batch and are not piecewise linear; use "
            "track_running_stats=True (a trained model).")


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, mass_linear=True,
          merge="batchnorm", refuses=_without_running_statistics, fresh=True, inplace=True)
def batchnorm_module(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``nn.BatchNorm*`` and ``nn.SyncBatchNorm`` with eval semantics, a per-channel affine
    map: with ``k = gamma / sqrt(var + eps)`` and ``t = beta - k mu``, ``d' = k d + t``,
    ``s' = |k| s + |t|``
    (merged into the affine map before it: ``t`` also holds ``k b``, whose ``|b|`` that map
    then leaves out)."""
    m = ctx.module
    return _bn_affine(ctx, args[0], m.running_mean, m.running_var, m.weight, m.bias, m.eps)


@register(F.batch_norm, mass_linear=True, fresh=True, inplace=True)
def batchnorm_function(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``F.batch_norm`` with ``training=False`` (``training=self.training`` under eval
    semantics), the affine map of :func:`batchnorm_module`: ``d' = k d + t``,
    ``s' = |k| s + |t|``. ``training=True`` normalises with the statistics of the batch
    (whatever running statistics are passed) and is refused."""
    names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps"]
    bound = dict(zip(names, args, strict=False)) | kwargs
    static_args(ctx, [bound.get(k) for k in names[1:5]], "batch_norm")
    if bound.get("training", False):
        raise unsupported(
            ctx, "F.batch_norm with training=True",
            "It normalises with the batch statistics, which couple the rows of a batch and "
            "are not piecewise linear; pass training=self.training (eval semantics use the "
            "running statistics).")
    return _bn_affine(ctx, bound["input"], bound["running_mean"], bound["running_var"],
                      bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5))


def _streams(v: Any) -> tuple[Any, Any]:
    """``(d, s)`` of a pair; a constant ``c`` (a tensor or a number) as ``(c, |c|)``."""
    if isinstance(v, Pair):
        return v.d, v.s
    return v, (v.abs() if isinstance(v, torch.Tensor) else abs(v))


@register(torch.where, lrp="structural", mass_linear=True)
def where(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``torch.where(c, a, b)`` with a condition that is not an activation (a constant mask,
    or a comparison frozen by ``nonlinear="freeze"``): a selection,
    ``d' = where(c, d_a, d_b)``, ``s' = where(c, s_a, s_b)``; a constant ``a`` or ``b``
    enters as ``(a, |a|)``."""
    b = dict(zip(["condition", "input", "other"], args, strict=False)) | kwargs
    static_args(ctx, b["condition"], "where")
    (da, sa), (db, sb) = _streams(b["input"]), _streams(b["other"])
    return Pair(torch.where(b["condition"], da, db), torch.where(b["condition"], sa, sb))


@register("where", lrp="structural", mass_linear=True)
def where_method(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``a.where(c, b) = torch.where(c, a, b)`` (see :func:`where`)."""
    b = dict(zip(["input", "condition", "other"], args, strict=False)) | kwargs
    return where(ctx, (b["condition"], b["input"], b["other"]), {})


@register(torch.masked_fill, "masked_fill", "masked_fill_", lrp="structural", mass_linear=True)
def masked_fill(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``x.masked_fill(m, v)`` with a mask that is not an activation: ``d' = d`` with ``v``
    where ``m``, ``s' = s`` with ``|v|`` where ``m``."""
    b = dict(zip(["input", "mask", "value"], args, strict=False)) | kwargs
    static_args(ctx, (b["mask"], b["value"]), "masked_fill")
    p, mask, value = b["input"], b["mask"], b["value"]
    _, mass = _streams(value)
    return Pair(p.d.masked_fill(mask, value), p.s.masked_fill(mask, mass))


@register(assign, lrp="structural", mass_linear=True)
def assign_rule(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """Item assignment ``t[i] = v`` (recorded out of place): ``d' = d_t`` with ``d'[i] = d_v``,
    ``s' = s_t`` with ``s'[i] = s_v``; a constant ``c`` on either side enters as ``(c, |c|)``."""
    target, index, value = args
    static_args(ctx, index, "indexing by an activation")
    t = lift(target)
    if isinstance(value, (Pair, torch.Tensor)):
        v = lift(value)
        return Pair(assign(t.d, index, v.d), assign(t.s, index, v.s))
    return Pair(assign(t.d, index, value), assign(t.s, index, abs(value)))


@register(F.pad, lrp="structural", mass_linear=True)
def pad_function(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``F.pad``: constant padding with ``c`` pads ``s`` with ``|c|``; other modes copy."""
    b = dict(zip(["input", "pad", "mode", "value"], args, strict=False)) | kwargs
    p, mode = b["input"], b.get("mode", "constant")
    value = b.get("value") or 0.0
    if mode == "constant" and value == -math.inf:
        # padding for a max pooling (timm's "same" pools): the pads never win, and the
        # convex max-pooling rule gives them no mass (s - d is taken as 0 there)
        return Pair(F.pad(p.d, b["pad"], mode, value), F.pad(p.s, b["pad"], mode, value))
    if mode == "constant":
        return Pair(F.pad(p.d, b["pad"], mode, value), F.pad(p.s, b["pad"], mode, abs(value)))
    return Pair(F.pad(p.d, b["pad"], mode), F.pad(p.s, b["pad"], mode))


@register(nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, lrp="structural", mass_linear=True)
def constant_pad_module(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``nn.ZeroPad*`` / ``nn.ConstantPad*`` with value ``c``: ``d`` padded with ``c``,
    ``s`` with ``|c|``."""
    m, p = ctx.module, args[0]
    return Pair(F.pad(p.d, m.padding, "constant", m.value),
                F.pad(p.s, m.padding, "constant", abs(m.value)))


@register(nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle,
          nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
          nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d,
          nn.CircularPad3d, nn.Unfold, nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d,
          lrp="structural", mass_linear=True)
def module_forward(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """A stateless positive linear module ``P`` (average pooling, flatten, shuffles,
    reflection/replication padding, ``nn.Unfold``'s copies and ``nn.Fold``'s sums, max
    unpooling with the pooling's indices): its forward (no hooks) with the call's other,
    constant arguments, ``d' = P d``, ``s' = P s``."""
    m, p, rest = ctx.module, args[0], args[1:]
    static_args(ctx, (rest, kwargs), type(m).__name__)
    return Pair(m.forward(p.d, *rest, **kwargs), m.forward(p.s, *rest, **kwargs))


register(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
         nn.AdaptiveAvgPool3d, nn.Fold)(Rule(module_forward.fn, lrp="epsilon", mass_linear=True))

_POSITIVE_INTERPOLATION = {"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"}
_SIGNED_INTERPOLATION = {"bicubic"}  # separable, with negative weights
_INTERPOLATE_ARGS = ("input", "size", "scale_factor", "mode", "align_corners",
                     "recompute_scale_factor", "antialias")


def _axis_matrix(b: dict, axis: int, like: torch.Tensor) -> torch.Tensor:
    """The interpolation matrix ``P_axis`` (out x in) of one spatial axis of a separable
    ``F.interpolate``: the call applied to the basis vectors of that axis, held constant along
    the other axis (whose rows of weights sum to one, so it leaves them unchanged)."""
    n, other = like.shape[2 + axis], like.shape[3 - axis]
    basis = torch.eye(n, dtype=like.dtype, device=like.device)
    if axis == 0:
        out = F.interpolate(basis.view(n, 1, n, 1).expand(n, 1, n, other), **b)[:, 0, :, 0]
    else:
        out = F.interpolate(basis.view(n, 1, 1, n).expand(n, 1, other, n), **b)[:, 0, 0, :]
    return out.T  # column i: the image of basis vector i


def _signed_interpolation(ctx: Ctx, b: dict) -> Pair:
    """Separable 2-D interpolation with signed weights (bicubic): ``P = P_H (x) P_W``,
    ``d' = P d`` (the call itself), ``s' = |P| s = |P_H| s |P_W|^T``."""
    p = b.pop("input")
    if p.d.dim() != 4:
        raise unsupported(ctx, f"{b.get('mode')} interpolation of a {p.d.dim()}-D tensor",
                          "Interpolate (N, C, H, W) tensors.")
    d = F.interpolate(p.d, **b)
    ph, pw = _axis_matrix(b, 0, p.d), _axis_matrix(b, 1, p.d)
    separable = torch.einsum("oh,nchw,pw->ncop", ph, p.d, pw)
    scale = d.abs().amax().clamp_min(torch.finfo(d.dtype).tiny)
    if separable.shape != d.shape or bool(
            (separable - d).abs().amax() > 64 * torch.finfo(d.dtype).eps * scale):
        raise unsupported(ctx, f"{b.get('mode')} interpolation with these options (not "
                          "separable into one matrix per axis)",
                          "Use nearest, (bi/tri)linear or area interpolation.")
    return Pair(d, torch.einsum("oh,nchw,pw->ncop", ph.abs(), p.s, pw.abs()))


@register(F.interpolate, F.upsample, mass_linear=True)
def interpolate(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``F.interpolate`` with interpolation weights ``P``: ``d' = P d``, ``s' = |P| s``.

    For non-negative weights (nearest, (bi/tri)linear, area) ``|P| = P`` and the call is
    applied to both streams; for bicubic (negative weights) ``|P| = |P_H| (x) |P_W|`` from the
    separable per-axis matrices."""
    b = dict(zip(_INTERPOLATE_ARGS, args, strict=False)) | kwargs
    mode = b.get("mode", "nearest")
    if mode in _SIGNED_INTERPOLATION:
        return _signed_interpolation(ctx, b)
    if mode not in _POSITIVE_INTERPOLATION:
        raise unsupported(ctx, f"interpolation mode {mode!r}",
                          "Use nearest, (bi/tri)linear, area or bicubic interpolation.")
    p = b.pop("input")
    return Pair(F.interpolate(p.d, **b), F.interpolate(p.s, **b))


@register(nn.Upsample, mass_linear=True)
def upsample_module(ctx: Ctx, args: tuple, kwargs: dict) -> Pair:
    """``nn.Upsample``: as :func:`interpolate` (``d' = P d``, ``s' = |P| s``)."""
    m = ctx.module
    return interpolate(ctx, (args[0],), {"size": m.size, "scale_factor": m.scale_factor,
                                         "mode": m.mode, "align_corners": m.align_corners,
                                         "recompute_scale_factor": m.recompute_scale_factor})


# --------------------------------------------------------------------------- the table
# Decorated functions above register themselves; the factories' rules are registered here.
_STRUCTURAL_FUNCTIONS = [
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.chunk, torch.split, torch.unbind, torch.narrow, torch.roll, torch.flip, torch.movedim,
    torch.t, torch.channel_shuffle, torch.tensor_split, F.pixel_shuffle, F.pixel_unshuffle,
    torch.swapaxes, torch.swapdims, torch.repeat_interleave, torch.tile, F.unfold,
    F.max_unpool1d, F.max_unpool2d, F.max_unpool3d, torch.index_select, torch.gather,
    torch.take_along_dim, torch.select, torch.broadcast_to, torch.fliplr, torch.flipud,
    torch.rot90,
]
_AVERAGING_FUNCTIONS = [
    torch.mean, torch.sum, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.fold, torch.cumsum,
]
for _fn in _STRUCTURAL_FUNCTIONS:
    register(_fn)(Rule(same(_fn), lrp="structural", mass_linear=True))
for _fn in _AVERAGING_FUNCTIONS:
    register(_fn)(Rule(same(_fn), lrp="epsilon", mass_linear=True))
for _fn in (torch.cat, torch.concat, torch.concatenate, torch.stack):
    register(_fn)(Rule(concat(torch.stack if _fn is torch.stack else torch.cat),
                       lrp="structural", mass_linear=True))
for _fn in (F.linear, F.conv1d, F.conv2d, F.conv3d):
    register(_fn)(Rule(functional_affine(_fn), mass_linear=True))
for _fn in (torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like):
    register(_fn)(Rule(constant_like(_fn), lrp="none"))

_STRUCTURAL_METHODS = [
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "chunk", "split", "unbind", "narrow", "flip", "roll", "t", "unflatten", "movedim", "expand",
    "repeat", "view_as", "reshape_as", "expand_as", "float", "double", "half", "to", "type_as",
    "clone", "detach", "squeeze_", "unsqueeze_", "swapaxes", "swapdims", "tensor_split", "unfold",
    "repeat_interleave", "tile", "index_select", "gather", "take_along_dim", "select",
    "broadcast_to", "fliplr", "flipud", "rot90",
]
for _name in _STRUCTURAL_METHODS:
    register(_name)(Rule(method(_name.rstrip("_")), lrp="structural", mass_linear=True))
for _name in ("mean", "sum", "cumsum"):
    register(_name)(Rule(method(_name), lrp="epsilon", mass_linear=True))
for _name in ("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"):
    register(_name)(Rule(constant_like(
        lambda t, *a, _name=_name, **k: getattr(t, _name)(*a, **k)), lrp="none"))
# x.zero_() / x.fill_(v) (on x or a slice of it): a constant of x's shape, on a copy of d
for _name in ("zero_", "fill_"):
    register(_name)(Rule(constant_like(
        lambda t, *a, _name=_name, **k: getattr(t.clone(), _name)(*a, **k)), lrp="none"))


def _query(ctx: Ctx, args: tuple, kwargs: dict) -> Any:
    """A query answered by ``d`` alone (``x.size()``, ``x.dim()``): a static value."""
    raise AssertionError("queries are evaluated on d by the interpreter")  # pragma: no cover


_QUERY = Rule(_query, lrp="none", query=True)
for _name in ("size", "dim", "numel", "nelement", "ndimension", "get_device",
              "is_contiguous", "element_size", "stride"):
    register(_name)(_QUERY)
# x.type(dtype) is a cast, (d', s') = (d.type(dtype), s.type(dtype)); x.type() without a
# dtype names the tensor type: a query (see is_query)
register("type")(Rule(method("type"), lrp="structural", mass_linear=True))
# tensor attributes read with getattr(x, name) that are static values
QUERY_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad",
                              "layout"})


# frozen operations (core.frozen_rules): shift points "unit" (elementwise: SplitLRP passes
# relevance), "mixing" (norms, attention: SplitLRP's epsilon rule); gates are constants
def _register_frozen(targets: tuple, entry: tuple) -> None:
    fn, check, shift, constant = entry
    lrp = ("none" if constant else "activation" if shift == "unit"
           else "structural" if shift == "pass" else "epsilon")
    register(*targets, lrp=lrp, activation=shift in ("unit", "mixing"), freezes=check,
             constant=constant)(fn)


for _types, _entry in frozen_rules.MODULE_RULES:
    _register_frozen(_types, _entry)
for _fn, _entry in frozen_rules.FUNCTION_RULES.items():
    _register_frozen((_fn,), _entry)
for _name, _entry in frozen_rules.METHOD_RULES.items():
    _register_frozen((_name,), _entry)


def lookup(op: str, target: Any, module: nn.Module | None = None) -> Rule | None:
    """The rule of an fx node (``op``, ``target``; the leaf ``module`` of ``call_module``)."""
    return TABLE.lookup(op, target, module)


def is_query(op: str, target: Any, args: tuple, kwargs: Any = None) -> bool:
    """Whether an fx node computes a static value from an activation's metadata
    (``x.type()`` without a dtype is one, the cast ``x.type(dtype)`` is not)."""
    if op == "call_function" and target is getattr:
        return len(args) > 1 and args[1] in QUERY_ATTRIBUTES
    if op == "call_method" and target == "type":
        return len(args) < 2 and (kwargs or {}).get("dtype") is None
    rule = TABLE.lookup(op, target) if op != "call_module" else None
    return rule is not None and rule.query
