"""Computation times of table 7: the split itself and each method per image."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["split_time", "explain_time"]


def split_time(model: nn.Module, repeats: int = 20) -> float:
    """Mean seconds of ``core.split(model)`` (building the split view), over ``repeats``."""
    import core

    core.split(model)  # warm-up (imports, graph tracing caches)
    start = time.perf_counter()
    for _ in range(repeats):
        core.split(model)
    return (time.perf_counter() - start) / repeats


def explain_time(explain: Callable, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 kwargs: dict, repeats: int = 2) -> float:
    """Mean seconds per image of ``explain(model, x, y, **kwargs)`` after one warm-up call."""
    explain(model, x, y, **kwargs)
    start = time.perf_counter()
    for _ in range(repeats):
        explain(model, x, y, **kwargs)
    return (time.perf_counter() - start) / (repeats * len(y))
