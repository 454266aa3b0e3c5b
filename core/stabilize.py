"""Forward stabilisers (value-only shifts of both streams) and the backward alpha shift."""

from __future__ import annotations

import math

import torch


class ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by a constant (the alpha shift)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # noqa: D102
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad * ctx.factor, None


class _ValueOnly(torch.autograd.Function):
    """Returns ``new`` in the forward but passes the gradient to ``s`` unchanged.

    A stabiliser adds the same amount to both streams; by Theorem 6 that is a constant shift
    that does not change the sensitivities.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, new: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return new

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1)


# rows of at least this many entries (of 2 to 16 samples) are reduced one by one with aminmax
_LONG_ROW = 1 << 17


def _extremes(d: torch.Tensor, s: torch.Tensor,
              d_nonnegative: bool = False) -> list[tuple[float, float, float, float]]:
    """Per sample ``(max s, min s, max d, min d)`` as Python numbers, in one transfer.

    The decisions of the stabiliser are taken on these few numbers on the host: a dozen
    tensor operations on one value per sample would cost more than the reductions. Long
    rows of 2 to 16 samples are reduced one by one with ``torch.aminmax`` (one pass for
    both); otherwise ``amax`` and ``amin`` along the rows (one sample: over the whole
    tensor, no reshape), not ``aminmax(dim=1)``, which on CPU is 15-30x slower than both
    together (torch 2.x). No ``abs``, which would write a temporary of the size of ``s``.
    ``d_nonnegative`` (a ReLU's output): ``min d`` is not computed but given as 0, which
    changes no decision (``max |d| = max d``; a NaN shows in ``max d``).
    """
    if s.dim() == 0 or s.shape[0] == 1:  # one sample
        stats = [s.amax(), s.amin(), d.amax()]
        if not d_nonnegative:
            stats.append(d.amin())
        values = torch.stack(stats).tolist()
        return [(*values, 0.0) if d_nonnegative else tuple(values)]
    rows_s, rows_d = _rows(s), _rows(d)
    if rows_s.shape[1] >= _LONG_ROW and rows_s.shape[0] <= 16:
        parts = []
        for row in range(rows_s.shape[0]):
            parts.extend(torch.aminmax(rows_s[row])[::-1])
            if d_nonnegative:
                parts.extend((rows_d[row].amax(), rows_d.new_zeros(())))
            else:
                parts.extend(torch.aminmax(rows_d[row])[::-1])
        return [tuple(r) for r in torch.stack(parts).reshape(rows_s.shape[0], 4).tolist()]
    stats = [rows_s.amax(dim=1), rows_s.amin(dim=1), rows_d.amax(dim=1)]
    if not d_nonnegative:
        stats.append(rows_d.amin(dim=1))
    return [(*r, 0.0) if d_nonnegative else tuple(r)
            for r in torch.stack(stats, dim=1).tolist()]


def _all_below(stats: list[tuple[float, float, float, float]], threshold: float) -> bool:
    """Whether no sample can exceed: ``max |s| + max |d| <= 2 threshold`` bounds
    ``max (|s| + |d|)``; decided without further work (a NaN compares
    false and is left alone, as in :func:`_exceeds`)."""
    # halved as in _exceeds, not 2 * threshold: that is inf for a threshold above half the
    # largest float, and an inf max |s| (or a sum that overflows) would pass
    for hi_s, lo_s, hi_d, lo_d in stats:
        if (max(hi_s, -lo_s) + max(hi_d, -lo_d)) / 2 > threshold:
            return False
    return True


def _exceeds(d: torch.Tensor, s: torch.Tensor, threshold: float,
             d_nonnegative: bool = False, stats: list | None = None,
             ) -> tuple[list[bool], list[float]]:
    """Per sample whether ``max |a+-| = max (|s| + |d|) / 2 > threshold``, checked cheaply,
    and ``max |s|`` (``stats``: the :func:`_extremes` of ``d, s`` where taken already).

    The bounds ``max(max|s|, max|d|) <= max(|s| + |d|) <= max|s| + max|d|`` decide almost
    every sample; the exact maximum is computed only for the others. A sample with a NaN is
    left alone (the overflow check reports it).
    """
    exceed, mass, unsure = [], [], []
    if stats is None:
        stats = _extremes(d, s, d_nonnegative)
    for row, (hi_s, lo_s, hi_d, lo_d) in enumerate(stats):
        ms, md = max(hi_s, -lo_s), max(hi_d, -lo_d)
        if math.isnan(ms) or math.isnan(md):
            exceed.append(False)
        elif max(ms, md) / 2 > threshold:
            exceed.append(True)
        else:
            exceed.append(False)
            if (ms + md) / 2 > threshold:
                unsure.append((row, lo_s >= 0 and lo_d >= 0))
        mass.append(ms)
    for row, nonnegative in unsure:  # rare: the bounds did not decide
        rs, rd = _rows(s)[row], _rows(d)[row]
        both = rs + rd if nonnegative else rs.abs() + rd.abs()  # ReLU outputs: no abs needed
        exceed[row] = float(both.amax()) / 2 > threshold
    return exceed, mass


def column(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The per-row values ``v`` (one per sample) as a view that broadcasts against ``like``
    (shape ``(B, 1, ..., 1)``; a 0-d ``like`` gets a 0-d value)."""
    return v.view((-1,) + (1,) * (like.dim() - 1)) if like.dim() > 0 else v.reshape(())


def _scale_factors(d: torch.Tensor, s: torch.Tensor, theta: float, threshold: float,
                   d_nonnegative: bool = False, stats: list | None = None) -> list[float]:
    """Per sample ``theta ** k``: ``k = 0`` unless ``max |a+-|`` exceeds the threshold, else
    the least ``k >= 1`` after which the mass ``max |s| / 2`` is at most the threshold (an
    infinite mass gets the factor 0, which the overflow check then reports). ``stats``: as
    for :func:`_exceeds`."""
    exceeds, masses = _exceeds(d, s, threshold, d_nonnegative, stats)
    if theta == 1.0:  # theta ** k == 1 for every k
        return [1.0] * len(exceeds)
    factors = []
    for exceed, mass in zip(exceeds, masses, strict=True):
        if not exceed:
            factors.append(1.0)
            continue
        ratio = max(mass / 2 / max(threshold, 1e-30), 1.0)
        if math.isinf(ratio):
            factors.append(0.0)
            continue
        k = max(math.ceil(math.log(ratio) / -math.log(theta)), 1)
        factors.append(theta ** k)
    return factors


# dtypes whose product with a Python number is bit for bit that with the number as a tensor
# of the dtype (float16/bfloat16 multiply in float32: a tensor factor is rounded first)
_EXACT_SCALAR = (torch.float32, torch.float64)


def _per_row(values: list, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return column(torch.tensor(values, dtype=dtype, device=like.device), like)


def stabilise(d: torch.Tensor, s: torch.Tensor, mode: str, theta: float,
              threshold: float, inplace: bool = False,
              d_nonnegative: bool = False, keep_parts: bool = False) -> torch.Tensor:
    """The stabilised mass ``s`` of one ReLU-type unit's output.

    Parameters
    ----------
    d, s: torch.Tensor
        The pair in sum/difference form (``d`` is never changed).
    mode: str
        ``"scale"``: ``s <- theta * s`` for each sample whose ``max |a+-|`` exceeds
        ``threshold``, repeated until that sample's mass ``max |s| / 2`` is at most
        ``threshold`` (one scaling per unit cannot keep up with the growth of ``s`` in deep
        nets); ``"shift"``: ``s <- 0`` for those samples; ``"none"``.
    theta, threshold: float
        The factor and the threshold of ``"scale"`` (the threshold also of ``"shift"``).
    inplace: bool
        Write the new values into ``s`` (the caller owns it, no autograd); the same bits.
    d_nonnegative: bool
        ``d >= 0`` everywhere (a ReLU's output): one reduction fewer, the same result.
    keep_parts: bool
        ``"scale"`` keeps the parts ``a+- = (s +- d) / 2`` of a scaled sample non-negative:
        its new mass is ``max(theta^k s, |d|)``, still the same amount added to both
        streams, elementwise. The forward and the sensitivities use the plain rule; SplitLRP,
        whose rules share relevance in proportion to the parts, uses this one (a mass
        scaled below ``|d|`` gave negative parts, and relevance that grew by 1e4 per
        Inception block). ``"shift"`` stays the paper's baseline pair ``(d/2, -d/2)``.

    Returns
    -------
    torch.Tensor
        The new ``s``; its gradient is passed to the old one unchanged.
    """
    if mode == "none" or (mode == "scale" and theta == 1.0):  # theta ** k == 1 for every k
        return s
    with torch.no_grad():
        stats = _extremes(d, s, d_nonnegative)
        if _all_below(stats, threshold):  # no sample can exceed: nothing more to do
            return s
        if mode == "scale":
            factors = _scale_factors(d, s, theta, threshold, d_nonnegative, stats)
            if all(f == 1.0 for f in factors):
                return s
            changed = [f != 1.0 for f in factors]
            if len(set(factors)) == 1 and s.dtype in _EXACT_SCALAR:  # one sample, mostly
                factors = factors[0]
            else:
                factors = _per_row(factors, s, s.dtype)
            new = s.mul_(factors) if inplace else s * factors
            if keep_parts:  # only the rows scaled here (an input split may have s < |d|)
                floor = d.abs()
                if not all(changed):
                    floor = torch.where(_per_row(changed, s, torch.bool), floor,
                                        torch.zeros_like(floor))
                new = (torch.maximum(new, floor, out=new) if inplace
                       else torch.maximum(new, floor))
        else:  # "shift" keeps the paper's baseline pair (d/2, -d/2), keep_parts or not
            exceed = _exceeds(d, s, threshold, d_nonnegative, stats)[0]
            if not any(exceed):
                return s
            mask = _per_row(exceed, s, torch.bool)
            new = (s.masked_fill_(mask, 0.0) if inplace
                   else torch.where(mask, torch.zeros_like(s), s))
    if s.requires_grad:
        return _ValueOnly.apply(s, new)
    return new
