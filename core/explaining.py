"""Explaining never changes the model: eval semantics and restored buffers.

:func:`eval_semantics` is the one context manager that core and every adapter (Captum,
Zennit, Quantus) run their work in.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from core.errors import WarnedModels

#: models already warned about training mode (weak: an entry goes with its model)
_WARNED_TRAINING = WarnedModels()


@contextmanager
def eval_semantics(model: nn.Module, warn: bool = True, stacklevel: int = 3,
                   buffers: bool = True) -> Iterator[nn.Module]:
    """Run the body with every module of ``model`` in eval mode, then restore the model.

    The training flags are set back module by module, and a buffer that the body changed (a
    BatchNorm's running statistics in training mode, a call counter or an EMA updated by the
    forward) is copied back bit for bit; an unchanged buffer is not touched (its version
    counter stays). This holds when the body raises, too.

    Parameters
    ----------
    model: torch.nn.Module
        The user's model.
    warn: bool
        Warn when the model is in training mode: once per model (not on every call; a
        Quantus loop builds a new explainer per batch).
    buffers: bool
        Guard the buffers (False where the body cannot write them: the split's interpreter
        reads buffers as copies wherever the forward writes into them).

    Yields
    ------
    torch.nn.Module
        The model, in eval mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    if warn and any(t for _, t in modes) and model not in _WARNED_TRAINING:
        _WARNED_TRAINING.add(model)
        warnings.warn(
            f"{type(model).__name__} is in training mode: it is explained with eval semantics "
            "(BatchNorm running statistics, dropout off) and left in training mode with its "
            "buffers unchanged; call model.eval() to compare with model(x).",
            stacklevel=stacklevel,
        )
    saved = [(b, b.detach().clone()) for b in model.buffers()] if buffers else []
    try:  # nn.Module.__setattr__ is slow: only flags that differ are written
        for m, training in modes:
            if training:
                m.training = False
        yield model
    finally:
        for m, training in modes:
            if m.training != training:
                m.training = training
        with torch.no_grad():
            for b, value in saved:
                if b.shape != value.shape or not torch.equal(b, value):
                    if b.shape != value.shape:
                        b.resize_(value.shape)
                    b.copy_(value)


def refuse_backward_hooks(model: nn.Module) -> None:
    """Refuse a model with backward hooks before a gradient-based explanation.

    A module's backward hook (``register_full_backward_hook``, ``register_backward_hook``,
    ``register_full_backward_pre_hook``) or a global one changes the gradient that
    autograd computes; the split's sensitivities and SplitLRP run their own backward passes
    through the split pair and do not go through it, so they would silently differ.

    Raises
    ------
    core.UnsupportedOperation
        Naming the first module with such a hook.
    """
    from core.errors import UnsupportedOperation

    where = None
    hooks = nn.modules.module
    if getattr(hooks, "_global_backward_hooks", None) or getattr(
            hooks, "_global_backward_pre_hooks", None):
        where = "a global module backward hook (register_module_full_backward_hook)"
    else:
        for name, m in model.named_modules():
            if m._backward_hooks or m._backward_pre_hooks:
                where = f"module {name or type(model).__name__!r} has a backward hook"
                break
    if where is not None:
        raise UnsupportedOperation(
            f"{where}: it changes the gradient that autograd computes, which the split's "
            "sensitivities and SplitLRP do not go through, so they would ignore it. Remove "
            "it while explaining (handle.remove())."
        )
