"""Exceptions and warnings of the split."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: How to compute in float64, in :func:`precision_advice`.
FLOAT64 = "float64 (model.double() on a copy and x.double())"


def precision_advice(dtype: torch.dtype, *options: str, otherwise: str = "") -> str:
    """What to do about a result that overflowed or lost precision in ``dtype``: one
    sentence for the end of every such message (:class:`SplitOverflowError`,
    :class:`SplitPrecisionWarning`), so that float64 is advised only where the computation
    does not already run in it.

    Parameters
    ----------
    dtype: torch.dtype
        The dtype the computation ran in.
    *options: str
        The other remedies, in order (``"a larger epsilon"``); float64 is added last unless
        ``dtype`` is float64.
    otherwise: str
        The sentence for a float64 computation with no ``options`` left (what else to do).

    Returns
    -------
    str
        ``"Use a, b or float64 (...)."``; in float64 ``"Use a or b (it already runs in
        float64)."`` or ``otherwise``.

    Examples
    --------
    >>> precision_advice(torch.float32, "a larger epsilon")
    'Use a larger epsilon or float64 (model.double() on a copy and x.double()).'
    >>> precision_advice(torch.float64, "a larger epsilon")
    'Use a larger epsilon (the computation already runs in float64).'
    """
    wide = dtype == torch.float64
    remedies = [*options] if wide else [*options, FLOAT64]
    if not remedies:
        return otherwise or "The computation already runs in float64, the widest float dtype."
    listed = remedies[0] if len(remedies) == 1 else (
        f"{', '.join(remedies[:-1])} or {remedies[-1]}")
    return f"Use {listed}" + (" (the computation already runs in float64)." if wide else ".")


def with_caller(err: BaseException, who: str) -> BaseException:
    """Put ``"who: "`` in front of the message of ``err``, in place, and return ``err``.

    The exception object itself is kept, re-raised as it is (as :mod:`core.interpreter`
    adds its ``"while splitting ..."`` note): its type, its further constructor arguments
    (:class:`SeveralInputsError`'s ``module`` and ``sources``), attributes, traceback and
    notes are unchanged, where ``type(err)(message)`` would fail for a type that takes
    several arguments or drop them. Only ``err.args[0]`` changes, when it is a message (a
    str) that does not already start with ``"who: "``; an exception without one gets a
    note ``"in who"`` instead.

    Examples
    --------
    >>> err = SeveralInputsError("layer 'mix:input': ...", "mix", ("a", "b"))
    >>> with_caller(err, "SplitCAM") is err, str(err), err.module
    (True, "SplitCAM: layer 'mix:input': ...", 'mix')
    """
    prefix = f"{who}: "
    if err.args and isinstance(err.args[0], str):
        if not err.args[0].startswith(prefix):
            err.args = (prefix + err.args[0], *err.args[1:])
    else:
        err.add_note(f"in {who}")
    return err


@contextmanager
def caller(who: str) -> Iterator[None]:
    """Within it, an ``Exception`` raised gets ``"who: "`` in front of its message
    (:func:`with_caller`) and is re-raised as it is: how an adapter (``"SplitCAM"``) names
    itself in the errors of the split that it calls."""
    try:
        yield
    except Exception as err:
        with_caller(err, who)
        raise


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
    """A split stream or its sensitivity left the float range of the input's dtype.

    The message names where, and what to do (:func:`precision_advice`: float64 only where
    the computation does not already run in it).
    """


class SplitPrecisionWarning(UserWarning):
    """``g - h`` misses the model's output by more than :data:`core.split.CARRIES` of its size.

    The streams are then so much larger than the output that the dtype's precision cannot
    hold the output in their difference (products of activations, frozen normalisations and
    tiny outputs do this). ``g`` and ``h`` are still right to that precision; their
    difference is not the output. Read the output from ``model(x)``, or, below float64,
    compute in float64 (the message says which, :func:`precision_advice`).
    """


#: the packages whose frames lie between a user's call and a warning of the split
LIBRARY_PACKAGES = frozenset({"torch", "core", "captum_split", "zennit_split",
                              "quantus_adapters", "splitxai", "captum", "zennit", "quantus",
                              "contextlib", "functools"})


def frames_to_user() -> int:
    """How many frames, counting the caller of this function, lie inside
    :data:`LIBRARY_PACKAGES`: a warning raised by that caller with ``stacklevel=1 + this``
    points at the user's line (``sm.sensitivities(...)``, ``SplitCAM(...).attribute(...)``,
    a Zennit attributor's call), however many adapter frames lie between."""
    frame = sys._getframe(1)
    count = 0
    while frame is not None and (
        frame.f_globals.get("__name__", "").partition(".")[0] in LIBRARY_PACKAGES
    ):
        frame = frame.f_back
        count += 1
    return count
