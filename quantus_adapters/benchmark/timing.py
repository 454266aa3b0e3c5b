"""Computation times of table 7: the split itself and each method per image."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["split_time", "explain_time"]


def split_time(model: nn.Module, repeats: int = 20) -> float:
    """Mean seconds of building the split of ``model`` from scratch (tracing and planning:
    ``core.split(model, reuse_capture=False)``, so a capture kept from an earlier split does
    not serve it), over ``repeats``."""
    import core

    core.split(model, reuse_capture=False)  # warm-up (imports)
    start = time.perf_counter()
    for _ in range(repeats):
        core.split(model, reuse_capture=False)
    return (time.perf_counter() - start) / repeats


def explain_time(explain: Callable, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 kwargs: dict, repeats: int = 2) -> float:
    """Mean seconds per image of ``explain(model, x, y, **kwargs)`` after one warm-up call."""
    explain(model, x, y, **kwargs)
    start = time.perf_counter()
    for _ in range(repeats):
        explain(model, x, y, **kwargs)
    return (time.perf_counter() - start) / (repeats * len(y))
