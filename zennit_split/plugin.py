"""splitxai plugin of the Zennit adapter: the explainers "SplitLRP" and "LRP".

Found through the entry point ``zennit = "zennit_split.plugin"`` of the group ``"splitxai"``
(see :mod:`quantus_adapters.registry`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy
import torch
from torch import nn

from core import checks

from .composite import select_stream
from .helpers import lrp_gamma, split_lrp

hookimpl = pluggy.HookimplMarker("splitxai")


def _layer_map(relevance: torch.Tensor, method: str, layer: str) -> torch.Tensor:
    """Sum a layer's relevance over channels: (B, C, h, w) -> (B, 1, h, w)."""
    if relevance.ndim != 4:
        raise ValueError(
            f"{method}: layer={layer!r} has an output of shape {tuple(relevance.shape)}; a map "
            "needs a (B, C, h, w) layer (a convolution, pooling or activation module)."
        )
    return relevance.sum(dim=1, keepdim=True)


def split_lrp_explainer(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    layer: str | nn.Module | None = None,
    stream: str = "pos",
    epsilon: float = 1e-6,
    maxpool: str = "wta",
    stabilizer: str = "scale",
    input_split: str = "relu",
    activation_rule: str = "pass",
    residual: str = "even",
    nonlinear: str = "error",
) -> torch.Tensor:
    """SplitLRP: epsilon-LRP on the split pair f = g - h (Zennit composite "split_lrp").

    Parameters
    ----------
    model, inputs, targets:
        As in the explainer contract of :mod:`quantus_adapters.registry`.
    layer: str or torch.nn.Module, optional
        Module name (``model.named_modules()``), or the submodule itself, whose output
        relevance is returned, summed over channels, (B, 1, h, w); ``None`` or ``"input"``:
        the input relevance (B, C, H, W).
    stream: str, optional
        ``"pos"`` (``R(l,+)``), ``"neg"`` (``R(l,-)``) or ``"comb"`` (their difference).
    epsilon, maxpool, stabilizer, input_split, activation_rule, residual, nonlinear:
        As in :class:`zennit_split.SplitLRP` (every option of the composite but ``layer``'s
        lists and ``canonizers``).
    """
    if layer is None or isinstance(layer, str):  # a name is checked by the composite
        name = "input" if layer in (None, "", "input") else layer
    else:  # a submodule, by its name (one TypeError line for anything else)
        name = checks.layer_name(model, layer, "SplitLRP")
    relevance = split_lrp(
        model,
        inputs,
        targets,
        [name],
        epsilon=epsilon,
        maxpool=maxpool,
        stabilizer=stabilizer,
        input_split=input_split,
        activation_rule=activation_rule,
        residual=residual,
        nonlinear=nonlinear,
    )
    result = select_stream(relevance[name], stream)
    if name == "input":
        return result
    return _layer_map(result, "SplitLRP", name)


def lrp_explainer(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    layer: str | nn.Module | None = None,
    gamma: float = 0.25,
) -> torch.Tensor:
    """LRP with the gamma rule (gamma = 0.25, Zennit), at the input or at a layer.

    Parameters
    ----------
    model, inputs, targets:
        As in the explainer contract of :mod:`quantus_adapters.registry`.
    layer: str or torch.nn.Module, optional
        Module name, or the submodule itself, whose output relevance is returned, summed
        over channels, (B, 1, h, w); ``None`` or ``"input"``: the input relevance (B, C, H, W).
    gamma: float, optional
        Gamma of the rule, on every convolution and linear layer (BatchNorm merged).
    """
    name = checks.layer_name(model, layer, "LRP", allow_input=True)
    relevance = lrp_gamma(model, inputs, targets, gamma=gamma, layer=name)
    if name == "input":
        return relevance
    return _layer_map(relevance, "LRP", name)


@hookimpl
def splitxai_explainers() -> dict[str, Callable[..., Any]]:
    """Return the explainers of the Zennit adapter."""
    return {"SplitLRP": split_lrp_explainer, "LRP": lrp_explainer}
