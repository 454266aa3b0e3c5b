"""What a module's own state is made of, in one place for the code that copies it
(:func:`core.twin.module_twin`) and the code that compares it
(:class:`core.reuse.Fingerprint`).

``nn.Module.__init__`` sets the same attributes on every module: the ``training`` flag, the
tree (``_parameters``, ``_buffers``, ``_modules``) and the hook state (hook dicts, the set of
non-persistent buffer names, ``_is_full_backward_hook``). Everything else in a module's
``__dict__`` is the module's own (``in_features``, ``stride``, a user's attributes).
"""

from __future__ import annotations

import torch
from torch import nn

PLAIN: frozenset[type] = frozenset({type(None), bool, int, float, complex, str, bytes,
                                    torch.dtype, torch.device})
"""Types of immutable plain values: a copy of a module shares them, a fingerprint compares
them by value."""

_STATE = nn.Module().__dict__

TREE: tuple[str, ...] = ("_parameters", "_buffers", "_modules")
"""The containers of the module tree."""

BASE_KEYS: frozenset[str] = frozenset(_STATE)
"""Every attribute that ``nn.Module.__init__`` sets."""

HOOK_STATE: tuple[str, ...] = tuple(k for k in _STATE if k not in TREE and k != "training")
"""The hook state among them, in ``__init__``'s order: hook dicts and sets (empty in most
modules) and ``_is_full_backward_hook``."""

HOOK_CONTAINERS: tuple[str, ...] = tuple(k for k in HOOK_STATE
                                         if isinstance(_STATE[k], (dict, set)))
"""The dicts and sets of the hook state (a copy of a module never shares them)."""
