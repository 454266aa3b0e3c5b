"""Argument checks shared by the Captum attributions of :mod:`captum_split`.

Everything here runs before any forward or backward pass, so that a wrong layer, stream, sign
or target fails fast with a message naming what was wrong and what to pass instead.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

STREAMS = ("g", "h")
SIGNS = (None, "+", "-")
MAXPOOL_MODES = ("convex", "wta")
STABILIZERS = ("scale", "shift", "none")
INPUT_SPLITS = ("relu", "half")
INPUT_NAMES = ("input", "")


def unwrap_model(forward_func: Callable[..., Any], method: str) -> nn.Module:
    """Return the ``nn.Module`` behind ``forward_func``.

    Accepts a module, a ``DataParallel``/``DistributedDataParallel`` wrapper (its ``.module``)
    or a module's bound ``forward`` method. The split methods need the module itself because the
    split pair is built from its submodules.

    Raises
    ------
    TypeError
        If ``forward_func`` is any other callable.
    """
    model = forward_func
    if not isinstance(model, nn.Module):
        owner = getattr(forward_func, "__self__", None)
        if isinstance(owner, nn.Module) and getattr(forward_func, "__name__", "") in (
            "forward",
            "__call__",
        ):
            model = owner
        else:
            raise TypeError(
                f"{method} needs the model itself as forward_func (a torch.nn.Module), because "
                f"the split pair g, h is built from its submodules; got "
                f"{type(forward_func).__name__}. Pass the nn.Module whose output holds the "
                "class scores (wrap any post-processing into a small nn.Module)."
            )
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (compared with ``==``)."""
    if not any(value is c or (c is not None and value == c) for c in choices):
        raise ValueError(
            f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}."
        )


def check_alpha(alpha: Any) -> None:
    """Check that the shift ``alpha`` is a real number or a dict of real numbers."""
    values = alpha.values() if isinstance(alpha, dict) else [alpha]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(
                f"alpha must be a float or a dict {{layer name: float}}; got {alpha!r}."
            )
        if not 0.0 <= float(v) <= 0.5:
            raise ValueError(
                f"alpha={v!r} is outside [0, 0.5]: the shift interpolates between the split-pair "
                "gradients (alpha=0) and half the model's gradient (alpha=0.5)."
            )


def layer_name(
    model: nn.Module, layer: nn.Module | str | None, method: str, allow_input: bool = False
) -> str:
    """Name (as in ``model.named_modules()``) of ``layer``, given as module or name.

    Parameters
    ----------
    model : :py:class:`torch.nn.Module`
        The model that must contain ``layer``.
    layer : :py:class:`torch.nn.Module`, str or None
        A submodule of ``model`` (found by identity, Captum's convention) or its name.
        ``None``, ``"input"`` and ``""`` mean the model input, allowed only with ``allow_input``.
    method : str
        The attribution's name, for error messages.
    allow_input : bool
        Whether the model input is an admissible layer.

    Returns
    -------
    str
        The module name, or ``"input"`` for the model input.
    """
    if layer is None or (isinstance(layer, str) and layer in INPUT_NAMES):
        if allow_input:
            return "input"
        raise ValueError(
            f"{method} needs a layer: pass a submodule of the model (e.g. model.layer3) or its "
            "name as listed by model.named_modules()."
        )
    if isinstance(layer, nn.Module):
        if layer is model:
            raise ValueError(
                f"{method}: layer is the model itself; pass one of its submodules (e.g. the last "
                "convolution) instead."
            )
        for name, module in model.named_modules():
            if module is layer and name:
                return name
        raise ValueError(
            f"{method}: the layer {type(layer).__name__} is not a submodule of the given "
            f"{type(model).__name__} (it is not found in model.named_modules()). Pass a module "
            "of this very model object, or its name."
        )
    if isinstance(layer, str):
        names = [n for n, _ in model.named_modules() if n]
        if layer in names:
            return layer
        close = difflib.get_close_matches(layer, names, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"{method}: layer {layer!r} is not a module of {type(model).__name__} (names are "
            f"those of model.named_modules()).{hint}"
        )
    raise TypeError(
        f"{method}: layer must be a torch.nn.Module or a module name (str); got "
        f"{type(layer).__name__}."
    )


def module_by_name(model: nn.Module, name: str) -> nn.Module:
    """The submodule of ``model`` called ``name``."""
    return dict(model.named_modules())[name]


def last_conv_name(model: nn.Module, method: str) -> str:
    """Name of the last ``Conv1d/2d/3d`` in ``model.named_modules()`` order (the CAM default)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise ValueError(
            f"{method}: the model has no convolution, so there is no default layer; pass "
            "layer=<module name>."
        )
    return convs[-1]


def single_input(inputs: Tensor | tuple[Tensor, ...],
                 method: str) -> tuple[Tensor | tuple[Tensor, ...], bool]:
    """Return the input tensor (a tuple of them for several inputs, each split) and whether
    it was given as a tuple."""
    is_tuple = isinstance(inputs, tuple)
    items = inputs if is_tuple else (inputs,)
    if not items or not all(isinstance(t, Tensor) for t in items):
        raise ValueError(
            f"{method} explains tensor inputs; got "
            f"{[type(t).__name__ for t in items] if is_tuple else type(inputs).__name__}. Pass "
            "further (non-tensor) model arguments through additional_forward_args."
        )
    for x in items:
        if not x.is_floating_point():
            raise TypeError(f"{method}: inputs must be floating-point tensors; got {x.dtype}.")
        if x.dim() < 2:
            raise ValueError(
                f"{method}: inputs must have a batch dimension first, e.g. (B, C, H, W); got "
                f"shape {tuple(x.shape)}."
            )
    return (items[0] if len(items) == 1 else tuple(items)), is_tuple


def format_additional_args(additional_forward_args: Any) -> tuple[Any, ...]:
    """Captum's convention: ``None`` -> ``()``, a non-tuple -> a 1-tuple."""
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def format_target(target: Any, batch_size: int, method: str) -> int | Tensor:
    """Turn a Captum target into an int or a 1-D ``LongTensor`` with one index per row.

    Accepted: an int, a 0-d or one-element integer tensor (one class for all rows), a 1-D
    integer tensor or a list of ints with one class per row. Negative indices are refused.

    Raises
    ------
    ValueError, TypeError
        For ``None``, tuples (targets of outputs with more than two dimensions), wrong lengths,
        non-integer or negative entries.
    """
    if target is None:
        raise ValueError(
            f"{method} needs target= (the class index whose score is explained): an int, or "
            "a list / 1-D tensor with one index per input row."
        )
    if isinstance(target, tuple) or (
        isinstance(target, list) and any(isinstance(t, tuple) for t in target)
    ):
        raise ValueError(
            f"{method} explains one score per row of a (B, n_classes) output; tuple targets "
            "(for outputs with more dimensions) are not supported."
        )
    if isinstance(target, bool):
        raise TypeError(f"{method}: target must be an int class index, not a bool.")
    if isinstance(target, numbers.Integral):
        if int(target) < 0:
            raise ValueError(f"{method}: target={int(target)} is negative; use a class index >= 0.")
        return int(target)
    if isinstance(target, list):
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in target):
            raise TypeError(f"{method}: a target list must hold ints; got {target!r}.")
        target = torch.tensor(target, dtype=torch.long)
    if not isinstance(target, Tensor):
        raise TypeError(
            f"{method}: target must be an int, a list of ints or an integer tensor; got "
            f"{type(target).__name__}."
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{method}: target must hold integer class indices; got {target.dtype}.")
    if target.numel() == 1:
        value = int(target.reshape(()))
        if value < 0:
            raise ValueError(f"{method}: target={value} is negative; use a class index >= 0.")
        return value
    if target.dim() != 1 or target.numel() != batch_size:
        raise ValueError(
            f"{method}: target has shape {tuple(target.shape)}, but inputs have {batch_size} "
            "rows; pass one int for all rows or a 1-D tensor with one index per row."
        )
    if bool((target < 0).any()):
        raise ValueError(f"{method}: target has negative entries {target.tolist()}.")
    return target.to(torch.long)


def check_target_range(target: int | Tensor, n_outputs: int, method: str) -> None:
    """Raise ``ValueError`` (as :mod:`core` does) if a class index is ``>= n_outputs``."""
    top = target if isinstance(target, int) else int(target.max())
    if top >= n_outputs:
        raise ValueError(
            f"{method}: target {top} is out of range for a model with {n_outputs} outputs "
            f"(valid: 0..{n_outputs - 1})."
        )


def checked_forward(
    forward_func: Callable[..., Any], target: Any, method: str
) -> Callable[..., Any]:
    """Wrap ``forward_func`` so that a target out of range fails right after the forward.

    Captum's own check is an indexing error deep in autograd code; this raises a clear
    ``ValueError`` before any gradient is computed.
    """

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = forward_func(*args, **kwargs)
        if isinstance(out, Tensor) and out.dim() == 2 and target is not None:
            if isinstance(target, tuple):
                return out
            if isinstance(target, list):
                idx = [t for t in target if isinstance(t, numbers.Integral)]
                if idx:
                    check_target_range(max(int(t) for t in idx), out.shape[1], method)
            elif isinstance(target, Tensor) and target.numel() > 0:
                check_target_range(int(target.max()), out.shape[1], method)
            elif isinstance(target, numbers.Integral):
                check_target_range(int(target), out.shape[1], method)
        return out

    return forward
