"""Argument checks shared by :mod:`core` and every adapter (Captum, Zennit, Quantus).

One place for each check, so that a wrong option, target or layer name gets the same one-line
message (naming what was wrong and what to pass instead) wherever it is given, before any
forward or backward pass. ``who`` names the caller (e.g. ``"SplitCAM"``) and prefixes the
message; ``None`` gives no prefix.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Container, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

#: names that mean the model's input where a layer is asked for
INPUT_NAMES = ("input", "")

T = TypeVar("T")


def prefix(who: str | None) -> str:
    """``"who: "``, the start of a message of the caller ``who`` (``""`` for None)."""
    return f"{who}: " if who else ""


def option(name: str, value: T, allowed: Sequence[Any], who: str | None = None) -> T:
    """Return ``value`` if it is one of ``allowed``, else raise ``ValueError``.

    Parameters
    ----------
    name: str
        The option's name, as the user wrote it (``"maxpool"``).
    value: object
        The value given.
    allowed: sequence
        The admissible values (``None`` among them is matched by identity).
    who: str, optional
        The caller, prefixed to the message.

    Returns
    -------
    object
        ``value`` unchanged.
    """
    if any(value is c or (c is not None and isinstance(value, type(c))
                          and isinstance(value, bool) == isinstance(c, bool) and value == c)
           for c in allowed):
        return value
    raise ValueError(
        f"{prefix(who)}{name}={value!r} is not one of {', '.join(map(repr, allowed))}"
    )


def number(name: str, value: Any, low: float | None = None, high: float | None = None,
           who: str | None = None, low_open: bool = False, note: str = "") -> float:
    """Return ``value`` as a float if it is a real number in the interval, else raise.

    NaN is refused by name (every comparison with it is false, so a range check alone
    would let it through, or refuse it with a confusing range).

    Parameters
    ----------
    name: str
        The option's name, as the user wrote it (``"epsilon"``).
    value: object
        The value given.
    low, high: float, optional
        The bounds (None: unbounded on that side); ``high`` is included.
    who: str, optional
        The caller, prefixed to the message.
    low_open: bool
        Whether ``low`` itself is excluded (``theta`` in ``(0, 1]``).
    note: str
        Appended to the out-of-range message (what the option means).

    Returns
    -------
    float
        ``float(value)``.

    Raises
    ------
    TypeError
        For a bool or anything that is not a real number (a 0-d tensor is read as one).
    ValueError
        For NaN and for a value outside the interval.
    """
    p = prefix(who)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{p}{name} must be a number; got {type(value).__name__} {value!r}.")
    v = float(value)
    interval = (f"{'(' if low_open else '['}{'-inf' if low is None else f'{low:g}'}, "
                f"{'inf' if high is None else f'{high:g}'}{')' if high is None else ']'}")
    if math.isnan(v):
        raise ValueError(f"{p}{name} is NaN; pass a number in {interval}.")
    if (low is not None and (v < low or (low_open and v == low))) or (
            high is not None and v > high):
        raise ValueError(f"{p}{name}={value!r} is outside {interval}.{note}")
    return v


def finite(name: str, tensor: torch.Tensor, who: str | None = None,
           fix: str = "clean or clip it first") -> None:
    """Raise ``ValueError`` if ``tensor`` (an input, a seed) holds NaN or Inf values.

    Parameters
    ----------
    name: str
        What the tensor is, as the message names it (``"seed"``, ``"input 1"``).
    tensor: torch.Tensor
        The tensor.
    who: str, optional
        The caller, prefixed to the message.
    fix: str
        What to do instead.
    """
    if tensor.is_floating_point() or tensor.is_complex():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{prefix(who)}{name} contains NaN or Inf values; {fix}")


def close_names(name: str, names: Sequence[str], n: int = 3, under: str = "") -> str:
    """``" Did you mean 'a', 'b'?"`` for the entries of ``names`` close to ``name`` (or "");
    with ``under``, each shown as ``"under.a"``."""
    close = difflib.get_close_matches(name, [m for m in names if m], n=n)
    shown = [f"{under}.{m}" for m in close] if under else close
    return f" Did you mean {', '.join(map(repr, shown))}?" if close else ""


def unknown_layer(model: nn.Module, layer: str, who: str | None = None,
                  allow_input: bool = False, wrapper: str = "") -> ValueError:
    """The error for a layer name that is not a module of ``model``, with close names.

    ``wrapper`` is the name of ``model`` in the wrappers around it (``"_orig_mod"`` of a
    ``torch.compile``d model, ``"module"`` of ``DataParallel``) where ``layer`` was given
    under it, as typed (``"_orig_mod.conv3"``): the close names are then given that way too.
    """
    names = [n for n, _ in model.named_modules() if n]
    also = " or 'input'" if allow_input else ""
    # close names of the part after the wrapper's name, given under it as the layer was
    close = close_names(layer[len(wrapper) + 1:] if wrapper else layer, names, under=wrapper)
    return ValueError(
        f"{prefix(who)}layer {layer!r} is not a module of the model ({type(model).__name__}); "
        f"use a name from model.named_modules(){also}.{close}"
    )


def names_a_layer(names: Container[str], layer: str, allow_elements: bool = False) -> bool:
    """Whether ``layer`` is one of ``names`` (a model's module names) or, with
    ``allow_elements``, ``"NAME:i"`` of one (what :func:`layer_name` accepts by name)."""
    base, _, suffix = layer.rpartition(":")
    return layer in names or (allow_elements and suffix.isdigit() and base in names)


def tuple_output(layer: str, names: Sequence[str], count: int,
                 who: str | None = None) -> ValueError:
    """The error for a module whose output is a tuple, named where one activation is needed.

    Parameters
    ----------
    layer: str
        The module's name, as given.
    names: sequence of str
        The element names that are activations (``"NAME:0"``...), to use instead.
    count: int
        The number of values in the tuple.
    who: str, optional
        The caller (an adapter), prefixed to the message; the message then asks for a
        ``layer`` to pass, in :mod:`core`'s own words (``who=None``) for a name to probe.
    """
    listed = ", ".join(map(repr, names))
    if who is None:
        fix = f"probe its activations by name: {listed}" if names else \
            "it holds no activation; probe another layer"
    else:
        fix = f"pass one of its activations as the layer: {listed}" if names else \
            "it holds no activation; pass another layer"
    return ValueError(
        f"{prefix(who)}layer {layer!r} outputs a tuple of {count} values, not one tensor; {fix}"
    )


def layer_name(model: nn.Module, layer: nn.Module | str | None, who: str | None = None,
               allow_input: bool = False, allow_elements: bool = False) -> str:
    """The name (as in ``model.named_modules()``) of ``layer``, given as a module or a name.

    Parameters
    ----------
    model: torch.nn.Module
        The model that must contain ``layer``.
    layer: torch.nn.Module, str or None
        A submodule of ``model`` (found by identity, Captum's convention) or its name.
        ``None``, ``"input"`` and ``""`` mean the model's input, admissible only with
        ``allow_input``.
    who: str, optional
        The caller, prefixed to messages.
    allow_input: bool
        Whether the model's input is an admissible layer.
    allow_elements: bool
        Whether ``"NAME:0"``, ``"NAME:1"``... (an element of a module's tuple output) are
        admissible names for a module ``NAME`` (the split checks, when it runs, that the
        element exists).

    Returns
    -------
    str
        The module name, or ``"input"``.

    Raises
    ------
    ValueError
        For a module that is not part of ``model``, the model itself, an unknown name (the
        message lists close names) or the input where it is not admissible.
    TypeError
        For anything else than a module, a string or None.
    """
    if layer is None or (isinstance(layer, str) and layer in INPUT_NAMES):
        if allow_input:
            return "input"
        raise ValueError(
            f"{prefix(who)}needs a layer: pass a submodule of the model (e.g. model.layer3) "
            "or its name as listed by model.named_modules()."
        )
    if isinstance(layer, nn.Module):
        if layer is model:
            raise ValueError(
                f"{prefix(who)}layer is the model itself; pass one of its submodules (e.g. the "
                "last convolution) instead."
            )
        for name, module in model.named_modules():
            if module is layer and name:
                return name
        raise ValueError(
            f"{prefix(who)}the layer {type(layer).__name__} is not a submodule of the given "
            f"{type(model).__name__} (it is not found in model.named_modules()). Pass a module "
            "of this very model object, or its name."
        )
    if isinstance(layer, str):
        if names_a_layer(dict(model.named_modules()), layer, allow_elements):
            return layer
        raise unknown_layer(model, layer, who, allow_input)
    raise TypeError(
        f"{prefix(who)}layer must be a torch.nn.Module or a module name (str); got "
        f"{type(layer).__name__}."
    )


def flag(name: str, value: Any, who: str | None = None) -> bool:
    """Return ``value`` if it is a bool, else raise ``TypeError`` naming the parameter.

    A flag passed in the wrong position (a tensor or None where a bool belongs) is caught
    here instead of being read as true or false.
    """
    if isinstance(value, bool):
        return value
    raise TypeError(
        f"{prefix(who)}{name} must be True or False; got {type(value).__name__}. Check the "
        "order of positional arguments, or pass it by keyword."
    )


def batch_size(x: torch.Tensor, what: str = "input", who: str | None = None) -> int:
    """The batch size of ``x`` (its first dimension); ``ValueError`` for a scalar or an empty
    batch, where nothing can be explained."""
    if x.dim() == 0:
        raise ValueError(f"{prefix(who)}{what} must have a batch dimension, got a scalar")
    if x.shape[0] == 0:
        raise ValueError(f"{prefix(who)}{what} has an empty batch (shape {tuple(x.shape)}); "
                         "pass at least one sample")
    return int(x.shape[0])


def targets(target: Any, batch: int, who: str | None = None,
            whole_floats: bool = False) -> torch.Tensor:
    """Class indices as a ``LongTensor`` of shape ``(batch,)``.

    Accepted: an int (one class for all rows), a list of ints, an integer tensor or array
    with one entry (for all rows) or one per row; with ``whole_floats``, also floats with
    whole values (labels stored as floats, as Quantus may pass them).

    Raises
    ------
    ValueError
        For ``None``, tuples (Captum's index into outputs with more dimensions), NaN,
        fractional or negative values, a count that is neither 1 nor ``batch``, or a
        tensor / array with more than one axis longer than 1 (``(2, 3)`` for 6 rows).
    TypeError
        For bools, floats (unless ``whole_floats``) and anything that is not a number, a
        list or a tensor / array of numbers.
    """
    p = prefix(who)
    if target is None:
        raise ValueError(
            f"{p}needs target= (the class index whose score is explained): an int, or a list / "
            "1-D tensor with one index per input row."
        )
    if isinstance(target, tuple) or (
        isinstance(target, list) and any(isinstance(t, tuple) for t in target)
    ):
        raise ValueError(
            f"{p}explains one score per row of a (B, n_classes) output; tuple targets (for "
            "outputs with more dimensions) are not supported."
        )
    if isinstance(target, bool) or (
        isinstance(target, list) and any(isinstance(t, bool) for t in target)
    ):
        raise TypeError(f"{p}target must be an int class index, not a bool.")
    for t in target if isinstance(target, list) else [target]:
        if isinstance(t, numbers.Integral) and not -(1 << 63) <= int(t) < 1 << 63:
            raise ValueError(f"{p}target {int(t)} is out of range: a class index is a small "
                             "int (0 .. number of outputs - 1).")  # torch: "Overflow when ..."
    if isinstance(target, numbers.Integral):
        index = torch.tensor([int(target)], dtype=torch.long)
    elif isinstance(target, torch.Tensor):
        index = target.detach()
    else:
        try:
            index = torch.as_tensor(target)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{p}target must be an int, a list of ints or an integer tensor; got "
                f"{type(target).__name__}."
            ) from None
    if sum(n > 1 for n in index.shape) > 1:  # (B,), (B, 1) and (1, B) say one index per row
        raise ValueError(f"{p}target of shape {tuple(index.shape)} holds more than one index "
                         "per row; pass one class index per row (shape (B,)) or one for all.")
    index = index.reshape(-1)
    if index.numel() == 0:  # an empty list is float32 to torch: say what is wrong first
        raise _count_error(p, 0, batch)
    if index.dtype == torch.bool or index.is_complex():
        raise TypeError(f"{p}targets must be class indices (integers), got dtype {index.dtype}.")
    if index.is_floating_point() and bool(index.isnan().any()):
        raise ValueError(f"{p}target contains NaN (a missing or unparsed label); pass integer "
                         "class indices, one per row or one for all rows.")
    if index.is_floating_point() and not whole_floats:
        raise TypeError(f"{p}target must hold integer class indices; got {index.dtype} (cast "
                        "the labels with .long() or .astype(int)).")
    if index.is_floating_point():
        if not bool(torch.equal(index, index.round())):
            raise ValueError(f"{p}targets must be class indices (integers), got fractional "
                             f"values {index.tolist()[:8]}.")
    index = index.to(torch.long)
    if index.numel() == 1:
        index = index.expand(batch)
    if index.numel() != batch:
        raise _count_error(p, index.numel(), batch)
    if bool((index < 0).any()):
        raise ValueError(f"{p}target has negative entries {index.tolist()[:8]}; use class "
                         "indices >= 0.")
    return index


def _count_error(p: str, count: int, batch: int) -> ValueError:
    return ValueError(f"{p}got {count} targets for a batch of {batch} inputs; pass one int for "
                      "all rows or one index per row.")


def target_range(index: torch.Tensor | int, n_outputs: int, who: str | None = None) -> None:
    """Raise ``ValueError`` if a class index is ``>= n_outputs``."""
    top = int(index) if isinstance(index, numbers.Integral) else int(index.max())
    if top >= n_outputs:
        raise ValueError(
            f"{prefix(who)}target {top} is out of range for a model with {n_outputs} outputs "
            f"(valid: 0..{n_outputs - 1})."
        )


def logits(out: torch.Tensor, who: str | None = None, fix: str | None = None,
           batch: int | None = None) -> None:
    """Raise ``ValueError`` unless the model output is ``(batch, classes)`` logits.

    Parameters
    ----------
    out: torch.Tensor
        The model's output.
    who: str, optional
        The caller, prefixed to the message.
    fix: str, optional
        What to do instead of a wrong number of dimensions (default: reduce the output to
        one score per class).
    batch: int, optional
        The number of input rows: the output must have as many (see :func:`output_rows`).

    Raises
    ------
    ValueError
        For an output that is not 2-D, or whose rows are not the input's.
    """
    if out.dim() != 2:
        fix = fix or ("Reduce it to one score per class: wrap the model in an nn.Module "
                      "whose forward returns, for a segmentation map, model(x).sum((2, 3)) "
                      "(core.split also takes output=lambda out: out.sum((2, 3))).")
        raise ValueError(
            f"{prefix(who)}the model output has shape {tuple(out.shape)}; class targets need "
            f"(batch, classes) logits. {fix}"
        )
    if batch is not None:
        output_rows(out, batch, who)


def output_rows(out: torch.Tensor, batch: int, who: str | None = None) -> None:
    """Raise ``ValueError`` unless the model output has one row per input row.

    A forward that mixes the rows of the batch (``x.view(1, -1)`` before a Linear,
    ``out.mean(0, keepdim=True)``) has no per-row score to explain: targets, seeds and
    attributions are per input row.

    Parameters
    ----------
    out: torch.Tensor
        The model's output (its first dimension is the batch).
    batch: int
        The number of input rows.
    who: str, optional
        The caller, prefixed to the message.
    """
    rows = out.shape[0] if out.dim() else None
    if rows != batch:
        raise ValueError(
            f"{prefix(who)}the model output has shape {tuple(out.shape)} for a batch of "
            f"{batch} inputs: its first dimension must be the batch (one row per input), but "
            "the forward mixes or drops the batch dimension (e.g. x.view(-1), "
            "x.reshape(1, -1) or out.mean(0)). Keep dimension 0 as the batch: x.flatten(1), "
            "out.mean(1)."
        )
