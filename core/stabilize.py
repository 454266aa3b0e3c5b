"""Forward stabilisers (value-only shifts of both streams) and the backward alpha shift."""

from __future__ import annotations

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


def _per_sample_max(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        return t.reshape(())
    return t.reshape(t.shape[0], -1).amax(dim=1).view((-1,) + (1,) * (t.dim() - 1))


def _scale_factor(d: torch.Tensor, s: torch.Tensor, theta: float,
                  threshold: float) -> torch.Tensor:
    """Per sample ``theta ** k``: ``k = 0`` unless ``max |a+-|`` exceeds the threshold, else
    the least ``k >= 1`` after which the mass ``max |s| / 2`` is at most the threshold."""
    s_abs = s.abs()
    peak = _per_sample_max(s_abs + d.abs()) / 2  # max(|a+|, |a-|) = (|s| + |d|) / 2
    mass = _per_sample_max(s_abs) / 2
    ratio = (mass / max(threshold, 1e-30)).clamp_min(1.0)
    k = torch.ceil(torch.log(ratio) / -torch.log(torch.tensor(theta, dtype=ratio.dtype)))
    k = torch.where(peak > threshold, k.clamp_min(1.0), torch.zeros_like(k))
    return torch.pow(torch.tensor(theta, dtype=s.dtype, device=s.device), k)


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
            new = s * _scale_factor(d, s, theta, threshold)
        else:
            hit = _per_sample_max(s.abs() + d.abs()) / 2 > threshold
            new = torch.where(hit, torch.zeros_like(s), s)
    if s.requires_grad:
        return _ValueOnly.apply(s, new)
    return new
