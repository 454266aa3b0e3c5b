"""Explaining never changes the model: eval semantics and restored buffers.

:func:`eval_semantics` is the one context manager that core and every adapter (Captum,
Zennit, Quantus) run their work in.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

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
    counter stays). This holds when the body raises, too, and when several threads explain
    the model at once: the first call in saves the flags and buffers, the last call out
    restores them (in between the model stays in eval mode).

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
    modules = list(model.modules())
    saved = list(model.buffers()) if buffers else []
    with _LOCK:  # the flags as the user set them, also while another thread explains
        training = any(_FLAGS[id(m)][2] if id(m) in _FLAGS else m.training for m in modules)
        for m in modules:
            _enter(_FLAGS, m, m.training)
            if m.training:  # nn.Module.__setattr__ is slow: only flags that differ are written
                m.training = False
        for b in saved:
            _enter(_BUFFERS, b, None)
    try:  # a warning turned into an error restores the model too
        if warn and training and model not in _WARNED_TRAINING:
            _WARNED_TRAINING.add(model)
            warnings.warn(
                f"{type(model).__name__} is in training mode: it is explained with eval semantics "
                "(BatchNorm running statistics, dropout off) and left in training mode with its "
                "buffers unchanged; call model.eval() to compare with model(x).",
                stacklevel=stacklevel,
            )
        yield model
    finally:
        with _LOCK, torch.no_grad():
            for m in modules:
                last, flag = _leave(_FLAGS, m)
                if last and m.training != flag:
                    m.training = flag
                elif not last and m.training:  # another call still runs in eval mode
                    m.training = False
            for b in saved:
                last, value = _leave(_BUFFERS, b)
                if last and (b.shape != value.shape or not torch.equal(b, value)):
                    if b.shape != value.shape:
                        b.resize_(value.shape)
                    b.copy_(value)


# Calls of eval_semantics that run at the same time (threads explaining one model, or calls
# nested in one thread) share one record per module and per buffer: the first call in saves
# the user's training flag and buffer value, the last call out restores them. (Each call
# saving its own view let a second thread save the eval mode the first had set, and restore
# it last.) id -> [object, number of calls inside, saved flag or value]
_LOCK = threading.Lock()
_FLAGS: dict[int, list[Any]] = {}
_BUFFERS: dict[int, list[Any]] = {}


def _enter(record: dict[int, list[Any]], obj: Any, flag: bool | None) -> None:
    entry = record.get(id(obj))
    if entry is None:
        value = flag if flag is not None else obj.detach().clone()
        record[id(obj)] = [obj, 1, value]
    else:
        entry[1] += 1


def _leave(record: dict[int, list[Any]], obj: Any) -> tuple[bool, Any]:
    entry = record[id(obj)]
    entry[1] -= 1
    if entry[1] == 0:
        del record[id(obj)]
        return True, entry[2]
    return False, entry[2]


#: one reentrant lock per model, see :func:`model_lock`
_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_LOCK = threading.Lock()


def model_lock(model: nn.Module) -> Any:
    """The model's reentrant lock, held by calls that put something on the model for their
    duration: hooks (Captum's layer methods, backward hooks on ReLUs), a Zennit composite,
    canonizers that merge BatchNorm into the weights in place. Such calls from several
    threads on one model run one after the other (at the same time they refused each
    other's composite, left merged weights behind, or returned another thread's map).
    Never taken on autograd's device threads, where a SplitLRP backward runs on CUDA.
    """
    with _MODEL_LOCKS_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


#: device types whose autocast state :func:`autocast_off` reads
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


@contextmanager
def autocast_off() -> Iterator[None]:
    """Run the body with ``torch.autocast`` off on every device type where it is on.

    The sensitivities and SplitLRP explain the model in its own dtype: under a caller's
    ``torch.autocast`` their forward and backward ran in bfloat16 / float16 (maps in that
    dtype, relevance off by 1e-2 of its size, or a backward that failed on mixed dtypes).
    The streams (``sm(x)``) follow the caller's autocast, as ``model(x)`` does.
    """
    with ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            try:
                on = torch.is_autocast_enabled(device)
            except (TypeError, RuntimeError, ValueError):  # torch < 2.4, an unknown type
                on = (torch.is_autocast_cpu_enabled() if device == "cpu" else
                      torch.is_autocast_enabled() if device == "cuda" else False)
            if on:
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


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
