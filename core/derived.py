"""Constants that a rule derives from a module's own small tensors, kept between calls.

A BatchNorm's rule needs ``k = gamma / sqrt(var + eps)``, ``t = beta - k mu`` and their
absolute values: about ten operations on vectors of one value per channel, which at batch 1
cost more in dispatch than in arithmetic (ResNet50 has 53 BatchNorms). :data:`DERIVED` keeps
them per module with a copy of the tensors they came from, and serves them again only while
those tensors hold the same values: compared by value, because torch does not count every
write in a tensor's version counter (a BatchNorm's forward in training mode updates its
running statistics without it, and so does a write through ``.data``). For small tensors
only (a comparison reads them): a few vectors per module, weakly keyed by the module (an
entry goes with its module). On the CPU only: on a GPU the comparison's answer waits for the
device, which the recomputation does not.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import nn


def _layout(sources: Sequence[torch.Tensor | None]) -> tuple:
    return tuple(None if t is None else (t.dtype, t.device, t.shape) for t in sources)


def _values(sources: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    return [t.reshape(-1) if t.dim() != 1 else t for t in sources if t is not None]


def _same(kept: tuple, sources: Sequence[torch.Tensor | None]) -> bool:
    """Whether ``sources`` hold the values kept (one comparison of all of them where they
    share a dtype and device, the usual case: a BatchNorm's four vectors)."""
    layout, copies = kept
    if layout != _layout(sources):
        return False
    now = _values(sources)
    if isinstance(copies, torch.Tensor):
        return torch.equal(copies, torch.cat(now))
    return all(torch.equal(a, b) for a, b in zip(copies, now, strict=True))


def _copies(sources: Sequence[torch.Tensor | None]) -> tuple:
    now = [t.detach() for t in _values(sources)]
    if len({(t.dtype, t.device) for t in now}) == 1:
        return _layout(sources), torch.cat(now)
    return _layout(sources), [t.clone() for t in now]


class Derived:
    """Values computed from a module's small tensors, kept while those hold the same values."""

    def __init__(self) -> None:
        self._kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __contains__(self, module: nn.Module) -> bool:
        return module in self._kept

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, module: nn.Module, tag: Hashable,
            sources: Sequence[torch.Tensor | None], compute: Callable[[], Any]) -> Any:
        """``compute()``, or its value from an earlier call with the same ``module`` and
        ``tag`` whose source tensors held the values that ``sources`` hold now (a NaN
        never compares equal: then it is computed again). ``compute`` runs without
        autograd; it must read nothing but the sources (and constants that ``tag`` names).
        """
        hit = self._kept.get(module, {}).get(tag)
        if hit is not None and _same(hit[0], sources):
            return hit[1]
        with torch.no_grad():
            value = compute()
            kept = _copies(sources)
        self._kept.setdefault(module, {})[tag] = (kept, value)
        return value


#: the one store the rules share (entries are per module, so every split of a model and
#: every adapter that splits it again at each call find them)
DERIVED = Derived()
