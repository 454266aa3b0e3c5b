"""Reusing a model's capture between ``core.split`` calls.

Users split one model many times: a Quantus loop calls the explain function once per batch,
and every call builds a SplitGrad or SplitCAM, hence a new split. What the split captures
(the symbolic graph, the eager graphs per input signature, the interpreter's plans) depends
on the model's structure and code, not on its weights' values. It is kept per model object
and served again while the model's :class:`Fingerprint` -- a walk over everything the
capture reads -- is unchanged:

- the module tree: child names, module identities and types;
- every module's attributes: by value for ``None``, ``bool``, ``int``, ``float``, ``str``,
  ``bytes``, dtypes, devices and for tuples, lists, dicts and sets of them (nested), by
  identity for any other object; the ``training`` flags are left out (capture always runs in
  eval mode);
- parameters and buffers: names with shape, dtype and device (the graphs read them by name
  at every run; their values do not matter);
- tensor attributes that are neither (torch.fx stores them as constants): identity, version
  counter, shape, dtype and device;
- hooks: every module's forward, pre-, backward and state-dict hooks (its hook dicts, above)
  and the global module hooks of ``torch.nn.modules.module``;
- the code: every class of the tree and the attributes of its class dictionary and of its
  bases below ``nn.Module`` (``forward`` and the methods it calls), by identity.

Not seen, the limits: the contents of any other object a module holds (a config object whose
attributes change in place), a global variable or a module-level setting that the forward
reads, a function whose code or defaults are changed in place. For such a model pass
``core.split(model, reuse_capture=False)``: the model is captured afresh and nothing is kept.

The cache never keeps a model alive, nor does it modify one: it is keyed by the model's
identity and emptied by a weak reference when the model goes; the graphs name modules and
attributes by path; plans are kept without their modules and bound to the model's at every
split; the fingerprint keeps weak references to the objects whose identities it compares
(an object that dies makes the fingerprint stale), strong ones only to objects that take
none.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch
from torch import nn

from core.modstate import BASE_KEYS, HOOK_STATE, PLAIN

_SEQUENCES = (tuple, list)  # and their subclasses (torch.Size, named tuples)
_EMPTY = frozenset({dict, OrderedDict, set})  # fast path for empty ones
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_forward_hooks_with_kwargs", "_global_forward_hooks_always_called",
                 "_global_backward_hooks", "_global_backward_pre_hooks",
                 "_global_is_full_backward_hook")
_DEPTH = 6  # nesting of containers compared by value; deeper ones by identity


class _Mark:
    """A delimiter in a fingerprint (compared by identity)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_MODULE, _SEEN, _NONE, _CLASS, _TENSOR, _OBJECT, _END, _BASE_MARK = (
    _Mark(n) for n in ("module", "seen", "none", "class", "tensor", "object", "end", "base"))


def _value(v: Any, key: list, held: list, depth: int = 0) -> None:
    """Append ``v`` to ``key``: by value where it is plain data, else by identity (``held``
    gets the object, so that its identity can be kept)."""
    t = type(v)
    if t in PLAIN:
        key += (t, v)
    elif t is tuple and PLAIN.issuperset(map(type, v)):
        key += (t, tuple(map(type, v)), v)  # a tuple of plain values (kernel_size, stride)
    elif isinstance(v, torch.Tensor):
        key += (_TENSOR, id(v), v._version, v.shape, v.dtype, v.device)
        held.append(v)
    elif depth < _DEPTH and isinstance(v, _SEQUENCES) and not isinstance(v, nn.Module):
        key += (t, len(v))
        for x in v:
            _value(x, key, held, depth + 1)
    elif depth < _DEPTH and isinstance(v, dict):
        key += (t, len(v))
        for k, x in v.items():
            _value(k, key, held, depth + 1)
            _value(x, key, held, depth + 1)
    elif isinstance(v, (set, frozenset)) and all(type(x) in PLAIN for x in v):
        key += (t, frozenset(v))
    else:
        key += (_OBJECT, t, id(v))
        held.append(v)


def _classes(classes: dict[type, None], key: list, held: list) -> None:
    """The class dictionaries of the module classes and their bases below ``nn.Module``."""
    seen: set[type] = set()
    for cls in classes:
        for base in cls.__mro__:
            if base is nn.Module or base is object:
                break
            if base in seen:
                continue
            seen.add(base)
            key += (_CLASS, base)
            for name, attr in vars(base).items():
                key.append(name)
                _value(attr, key, held)


class Fingerprint:
    """What a model's capture depends on, as one tuple (see the module docstring).

    Parameters
    ----------
    model: torch.nn.Module
        The model; it is read, never changed.

    Attributes
    ----------
    key: tuple
        The values and identities, compared with ``==``.
    """

    __slots__ = ("key", "held")

    def __init__(self, model: nn.Module) -> None:
        key: list = []
        held: list = []
        classes: dict[type, None] = {}
        visited: set[int] = set()
        stack = [model]
        while stack:
            m = stack.pop()
            if id(m) in visited:  # a module that appears twice in the tree
                key += (_SEEN, id(m))
                continue
            visited.add(id(m))
            cls = type(m)
            classes[cls] = None
            key += (_MODULE, cls, id(m))
            held.append(m)
            state = m.__dict__
            base = tuple(map(state.get, HOOK_STATE))
            if any(base):  # a hook
                for name, v in zip(HOOK_STATE, base, strict=True):
                    key.append(name)
                    _value(v, key, held)
            else:  # all empty (or None, False): their types tell them apart
                key += (_BASE_MARK, tuple(map(type, base)))
            for name, v in state.items():
                if name in BASE_KEYS:
                    continue
                t = type(v)
                if t in PLAIN:
                    key += (name, t, v)
                elif t in _EMPTY and not v:
                    key += (name, t)  # an empty hook dict or set (the common case)
                elif t is tuple and PLAIN.issuperset(map(type, v)):
                    key += (name, t, tuple(map(type, v)), v)  # as _value does
                else:
                    key.append(name)
                    _value(v, key, held)
            for name, p in state["_parameters"].items():
                key += (name, _NONE) if p is None else (name, p.shape, p.dtype, p.device)
            for name, b in state["_buffers"].items():
                key += (name, _NONE) if b is None else (name, b.shape, b.dtype, b.device)
            children = state["_modules"]
            for name, child in reversed(children.items()):
                key.append(name)
                if child is None:
                    key.append(_NONE)
                else:
                    stack.append(child)
            key.append(_END)
        _classes(classes, key, held)
        hooks = nn.modules.module
        for name in _GLOBAL_HOOKS:
            key.append(name)
            _value(getattr(hooks, name, None), key, held)
        self.key = tuple(key)
        self.held = held


class Entry:
    """What the capture of one model found, with the fingerprint it was found under.

    Attributes
    ----------
    key: tuple
        The fingerprint's key.
    found: dict
        The shared capture state per ``output=`` key (see :class:`core.capture.Capture`).
    """

    def __init__(self, fingerprint: Fingerprint) -> None:
        self.key = fingerprint.key
        self.found: dict[Hashable, Any] = {}
        self.stale = False
        self._refs: list[weakref.ref] = []
        self._strong: list[Any] = []  # objects without weak references keep their ids
        for obj in fingerprint.held:
            try:
                self._refs.append(weakref.ref(obj, self._died))
            except TypeError:
                self._strong.append(obj)

    def _died(self, _ref: weakref.ref) -> None:
        self.stale = True  # its id may be reused by a new object: the key no longer proves

    def matches(self, fingerprint: Fingerprint) -> bool:
        """Whether the model still has this entry's fingerprint."""
        return not self.stale and fingerprint.key == self.key


_ENTRIES: dict[int, tuple[weakref.ref, Entry]] = {}


def _forget(ref: weakref.ref, ident: int) -> None:
    kept = _ENTRIES.get(ident)
    if kept is not None and kept[0] is ref:
        del _ENTRIES[ident]


def output_key(output: Any) -> Hashable | None:
    """The cache key of an ``output=`` selector; None where it is not kept (a callable)."""
    if output is None or type(output) in (int, str):
        return (type(output), output)
    return None


def entry(model: nn.Module, fingerprint: Fingerprint) -> Entry:
    """The model's entry for this fingerprint: the kept one if it matches, else a new one
    (which replaces it)."""
    kept = _ENTRIES.get(id(model))
    if kept is not None and kept[0]() is model and kept[1].matches(fingerprint):
        return kept[1]
    new = Entry(fingerprint)
    ident = id(model)
    ref = weakref.ref(model, lambda r: _forget(r, ident))
    _ENTRIES[ident] = (ref, new)
    return new


def clear() -> None:
    """Forget every kept capture."""
    _ENTRIES.clear()
