"""The module twin: a cheap copy of a module tree that a capture may run and change.

Tracing (:mod:`core.graph`) and eager recording (:mod:`core.record`) run the model's forward;
they run it on a twin so that nothing the forward does -- set ``training``, update a buffer
(a call counter, an EMA), write a Python or tensor attribute, register a hook -- reaches the
user's model. The twin shares the parameters (a forward that writes into one, an EMA in a
frozen ``nn.Parameter``, has it put back after the recording: ``core.record``) and owns
copies of the buffers and of other tensor attributes.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from core.modstate import BASE_KEYS, HOOK_CONTAINERS, PLAIN


def _twin_tensor(value: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    """One copy per tensor, however often the tree holds it."""
    found = memo.get(id(value))
    if found is None:
        found = memo[id(value)] = value.clone()  # under no_grad: detached
    return found


def _twin_value(value: Any, memo: dict[int, Any], training: bool | None) -> Any:
    """An attribute of a module in its twin: modules by their twins, tensors as copies."""
    t = type(value)
    if t in PLAIN or t is nn.Parameter:
        return value
    if t is torch.Tensor:  # a buffer (the common case)
        return _twin_tensor(value, memo)
    if isinstance(value, nn.Module):
        return _twin_module(value, memo, training)
    if isinstance(value, torch.Tensor):
        return value if isinstance(value, nn.Parameter) else _twin_tensor(value, memo)
    if t is types.MethodType and isinstance(value.__self__, nn.Module):
        # a method of a module stored as an attribute (model.forward = model.other):
        # bound to the module's twin
        return types.MethodType(value.__func__, _twin_module(value.__self__, memo, training))
    if t is tuple or t is list:
        for v in value:
            if type(v) not in PLAIN and isinstance(v, (nn.Module, torch.Tensor)):
                return t(_twin_value(v, memo, training) for v in value)
    elif t is dict:
        for v in value.values():
            if type(v) not in PLAIN and isinstance(v, (nn.Module, torch.Tensor)):
                return {k: _twin_value(v, memo, training) for k, v in value.items()}
    elif isinstance(value, (dict, set)):
        return value.copy()  # an OrderedDict, a set: never shared
    return value


def _twin_module(module: nn.Module, memo: dict[int, Any], training: bool | None) -> nn.Module:
    found = memo.get(id(module))
    if found is not None:
        return found
    cls = type(module)
    # what copy.copy does, without pickling's machinery; an fx.GraphModule's __new__ makes a
    # fresh class per instance (its forward is set on the class by recompile), so its twin
    # keeps the instance's class
    twin = object.__new__(cls) if isinstance(module, fx.GraphModule) else cls.__new__(cls)
    memo[id(module)] = twin
    source = module.__dict__
    state = twin.__dict__
    state.update(source)
    for key in HOOK_CONTAINERS:
        value = source.get(key)
        if value is not None:
            state[key] = value.copy()
    value = source.get("_parameters")
    if value is not None:
        state["_parameters"] = value.copy()
    value = source.get("_buffers")
    if value is not None:
        state["_buffers"] = {k: None if v is None else _twin_value(v, memo, training)
                             for k, v in value.items()} if value else {}
    value = source.get("_modules")
    if value is not None:
        state["_modules"] = {k: None if v is None else _twin_module(v, memo, training)
                             for k, v in value.items()} if value else {}
    for key in source.keys() - BASE_KEYS:  # the module's own attributes
        value = source[key]
        if type(value) not in PLAIN:
            state[key] = _twin_value(value, memo, training)
    if training is not None:
        state["training"] = training
    return twin


def module_twin(model: nn.Module, training: bool | None = None) -> nn.Module:
    """A copy of the module tree that shares the parameters and owns copies of the buffers
    (and of other tensor attributes); other attributes are shared, containers of modules and
    tensors are copied. Much cheaper than ``copy.deepcopy`` (no parameter, no Python object
    but the modules and their dicts is copied).

    Parameters
    ----------
    model: torch.nn.Module
        The model; it is not modified.
    training: bool, optional
        The ``training`` flag of every module of the twin (default: the model's flags).
    """
    with torch.no_grad():
        return _twin_module(model, {}, training)
