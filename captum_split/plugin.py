"""splitxai plugin: the Captum-based explainers, found through the ``"splitxai"`` entry points.

Registers ``SplitCAM``, ``SplitGrad``, ``LayerCAM``, ``GradCAM`` (Captum's ``LayerGradCam``) and
``GradCAMPlusPlus``. Each explainer is called as ``fn(model, inputs, targets, **options)`` with
``inputs`` a float tensor ``(B, C, H, W)`` and ``targets`` a long tensor ``(B,)`` and returns a
layer map ``(B, 1, h, w)`` (SplitGrad without a layer: ``(B, 1, H, W)``). ``layer`` is a module
name as in ``model.named_modules()``; the CAM methods default to the model's last convolution
(in ``named_modules()`` order) that the forward on the inputs calls.
Nothing is cached between calls (each call builds the split view of the model as it is now).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy
from torch import Tensor, nn

from core import checks
from core.capture import wrapped_module

from ._utils import (
    checked_forward,
    dtype_errors,
    eval_context,
    input_tensors,
    last_conv_name,
    owner_module,
    resolve_layer,
    split_element,
)

hookimpl = pluggy.HookimplMarker("splitxai")

__all__ = ["hookimpl", "splitxai_explainers"]


def _cam_layer(model: nn.Module, layer: str | None, method: str,
               inputs: Any = None) -> tuple[nn.Module, str]:
    """The model inside any wrappers and the layer's name in it (default: the last
    convolution that the forward on ``inputs`` calls; ``"NAME:i"`` admitted), resolved as by
    the explainers themselves."""
    if layer is None:
        def run() -> Any:
            return model(*inputs) if isinstance(inputs, tuple) else model(inputs)

        layer = last_conv_name(wrapped_module(model)[0], method,
                               None if inputs is None else run)
    inner, name = resolve_layer(model, layer, method, allow_elements=True)
    assert inner is not None and name is not None  # model is a module
    return inner, name


def split_cam(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    layer: str | None = None,
    alpha: float | str | dict[str, float] = "auto",
    stream: str = "g",
    sign: str | None = None,
    maxpool: str = "convex",
    stabilizer: str = "scale",
    input_split: str = "relu",
    relu_attributions: bool = False,
    nonlinear: str = "error",
    output: Any = None,
    reuse_capture: bool = True,
) -> Tensor:
    """SplitCAM (paper eqs. 6-7): split-pair sensitivities times activations, summed over channels.

    Options: ``layer`` (module name; default the last convolution that runs), ``alpha`` ("auto",
    or a float),
    ``stream`` ("g" | "h"), ``sign`` (None | "+" | "-"), ``maxpool`` ("convex" | "wta"),
    ``stabilizer`` ("scale" | "shift" | "none"), ``input_split`` ("relu" | "half"),
    ``relu_attributions`` (False), ``nonlinear`` ("error" | "freeze"), ``output`` (an index,
    key or callable picking the logits of a structured output), ``reuse_capture`` (True; False
    for a forward that branches on non-module Python state). Returns ``(B, 1, h, w)`` at the
    layer's resolution.
    """
    from .splitcam import SplitCAM

    explainer = SplitCAM(
        model,
        _cam_layer(model, layer, "SplitCAM", inputs)[1],
        alpha=alpha,
        stream=stream,
        sign=sign,
        maxpool=maxpool,
        stabilizer=stabilizer,
        input_split=input_split,
        nonlinear=nonlinear,
        output=output,
        reuse_capture=reuse_capture,
    )
    return explainer.attribute(inputs, target=targets, relu_attributions=relu_attributions)


def split_grad(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    layer: str | None = None,
    alpha: float | str | dict[str, float] = "auto",
    stream: str = "g",
    sign: str | None = None,
    maxpool: str = "convex",
    stabilizer: str = "scale",
    input_split: str = "relu",
    nonlinear: str = "error",
    output: Any = None,
    reuse_capture: bool = True,
) -> Tensor:
    """SplitGrad (paper section 4.1): channel mean of a shifted split-pair sensitivity.

    Options: ``layer`` (module name; default None, the input), ``alpha`` ("auto", or a float),
    ``stream``, ``sign``, ``maxpool``, ``stabilizer``, ``input_split``, ``nonlinear``,
    ``output``, ``reuse_capture`` as for SplitCAM. Returns
    ``(B, 1, h, w)``; at the input the channel mean ``(B, 1, H, W)`` (the paper's map).
    """
    from .splitcam import SplitGrad

    explainer = SplitGrad(
        model,
        layer,
        alpha=alpha,
        stream=stream,
        sign=sign,
        maxpool=maxpool,
        stabilizer=stabilizer,
        input_split=input_split,
        nonlinear=nonlinear,
        output=output,
        reuse_capture=reuse_capture,
    )
    out = explainer.attribute(inputs, target=targets)
    return out.mean(dim=1, keepdim=True) if explainer.layer_name == "input" else out


def _captum_cam(cls_name: str) -> Callable[..., Tensor]:
    def explain(
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        *,
        layer: str | None = None,
        relu_attributions: bool = True,
    ) -> Tensor:
        if cls_name == "LayerGradCam":
            from captum.attr import LayerGradCam as cls
        else:
            from . import cams

            cls = getattr(cams, cls_name)
        inner, name = _cam_layer(model, layer, cls_name, inputs)
        base, element = split_element(inner, name)
        if element is not None and cls_name == "LayerGradCam":
            raise ValueError(
                f"GradCAM: layer {name!r} is an element of the tuple output of {base!r}, which "
                "Captum's LayerGradCam cannot select; use LayerCAM, GradCAMPlusPlus or "
                f"SplitCAM with layer={name!r}."
            )
        items = input_tensors(inputs, cls_name, floating=False)
        target = checks.targets(targets, items[0].shape[0], cls_name)
        # Captum's LayerGradCam reports a class index past the output as a gather error
        forward = checked_forward(model, target, cls_name) if cls_name == "LayerGradCam" else model
        # ours take the name (and so "NAME:i"), Captum's the module
        explainer: Any = cls(forward, inner.get_submodule(name) if element is None else name)
        # eval semantics here too: Captum's LayerGradCam would run a training-mode model in
        # training mode (stacklevel 4: the caller of this function)
        with eval_context(model, stacklevel=4), dtype_errors(items, owner_module(model),
                                                             cls_name):
            return explainer.attribute(inputs, target=target,
                                       relu_attributions=relu_attributions)

    return explain


layer_cam = _captum_cam("LayerCAM")
layer_cam.__name__ = layer_cam.__qualname__ = "layer_cam"
layer_cam.__doc__ = """LayerCAM (Jiang et al. 2021): ReLU(sum_c ReLU(gradient) * activation).

    Options: ``layer`` (module name; default the last convolution that runs), ``relu_attributions``
    (True, the original method). Returns ``(B, 1, h, w)`` at the layer's resolution.
    """

grad_cam = _captum_cam("LayerGradCam")
grad_cam.__name__ = grad_cam.__qualname__ = "grad_cam"
grad_cam.__doc__ = """Grad-CAM (Selvaraju et al. 2017), Captum's LayerGradCam.

    Options: ``layer`` (module name; default the last convolution that runs), ``relu_attributions``
    (True, the original method; Captum's own default is False). Returns ``(B, 1, h, w)``.
    """

grad_cam_pp = _captum_cam("GradCAMPlusPlus")
grad_cam_pp.__name__ = grad_cam_pp.__qualname__ = "grad_cam_pp"
grad_cam_pp.__doc__ = """Grad-CAM++ (Chattopadhay et al. 2018): pixel-weighted positive gradients.

    Options: ``layer`` (module name; default the last convolution that runs), ``relu_attributions``
    (True, the original method). Returns ``(B, 1, h, w)`` at the layer's resolution.
    """


@hookimpl
def splitxai_explainers() -> dict[str, Callable[..., Tensor]]:
    """The explainers of the Captum adapter: SplitCAM, SplitGrad and the CAM baselines."""
    return {
        "SplitCAM": split_cam,
        "SplitGrad": split_grad,
        "LayerCAM": layer_cam,
        "GradCAM": grad_cam,
        "GradCAMPlusPlus": grad_cam_pp,
    }
