"""The once-per-model record of warnings (core.errors.WarnedModels)."""

from __future__ import annotations

import gc
import weakref

from torch import nn

from core.errors import WarnedModels


def test_warned_models_are_kept_per_key_and_held_weakly():
    warned = WarnedModels()
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    assert a not in warned and (a, "layer1") not in warned
    warned.add(a)
    warned.add(b, "layer1")
    assert a in warned and (a, "layer1") not in warned
    assert (b, "layer1") in warned and b not in warned and (b, "layer2") not in warned
    ref = weakref.ref(a)
    del a
    gc.collect()
    assert ref() is None  # the record does not keep the model alive
