"""Exceptions raised by the split."""

from __future__ import annotations


class UnsupportedOperation(TypeError):
    """An operation of the model has no exact split-pair rule.

    The message names the module path or graph node, the operation and what to do.
    """


class SplitOverflowError(FloatingPointError):
    """A split stream or its sensitivity left the float range of the input's dtype."""
