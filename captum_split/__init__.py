"""Captum attributions on the split pair ``f = g - h``: SplitCAM, SplitGrad, and the CAM
baselines Captum lacks (LayerCAM, Grad-CAM++).

A Captum user swaps ``LayerGradCam(model, layer)`` for ``SplitCAM(model, layer)``::

    from captum_split import SplitCAM
    attr = SplitCAM(model, model.layer3).attribute(x, target=labels)   # (B, 1, h, w)
"""

from splitxai.install import require_extra, require_own_core

require_own_core()
require_extra(("captum",), "captum", "captum_split")

from .cams import GradCAMPlusPlus, LayerCAM  # noqa: E402
from .splitcam import SplitCAM, SplitGrad  # noqa: E402

__all__ = ["SplitCAM", "SplitGrad", "LayerCAM", "GradCAMPlusPlus"]
