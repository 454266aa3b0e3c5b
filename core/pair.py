"""The split pair of one activation in sum/difference form."""

from __future__ import annotations

from typing import Any

import torch


class Pair:
    """One node's split pair: ``d = a+ - a-`` (the model's activation), ``s = a+ + a-``.

    Parameters
    ----------
    d: torch.Tensor
        The original model's activation at the node.
    s: torch.Tensor
        The non-negative mass ``a+ + a-`` of the split pair (shifted by stabilisers).
    """

    __slots__ = ("d", "s")

    def __init__(self, d: torch.Tensor, s: torch.Tensor) -> None:
        self.d = d
        self.s = s

    @property
    def pos(self) -> torch.Tensor:
        """``a+ = (s + d) / 2``."""
        return (self.s + self.d) / 2

    @property
    def neg(self) -> torch.Tensor:
        """``a- = (s - d) / 2``."""
        return (self.s - self.d) / 2

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Pair(shape={tuple(self.d.shape)})"


def lift(value: Any) -> Pair:
    """A constant tensor as a split pair with the ReLU input split (``s = |c|``)."""
    if isinstance(value, Pair):
        return value
    if isinstance(value, torch.Tensor):
        return Pair(value, value.abs())
    raise TypeError(f"cannot lift {type(value).__name__} to a split pair")


def contains_pair(value: Any) -> bool:
    """Whether a (nested) argument holds a :class:`Pair`."""
    if isinstance(value, Pair):
        return True
    if isinstance(value, (list, tuple)):
        for v in value:  # a loop, not any() over a generator: this runs for every node
            if contains_pair(v):
                return True
        return False
    if isinstance(value, dict):
        for v in value.values():
            if contains_pair(v):
                return True
    return False


def detached(t: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter or buffer as a constant of a rule: ``t.detach()``, None for None (a
    module without bias); ``t`` itself where autograd is off (nothing is recorded then, and
    a detach would only cost a dispatch: two per tensor, six per BatchNorm call)."""
    if t is None or not torch.is_grad_enabled():
        return t
    return t.detach()
