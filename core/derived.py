"""Constants that a rule derives from a module's own tensors, kept between calls.

A BatchNorm's rule needs ``k = gamma / sqrt(var + eps)``, ``t = beta - k mu`` and their
absolute values: about ten operations on vectors of one value per channel, which at batch 1
cost more in dispatch than in arithmetic (ResNet50 has 53 BatchNorms). :data:`DERIVED` keeps
them per module, recomputed when one of the tensors they came from is another object or was
written since (its version counter and storage). The entries hold no copy of a weight: a few
vectors per module, weakly keyed by the module (an entry goes with its module).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import nn


def _stamp(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t._version, t.data_ptr(), t.dtype, t.device)


class Derived:
    """Values computed from a module's tensors, kept while those tensors are unchanged."""

    def __init__(self) -> None:
        self._kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __contains__(self, module: nn.Module) -> bool:
        return module in self._kept

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, module: nn.Module, tag: Hashable,
            sources: Sequence[torch.Tensor | None], compute: Callable[[], Any]) -> Any:
        """``compute()``, or its value from an earlier call with the same ``module``, ``tag``
        and source tensors (the same objects, unchanged since: version counter, storage,
        dtype and device). ``compute`` runs without autograd; it must read nothing but the
        sources (and constants that ``tag`` names)."""
        stamp = tuple(_stamp(t) for t in sources)
        with self._lock:
            hit = self._kept.get(module, {}).get(tag)
        if (hit is not None and hit[1] == stamp
                and all(a is b for a, b in zip(hit[0], sources, strict=True))):
            return hit[2]
        with torch.no_grad():
            value = compute()
        with self._lock:
            self._kept.setdefault(module, {})[tag] = (tuple(sources), stamp, value)
        return value


#: the one store the rules share (entries are per module, so every split of a model and
#: every adapter that splits it again at each call find them)
DERIVED = Derived()
