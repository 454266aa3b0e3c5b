"""Exceptions and warnings of the split."""

from __future__ import annotations


class UnsupportedOperation(TypeError):
    """An operation of the model has no exact split-pair rule.

    The message names the module path or graph node, the operation and what to do.
    """


class SplitOverflowError(FloatingPointError):
    """A split stream or its sensitivity left the float range of the input's dtype."""


class SplitPrecisionWarning(UserWarning):
    """``g - h`` misses the model's output by more than :data:`core.split.CARRIES` of its size.

    The streams are then so much larger than the output that the dtype's precision cannot
    hold the output in their difference (products of activations, frozen normalisations and
    tiny outputs do this). ``g`` and ``h`` are still right to that precision; their
    difference is not the output. Compute in float64, or read the output from ``model(x)``.
    """
