"""The once-per-model record of warnings (core.errors.WarnedModels) and the precision advice of
every overflow and precision message (core.errors.precision_advice)."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import core
from core.errors import WarnedModels, precision_advice


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


# --------------------------------------------------------------------------- precision advice


def test_precision_advice_advises_float64_only_below_float64():
    assert precision_advice(torch.float32, "a larger epsilon") == (
        "Use a larger epsilon or float64 (model.double() on a copy and x.double()).")
    assert precision_advice(torch.bfloat16) == (
        "Use float64 (model.double() on a copy and x.double()).")
    assert precision_advice(torch.float64, "a", "b", "c") == (
        "Use a, b or c (the computation already runs in float64).")
    assert precision_advice(torch.float64, otherwise="Rescale.") == "Rescale."
    assert "already runs in float64" in precision_advice(torch.float64)


class _Cancels(nn.Module):
    """``relu(big x) - relu(big x) + x``: streams of ``big |x|`` around an output ``x``."""

    def __init__(self, big: float, after: float = 1.0) -> None:
        super().__init__()
        self.big, self.after = big, after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(x * self.big)
        return (a - a) * self.after + x


@pytest.mark.parametrize(("dtype", "big"), [(torch.float32, 1e9), (torch.float64, 1e18)])
def test_the_precision_warning_advises_float64_only_below_it(dtype, big):
    """Was 'compute in float64' also for a float64 computation."""
    x = torch.randn(2, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        core.split(_Cancels(big).eval(), stabilizer="none")(x)
    (message,) = [str(w.message) for w in caught
                  if issubclass(w.category, core.SplitPrecisionWarning)]
    assert f"in {dtype}" in message and "model(x) for the output" in message
    assert ("model.double()" in message) == (dtype != torch.float64)
    assert ("already runs in float64" in message) == (dtype == torch.float64)


@pytest.mark.parametrize(("dtype", "big"), [(torch.float32, 1e30), (torch.float64, 1e300)])
def test_the_overflow_error_advises_float64_only_below_it(dtype, big):
    """Was 'use stabilizer='scale' or float64 inputs' also for float64 inputs."""
    x = torch.randn(2, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    model = _Cancels(big, after=big).eval()
    with pytest.raises(core.SplitOverflowError, match=f"overflowed {dtype}.*stabilizer='scale'") \
            as err:
        core.split(model, stabilizer="none")(x)
    assert ("float64 (model.double()" in str(err.value)) == (dtype != torch.float64)
    assert ("already runs in float64" in str(err.value)) == (dtype == torch.float64)
