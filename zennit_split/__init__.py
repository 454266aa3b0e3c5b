"""SplitLRP for Zennit users.

Importing this package registers :class:`SplitLRP` as
``zennit.composites.COMPOSITES["split_lrp"]``, so that Zennit's and Quantus's lookups by
name find it::

    from zennit.attribution import Gradient
    from zennit_split import SplitLRP

    with Gradient(model, SplitLRP(stream="pos")) as attributor:
        output, relevance = attributor(x, torch.eye(10)[target])
"""

from __future__ import annotations

from splitxai.install import require_extra, require_own_core

require_own_core()
require_extra(("zennit",), "zennit", "zennit_split")

from zennit.composites import register_composite  # noqa: E402

from .composite import SplitLRP, select_stream  # noqa: E402
from .helpers import gamma_composite, lrp_gamma, output_seed, split_lrp  # noqa: E402

register_composite("split_lrp")(SplitLRP)

__all__ = [
    "SplitLRP",
    "gamma_composite",
    "lrp_gamma",
    "output_seed",
    "select_stream",
    "split_lrp",
]
