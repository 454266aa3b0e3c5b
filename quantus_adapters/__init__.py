"""Explain functions for Quantus, for every method that the installed plugins offer.

``quantus_adapters.explain`` is a Quantus ``explain_func``; the methods (SplitCAM, SplitGrad,
SplitLRP, the baselines, and any third-party method) are found through pluggy entry points of
group ``"splitxai"`` (see :mod:`quantus_adapters.registry`). Importing this package applies a
small NumPy 2 shim that Quantus 0.6 needs (see :mod:`quantus_adapters.compat`); it does not
import Quantus.
"""

from splitxai.install import require_own_core as _require_own_core

_require_own_core()

from quantus_adapters import compat as _compat  # noqa: E402

_compat.apply()

from quantus_adapters.explain import (  # noqa: E402
    QUANTUS_KEYWORDS,
    UPSAMPLE_MODES,
    ConstantExplanationError,
    explain,
)
from quantus_adapters.registry import (  # noqa: E402
    ENTRY_POINT_GROUP,
    PROJECT_NAME,
    MethodClashError,
    MethodInfo,
    PluginError,
    PluginLoadWarning,
    UnknownMethodError,
    available_methods,
    get_explainer,
    get_plugin_manager,
    hookimpl,
    hookspec,
    method_info,
    plugin_errors,
    refresh,
    register,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROJECT_NAME",
    "QUANTUS_KEYWORDS",
    "UPSAMPLE_MODES",
    "ConstantExplanationError",
    "MethodClashError",
    "MethodInfo",
    "PluginError",
    "PluginLoadWarning",
    "UnknownMethodError",
    "available_methods",
    "explain",
    "get_explainer",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "method_info",
    "plugin_errors",
    "refresh",
    "register",
]
