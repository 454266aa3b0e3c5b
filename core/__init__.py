"""splitxai core: the exact DC decomposition ``f = g - h`` of piecewise-linear models
(products of activations included; smooth operations frozen with ``nonlinear="freeze"``).

>>> import core
>>> sm = core.split(model)
>>> g, h = sm(x)                       # g - h == model(x)
>>> probes = sm.sensitivities(x, target, layers=["layer3"], alpha=0.4)
"""

from core.errors import (
    SeveralInputsError,
    SplitOverflowError,
    SplitPrecisionWarning,
    UnsupportedOperation,
)
from core.explaining import eval_semantics
from core.pair import Pair
from core.probes import Probe
from core.shift import ShiftReport, SplitClassBlindWarning, shift_diagnostics
from core.split import NONLINEAR_MODES, SplitModel, split


def __getattr__(name: str):
    """``core.zoo``, ``core.dc`` and ``core.lrp`` load on first use."""
    if name in ("zoo", "dc", "lrp"):
        import importlib

        return importlib.import_module(f"core.{name}")
    raise AttributeError(f"module 'core' has no attribute {name!r}")


__all__ = [
    "NONLINEAR_MODES", "Pair", "Probe", "SeveralInputsError", "ShiftReport",
    "SplitClassBlindWarning", "SplitModel",
    "SplitOverflowError", "SplitPrecisionWarning", "UnsupportedOperation", "eval_semantics",
    "shift_diagnostics", "split",
]
