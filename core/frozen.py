"""Non-piecewise-linear operations, frozen at the model's activation (``nonlinear="freeze"``).

An operation that is its input times a data-dependent factor is split with that factor taken
as a constant, evaluated on the model's own activation ``z`` (the ``d`` of the input pair).
Three forms cover the smooth units of modern vision models:

secant units (SiLU, GELU, Mish, ELU, SELU, CELU, Softplus, Tanh, LogSigmoid)
    ``phi(z) = phi(0) + c * z`` with the secant slope ``c = (phi(z) - phi(0)) / z``
    (``c = phi'(0)`` at ``z = 0``): ``sigmoid(z)`` for SiLU, ``Phi(z)`` for GELU,
    ``tanh(softplus(z))`` for Mish. ``c >= 0`` for all of these. The pair::

        d' = phi(d)  (the model's own result)      s' = |c| s + |phi(0)|

    They are activations: the stabiliser and the alpha shift apply after them.
gates (sigmoid, softmax, attention weights, statistics such as ``var``, ``rsqrt``)
    the result is a constant (no pair): a gate ``x * sigmoid(y)`` then multiplies the pair
    of ``x`` by the non-negative constant, ``d' = d * c``, ``s' = s * c``; attention
    ``softmax(q k^T) v`` is the positive linear map ``A`` of ``v``'s pair;
    ``nn.MultiheadAttention`` the same between its value and output projections
    (:func:`multihead_attention`).
normalisations (LayerNorm, GroupNorm, RMSNorm, ``F.normalize``)
    ``y = (z - mean z) * r * w + b`` with ``r = 1 / sqrt(var z + eps)`` a positive constant
    per normalised group. Mean subtraction is the linear map ``M = I - 1/n``, whose absolute
    matrix gives ``|M| s = (1 - 2/n) s + mean(s)``; the affine weight ``w`` may be negative::

        d' = the model's own normalisation      s' = |w| r ((1 - 2/n) s + mean s) + |b|

    (RMSNorm and ``F.normalize`` have no mean subtraction: ``s' = |w| r s``.)

Division by an activation freezes the divisor: ``a / b = a * (1 / b)`` with ``1 / b`` a
constant.

Backward. With the factors held constant, the split is the exact split pair of the *frozen
model* ``f~``: the model in which every frozen factor is replaced by its value at the
explained input. ``f~(x) = f(x)`` at that input, and the ``d`` stream's backward multiplies
by the frozen factors (:func:`frozen_value`), so ``grad`` (and ``g - h = Dg/2 - Dh/2``) is
the gradient of ``f~``. It differs from the model's true gradient by the derivative of the
factors: ``z c'(z)`` for a secant unit (SiLU: ``silu'(z) = sigmoid(z) + z sigmoid'(z)``),
the derivative of ``r`` for a normalisation (the component along the normalised output),
and everything that flows through a gate's input (the sigmoid branch of a
squeeze-excitation, the queries and keys of attention), which gets no gradient at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.pair import Pair, detached

NONLINEAR_MODES = ("error", "freeze")


def frozen_value(value: torch.Tensor, d: torch.Tensor,
                 linear: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``value`` (the model's own result) with the backward of the frozen linear map
    ``linear`` at ``d``.

    The forward value is exactly ``value`` (``linear(d) - linear(d)`` is zero); the
    gradient reaching ``d`` is the vector-Jacobian product of ``linear``.
    """
    if not (torch.is_grad_enabled() and d.requires_grad):
        return value.detach()
    lin = linear(d)
    return value.detach() + (lin - lin.detach())


# --------------------------------------------------------------------------- frozen shifts
def frozen_shift(p: Pair, value: torch.Tensor) -> Pair:
    """``value = z - c`` (``log_softmax``: ``c = logsumexp(z)``) with ``c`` frozen, a constant
    shift as a bias: ``d' = value`` (the model's own), ``s' = s + |c|``; the gradient passes
    to ``z`` unchanged."""
    d = p.d.to(value.dtype)
    c = (d - value).detach()
    return Pair(frozen_value(value, p.d, lambda t: t.to(value.dtype)),
                p.s.to(value.dtype) + c.abs())


# --------------------------------------------------------------------------- secant units
def secant_slope(z: torch.Tensor, value: torch.Tensor, phi0: float,
                 slope0: float) -> torch.Tensor:
    """``c = (phi(z) - phi(0)) / z``, ``phi'(0)`` where ``z == 0`` (no gradient)."""
    z, value = z.detach(), value.detach()
    safe = torch.where(z == 0, torch.ones_like(z), z)
    return torch.where(z == 0, torch.full_like(z, slope0), (value - phi0) / safe)


def secant_pair(p: Pair, value: torch.Tensor, c: torch.Tensor, phi0: float) -> Pair:
    """``phi(z) = phi(0) + c z`` with ``c`` frozen: ``d' = value``, ``s' = |c| s + |phi(0)|``."""
    s = p.s * c.abs()
    if phi0 != 0:
        s = s + abs(phi0)
    return Pair(frozen_value(value, p.d, lambda t: t * c), s)


def _at_zero(fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """``phi(0)`` and ``phi'(0)`` of an elementwise function, in float64."""
    z = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = fn(z)
        (dy,) = torch.autograd.grad(y, z)
    return float(y.detach()), float(dy)


_CLOSED_SLOPES: dict[str, Callable[..., torch.Tensor]] = {
    "silu": lambda z, **k: torch.sigmoid(z),
    "mish": lambda z, **k: torch.tanh(F.softplus(z)),
    "gelu": lambda z, approximate="none", **k: (
        0.5 * (1 + torch.erf(z / math.sqrt(2))) if approximate == "none"
        else 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    ),
}


def secant_unit(name: str, fn: Callable[..., torch.Tensor], p: Pair,
                **options: Any) -> Pair:
    """Split ``fn(z, **options)`` (an elementwise unit named ``name``) as a secant unit."""
    value = fn(p.d, **options)
    if name in _CLOSED_SLOPES:
        c = _CLOSED_SLOPES[name](p.d.detach(), **options)
        return secant_pair(p, value, c, 0.0)
    phi0, slope0 = _at_zero(lambda z: fn(z, **options))
    return secant_pair(p, value, secant_slope(p.d, value, phi0, slope0), phi0)


# --------------------------------------------------------------------------- normalisations
def _dims(ndim: int, count: int) -> tuple[int, ...]:
    return tuple(range(ndim - count, ndim))


def _centred_mass(s: torch.Tensor, dims: tuple[int, ...], n: int) -> torch.Tensor:
    """``|I - 1/n| s = (1 - 2/n) s + mean(s)`` over ``dims`` (zero for ``n == 1``)."""
    if n == 1:
        return torch.zeros_like(s)
    return s * (1 - 2 / n) + s.mean(dim=dims, keepdim=True)


def _affine_mass(s: torch.Tensor, weight, bias, shape) -> torch.Tensor:
    if weight is not None:
        s = s * weight.detach().abs().reshape(shape)
    if bias is not None:
        s = s + bias.detach().abs().reshape(shape)
    return s


def layer_norm(p: Pair, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Pair:
    """``F.layer_norm`` with ``r = 1 / std`` frozen: ``d' = layer_norm(d)``,
    ``s' = |w| r ((1 - 2/n) s + mean(s)) + |b|`` over the ``n`` normalised entries
    (``|I - 1/n| s``, :func:`_centred_mass`)."""
    d = p.d
    dims = _dims(d.dim(), len(tuple(normalized_shape)))
    value = F.layer_norm(d, normalized_shape, weight, bias, eps)
    n = math.prod(d.shape[i] for i in dims)
    with torch.no_grad():
        r = torch.rsqrt(d.var(dim=dims, unbiased=False, keepdim=True) + eps)
    w = None if weight is None else weight.detach()

    def linear(t: torch.Tensor) -> torch.Tensor:
        out = (t - t.mean(dim=dims, keepdim=True)) * r
        return out if w is None else out * w

    s = _affine_mass(_centred_mass(p.s, dims, n) * r, weight, bias, tuple(normalized_shape))
    return Pair(frozen_value(value, d, linear), s)


def local_response_norm(p: Pair, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> Pair:
    """``F.local_response_norm`` with the divisor frozen: ``z / q`` with
    ``q = (k + alpha mean_window(z^2))^beta`` over ``size`` neighbouring channels (zero
    padded); ``r = 1 / q > 0`` frozen, ``d' = local_response_norm(d)``, ``s' = r s``."""
    d = p.d
    value = F.local_response_norm(d, size, alpha, beta, k)
    with torch.no_grad():
        square = (d * d).unsqueeze(1)  # (B, 1, C, ...): the window runs along the channels
        square = F.pad(square.flatten(3) if d.dim() > 3 else square,
                       (0, 0, size // 2, (size - 1) // 2))
        mean = F.avg_pool2d(square, (size, 1), stride=1).squeeze(1).view(d.shape)
        r = (mean * alpha + k).pow(-beta)
    return Pair(frozen_value(value, d, lambda t: t * r), p.s * r)


def group_norm(p: Pair, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> Pair:
    """``F.group_norm`` with ``r = 1 / std`` of every group frozen: ``d' = group_norm(d)``,
    ``s' = |w| r ((1 - 2/n) s + mean(s)) + |b|`` over the ``n`` entries of each group."""
    value = F.group_norm(p.d, num_groups, weight, bias, eps)
    return _grouped_norm(p, num_groups, weight, bias, eps, value)


def instance_norm(p: Pair, weight=None, bias=None, eps: float = 1e-5) -> Pair:
    """``F.instance_norm`` with the input's statistics: a group norm with one group per
    channel, ``1 / std`` of every channel of every sample frozen."""
    value = F.instance_norm(p.d, None, None, weight, bias, True, 0.0, eps)
    return _grouped_norm(p, p.d.shape[1], weight, bias, eps, value)


def _grouped_norm(p: Pair, num_groups: int, weight, bias, eps: float,
                  value: torch.Tensor) -> Pair:
    d = p.d
    b, c = d.shape[0], d.shape[1]
    grouped = (b, num_groups, -1)
    n = d[0].numel() // num_groups
    with torch.no_grad():
        r = torch.rsqrt(d.reshape(grouped).var(dim=2, unbiased=False, keepdim=True) + eps)
    shape = (1, c) + (1,) * (d.dim() - 2)
    w = None if weight is None else weight.detach().reshape(shape)

    def linear(t: torch.Tensor) -> torch.Tensor:
        g = t.reshape(grouped)
        out = ((g - g.mean(dim=2, keepdim=True)) * r).reshape(t.shape)
        return out if w is None else out * w

    s = (_centred_mass(p.s.reshape(grouped), (2,), n) * r).reshape(d.shape)
    return Pair(frozen_value(value, d, linear), _affine_mass(s, weight, bias, shape))


def rms_norm(p: Pair, normalized_shape, weight=None, eps: float | None = None) -> Pair:
    """``F.rms_norm`` with ``r = 1 / rms`` frozen: ``d' = rms_norm(d)``, ``s' = |w| r s``.

    ``r = 1 / sqrt(mean(d^2) + eps)`` is computed as torch computes it: in float32 for
    float16 and bfloat16, and with ``eps=None`` that computation dtype's epsilon (float32's
    for the half dtypes, not their own).
    """
    d = p.d
    dims = _dims(d.dim(), len(tuple(normalized_shape)))
    value = F.rms_norm(d, normalized_shape, weight, eps)
    wide = torch.promote_types(d.dtype, torch.float32)
    e = torch.finfo(wide).eps if eps is None else eps
    with torch.no_grad():
        r = torch.rsqrt(d.to(wide).pow(2).mean(dim=dims, keepdim=True) + e).to(d.dtype)
    w = None if weight is None else weight.detach()

    def linear(t: torch.Tensor) -> torch.Tensor:
        return t * r if w is None else t * r * w

    s = _affine_mass(p.s * r, weight, None, tuple(normalized_shape))
    return Pair(frozen_value(value, d, linear), s)


def normalize(p: Pair, p_norm: float = 2.0, dim: int = 1, eps: float = 1e-12) -> Pair:
    """``F.normalize``: ``z / max(||z||, eps)`` with the norm frozen: ``d' = normalize(d)``,
    ``s' = s / max(||d||, eps)``."""
    d = p.d
    value = F.normalize(d, p_norm, dim, eps)
    with torch.no_grad():
        r = 1 / torch.linalg.vector_norm(d, p_norm, dim, keepdim=True).clamp_min(eps)
    return Pair(frozen_value(value, d, lambda t: t * r), p.s * r)


# --------------------------------------------------------------------------- gates
def glu(p: Pair, dim: int = -1) -> Pair:
    """``F.glu(z) = a * sigmoid(b)`` (``a``, ``b`` the halves of ``z`` along ``dim``) with the
    gate ``sigmoid(b)`` frozen: ``d' = glu(d)``, ``s' = sigmoid(d_b) s_a``."""
    d = p.d
    value = F.glu(d, dim)
    with torch.no_grad():
        gate = torch.sigmoid(d.chunk(2, dim)[1])
    return Pair(frozen_value(value, d, lambda t: t.chunk(2, dim)[0] * gate),
                p.s.chunk(2, dim)[0] * gate)


def attention(q: Any, k: Any, v: Any, attn_mask=None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> Any:
    """``F.scaled_dot_product_attention`` with the attention weights ``A`` frozen.

    ``A = softmax(q k^T * scale + mask)`` (non-negative) is a constant: the result is the
    positive linear map ``A v`` of ``v``'s pair (a constant when ``v`` is one).
    """
    qd, kd = (t.d if isinstance(t, Pair) else t for t in (q, k))
    vd = v.d if isinstance(v, Pair) else v
    opts = dict(attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale)
    if enable_gqa:
        opts["enable_gqa"] = True
    value = F.scaled_dot_product_attention(qd, kd, vd, **opts)
    if not isinstance(v, Pair):
        return value.detach()
    with torch.no_grad():
        weights = _attention_weights(qd, kd, attn_mask, is_causal, scale, enable_gqa, vd)
    return Pair(frozen_value(value, v.d, lambda t: _apply(weights, t, enable_gqa)),
                _apply(weights, v.s, enable_gqa))


def _apply(weights: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
    if gqa and weights.shape[-3] != v.shape[-3]:
        v = v.repeat_interleave(weights.shape[-3] // v.shape[-3], dim=-3)
    return weights @ v


def _attention_weights(q, k, mask, causal, scale, gqa, v) -> torch.Tensor:
    if gqa and q.shape[-3] != k.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * scale
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else logits + mask
    return torch.softmax(logits, dim=-1)


def multihead_attention(m: nn.MultiheadAttention, query: Any, key: Any, value: Any,
                        key_padding_mask: Any = None, need_weights: bool = True,
                        attn_mask: Any = None, average_attn_weights: bool = True,
                        is_causal: bool = False) -> tuple[Any, torch.Tensor | None]:
    """``nn.MultiheadAttention`` (eval semantics) with its attention weights frozen.

    With ``H`` heads of size ``e = E / H``, the projections ``q = W_q x_q + b_q``,
    ``k = W_k x_k + b_k`` (``bias_k`` appended as one more key with ``add_bias_kv``, a zero
    key with ``add_zero_attn``) give the per-head weights::

        A_h = softmax(q_h k_h^T / sqrt(e) + M)        (>= 0, frozen)

    with ``M`` the additive mask (``attn_mask`` and ``key_padding_mask``, a boolean ``True``
    as ``-inf``). With ``A`` a constant, the output is an affine map of the value input
    ``x_v`` alone::

        y = W_o concat_h(A_h V_h) + b_o,      V = [W_v x_v + b_v; bias_v; 0]

    so its split pair is exact::

        d' = the module's own output
        s' = |W_o| concat_h(A_h [|W_v| s_v + |b_v|; |bias_v|; 0]_h) + |b_o|

    and the backward of ``d'`` is that of the frozen affine map. The query and the key (and
    an input-dependent mask) only enter ``A``: no gradient flows into them.

    Parameters
    ----------
    m: torch.nn.MultiheadAttention
        The module (its parameters are read, never changed).
    query, key, value: Pair or torch.Tensor
        The module's inputs, split pairs or constants.
    key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal:
        The module's options (see ``nn.MultiheadAttention.forward``); a mask that is a pair
        is used through its ``d``.

    Returns
    -------
    tuple
        ``(output, weights)`` as the module returns them: the output's pair (a constant when
        ``value`` is one) and the module's attention weights (a constant, or None).
    """
    qd, kd, vd = (t.d if isinstance(t, Pair) else t for t in (query, key, value))
    kpm = key_padding_mask.d if isinstance(key_padding_mask, Pair) else key_padding_mask
    mask = attn_mask.d if isinstance(attn_mask, Pair) else attn_mask
    # the model's own result (and weights, as the module returns them), by the path a call
    # with gradients takes (torch's fused inference path, taken without them, rounds
    # differently); inputs detached once each, so that `query is key is value` still holds
    plain = {id(t): t.detach() for t in (qd, kd, vd)}
    with torch.enable_grad():
        out, weights = m.forward(plain[id(qd)], plain[id(kd)], plain[id(vd)],
                                 key_padding_mask=kpm, need_weights=need_weights,
                                 attn_mask=mask, average_attn_weights=average_attn_weights,
                                 is_causal=is_causal)
    out, weights = out.detach(), None if weights is None else weights.detach()
    if not isinstance(value, Pair):
        return out.detach(), weights
    batched = qd.dim() == 3

    def first(t: torch.Tensor) -> torch.Tensor:  # to (batch, sequence, features)
        if not batched:
            return t.unsqueeze(0)
        return t if m.batch_first else t.transpose(0, 1)

    def back(t: torch.Tensor) -> torch.Tensor:
        if not batched:
            return t.squeeze(0)
        return t if m.batch_first else t.transpose(0, 1)

    (w_q, b_q), (w_k, b_k), (w_v, b_v) = _mha_projections(m)
    with torch.no_grad():
        a = _mha_weights(m, F.linear(first(qd), w_q, b_q), F.linear(first(kd), w_k, b_k),
                         kpm if kpm is None or batched else kpm.unsqueeze(0), mask)
    w_o, b_o = m.out_proj.weight.detach(), detached(m.out_proj.bias)
    bias_v = detached(m.bias_v)

    def frozen_map(t: torch.Tensor, absolute: bool) -> torch.Tensor:
        """The affine map ``x_v -> y`` with ``A`` fixed (``absolute``: all coefficients and
        constants by their absolute values)."""
        mag = torch.abs if absolute else (lambda c: c)
        v = F.linear(first(t), mag(w_v), None if b_v is None else mag(b_v))
        if bias_v is not None:
            v = torch.cat([v, mag(bias_v).to(v.dtype).expand(v.shape[0], 1, -1)], dim=1)
        heads = _heads(v, m.num_heads)
        if m.add_zero_attn:
            heads = F.pad(heads, (0, 0, 0, 1))
        mixed = (a @ heads).transpose(1, 2).flatten(2)
        return back(F.linear(mixed, mag(w_o), None if b_o is None else mag(b_o)))

    d = frozen_value(out, value.d, lambda t: frozen_map(t, False))
    return Pair(d, frozen_map(value.s, True)), weights


def _mha_projections(m: nn.MultiheadAttention) -> list[tuple[torch.Tensor,
                                                              torch.Tensor | None]]:
    """``[(W_q, b_q), (W_k, b_k), (W_v, b_v)]`` of a MultiheadAttention, detached (packed
    ``in_proj_weight``, or separate weights when ``kdim``/``vdim`` differ from
    ``embed_dim``)."""
    if m.in_proj_weight is not None:  # packed (kdim == vdim == embed_dim)
        weights = m.in_proj_weight.detach().chunk(3)
    else:
        weights = (m.q_proj_weight.detach(), m.k_proj_weight.detach(),
                   m.v_proj_weight.detach())
    biases = (None,) * 3 if m.in_proj_bias is None else m.in_proj_bias.detach().chunk(3)
    return list(zip(weights, biases, strict=True))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(N, L, E) -> (N, H, L, E / H)``."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A MultiheadAttention mask as logits to add: a boolean ``True`` (not attended) is
    ``-inf``, a float mask is added as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def _mha_weights(m: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor,
                 key_padding_mask: torch.Tensor | None,
                 attn_mask: torch.Tensor | None) -> torch.Tensor:
    """``A = softmax(q k^T / sqrt(e) + M)`` per head, ``(N, H, L, S')`` from the projected
    ``q`` ``(N, L, E)`` and ``k`` ``(N, S, E)``; ``S'`` counts the key of ``bias_k`` and the
    zero key of ``add_zero_attn``, whose mask entries are 0."""
    n, length, heads, keys = q.shape[0], q.shape[1], m.num_heads, k.shape[1]
    if m.bias_k is not None:
        k = torch.cat([k, m.bias_k.detach().to(k.dtype).expand(n, 1, -1)], dim=1)
    kh = _heads(k, heads)
    if m.add_zero_attn:
        kh = F.pad(kh, (0, 0, 0, 1))
    logits = (_heads(q, heads) @ kh.transpose(-2, -1)) / math.sqrt(kh.shape[-1])
    extra = logits.shape[-1] - keys  # bias_k and the zero key: never masked
    mask = _additive_mask(attn_mask, logits.dtype)
    if mask is not None:
        # (L, S) for all rows and heads, (N * H, L, S) per row and head
        mask = mask.reshape(-1, heads, length, mask.shape[-1]) if mask.dim() == 3 else mask
        logits = logits + F.pad(mask, (0, extra))
    padding = _additive_mask(key_padding_mask, logits.dtype)
    if padding is not None:
        logits = logits + F.pad(padding, (0, extra))[:, None, None, :]
    return torch.softmax(logits, dim=-1)


# modules whose forward is one of the secant units above: (type, name, function, options)
def module_unit(m: nn.Module) -> tuple[str, Callable[..., torch.Tensor], dict] | None:
    """The secant unit a leaf module computes, or None."""
    if isinstance(m, nn.SiLU):
        return "silu", F.silu, {}
    if isinstance(m, nn.GELU):
        return "gelu", F.gelu, {"approximate": m.approximate}
    if isinstance(m, nn.Mish):
        return "mish", F.mish, {}
    if isinstance(m, nn.ELU):
        return "elu", F.elu, {"alpha": m.alpha}
    if isinstance(m, nn.CELU):
        return "celu", F.celu, {"alpha": m.alpha}
    if isinstance(m, nn.SELU):
        return "selu", F.selu, {}
    if isinstance(m, nn.Softplus):
        return "softplus", F.softplus, {"beta": m.beta, "threshold": m.threshold}
    if isinstance(m, nn.Tanh):
        return "tanh", torch.tanh, {}
    if isinstance(m, nn.LogSigmoid):
        return "logsigmoid", F.logsigmoid, {}
    if isinstance(m, nn.Softsign):
        return "softsign", F.softsign, {}
    if isinstance(m, nn.Tanhshrink):
        return "tanhshrink", F.tanhshrink, {}
    return None
