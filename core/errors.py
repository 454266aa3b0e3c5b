"""Exceptions and warnings of the split."""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from typing import Any


class WarnedModels:
    """Which models (and keys, such as a layer) a warning was given for, so that it is given
    once per model and key; the models are held weakly.
    """

    def __init__(self) -> None:
        self._keys: weakref.WeakKeyDictionary[Any, set[Hashable]] = weakref.WeakKeyDictionary()

    def __contains__(self, item: Any) -> bool:
        model, key = item if isinstance(item, tuple) else (item, None)
        return key in self._keys.get(model, ())

    def add(self, model: Any, key: Hashable = None) -> None:
        """Record that the warning was given for ``model`` (and ``key``)."""
        self._keys.setdefault(model, set()).add(key)


class UnsupportedOperation(TypeError):
    """An operation of the model has no exact split-pair rule.

    The message names the module path or graph node, the operation and what to do.
    """


class SeveralInputsError(ValueError):
    """A probe of a module's input (``"NAME:input"``) where the module is called with several
    tensors that depend on the model's input, so that it has no single input.

    Attributes
    ----------
    module: str
        The module's name.
    sources: tuple of str
        Where each of those tensors is computed (a module name or a graph node), in
        argument order.
    """

    def __init__(self, message: str, module: str, sources: tuple[str, ...]) -> None:
        super().__init__(message)
        self.module = module
        self.sources = sources


class SplitOverflowError(FloatingPointError):
    """A split stream or its sensitivity left the float range of the input's dtype."""


class SplitPrecisionWarning(UserWarning):
    """``g - h`` misses the model's output by more than :data:`core.split.CARRIES` of its size.

    The streams are then so much larger than the output that the dtype's precision cannot
    hold the output in their difference (products of activations, frozen normalisations and
    tiny outputs do this). ``g`` and ``h`` are still right to that precision; their
    difference is not the output. Compute in float64, or read the output from ``model(x)``.
    """
