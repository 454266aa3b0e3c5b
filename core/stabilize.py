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


def _max_abs(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _rows(t)
    # amax and amin, not aminmax: on CPU torch.aminmax(dim=1) is 15-30x slower than both
    # together (torch 2.x); no abs, which would write a temporary of the size of t
    low, high = rows.amin(dim=1), rows.amax(dim=1)
    return torch.maximum(high, -low), low


def _peak(d: torch.Tensor, s: torch.Tensor,
          threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample ``max |a+-| = max (|s| + |d|) / 2 > threshold``, checked cheaply.

    The bounds ``max(max|s|, max|d|) <= max(|s| + |d|) <= max|s| + max|d|`` decide almost
    every sample; the exact maximum is computed only for the others. Returns the per-sample
    decision and ``max|s|``.
    """
    (ms, low_s), (md, low_d) = _max_abs(s), _max_abs(d)
    exceed = torch.maximum(ms, md) / 2 > threshold
    unsure = ~exceed & ((ms + md) / 2 > threshold)
    if bool(unsure.any()):
        if bool((low_s >= 0).all() and (low_d >= 0).all()):  # ReLU outputs: no abs needed
            both = _rows(s) + _rows(d)
        else:
            both = _rows(s).abs() + _rows(d).abs()
        exact = both.amax(dim=1) / 2 > threshold
        exceed = exceed | (unsure & exact)
    return exceed, ms


def column(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The per-row values ``v`` (one per sample) as a view that broadcasts against ``like``
    (shape ``(B, 1, ..., 1)``; a 0-d ``like`` gets a 0-d value)."""
    return v.view((-1,) + (1,) * (like.dim() - 1)) if like.dim() > 0 else v.reshape(())


def _scale_factor(d: torch.Tensor, s: torch.Tensor, theta: float,
                  threshold: float) -> torch.Tensor:
    """Per sample ``theta ** k``: ``k = 0`` unless ``max |a+-|`` exceeds the threshold, else
    the least ``k >= 1`` after which the mass ``max |s| / 2`` is at most the threshold."""
    exceed, mass = _peak(d, s, threshold)
    ratio = (mass / 2 / max(threshold, 1e-30)).clamp_min(1.0)
    k = torch.ceil(torch.log(ratio) / -math.log(theta))
    k = torch.where(exceed, k.clamp_min(1.0), torch.zeros_like(k))
    return column(torch.pow(theta, k).to(s.dtype), s)


def stabilise(d: torch.Tensor, s: torch.Tensor, mode: str, theta: float,
              threshold: float) -> torch.Tensor:
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

    Returns
    -------
    torch.Tensor
        The new ``s``; its gradient is passed to the old one unchanged.
    """
    if mode == "none":
        return s
    with torch.no_grad():
        if mode == "scale":
            factor = _scale_factor(d, s, theta, threshold)
            if not bool((factor != 1).any()):
                return s
            new = s * factor
        else:
            exceed = _peak(d, s, threshold)[0]
            if not bool(exceed.any()):
                return s
            new = torch.where(column(exceed, s), torch.zeros_like(s), s)
    if s.requires_grad:
        return _ValueOnly.apply(s, new)
    return new
