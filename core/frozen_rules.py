"""Rules of the operations that ``nonlinear="freeze"`` splits (formulas in :mod:`core.frozen`).

Each rule here is registered in the tables of :mod:`core.rules` together with a *freeze
check*: ``check(node, carried, module)`` returns a short description of what is frozen at
that graph node (``carried`` is the set of nodes that carry split pairs, ``module`` the leaf
module of a ``call_module`` node), or None when the node is split exactly there (``x ** 2``,
a division by a constant, an InstanceNorm with running statistics). The planner refuses frozen nodes
with ``nonlinear="error"`` and lists them with ``nonlinear="freeze"``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from core import frozen
from core.absops import channel_affine
from core.pair import Pair

Rule = Callable[[Any, tuple, dict], Any]
Check = Callable[[fx.Node, set, "nn.Module | None"], "str | None"]


def _bind(names: list[str], args: tuple, kwargs: dict) -> dict:
    return dict(zip(names, args, strict=False)) | kwargs


def _plain(v: Any) -> Any:
    return v.d if isinstance(v, Pair) else v


# --------------------------------------------------------------------------- secant units
def secant_function(name: str, fn: Callable[..., torch.Tensor], names: list[str]) -> Rule:
    """A functional secant unit (``F.silu``, ``F.gelu``...): ``d' = phi(d)``,
    ``s' = |c| s + |phi(0)|`` with the frozen secant slope ``c``."""

    def rule(ctx: Any, args: tuple, kwargs: dict) -> Pair:
        b = _bind(["input"] + names, args, kwargs)
        p = b.pop("input")
        b.pop("inplace", None)
        return frozen.secant_unit(name, fn, p, **b)

    rule.__name__ = f"frozen_{name}"
    return rule


def secant_module(ctx: Any, args: tuple, kwargs: dict) -> Pair:
    """A secant unit module (``nn.SiLU``, ``nn.GELU``, ``nn.Mish``, ``nn.Tanh``...)."""
    name, fn, options = frozen.module_unit(ctx.module)
    return frozen.secant_unit(name, fn, args[0], **options)


# --------------------------------------------------------------------------- gates
def gate(fn: Callable[..., Any]) -> Rule:
    """An operation whose result is frozen to a constant (``sigmoid``, ``softmax``, ``var``,
    ``rsqrt``...): evaluated on the activations ``d``, detached (no pair, no gradient)."""

    def rule(ctx: Any, args: tuple, kwargs: dict) -> Any:
        args = fx.node.map_aggregate(args, _plain)
        kwargs = fx.node.map_aggregate(kwargs, _plain)
        out = fn(*args, **kwargs)
        return fx.node.map_aggregate(out, lambda t: t.detach() if isinstance(t, torch.Tensor)
                                     else t)

    rule.__name__ = f"gate_{getattr(fn, '__name__', 'op')}"
    return rule


def gate_module(ctx: Any, args: tuple, kwargs: dict) -> Any:
    """``nn.Sigmoid`` / ``nn.Softmax`` / ``nn.Softmin`` / ``nn.Softmax2d``: a constant."""
    return ctx.module.forward(*(_plain(a) for a in args)).detach()


def _method(name: str) -> Callable[..., Any]:
    def call(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return getattr(t, name)(*args, **kwargs)

    call.__name__ = name
    return call


# --------------------------------------------------------------------------- frozen shifts
def log_softmax_function(fn: Callable[..., torch.Tensor]) -> Rule:
    """``F.log_softmax`` / ``torch.log_softmax`` / ``x.log_softmax``: ``z - logsumexp(z)``
    with the normaliser frozen (:func:`core.frozen.frozen_shift`): ``d' = log_softmax(d)``,
    ``s' = s + |logsumexp(d)|``; its gradient and relevance are those of the logits."""

    def rule(ctx: Any, args: tuple, kwargs: dict) -> Pair:
        kwargs = dict(kwargs)
        p = args[0] if args else kwargs.pop("input")
        return frozen.frozen_shift(p, fn(p.d, *args[1:], **kwargs))

    rule.__name__ = "frozen_log_softmax"
    return rule


def log_softmax_module(ctx: Any, args: tuple, kwargs: dict) -> Pair:
    """``nn.LogSoftmax`` (see :func:`log_softmax_function`)."""
    return frozen.frozen_shift(args[0], ctx.module.forward(args[0].d))


# --------------------------------------------------------------------------- normalisations
def layer_norm(ctx: Any, args: tuple, kwargs: dict) -> Pair:
    """``F.layer_norm`` (``1 / std`` frozen)."""
    b = _bind(["input", "normalized_shape", "weight", "bias", "eps"], args, kwargs)
    return frozen.layer_norm(b["input"], b["normalized_shape"], b.get("weight"), b.get("bias"),
                             b.get("eps", 1e-5))


def group_norm(ctx: Any, args: tuple, kwargs: dict) -> Pair:
    """``F.group_norm`` (``1 / std`` of each group frozen)."""
    b = _bind(["input", "num_groups", "weight", "bias", "eps"], args, kwargs)
    return frozen.group_norm(b["input"], b["num_groups"], b.get("weight"), b.get("bias"),
                             b.get("eps", 1e-5))


def rms_norm(ctx: Any, args: tuple, kwargs: dict) -> Pair:
    """``F.rms_norm`` (``1 / rms`` frozen)."""
    b = _bind(["input", "normalized_shape", "weight", "eps"], args, kwargs)
    return frozen.rms_norm(b["input"], b["normalized_shape"], b.get("weight"), b.get("eps"))


def normalize(ctx: Any, args: tuple, kwargs: dict) -> Pair:
    """``F.normalize`` (the norm frozen)."""
    b = _bind(["input", "p", "dim", "eps"], args, kwargs)
    return frozen.normalize(b["input"], b.get("p", 2.0), b.get("dim", 1), b.get("eps", 1e-12))


def norm_module(ctx: Any, args: tuple, kwargs: dict) -> Pair:
    """``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``."""
    m, p = ctx.module, args[0]
    if isinstance(m, nn.LayerNorm):
        return frozen.layer_norm(p, m.normalized_shape, m.weight, m.bias, m.eps)
    if isinstance(m, nn.GroupNorm):
        return frozen.group_norm(p, m.num_groups, m.weight, m.bias, m.eps)
    return frozen.rms_norm(p, m.normalized_shape, m.weight, m.eps)


def local_response_norm(ctx: Any, args: tuple, kwargs: dict) -> Pair:
    """``F.local_response_norm`` / ``nn.LocalResponseNorm`` (the divisor frozen)."""
    if ctx.module is not None:
        m = ctx.module
        return frozen.local_response_norm(args[0], m.size, m.alpha, m.beta, m.k)
    b = _bind(["input", "size", "alpha", "beta", "k"], args, kwargs)
    return frozen.local_response_norm(b["input"], b["size"], b.get("alpha", 1e-4),
                                      b.get("beta", 0.75), b.get("k", 1.0))


_INSTANCE_NORM_DIMS = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}
_INSTANCE_NORM_NAMES = ["input", "running_mean", "running_var", "weight", "bias",
                        "use_input_stats", "momentum", "eps"]


def _instance_norm(ctx: Any, p: Pair, mean, var, weight, bias, input_stats: bool,
                   eps: float) -> Pair:
    if input_stats:
        return frozen.instance_norm(p, weight, bias, eps)
    # the running statistics: an exact per-channel affine map, k = gamma / sqrt(var + eps),
    # t = beta - k mu, s' = |k| s + |t| (as BatchNorm in eval)
    mean, var = mean.detach(), var.detach()
    weight = None if weight is None else weight.detach()
    bias = None if bias is None else bias.detach()
    d = F.instance_norm(p.d, mean, var, weight, bias, False, 0.0, eps)
    k = torch.rsqrt(var + eps) if weight is None else weight * torch.rsqrt(var + eps)
    t = -mean * k if bias is None else bias - mean * k
    return Pair(d, channel_affine(p.s.expand_as(d), k.abs(), t.abs(), ctx.mass))


def instance_norm(ctx: Any, args: tuple, kwargs: dict) -> Pair:
    """``F.instance_norm``: with running statistics (``use_input_stats=False``) an exact
    per-channel affine map ``d' = k d + t``, ``s' = |k| s + |t|``; with the input's
    statistics ``1 / std`` of every channel of every sample frozen."""
    b = _bind(_INSTANCE_NORM_NAMES, args, kwargs)
    return _instance_norm(ctx, b["input"], b.get("running_mean"), b.get("running_var"),
                          b.get("weight"), b.get("bias"), b.get("use_input_stats", True),
                          b.get("eps", 1e-5))


def instance_norm_module(ctx: Any, args: tuple, kwargs: dict) -> Pair:
    """``nn.InstanceNorm1d/2d/3d`` with eval semantics: the running statistics where the
    module tracks them, else the input's (see :func:`instance_norm`); an unbatched input
    gets a batch of one, as the module does."""
    m, p = ctx.module, args[0]
    unbatched = p.d.dim() == _INSTANCE_NORM_DIMS.get(type(m), 0) - 1
    if unbatched:
        p = Pair(p.d.unsqueeze(0), p.s.unsqueeze(0))
    out = _instance_norm(ctx, p, m.running_mean, m.running_var, m.weight, m.bias,
                         not _running_stats(m), m.eps)
    return Pair(out.d.squeeze(0), out.s.squeeze(0)) if unbatched else out


def _running_stats(m: nn.Module) -> bool:
    return bool(m.track_running_stats) and m.running_mean is not None


def glu(ctx: Any, args: tuple, kwargs: dict) -> Pair:
    """``F.glu`` / ``nn.GLU`` (the sigmoid gate frozen)."""
    if ctx.module is not None:
        return frozen.glu(args[0], ctx.module.dim)
    b = _bind(["input", "dim"], args, kwargs)
    return frozen.glu(b["input"], b.get("dim", -1))


_SDPA_NAMES = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
               "enable_gqa"]


def attention(ctx: Any, args: tuple, kwargs: dict) -> Any:
    """``F.scaled_dot_product_attention`` with the attention weights frozen."""
    b = _bind(_SDPA_NAMES, args, kwargs)
    return frozen.attention(b["query"], b["key"], b["value"], _plain(b.get("attn_mask")),
                            0.0, b.get("is_causal", False), b.get("scale"),
                            b.get("enable_gqa", False))


_MHA_NAMES = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
              "average_attn_weights", "is_causal"]


def multihead_attention_module(ctx: Any, args: tuple, kwargs: dict) -> tuple:
    """``nn.MultiheadAttention`` with the attention weights frozen (eval semantics):
    ``y = W_o concat_h(A_h V_h) + b_o`` with ``A_h = softmax(q_h k_h^T / sqrt(e) + M)`` a
    constant, an affine map of the value input: ``d' =`` the module's output,
    ``s' = |W_o| concat_h(A_h [|W_v| s_v + |b_v|; |bias_v|; 0]_h) + |b_o|``
    (:func:`core.frozen.multihead_attention`). The result is the module's tuple
    ``(output, weights)``; the weights (or None) are a constant."""
    b = _bind(_MHA_NAMES, args, kwargs)
    return frozen.multihead_attention(
        ctx.module, b["query"], b["key"], b["value"], b.get("key_padding_mask"),
        b.get("need_weights", True), b.get("attn_mask"), b.get("average_attn_weights", True),
        b.get("is_causal", False))


# --------------------------------------------------------------------------- freeze checks
def always(what: str) -> Check:
    """A check that freezes unconditionally, described as ``what``."""
    return lambda node, carried, module: what


def division_check(node: fx.Node, carried: set, module: nn.Module | None) -> str | None:
    """A division freezes when its divisor is an activation."""
    divisor = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if isinstance(divisor, fx.Node) and divisor in carried:
        return "division by an activation: 1 / b frozen"
    return None


def whole_exponent(n: Any) -> int | None:
    """``n`` as an integer when it is a whole number >= 1 (``2`` or ``2.0``: ``a ** n`` is the
    repeated product), else None."""
    if isinstance(n, bool) or not isinstance(n, int | float):
        return None
    return int(n) if n >= 1 and float(n).is_integer() else None


def integer_exponent(node: fx.Node) -> int | None:
    """The exponent of a power node when it is a whole number >= 1 (a repeated product)."""
    n = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
    return whole_exponent(n)


def power_check(node: fx.Node, carried: set, module: nn.Module | None) -> str | None:
    """A power freezes unless its exponent is an integer >= 1."""
    if integer_exponent(node) is not None:
        return None
    n = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
    return f"x ** {n} frozen to a constant"


def instance_norm_check(node: fx.Node, carried: set, module: nn.Module | None) -> str | None:
    """An instance norm freezes unless it normalises with running statistics."""
    if module is not None:
        return None if _running_stats(module) else NORM_EACH
    b = _bind(_INSTANCE_NORM_NAMES, node.args, node.kwargs)
    exact = b.get("use_input_stats", True) is False and b.get("running_mean") is not None
    return None if exact else NORM_EACH


def attention_module_check(node: fx.Node, carried: set,
                           module: nn.Module | None) -> str | None:
    """``nn.MultiheadAttention`` freezes its attention weights when the query, the key or
    a mask is an activation; with all of them constant the weights are constants and the
    module is an exact affine map of the value."""
    b = _bind(_MHA_NAMES, node.args, node.kwargs)
    sources = [b.get(n) for n in ("query", "key", "key_padding_mask", "attn_mask")]
    if any(isinstance(s, fx.Node) and s in carried for s in sources):
        return "attention weights softmax(q k^T / sqrt(e) + mask) frozen"
    return None


def attention_check(node: fx.Node, carried: set, module: nn.Module | None) -> str | None:
    """``F.scaled_dot_product_attention`` freezes its weights
    ``A = softmax(q k^T * scale + mask)`` when the query, the key or the mask is an
    activation; with all of them constant ``A`` is a constant and ``A v`` an exact linear
    map of the value's pair (``d' = A d``, ``s' = A s``)."""
    b = _bind(_SDPA_NAMES, node.args, node.kwargs)
    sources = [b.get(n) for n in ("query", "key", "attn_mask")]
    if any(isinstance(s, fx.Node) and s in carried for s in sources):
        return "attention weights frozen"
    return None


NORM_EACH = "1 / std of every channel of every sample frozen"
SECANT = always("secant slope c of phi(z) = phi(0) + c z frozen")
NORM = always("1 / std frozen")
DIVISOR = always("1 / divisor frozen")
GATE = always("result frozen to a constant")

_SECANT_FUNCTIONS = {
    F.silu: ("silu", F.silu, ["inplace"]),
    F.gelu: ("gelu", F.gelu, ["approximate"]),
    F.mish: ("mish", F.mish, ["inplace"]),
    F.elu: ("elu", F.elu, ["alpha", "inplace"]),
    F.celu: ("celu", F.celu, ["alpha", "inplace"]),
    F.selu: ("selu", F.selu, ["inplace"]),
    F.softplus: ("softplus", F.softplus, ["beta", "threshold"]),
    F.logsigmoid: ("logsigmoid", F.logsigmoid, []),
    F.softsign: ("softsign", F.softsign, []),
    F.tanhshrink: ("tanhshrink", F.tanhshrink, []),
    torch.tanh: ("tanh", torch.tanh, []),
    F.tanh: ("tanh", torch.tanh, []),
}
_GATE_FUNCTIONS = [torch.sigmoid, F.sigmoid, torch.softmax, F.softmax, F.softmin,
                   torch.rsqrt, torch.sqrt, torch.reciprocal,
                   torch.exp, torch.var, torch.std, torch.var_mean, torch.std_mean,
                   torch.linalg.vector_norm, torch.norm, torch.erf]
_GATE_METHODS = ["sigmoid", "sigmoid_", "softmax", "rsqrt", "rsqrt_", "sqrt",
                 "sqrt_", "reciprocal", "reciprocal_", "exp", "exp_", "var", "std", "norm",
                 "erf"]
# comparisons and signs: step functions of an activation, frozen to their value (a mask); the
# mask is constant around almost every input, so the frozen model's gradients are the model's
_COMPARISONS = ["gt", "ge", "lt", "le", "eq", "ne", "greater", "greater_equal", "less",
                "less_equal", "not_equal", "sign", "signbit", "heaviside"]
_COMPARISON_FUNCTIONS = [getattr(torch, n) for n in _COMPARISONS] + [
    operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne]
_COMPARISON_METHODS = _COMPARISONS + ["__gt__", "__ge__", "__lt__", "__le__", "__eq__",
                                      "__ne__"]
STEP = always("step function (comparison, sign) frozen to its mask")

# (rule, freeze check, shift point, constant result). Shift point (stabiliser and alpha shift
# after it): "unit" for elementwise units (SplitLRP passes relevance through them, as through
# ReLU), "mixing" for normalisations and attention (SplitLRP's epsilon rule), "" for none
# (SplitLRP's epsilon rule where the result holds a pair), "pass" for none where SplitLRP
# passes the relevance unchanged (a frozen shift: log_softmax). Frozen operations whose result is
# a split pair are shift points, GLU excepted; nn.MultiheadAttention returns a tuple
# (output, weights), which the stabiliser and the alpha shift do not act on: not one.
FUNCTION_RULES: dict[Any, tuple[Rule, Check, str, bool]] = {
    fn: (secant_function(name, impl, names), SECANT, "unit", False)
    for fn, (name, impl, names) in _SECANT_FUNCTIONS.items()
}
FUNCTION_RULES.update({fn: (gate(fn), GATE, "", True) for fn in _GATE_FUNCTIONS})
FUNCTION_RULES.update({fn: (gate(fn), STEP, "", True) for fn in _COMPARISON_FUNCTIONS})
FUNCTION_RULES.update({
    F.layer_norm: (layer_norm, NORM, "mixing", False),
    F.group_norm: (group_norm, NORM, "mixing", False),
    F.instance_norm: (instance_norm, instance_norm_check, "mixing", False),
    F.rms_norm: (rms_norm, always("1 / rms frozen"), "mixing", False),
    F.normalize: (normalize, always("1 / norm frozen"), "mixing", False),
    F.local_response_norm: (local_response_norm, DIVISOR, "mixing", False),
    F.glu: (glu, always("sigmoid gate of the second half frozen"), "", False),
    F.scaled_dot_product_attention: (attention, attention_check, "mixing", False),
})
SHIFT = always("normaliser logsumexp frozen")
FUNCTION_RULES.update({fn: (log_softmax_function(fn), SHIFT, "pass", False)
                       for fn in (F.log_softmax, torch.log_softmax)})
METHOD_RULES: dict[str, tuple[Rule, Check, str, bool]] = {
    "tanh": (secant_function("tanh", torch.tanh, []), SECANT, "unit", False),
    "log_softmax": (log_softmax_function(torch.Tensor.log_softmax), SHIFT, "pass", False),
}
METHOD_RULES.update({n: (gate(_method(n.rstrip("_"))), GATE, "", True)
                     for n in _GATE_METHODS})
METHOD_RULES.update({n: (gate(_method(n)), STEP, "", True) for n in _COMPARISON_METHODS})
MODULE_RULES: list[tuple[Any, tuple[Rule, Check, str, bool]]] = [
    ((nn.SiLU, nn.GELU, nn.Mish, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Tanh,
      nn.LogSigmoid, nn.Softsign, nn.Tanhshrink), (secant_module, SECANT, "unit", False)),
    ((nn.GLU,), (glu, always("sigmoid gate of the second half frozen"), "", False)),
    ((nn.Sigmoid, nn.Softmax, nn.Softmin, nn.Softmax2d), (gate_module, GATE, "", True)),
    ((nn.LogSoftmax,), (log_softmax_module, SHIFT, "pass", False)),
    ((nn.LayerNorm, nn.GroupNorm, nn.RMSNorm), (norm_module, NORM, "mixing", False)),
    ((nn.LocalResponseNorm,), (local_response_norm, DIVISOR, "mixing", False)),
    (tuple(_INSTANCE_NORM_DIMS), (instance_norm_module, instance_norm_check, "mixing", False)),
    ((nn.MultiheadAttention,), (multihead_attention_module, attention_module_check, "",
                                False)),
]
