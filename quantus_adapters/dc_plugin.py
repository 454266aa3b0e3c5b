"""Plugin registering ``DCGrad``: stream gradients of trained difference models (appendix D).

Registered through the ``splitxai`` entry point ``dc = "quantus_adapters.dc_plugin"`` so
that the difference models of ``core.dc.models`` (DIC, DM, DiffNone, DICIN, DMIN) can be
benchmarked like any other explanation method.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pluggy
import torch
from torch import nn

from core import checks
from core.dc.explain import STREAMS, target_gradients
from core.dc.models import is_difference_model

hookimpl = pluggy.HookimplMarker("splitxai")

__all__ = ["dc_grad", "splitxai_explainers"]


def dc_grad(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    stream: str = "g",
    **options,
) -> torch.Tensor:
    """DCGrad: input gradient of the g (or h, g - h) stream of a difference model (DM, DIC).

    Parameters
    ----------
    model: torch.nn.Module
        A difference model with streams ``.g``, ``.h`` and the flag ``.inverted``, as built
        by ``core.dc.models.mlp_maxout`` / ``cnn_maxout`` in modes DIC, DM, DiffNone, DICIN,
        DMIN. It is used in evaluation mode; its training flags are restored.
    inputs: torch.Tensor
        ``(B, C, H, W)`` input batch (``(B, 1, 28, 28)`` for the appendix-D models).
    targets: torch.Tensor
        ``(B,)`` class indices.
    stream: str
        ``"g"`` (default): d g_target / d x, the present evidence; ``"h"``: d h_target / d u
        with u the input of h (``1 - x`` for DICIN / DMIN), the missing evidence;
        ``"diff"``: d (g - h)_target / d x, the model's own gradient.

    Returns
    -------
    torch.Tensor
        The gradient, same shape as ``inputs`` (input resolution).
    """
    if options:
        raise TypeError(
            f"DCGrad got unknown option(s) {sorted(options)}; it accepts only stream "
            f"(one of {STREAMS})"
        )
    checks.option("stream", stream, STREAMS, "DCGrad")
    if not is_difference_model(model):
        raise TypeError(
            f"DCGrad explains difference models with streams .g and .h (core.dc.models modes "
            f"DIC, DM, DiffNone, DICIN, DMIN); {type(model).__name__} has no .g/.h streams. "
            "Train one with `splitxai train-dc` or use a gradient method such as Saliency."
        )
    x = torch.as_tensor(np.asarray(inputs) if not torch.is_tensor(inputs) else inputs)
    if not x.is_floating_point():
        x = x.float()
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else x.device
    if reference is not None:
        x = x.to(device=device, dtype=reference.dtype)
    # the targets as given: target_gradients checks them (whole floats, as Quantus may pass
    # labels, are accepted; a fractional or negative one is refused, not truncated)
    grad = target_gradients(model, x, targets, stream=stream)
    return grad.detach().to(inputs.device if torch.is_tensor(inputs) else "cpu")


@hookimpl
def splitxai_explainers() -> dict[str, Callable[..., torch.Tensor]]:
    """The methods this plugin offers: ``{"DCGrad": dc_grad}``."""
    return {"DCGrad": dc_grad}
