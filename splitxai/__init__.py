"""splitxai: the distribution's own package, holding its version and its install checks.

The distribution ships the top-level packages ``core``, ``captum_split``, ``zennit_split``,
``quantus_adapters`` and this one. ``core`` is a generic name that other distributions also
use; :func:`splitxai.install.require_own_core` (run by every splitxai package on import)
refuses a foreign ``core`` with a message naming both locations.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
