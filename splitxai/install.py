"""Install checks: a foreign top-level ``core`` package, and optional extras.

Both checks run when a splitxai package is imported, before any heavy import, so that a broken
environment fails with one line that says what is wrong and what to do.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

__all__ = ["ForeignCoreError", "MissingExtraError", "require_extra", "require_own_core"]

#: the directory that holds splitxai's top-level packages (site-packages or the source tree)
ROOT = Path(__file__).resolve().parent.parent


class ForeignCoreError(ImportError):
    """The top-level ``core`` package found first is not splitxai's."""


class MissingExtraError(ImportError):
    """A module of an optional extra is not installed."""


def _owners(package: str) -> list[str]:
    """Distributions that declare the top-level ``package`` (from their RECORD / top_level)."""
    try:
        return sorted(set(importlib.metadata.packages_distributions().get(package, [])))
    except Exception:  # broken metadata of some distribution: the message just lacks names
        return []


def require_own_core() -> None:
    """Raise :class:`ForeignCoreError` unless ``import core`` gives splitxai's ``core``.

    splitxai's ``core`` lies next to this package (``ROOT/core``). Another distribution's
    ``core`` earlier on ``sys.path`` (or already imported) would shadow it, and the split would
    fail later with an ``AttributeError`` far from the cause.
    """
    expected = ROOT / "core" / "__init__.py"
    module = sys.modules.get("core")
    if module is not None:
        found = getattr(module, "__file__", None)
    else:
        spec = importlib.util.find_spec("core")
        found = spec.origin if spec is not None else None
    if found is not None and Path(found).resolve() == expected:
        return
    owners = [d for d in _owners("core") if d != "splitxai"]
    by = f" (installed by {', '.join(owners)})" if owners else ""
    where = found if found is not None else "nowhere (no package 'core' is importable)"
    raise ForeignCoreError(
        f"splitxai needs its own top-level package 'core' at {expected.parent}, but "
        f"'import core' finds {where}{by}. Another package named 'core' shadows splitxai's: "
        "remove its directory from sys.path / PYTHONPATH, uninstall that distribution, or "
        "install splitxai into its own virtual environment."
    )


def require_extra(modules: tuple[str, ...], extra: str, feature: str) -> None:
    """Import ``modules``; if one is missing, raise :class:`MissingExtraError` with the fix.

    Parameters
    ----------
    modules : tuple of str
        Top-level modules the feature needs (e.g. ``("captum",)``).
    extra : str
        The extra of the splitxai distribution that installs them.
    feature : str
        What needs them, for the message (e.g. ``"captum_split"``).
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise MissingExtraError(
                f"{feature} needs the optional dependency {name!r}, which could not be "
                f"imported ({exc}). Install it with: pip install \"splitxai[{extra}]\""
            ) from exc
