"""``explain``: one Quantus ``explain_func`` for every method the plugins offer.

Usage with Quantus::

    import quantus
    import quantus_adapters

    metric = quantus.PixelFlipping(features_in_step=16, return_auc_per_sample=True)
    scores = metric(model=model, x_batch=x, y_batch=y, device="cpu",
                    explain_func=quantus_adapters.explain,
                    explain_func_kwargs={"method": "SplitCAM", "layer": "layer3.2.conv2"})

The method runs once per batch (one batched call, no loop over rows), without caching
anything between calls (Quantus's randomisation metrics pass mutated copies of the model).
Quantus 0.6's own ``quantus.explain`` is the model for the conventions: ``device=`` moves the
model and the inputs there, the model ends in eval mode, ``reduce_axes``/``keepdims`` reduce
the map, and Quantus's method names (``"Gradient"``, ``"GradCam"``, ...) are accepted where
a plugin method means the same. Apart from the device and the eval mode (Quantus's own
changes), the model is left as it was: ``requires_grad`` flags, ``.grad`` and hooks are
restored after the call, also when the method raises.
Work runs with eval semantics: a model's buffers are left bit for bit as they were
(:func:`core.eval_semantics`).
"""

from __future__ import annotations

import ast
import copy
import inspect
import operator
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core import checks
from core.errors import precision_advice
from core.explaining import eval_semantics, model_lock
from quantus_adapters.registry import UnknownMethodError, available_methods, method_info

__all__ = [
    "QUANTUS_ALIASES", "QUANTUS_KEYWORDS", "QUANTUS_ONLY_METHODS", "UPSAMPLE_MODES",
    "ConstantExplanationError", "explain",
]

#: keywords that Quantus (or a Quantus ``explain_func_kwargs`` written for
#: ``quantus.explain``) passes and that are not method options; see :func:`explain`.
QUANTUS_KEYWORDS = frozenset(
    {"device", "softmax", "channel_first", "xai_lib", "xai_lib_kwargs", "reduce_axes",
     "keepdims", "interpolate", "interpolate_mode"}
)

#: Quantus 0.6 method names (``quantus.explain``) -> (plugin method, options) of the same
#: meaning; used only when no plugin offers the Quantus name itself. Quantus's "Gradient" is
#: Captum's Saliency with ``abs=False``; "GradCam"/"LayerGradCam" are Captum's LayerGradCam
#: with its default ``relu_attributions=False`` (signed maps; splitxai's "GradCAM" keeps
#: Grad-CAM's ReLU by default).
QUANTUS_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "Gradient": ("Saliency", {"abs": False}),
    "GradCam": ("GradCAM", {"relu_attributions": False}),
    "LayerGradCam": ("GradCAM", {"relu_attributions": False}),
}

#: ``quantus.explain``'s (Quantus 0.6, Captum path) method names that no splitxai method
#: stands for; asking for one is one ``UnknownMethodError`` line that points to
#: ``quantus.explain``
QUANTUS_ONLY_METHODS = frozenset(
    {"DeepLiftShap", "FeaturePermutation", "Lime", "KernelShap", "GuidedGradCam",
     "LayerConductance", "LayerActivation", "InternalInfluence", "LayerGradientXActivation",
     "Control Var. Sobel Filter", "Control Var. Constant", "Control Var. Random Uniform"}
)

#: the modes of ``torch.nn.functional.interpolate`` accepted for ``upsample``
UPSAMPLE_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")


class ConstantExplanationError(ValueError):
    """The method produced a constant (or non-finite) map, which Quantus cannot rank."""


def explain(
    model: nn.Module,
    inputs: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor | int,
    method: str = "SplitCAM",
    *,
    upsample: str | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Explain a batch with a method from any installed plugin; a Quantus ``explain_func``.

    Parameters
    ----------
    model: torch.nn.Module
        The model to explain (or a Quantus ``ModelInterface`` wrapping one). As in
        ``quantus.explain``: moved to ``device`` when one is given, and in eval mode when the
        call returns. The inputs go to the model's device and floating dtype.
    inputs: numpy.ndarray or torch.Tensor
        The batch, (B, C, H, W) channel first (or (B, H, W, C) with ``channel_first=False``).
    targets: numpy.ndarray, torch.Tensor or int
        The class explained for each row, shape (B,) (an int is used for every row).
    method: str, optional
        The method name, one of :func:`quantus_adapters.available_methods` (default
        ``"SplitCAM"``), or a Quantus name of :data:`QUANTUS_ALIASES`. Quantus's
        ``evaluate`` passes it as a keyword.
    upsample: str, optional
        How a map at another resolution (a layer map) is resized to the input's: a mode of
        ``torch.nn.functional.interpolate`` out of :data:`UPSAMPLE_MODES`. Default
        ``"bilinear"`` (``align_corners=False``), or ``"nearest"`` when Quantus's
        ``interpolate`` is given (below).
    **kwargs:
        Method options (e.g. ``layer``, ``alpha``, ``stream``, ``sign``; see the method's
        docstring), plus the keywords Quantus injects or a Quantus ``explain_func_kwargs``
        may contain, which are not method options:

        - ``device``: as ``quantus.explain``, ``model.to(device)`` and the inputs on that
          device; None keeps the model where it is;
        - ``channel_first``: ``False`` means (B, H, W, C) inputs, the result is then
          channel-last too; ``None`` or ``True`` mean channel first;
        - ``softmax``: only ``False`` (or ``None``); the methods explain the model's output
          (the logits); with ``False``, as in ``quantus.explain``, a model whose last module
          (of ``model.modules()``) is an ``nn.Softmax`` is explained without it (a copy with
          ``nn.Identity`` in its place);
        - ``reduce_axes`` (default: the channels) and ``keepdims`` (default True): the axes
          summed, as in ``quantus.explain``, counted in the inputs' layout (channel-last with
          ``channel_first=False``); ``()`` keeps every channel the method returns; axis 0
          (the batch) is refused;
        - ``interpolate`` and ``interpolate_mode``: Quantus's resizing of a layer map
          (``quantus.explain`` resizes with Captum's ``LayerAttribution.interpolate``,
          ``"nearest"`` unless ``interpolate_mode`` names another mode): ``interpolate`` must
          be the inputs' (H, W), as the map is always resized to the input; with it the mode
          defaults to ``"nearest"``; ``interpolate_mode`` is ``upsample`` (give one of them);
        - ``gc_layer``: Quantus's layer keyword (``"model.layer3"`` or ``"layer3"``), taken as
          ``layer``; a ``layer`` string that is no module name may be the expression
          ``quantus.explain`` evaluates (``"model._modules.get('conv_2')"``,
          ``"model.features[3]"``, ``"list(model.named_modules())[3][1]"``): attributes,
          constant indices, ``.get(name)`` and ``list(model.named_modules())`` of ``model``
          are followed (nothing else is evaluated) to a submodule of the model;
        - ``xai_lib_kwargs``: a dict merged into the method options;
        - ``xai_lib``: ignored.

    Returns
    -------
    numpy.ndarray
        The map resized to the input and reduced over ``reduce_axes``: (B, 1, H, W) by
        default. float32, or float64 for a float64 model (resizing and reducing run in the
        model's dtype, then the result is cast); Occlusion gives float32 (Captum divides
        by its window counts in float32).

    Raises
    ------
    UnknownMethodError
        ``method`` is not offered by any plugin (the message lists the available ones).
    MethodClashError
        Two plugins offer ``method``.
    TypeError
        An option that the method does not accept.
    ConstantExplanationError
        The batch's maps are constant (which Quantus rejects) or not finite.
    """
    device = kwargs.pop("device", None)
    channel_first = kwargs.pop("channel_first", None)
    softmax = kwargs.pop("softmax", None)
    lib_kwargs = kwargs.pop("xai_lib_kwargs", None) or {}
    given_axes = kwargs.pop("reduce_axes", None)
    reduce_axes = (1,) if given_axes is None else _check_reduce_axes(given_axes)
    keepdims = bool(kwargs.pop("keepdims", True))
    kwargs.pop("xai_lib", None)
    interpolate = kwargs.pop("interpolate", None)
    upsample = _upsample_mode(upsample, interpolate, kwargs.pop("interpolate_mode", None))
    if "gc_layer" in kwargs:
        if "layer" in kwargs:
            raise TypeError("give the layer once: 'layer' or Quantus's 'gc_layer', not both")
        kwargs["layer"] = kwargs.pop("gc_layer")
    if softmax:
        raise ValueError(
            "softmax=True is not supported: splitxai methods explain the model's output "
            "(the logits) as it is; remove 'softmax' from explain_func_kwargs"
        )
    if not isinstance(lib_kwargs, dict):
        raise TypeError(f"xai_lib_kwargs must be a dict, got {type(lib_kwargs).__name__}")
    both = sorted(set(lib_kwargs) & set(kwargs))
    if both:
        raise TypeError(f"option(s) {both} given both directly and in xai_lib_kwargs")
    options = {**lib_kwargs, **kwargs}

    if not isinstance(model, nn.Module) and callable(getattr(model, "get_model", None)):
        model = model.get_model()  # a Quantus ModelInterface wrapper
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(options.get("layer"), str):
        options["layer"] = _quantus_layer(model, options["layer"])
    method, options = _resolve_alias(method, options)
    info = _method_info(method)
    options = _quantus_baseline(method, info.function, options)
    _check_options(method, info.function, options)
    with model_lock(model):  # one call on a model at a time: methods put hooks on it
        if device is not None:
            model.to(device)  # as quantus.explain does
        model.eval()  # before explaining, as quantus.explain does
        model_device, dtype = _model_device_dtype(model, device)
        x = _as_input_tensor(inputs, channel_first, model_device, dtype)
        checks.batch_size(x, "inputs", who=method)  # before the targets: 0 of them fit 0 rows
        checks.finite("inputs", x, who=method)  # every method: a baseline's map of NaN is no map
        _check_interpolate(interpolate, x.shape, channel_first)
        y = _as_targets(targets, x.shape[0], model_device)
        target = model
        if softmax is False:  # quantus.explain's softmax=False: explain without a last Softmax
            target, options = _without_last_softmax(model, options)

        try:
            with _model_left_unchanged(target, method), eval_semantics(target, stacklevel=4):
                result = info.function(target, x, y, **options)
        finally:
            model.eval()  # quantus.explain leaves the model in eval mode; Quantus checks it
    maps = _to_maps(result, method, x.shape, upsample, _layer_label(target, options))
    if reduce_axes:
        if channel_first is False and given_axes is not None:  # axes of (B, H, W, C)
            reduce_axes = tuple(_CHANNEL_LAST_AXES[a % 4] for a in reduce_axes)
        maps = maps.sum(dim=reduce_axes, keepdim=keepdims)
    _check_not_constant(maps, method, info.function, options)
    out_dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
    out = maps.detach().to("cpu", out_dtype).numpy()
    if channel_first is False and maps.ndim == 4:
        out = np.moveaxis(out, 1, -1)
    return np.ascontiguousarray(out)


#: axis of a channel-last (B, H, W, C) map -> the same axis of the channel-first map
_CHANNEL_LAST_AXES = {1: 2, 2: 3, 3: 1}


def _upsample_mode(upsample: str | None, interpolate: Any, interpolate_mode: Any) -> str:
    """The resizing mode: ``upsample``, or Quantus's ``interpolate_mode``; by default
    ``"bilinear"``, or ``"nearest"`` (Captum's, what ``quantus.explain`` resizes with) when
    Quantus's ``interpolate`` is given."""
    if interpolate_mode is not None:
        if upsample is not None and upsample != interpolate_mode:
            raise TypeError(
                f"give the resizing mode once: upsample={upsample!r} or Quantus's "
                f"interpolate_mode={interpolate_mode!r}, not both"
            )
        upsample = interpolate_mode
    if upsample is None:
        upsample = "bilinear" if interpolate is None else "nearest"
    checks.option("upsample", upsample, UPSAMPLE_MODES)
    return upsample


def _check_interpolate(interpolate: Any, shape: torch.Size, channel_first: bool | None) -> None:
    """Quantus's ``interpolate`` (the size a layer map is resized to) must be the inputs'
    (H, W): every map is resized to the input, as Quantus's metrics need."""
    if interpolate is None:
        return
    size = tuple(shape[-2:])
    given = (interpolate, interpolate) if isinstance(interpolate, int) else interpolate
    try:
        given = tuple(int(s) for s in given)
    except (TypeError, ValueError):
        given = None
    if given != size:
        layout = "(H, W) of channel-last inputs" if channel_first is False else "(H, W)"
        raise ValueError(
            f"interpolate={interpolate!r} is not the inputs' size {layout} = {size}; the map "
            f"is always resized to the inputs (Quantus's metrics need that): pass "
            f"interpolate={size} or leave it out"
        )


_MODULE_LISTS = ("modules", "named_modules", "children", "named_children")


def _quantus_layer(model: nn.Module, layer: str) -> str | nn.Module:
    """A ``layer`` string as ``quantus.explain`` means it: a module name (``"model."`` may
    prefix it), or the Python expression that Quantus evaluates with ``model`` bound, e.g.
    ``"model._modules.get('conv_2')"`` or ``"model.features[3]"``. The expression is followed
    step by step (attributes, constant indices, ``.get(constant)``, ``list(...)`` of
    ``model.named_modules()`` and similar), never evaluated; a result that is no submodule of
    ``model`` leaves the string to the method (which names the module names)."""
    names = {name for name, _ in model.named_modules()}
    if layer in names:
        return layer
    stripped = layer.removeprefix("model.")
    if stripped in names:
        return stripped
    try:
        found = _follow(ast.parse(layer, mode="eval").body, model)
    except Exception:  # noqa: BLE001 - anything not followable is not Quantus's expression
        return stripped
    if isinstance(found, nn.Module) and any(found is m for m in model.modules()):
        return found
    return stripped


def _follow(node: ast.AST, model: nn.Module) -> Any:
    """The value of a Quantus layer expression over ``model`` (see :func:`_quantus_layer`)."""
    if isinstance(node, ast.Name) and node.id == "model":
        return model
    if isinstance(node, ast.Attribute) and not node.attr.startswith("__"):
        return getattr(_follow(node.value, model), node.attr)
    if isinstance(node, ast.Subscript):
        return _follow(node.value, model)[ast.literal_eval(node.slice)]
    if isinstance(node, ast.Call) and not node.keywords:
        func = node.func
        if isinstance(func, ast.Name) and func.id == "list" and len(node.args) == 1:
            return list(_follow(node.args[0], model))
        if isinstance(func, ast.Attribute) and func.attr == "get" and len(node.args) == 1:
            return _follow(func.value, model).get(ast.literal_eval(node.args[0]))
        if isinstance(func, ast.Attribute) and func.attr in _MODULE_LISTS and not node.args:
            owner = _follow(func.value, model)
            if isinstance(owner, nn.Module):
                return getattr(owner, func.attr)()
    raise ValueError(f"not a Quantus layer expression: {ast.dump(node)}")


def _without_last_softmax(
    model: nn.Module, options: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    """``quantus.explain(softmax=False)``: when the last of ``model.modules()`` is an
    ``nn.Softmax``, Quantus explains a copy of the model with that module replaced by
    ``nn.Identity`` (the logits); the same here. A ``layer`` given as a module is taken as the
    copy's module of the same name. Otherwise the model itself, unchanged."""
    named = list(model.named_modules())
    name, last = named[-1]
    if not name or not isinstance(last, nn.Softmax):
        return model, options
    layer = options.get("layer")
    layer_name = None
    if isinstance(layer, nn.Module):
        layer_name = next((n for n, m in named if m is layer), None)
    logits_model = copy.deepcopy(model)
    parent_name, _, child = name.rpartition(".")
    setattr(logits_model.get_submodule(parent_name), child, nn.Identity())
    if layer_name is not None:
        options = {**options, "layer": logits_model.get_submodule(layer_name)}
    return logits_model, options


def _method_info(method: str) -> Any:
    """:func:`method_info`, with a Quantus-only method name refused in Quantus's words."""
    try:
        return method_info(method)
    except UnknownMethodError as exc:
        if method not in QUANTUS_ONLY_METHODS:
            raise
        raise UnknownMethodError(
            f"method {method!r} is a method of quantus.explain that splitxai does not offer; "
            f"for it pass explain_func=quantus.explain (with method={method!r}), or choose one "
            f"of splitxai's: {', '.join(sorted(available_methods()))}"
        ) from exc


def _resolve_alias(method: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Map a Quantus method name to the plugin method of the same meaning (if no plugin has it)."""
    if method not in QUANTUS_ALIASES or method in available_methods():
        return method, options
    target, fixed = QUANTUS_ALIASES[method]
    clash = sorted(k for k in fixed if k in options and options[k] != fixed[k])
    if clash:
        raise TypeError(
            f"method {method!r} is Quantus's name for {target!r} with {fixed}; the option(s) "
            f"{clash} contradict it (use method={target!r} to choose them)"
        )
    return target, {**options, **fixed}


def _quantus_baseline(method: str, fn: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Quantus's ``baseline`` (what ``quantus.explain`` reads for Integrated Gradients,
    Gradient SHAP and DeepLift) as Captum's ``baselines`` for a method that takes that."""
    if "baseline" not in options:
        return options
    try:
        takes = "baselines" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return options
    if not takes:
        return options
    if "baselines" in options:
        raise TypeError(
            f"method {method!r}: baseline (Quantus's name) and baselines (Captum's) are both "
            "given; pass one"
        )
    options = dict(options)
    options["baselines"] = options.pop("baseline")
    return options


def _check_reduce_axes(reduce_axes: Any) -> tuple[int, ...]:
    """Quantus's ``reduce_axes``: a sequence of int axes of the (B, C, H, W) map (a tuple,
    list or NumPy array, as Quantus takes), never the batch."""
    try:
        if isinstance(reduce_axes, (str, bytes)):
            raise TypeError
        axes = tuple(operator.index(a) for a in reduce_axes)
    except TypeError:
        raise TypeError(
            f"reduce_axes={reduce_axes!r} must be a tuple of int axes of the (B, C, H, W) map, "
            "e.g. (1,) for the channels (the default) or () for none"
        ) from None
    if any(a % 4 == 0 for a in axes):
        raise ValueError(
            f"reduce_axes={reduce_axes!r} includes axis 0, the batch; Quantus forbids reducing "
            "over the batch (use (1,) for the channels, the default)"
        )
    if any(not -4 <= a <= 3 for a in axes):
        raise ValueError(f"reduce_axes={reduce_axes!r}: the map (B, C, H, W) has axes 1..3")
    return axes


def _check_options(method: str, fn: Any, options: dict[str, Any]) -> None:
    """Raise a TypeError naming the options that ``fn`` does not take."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        name for i, (name, p) in enumerate(params.items())
        if i >= 3 and p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                 inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        hints = sorted({_QUANTUS_HINTS[k] for k in unknown if k in _QUANTUS_HINTS})
        raise TypeError(
            f"method {method!r} does not accept the option(s) {unknown}; "
            f"it accepts: {', '.join(accepted) or '(no options)'}"
            + "".join(f"; {hint}" for hint in hints)
        )


_METRIC_OPTION = (
    "normalise, abs, pos_only and neg_only are no options of quantus.explain (Quantus 0.6 "
    "ignores them there): normalising and taking the absolute value are the metric's options "
    "(e.g. quantus.PixelFlipping(normalise=True, abs=True)); remove them from "
    "explain_func_kwargs"
)
_ZENNIT_PATH = (
    "attributor, composite, canonizer and their _kwargs belong to quantus.explain's Zennit "
    "path (xai_lib='zennit'), which splitxai does not run: pass explain_func=quantus.explain "
    "for it, or use method='LRP' (Zennit, gamma rule) or 'SplitLRP'"
)
#: Quantus keywords that are no method option -> what to do instead (in the TypeError)
_QUANTUS_HINTS = {
    **dict.fromkeys(("normalise", "normalize", "abs", "pos_only", "neg_only"), _METRIC_OPTION),
    **dict.fromkeys(("attributor", "composite", "canonizer", "attributor_kwargs",
                     "composite_kwargs", "canonizer_kwargs"), _ZENNIT_PATH),
}


def _model_device_dtype(
    model: nn.Module, device_hint: Any
) -> tuple[torch.device, torch.dtype]:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device, torch.get_default_dtype()
    return torch.device(device_hint or "cpu"), torch.get_default_dtype()


def _as_input_tensor(
    inputs: Any, channel_first: bool | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        x = inputs.detach()
    elif isinstance(inputs, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(inputs))
    else:
        raise TypeError(
            f"inputs must be a numpy array or a torch tensor, got {type(inputs).__name__}"
        )
    if x.ndim != 4:
        raise ValueError(
            f"inputs must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}"
        )
    if channel_first is False:
        x = x.permute(0, 3, 1, 2)
    if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int32, torch.int64)):
        raise TypeError(f"inputs must be real numbers, got dtype {x.dtype}")
    x = x.to(device=device, dtype=dtype).contiguous()
    if x.is_inference() and not torch.is_inference_mode_enabled():
        x = x.clone()  # made under inference_mode: a copy that autograd can use
    return x


def _as_targets(targets: Any, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(targets, np.ndarray):
        targets = torch.from_numpy(np.ascontiguousarray(targets))
    return checks.targets(targets, batch, whole_floats=True).to(device).contiguous()


def _layer_label(model: nn.Module, options: dict[str, Any]) -> str | None:
    """The ``layer`` option as a name for messages (a submodule by its name), or None."""
    layer = options.get("layer")
    if layer is None or isinstance(layer, str):
        return layer
    for name, module in model.named_modules():
        if module is layer:
            return name
    return type(layer).__name__


def _to_maps(
    result: Any, method: str, input_shape: torch.Size, upsample: str,
    layer: str | None = None,
) -> torch.Tensor:
    """A method's output as (B, C, H, W) at the input's resolution, in its own dtype.

    A NumPy array is accepted as a tensor; a (B, h, w) map gets a channel axis; a channel-last
    (B, H, W, C) return is refused (summing it over axis 1 would mix rows of pixels). A result
    with fewer than 3 axes at a given ``layer`` is refused naming the layer: its output has no
    spatial axes.
    """
    if isinstance(result, tuple) and len(result) == 1:  # Captum's one-input convention
        result = result[0]
    if isinstance(result, np.ndarray):
        result = torch.from_numpy(np.ascontiguousarray(result))
    if not isinstance(result, torch.Tensor):
        raise TypeError(
            f"method {method!r} returned {type(result).__name__}, expected a torch.Tensor or "
            "a numpy.ndarray (B, 1, h, w) or (B, C, H, W)"
        )
    batch, channels, height, width = input_shape
    maps = result.detach()
    if layer not in (None, "", "input") and maps.ndim < 3:
        raise ValueError(
            f"{method}: layer={layer!r} gives a map of shape {tuple(result.shape)}, without "
            "spatial axes; a map needs a layer with a (B, C, h, w) output (a convolution, "
            "pooling or activation module), pass one of those as layer."
        )
    if maps.ndim == 3:
        maps = maps.unsqueeze(1)
    if maps.ndim != 4 or maps.shape[0] != batch:
        raise ValueError(
            f"method {method!r} returned shape {tuple(result.shape)}, expected (B, 1, h, w) "
            f"or (B, C, H, W) with B = {batch}"
        )
    if maps.shape[1:3] == (height, width) and maps.shape[-2:] != (height, width) \
            and maps.shape[3] in (1, channels):
        raise ValueError(
            f"method {method!r} returned shape {tuple(result.shape)}, which is channel-last "
            f"(B, H, W, C) for inputs {tuple(input_shape)}; a method must return channel "
            "first, (B, C, H, W) or (B, 1, h, w)"
        )
    if not maps.is_floating_point():
        maps = maps.to(torch.get_default_dtype())
    if maps.shape[-2:] != (height, width):
        kwargs = {"align_corners": False} if upsample in ("bilinear", "bicubic") else {}
        maps = F.interpolate(maps, size=(height, width), mode=upsample, **kwargs)
    return maps


def _layer_of(fn: Any, options: dict[str, Any]) -> str:
    if options.get("layer") is not None:
        return repr(options["layer"])
    try:
        param = inspect.signature(fn).parameters.get("layer")
    except (TypeError, ValueError):
        param = None
    if param is not None and param.default not in (inspect.Parameter.empty, None):
        return repr(param.default)
    return "(the method's default)"


def _check_not_constant(
    maps: torch.Tensor, method: str, fn: Any, options: dict[str, Any]
) -> None:
    layer = _layer_of(fn, options)
    if not torch.isfinite(maps).all():
        raise ConstantExplanationError(
            f"method {method!r} at layer {layer} produced non-finite values (NaN or inf). "
            + precision_advice(maps.dtype, "another layer", "another alpha")
        )
    if maps.numel() > 1 and bool((maps == maps.reshape(-1)[0]).all()):
        value = float(maps.reshape(-1)[0])
        raise ConstantExplanationError(
            f"method {method!r} at layer {layer} produced a constant map (every value is "
            f"{value:g}) for the whole batch, which Quantus rejects because its metrics rank "
            "pixels; try another layer (or another alpha / stream / sign), or check that the "
            "model's activations at that layer are not all zero for these inputs"
        )


_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_load_state_dict_pre_hooks",
)


@contextmanager
def _model_left_unchanged(model: nn.Module, method: str) -> Iterator[None]:
    """Restore training flags, ``requires_grad``, ``.grad`` and hooks after a method."""
    modules = list(model.modules())
    training = [m.training for m in modules]
    hooks = [{name: set(getattr(m, name, {})) for name in _HOOK_DICTS} for m in modules]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    try:
        yield
    finally:
        changed = set()
        for module, flag, before in zip(modules, training, hooks, strict=True):
            if module.training != flag:
                module.training = flag
                changed.add("training flag")
            for name, keys in before.items():
                current = getattr(module, name, None)
                if current is None:
                    continue
                for key in set(current) - keys:
                    del current[key]
                    changed.add("hooks")
                    for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(module, extra, {}).pop(key, None)
        for param, flag, grad in zip(params, requires_grad, grads, strict=True):
            if param.requires_grad != flag:
                param.requires_grad_(flag)
                changed.add("requires_grad")
            if grad is None and param.grad is not None:
                param.grad = None
                changed.add(".grad")
            elif grad is not None and (param.grad is None or not torch.equal(param.grad, grad)):
                param.grad = grad
                changed.add(".grad")
        if changed:
            warnings.warn(
                f"method {method!r} changed the model's {', '.join(sorted(changed))}; "
                "splitxai restored it (report this to the plugin's authors)",
                RuntimeWarning,
                stacklevel=4,
            )
