"""The baseline methods of the paper's evaluation, as a splitxai plugin.

Registered through the entry point ``baselines = "quantus_adapters.baselines"`` of group
``"splitxai"``, like any third-party plugin. Captum methods use Captum's defaults, except
Integrated Gradients, which uses ``quantus.explain``'s (10 trapezoid steps); where Captum has
no default (the baselines of Gradient SHAP, the window of Occlusion) the choice is stated in
the method's docstring. ``perturbations_per_eval`` of the perturbation methods only
batches the model calls: it does not change the result. Captum is imported when a Captum
method runs, so this module imports without it.

Methods: Saliency, InputXGradient, IntegratedGradients, GradientShap, GuidedBackprop,
Deconvolution, DeepLift, Occlusion, FeatureAblation (Captum), Random.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pluggy
import torch
from torch import nn

hookimpl = pluggy.HookimplMarker("splitxai")

__all__ = [
    "deconvolution",
    "deep_lift",
    "feature_ablation",
    "gradient_shap",
    "guided_backprop",
    "input_x_gradient",
    "integrated_gradients",
    "occlusion",
    "random_map",
    "saliency",
    "splitxai_explainers",
]


_CAPTUM_NOTICES = (
    r"Setting backward hooks on ReLU activations",
    r"Setting forward, backward hooks and attributes on non-linear",
)


def _leaf(inputs: torch.Tensor, method: str) -> torch.Tensor:
    """A leaf copy of the inputs that requires grad (Captum warns otherwise); one clear error
    inside ``torch.inference_mode()``, where the gradient ``method`` needs is off."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{method}: called inside torch.inference_mode(), where autograd (which {method} "
            "uses) is off; call it outside inference mode"
        )
    return inputs.detach().requires_grad_(True)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence Captum's notices that it sets (and removes) hooks on the activations."""
    with warnings.catch_warnings():
        for notice in _CAPTUM_NOTICES:
            warnings.filterwarnings("ignore", message=notice, category=UserWarning)
        yield


def _hooked(name: str, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
            **kwargs: Any) -> torch.Tensor:
    """Captum's attribution ``name``, which hooks the activations (its notices silenced)."""
    with _quiet():
        return getattr(_captum(), name)(model).attribute(_leaf(inputs, name), target=targets,
                                                         **kwargs)


def _per_eval(inputs: torch.Tensor, requested: int | None) -> int:
    """Perturbed copies of the batch per model call: the request, or a memory-bound default."""
    if requested is not None:
        return int(requested)
    return max(1, min(256, 2**24 // max(1, inputs.numel())))


def _captum() -> Any:
    try:
        import captum.attr
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "this baseline needs Captum: pip install 'splitxai[captum]'"
        ) from exc
    return captum.attr


def saliency(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, abs: bool = True
) -> torch.Tensor:
    """Saliency: the absolute gradient of the target logit (Captum Saliency, defaults).

    Parameters
    ----------
    abs: bool, optional
        Take the absolute value of the gradient (Captum's default, True).
    """
    return _captum().Saliency(model).attribute(_leaf(inputs, "Saliency"), target=targets,
                                             abs=abs)


def input_x_gradient(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Input x Gradient: the input times the gradient of the target logit (Captum)."""
    return _captum().InputXGradient(model).attribute(_leaf(inputs, "InputXGradient"),
                                                   target=targets)


def integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_steps: int = 10,
    integration_method: str = "riemann_trapezoid",
    baselines: float | torch.Tensor | None = None,
    internal_batch_size: int | None = None,
) -> torch.Tensor:
    """Integrated Gradients from a zero baseline, 10 trapezoid steps (``quantus.explain``).

    The defaults are those of Quantus 0.6's ``quantus.explain(method="IntegratedGradients")``
    (``n_steps=10``, ``method="riemann_trapezoid"``), not Captum's (50 Gauss-Legendre
    steps), so that the method of this name gives Quantus's result.

    Parameters
    ----------
    n_steps: int, optional
        Number of steps of the integral's approximation (10, as Quantus; Captum's is 50).
    integration_method: str, optional
        Captum's ``method`` of approximating the integral: ``"riemann_trapezoid"`` (default,
        as Quantus), ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"`` or
        ``"gausslegendre"`` (Captum's default).
    baselines: float or torch.Tensor, optional
        The baseline; zeros when None.
    internal_batch_size: int, optional
        Split the ``B * n_steps`` evaluations into batches of this size (no effect on the
        result).
    """
    return _captum().IntegratedGradients(model).attribute(
        _leaf(inputs, "IntegratedGradients"), target=targets, n_steps=n_steps,
        method=integration_method, baselines=baselines,
        internal_batch_size=internal_batch_size,
    )


def gradient_shap(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    baselines: torch.Tensor | None = None,
    n_samples: int = 5,
    stdevs: float = 0.0,
) -> torch.Tensor:
    """Gradient SHAP with a zero baseline (Captum, 5 samples, no noise; stochastic).

    Parameters
    ----------
    baselines: torch.Tensor, optional
        The baseline distribution (N, C, H, W); ``zeros_like(inputs)`` when None (as
        ``quantus.explain`` does; Captum has no default).
    n_samples: int, optional
        Random points per input (5).
    stdevs: float, optional
        Standard deviation of the noise added to each sample (0).
    """
    if baselines is None:
        baselines = torch.zeros_like(inputs)
    return _captum().GradientShap(model).attribute(
        _leaf(inputs, "GradientShap"), baselines=baselines, target=targets,
        n_samples=n_samples, stdevs=stdevs,
    )


def guided_backprop(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Guided Backpropagation: ReLU modules pass only positive gradients (Captum)."""
    return _hooked("GuidedBackprop", model, inputs, targets)


def deconvolution(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Deconvolution: ReLU modules applied to the gradient on the way back (Captum)."""
    return _hooked("Deconvolution", model, inputs, targets)


def deep_lift(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    baselines: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepLift (rescale rule) from a zero baseline (Captum defaults).

    Parameters
    ----------
    baselines: float or torch.Tensor, optional
        The reference input; zeros when None.
    """
    return _hooked("DeepLift", model, inputs, targets, baselines=baselines)


def occlusion(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    window: int | tuple[int, int, int] = 4,
    stride: int | tuple[int, int, int] = 1,
    baselines: float = 0.0,
    perturbations_per_eval: int | None = None,
) -> torch.Tensor:
    """Occlusion: the logit drop when a 4 x 4 patch (all channels) is zeroed (Captum).

    Captum divides the summed drops by the window counts in float32, so the map is float32
    (float32 precision) also for a float64 model.

    Parameters
    ----------
    window: int or tuple of int, optional
        The patch side: the sliding window is ``(C, window, window)``, 4 as in
        ``quantus.explain`` but over all channels (Captum has no default). A tuple is used as
        Captum's ``sliding_window_shapes`` as it is (``quantus.explain``'s ``(1, 4, 4)``).
    stride: int or tuple of int, optional
        The step of the window (Captum's default, 1); a tuple is Captum's ``strides``.
    baselines: float, optional
        The value of an occluded pixel (0).
    perturbations_per_eval: int, optional
        Occluded copies per model call (speed and memory only); when None, as many as keep a
        model call under 2**24 input values, at most 256.
    """
    channels, height, width = inputs.shape[1:]
    if isinstance(window, int):
        side = max(1, min(window, height, width))
        window = (channels, side, side)
    if isinstance(stride, int):
        stride = (1, stride, stride)
    return _captum().Occlusion(model).attribute(
        inputs, sliding_window_shapes=tuple(window), strides=tuple(stride),
        target=targets, baselines=baselines,
        perturbations_per_eval=_per_eval(inputs, perturbations_per_eval),
    )


def feature_ablation(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    feature_mask: torch.Tensor | None = None,
    baselines: float = 0.0,
    perturbations_per_eval: int | None = None,
) -> torch.Tensor:
    """Feature Ablation: the logit drop when each input element is zeroed (Captum defaults).

    Parameters
    ----------
    feature_mask: torch.Tensor, optional
        Groups of elements ablated together; every element alone when None.
    baselines: float, optional
        The ablation value (0).
    perturbations_per_eval: int, optional
        Ablated copies per model call (speed and memory only); when None, as many as keep a
        model call under 2**24 input values, at most 256.
    """
    return _captum().FeatureAblation(model).attribute(
        inputs, target=targets, feature_mask=feature_mask, baselines=baselines,
        perturbations_per_eval=_per_eval(inputs, perturbations_per_eval),
    )


def random_map(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    seed: int | None = None,
) -> torch.Tensor:
    """Random: a map of independent uniform [0, 1) values in the inputs' floating dtype
    (the model is not called).

    Parameters
    ----------
    seed: int, optional
        Seed of a private generator; torch's global generator when None.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    batch, _, height, width = inputs.shape
    dtype = inputs.dtype if inputs.is_floating_point() else torch.get_default_dtype()
    return torch.rand((batch, 1, height, width), generator=generator,
                      dtype=dtype).to(inputs.device)


_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "Saliency": saliency,
    "InputXGradient": input_x_gradient,
    "IntegratedGradients": integrated_gradients,
    "GradientShap": gradient_shap,
    "GuidedBackprop": guided_backprop,
    "Deconvolution": deconvolution,
    "DeepLift": deep_lift,
    "Occlusion": occlusion,
    "FeatureAblation": feature_ablation,
    "Random": random_map,
}


@hookimpl
def splitxai_explainers() -> dict[str, Callable[..., torch.Tensor]]:
    """Offer the baseline methods (see the module docstring)."""
    return dict(_METHODS)
