"""``explain``: one Quantus ``explain_func`` for every method the plugins offer.

Usage with Quantus::

    import quantus
    import quantus_adapters

    metric = quantus.PixelFlipping(features_in_step=16, return_auc_per_sample=True)
    scores = metric(model=model, x_batch=x, y_batch=y, device="cpu",
                    explain_func=quantus_adapters.explain,
                    explain_func_kwargs={"method": "SplitCAM", "layer": "layer3.2.conv2"})

The method runs once per batch (one batched call, no loop over rows), on the device of the
model, without caching anything between calls (Quantus's randomisation metrics pass mutated
copies of the model). The model is left as it was: training flags, ``requires_grad`` flags,
``.grad`` and hooks are restored after the call, also when the method raises; a model in
training mode is explained with eval semantics and its buffers are left bit for bit as they
were (:func:`core.eval_semantics`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.explaining import eval_semantics
from quantus_adapters.registry import method_info

__all__ = ["QUANTUS_KEYWORDS", "UPSAMPLE_MODES", "ConstantExplanationError", "explain"]

#: keywords that Quantus (or a Quantus ``explain_func_kwargs`` written for
#: ``quantus.explain``) passes and that are not method options; see :func:`explain`.
QUANTUS_KEYWORDS = frozenset(
    {"device", "softmax", "channel_first", "xai_lib", "xai_lib_kwargs", "reduce_axes",
     "keepdims"}
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
    upsample: str = "bilinear",
    **kwargs: Any,
) -> np.ndarray:
    """Explain a batch with a method from any installed plugin; a Quantus ``explain_func``.

    Parameters
    ----------
    model: torch.nn.Module
        The model to explain (or a Quantus ``ModelInterface`` wrapping one). It is not moved,
        copied or modified; the inputs are moved to the device (and floating dtype) of its
        parameters.
    inputs: numpy.ndarray or torch.Tensor
        The batch, (B, C, H, W) channel first (or (B, H, W, C) with ``channel_first=False``).
    targets: numpy.ndarray, torch.Tensor or int
        The class explained for each row, shape (B,) (an int is used for every row).
    method: str, optional
        The method name, one of :func:`quantus_adapters.available_methods` (default
        ``"SplitCAM"``). Quantus's ``evaluate`` passes it as a keyword.
    upsample: str, optional
        How a map at another resolution (a layer map) is resized to the input's: a mode of
        ``torch.nn.functional.interpolate`` out of :data:`UPSAMPLE_MODES`. Default
        ``"bilinear"`` (``align_corners=False``).
    **kwargs:
        Method options (e.g. ``layer``, ``alpha``, ``stream``, ``sign``; see the method's
        docstring), plus the keywords Quantus injects or a Quantus ``explain_func_kwargs``
        may contain, which are not method options:

        - ``device``: accepted; the model's own device is used, as the model is not moved
          (``device`` is used only for a model without parameters or buffers);
        - ``channel_first``: ``False`` means (B, H, W, C) inputs, the result is then
          (B, H, W, 1); ``None`` or ``True`` mean channel first;
        - ``softmax``: only ``False`` (or ``None``); the methods explain the model's output
          (the logits);
        - ``xai_lib_kwargs``: a dict merged into the method options;
        - ``xai_lib``, ``reduce_axes``, ``keepdims``: ignored (the result always has one
          channel, which Quantus expands as needed).

    Returns
    -------
    numpy.ndarray
        float32 (B, 1, H, W): the map summed over channels and resized to the input.

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
    device_hint = kwargs.pop("device", None)
    channel_first = kwargs.pop("channel_first", None)
    softmax = kwargs.pop("softmax", None)
    lib_kwargs = kwargs.pop("xai_lib_kwargs", None) or {}
    for name in ("xai_lib", "reduce_axes", "keepdims"):
        kwargs.pop(name, None)
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
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample={upsample!r} is not one of {UPSAMPLE_MODES}")

    if not isinstance(model, nn.Module) and callable(getattr(model, "get_model", None)):
        model = model.get_model()  # a Quantus ModelInterface wrapper
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    info = method_info(method)
    _check_options(method, info.function, options)
    device, dtype = _model_device_dtype(model, device_hint)
    x = _as_input_tensor(inputs, channel_first, device, dtype)
    y = _as_targets(targets, x.shape[0], device)

    with _model_left_unchanged(model, method), eval_semantics(model, stacklevel=4):
        result = info.function(model, x, y, **options)
    maps = _to_maps(result, method, x.shape, upsample)
    _check_not_constant(maps, method, info.function, options)
    out = maps.detach().to("cpu", torch.float32).numpy()
    if channel_first is False:
        out = np.moveaxis(out, 1, -1)
    return np.ascontiguousarray(out, dtype=np.float32)


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
        raise TypeError(
            f"method {method!r} does not accept the option(s) {unknown}; "
            f"it accepts: {', '.join(accepted) or '(no options)'}"
        )


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
    return x.to(device=device, dtype=dtype).contiguous()


def _as_targets(targets: Any, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(targets, torch.Tensor):
        y = targets.detach().reshape(-1)
    else:
        y = torch.as_tensor(np.asarray(targets)).reshape(-1)
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise ValueError("targets must be class indices (integers), got fractional values")
    elif y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"targets must be class indices (integers), got dtype {y.dtype}")
    if y.numel() == 1 and batch != 1:
        y = y.expand(batch)
    if y.numel() != batch:
        raise ValueError(f"got {y.numel()} targets for a batch of {batch} inputs")
    return y.to(device=device, dtype=torch.long).contiguous()


def _to_maps(
    result: Any, method: str, input_shape: torch.Size, upsample: str
) -> torch.Tensor:
    """Sum over channels and resize a method's output to (B, 1, H, W)."""
    if isinstance(result, tuple) and len(result) == 1:  # Captum's one-input convention
        result = result[0]
    if not isinstance(result, torch.Tensor):
        raise TypeError(
            f"method {method!r} returned {type(result).__name__}, expected a torch.Tensor "
            "(B, 1, h, w) or (B, C, H, W)"
        )
    batch, _, height, width = input_shape
    maps = result.detach()
    if maps.ndim == 3:
        maps = maps.unsqueeze(1)
    if maps.ndim != 4 or maps.shape[0] != batch:
        raise ValueError(
            f"method {method!r} returned shape {tuple(result.shape)}, expected (B, 1, h, w) "
            f"or (B, C, H, W) with B = {batch}"
        )
    maps = maps.to(torch.float32).sum(dim=1, keepdim=True)
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
            f"method {method!r} at layer {layer} produced non-finite values (NaN or inf); "
            "try another layer, another alpha, or a float64 model"
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
