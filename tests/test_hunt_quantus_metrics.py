"""Hunt: quantus_adapters.explain as a Quantus explain_func, edge cases found by use."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import quantus_adapters
from tests.test_plugins import tiny_model as _model

_X = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
_Y = np.array([0, 2])


@pytest.mark.parametrize("axes", [np.array([2, 3]), [np.int64(1)], (-3,)])
def test_reduce_axes_as_any_sequence_of_ints(axes):
    """Quantus takes reduce_axes as any sequence (it calls tuple() on it); a NumPy array
    of two axes raised NumPy's 'truth value of an array ... is ambiguous'."""
    out = quantus_adapters.explain(_model(), _X, _Y, method="Saliency", reduce_axes=axes)
    full = quantus_adapters.explain(_model(), _X, _Y, method="Saliency", reduce_axes=())
    assert np.allclose(out, full.sum(axis=tuple(int(a) for a in axes), keepdims=True))


@pytest.mark.parametrize("axes", [0, 1, np.int64(1), 1.0, (1.5,), "1"])
def test_reduce_axes_not_a_tuple_of_ints_is_one_clear_error(axes):
    """reduce_axes=0 (the batch) returned the unreduced (B, 3, H, W) map silently; 1 raised
    "'int' object is not iterable"; (1.5,) and "1" were taken as (1,)."""
    with pytest.raises(TypeError, match=r"reduce_axes=.* must be a tuple of int axes"):
        quantus_adapters.explain(_model(), _X, _Y, method="Saliency", reduce_axes=axes)


@pytest.mark.parametrize("method", ["SplitCAM", "LayerCAM"])
def test_a_training_model_gets_no_warning_that_it_stays_in_training_mode(method):
    """explain puts the model in eval mode, as quantus.explain does; the methods warned
    'Sequential is in training mode ... and left in training mode', and then explain left it
    in eval mode: the warning said the opposite of what happened."""
    model = _model().train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*training mode")
        out = quantus_adapters.explain(model, _X, _Y, method=method, layer="1")
    assert not any(m.training for m in model.modules())
    assert np.array_equal(out, quantus_adapters.explain(_model(), _X, _Y, method=method,
                                                        layer="1"))


@pytest.mark.parametrize("method", ["Saliency", "InputXGradient", "SplitGrad", "LayerCAM"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_inputs_with_nan_or_inf_are_refused_by_every_method(method, bad):
    """Captum's Saliency returned a finite map of an input with NaN (the split methods
    refused it): one check in explain for every method."""
    x = _X.copy()
    x[1, 0, 3, 3] = bad
    with pytest.raises(ValueError, match=rf"^{method}: inputs contains NaN or Inf values"):
        quantus_adapters.explain(_model(), x, _Y, method=method)
