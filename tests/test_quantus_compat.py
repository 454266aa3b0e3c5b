"""The NumPy 2 shim that Quantus 0.6 needs (np.trapz, np.NaN)."""

from __future__ import annotations

import numpy as np
import pytest
import quantus

from quantus_adapters import compat

NUMPY_HAS_TRAPZ = "trapz" in vars(np) and np.trapz is not np.trapezoid  # noqa: NPY201


def test_aliases_are_present_after_import():
    assert compat.missing() == []
    assert np.trapz is np.trapezoid or NUMPY_HAS_TRAPZ  # noqa: NPY201 (the alias under test)
    assert np.isnan(np.NaN)  # noqa: NPY201
    assert compat.apply() == []  # idempotent: nothing left to add


def test_quantus_auc_needs_the_shim_and_works_with_it(monkeypatch):
    curve = np.array([0.0, 1.0, 1.0])
    if not NUMPY_HAS_TRAPZ:  # NumPy >= 2.4: without the alias Quantus's AUC breaks
        monkeypatch.delattr(np, "trapz")
        with pytest.raises(AttributeError, match="trapz"):
            quantus.helpers.utils.calculate_auc(curve, dx=1)
        assert compat.apply() == ["trapz"]
    assert quantus.helpers.utils.calculate_auc(curve, dx=1) == pytest.approx(1.5)
    # the metrics' AUC path (Pixel Flipping, Selectivity) goes through the same helper
    batched = quantus.helpers.utils.calculate_auc(np.stack([curve, 2 * curve]), batched=True)
    np.testing.assert_allclose(batched, [1.5, 3.0])


def test_apply_adds_only_missing_names(monkeypatch):
    monkeypatch.delattr(np, "trapz", raising=False)
    sentinel = object()
    monkeypatch.setattr(np, "NaN", sentinel, raising=False)
    assert compat.missing() == ["trapz"]
    assert compat.apply() == ["trapz"]
    assert np.trapz is np.trapezoid  # noqa: NPY201
    assert np.NaN is sentinel  # an existing name is never replaced  # noqa: NPY201
