"""NumPy 2 compatibility shim for Quantus 0.6.

Quantus 0.6 calls two NumPy names that NumPy 2 removed:

- ``np.trapz`` (removed in NumPy 2.4; renamed ``np.trapezoid`` in 2.0), used by
  ``quantus.helpers.utils.calculate_auc``, i.e. by every metric that reports an AUC
  (Pixel Flipping, Selectivity, Region Perturbation, ...);
- ``np.NaN`` (removed in NumPy 2.0; the name is ``np.nan``), used by ``Continuity``.

:func:`apply` adds these two aliases to the ``numpy`` module when (and only when) they are
missing: ``np.trapz = np.trapezoid`` and ``np.NaN = np.nan``. It changes nothing else, does
not touch a name that exists, and is idempotent. Importing ``quantus_adapters`` applies it, so
a benchmark script only needs ``import quantus_adapters`` before it runs Quantus metrics.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ALIASES", "apply", "missing"]

#: alias name -> name of the NumPy 2 object it stands for
ALIASES: dict[str, str] = {"trapz": "trapezoid", "NaN": "nan"}


def missing() -> list[str]:
    """Return the aliases that the installed NumPy lacks.

    Returns
    -------
    list of str
        Names from :data:`ALIASES` that ``numpy`` does not define.
    """
    return [name for name in ALIASES if name not in vars(np)]


def apply() -> list[str]:
    """Add the missing Quantus 0.6 aliases to ``numpy``.

    Returns
    -------
    list of str
        The aliases that were added by this call (empty when nothing was missing).
    """
    added = []
    for name in missing():
        setattr(np, name, getattr(np, ALIASES[name]))
        added.append(name)
    return added
