"""The evaluation protocol of the paper (section 5.2, tables 1-3, 6, 7).

- the methods: each a :class:`MethodSpec` -- a registry name plus options, so that any
  method of any installed plugin can take part;
- the configurations: a method at a layer, with a variant (stream / sign) and abs or not;
- the metrics: Selectivity, Attribution Localisation, Pointing Game (Quantus), Pixel
  Flipping AUC at 5 % and 20 % (Quantus's perturbation, image-mean replacement, truncated
  at 20 %), Max Sensitivity (Quantus, abs only);
- the selection: per method, the configuration with the best average rank over the two
  localisation metrics, and separately over the two Pixel Flipping AUCs, on validation.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import quantus_adapters  # noqa: F401  (applies the NumPy 2 shim before Quantus is imported)
from core import checks

__all__ = [
    "METRICS",
    "LOCALISATION",
    "PIXEL_FLIPPING",
    "MetricInfo",
    "MethodSpec",
    "Config",
    "ProtocolSettings",
    "default_methods",
    "candidate_layers",
    "check_layers",
    "check_selectivity_patch",
    "evaluate_metric",
    "pixel_flipping_curves",
    "pixel_flipping_auc",
    "features_in_step",
    "select_configs",
    "seed_everything",
    "localisation_mask",
    "check_alpha",
    "check_metrics",
]


@dataclass(frozen=True)
class MetricInfo:
    """A metric of the protocol: its column title and whether higher is better."""

    key: str
    title: str
    higher_is_better: bool
    needs_masks: bool = False


METRICS: dict[str, MetricInfo] = {
    m.key: m
    for m in (
        MetricInfo("Selectivity", "Select.", False),
        MetricInfo("AttrLoc", "Attr. Loc.", True, needs_masks=True),
        MetricInfo("Pointing", "Point.", True, needs_masks=True),
        MetricInfo("PF@5", "Pixel Fl. (AUC@5)", True),
        MetricInfo("PF@20", "Pixel Fl. (AUC@20)", True),
        MetricInfo("MaxSens", "Max Sens.", False),
        MetricInfo("RandLogit", "Rand. Logit", False),
    )
}
LOCALISATION = ("AttrLoc", "Pointing")
PIXEL_FLIPPING = ("PF@5", "PF@20")


@dataclass
class ProtocolSettings:
    """Knobs of the metrics (the defaults follow the paper, scaled to the image size)."""

    max_sens_samples: int = 25
    max_sens_images: int | None = None
    selectivity_patch: int | None = None  # None: a divisor of the side near side / 8
    pf_fractions: tuple[float, float] = (0.05, 0.20)
    batch_size: int = 64
    device: str = "cpu"
    seed: int = 0
    metrics: tuple[str, ...] = tuple(METRICS)


@dataclass(frozen=True)
class MethodSpec:
    """One method of the comparison: a registry name with fixed options and variants.

    Attributes
    ----------
    label: str
        Row label of the tables, e.g. ``"SplitCAM (sc, α=0.4, wta)"``.
    method: str
        Name in :func:`quantus_adapters.available_methods`.
    options: dict
        Fixed options passed to the method (e.g. ``alpha``, ``maxpool``).
    group: str
        ``"split"``, ``"layer"`` (baselines with layer optimisation) or ``"baseline"``.
    layered: bool
        Whether the method takes a ``layer`` option and the layer is selected.
    input_layer: bool
        Whether ``"input"`` is one of its layers.
    variants: tuple of (str, dict)
        Layer-wise formula choices (tag, options), e.g. ``("+, g", {"sign": "+"})``.
    """

    label: str
    method: str
    options: dict = field(default_factory=dict)
    group: str = "baseline"
    layered: bool = False
    input_layer: bool = False
    variants: tuple = (("", {}),)
    alpha_ablation: bool = False

    def __hash__(self) -> int:
        return hash((self.label, self.method, json.dumps(self.options, sort_keys=True)))


@dataclass(frozen=True)
class Config:
    """A method at one layer with one variant (the abs choice is made at metric time)."""

    spec: MethodSpec
    layer: str | None
    variant: str
    options: dict

    @property
    def explain_kwargs(self) -> dict:
        """Options for ``quantus_adapters.explain`` (method included)."""
        kwargs = {"method": self.spec.method, **self.options}
        return kwargs

    @property
    def layer_label(self) -> str:
        """The layer column: ``(layer, variant)`` like the paper's ``(26, +, g)``."""
        layer = "input" if self.layer in (None, "input") else self.layer
        if not self.spec.layered:
            return "input"
        return f"({layer}, {self.variant})" if self.variant else layer

    def key(self) -> str:
        """A stable identifier (used to store and resume results)."""
        return json.dumps({"label": self.spec.label, "method": self.spec.method,
                           "options": self.options}, sort_keys=True, default=str)

    def with_options(self, **changes: Any) -> Config:
        """A copy with some options replaced (e.g. another alpha)."""
        return Config(self.spec, self.layer, self.variant, {**self.options, **changes})


def check_alpha(value: Any, option: str = "--alpha") -> float | str:
    """One alpha of SplitCAM / SplitGrad from the command line: ``auto`` or a number in
    [0, 0.5].

    alpha is the backward shift of the split pair's two streams (0: no shift, 0.5: half the
    model's gradient); ``auto`` chooses it per shift point (docs/alpha.md); other values are
    not defined.

    Raises
    ------
    ValueError
        ``value`` is not ``auto``, not a number or lies outside [0, 0.5] (the message names
        ``option``).
    """
    from core.shift import AUTO

    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{option} {value!r} is not a number; alpha is a number in "
                         "[0, 0.5] or 'auto'") from None
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 0.5):
        raise ValueError(f"{option} {value}: alpha must lie in [0, 0.5] (or be 'auto')")
    return alpha


def check_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """``--metrics`` names (keys of :data:`METRICS`), in the protocol's order.

    Raises
    ------
    ValueError
        An unknown name (the message lists the known ones).
    """
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise ValueError(f"--metrics: unknown {', '.join(map(repr, bad))}; use "
                         f"{', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


def default_methods(alpha: float | str = 0.4, quick: bool = False, image_size: int = 64,
                    channels: int = 1) -> list[MethodSpec]:
    """The methods of table 1: the Split methods and every baseline.

    Parameters
    ----------
    alpha: float or "auto"
        The backward shift of SplitCAM and SplitGrad in the main comparison.
    quick: bool
        One variant per Split method (for ``--quick``).
    image_size: int
        Side of the images (Occlusion windows and Feature Ablation groups scale with it).
    channels: int
        Channels of the images.
    """
    from core.shift import alpha_label

    a = alpha_label(alpha)
    cam_variants = (("g", {"sign": None}),) if quick else (("g", {"sign": None}),
                                                           ("+, g", {"sign": "+"}))
    lrp_variants = (("pos", {"stream": "pos"}),) if quick else (("pos", {"stream": "pos"}),
                                                                ("comb", {"stream": "comb"}))
    window = max(2, image_size // 8)
    block = max(1, image_size // 8)
    specs = [
        MethodSpec(f"SplitCAM (sc, α={a})", "SplitCAM", {"alpha": alpha, "maxpool": "convex"},
                   "split", True, False, cam_variants, alpha_ablation=True),
        MethodSpec(f"SplitGrad (α={a}, wta)", "SplitGrad", {"alpha": alpha, "maxpool": "wta"},
                   "split", True, True, cam_variants, alpha_ablation=True),
        MethodSpec("SplitLRP (sc, wta)", "SplitLRP", {"maxpool": "wta"}, "split", True, True,
                   lrp_variants),
        MethodSpec("LayerCAM", "LayerCAM", {}, "layer", True),
        MethodSpec("GradCAM", "GradCAM", {}, "layer", True),
        MethodSpec("GradCAM++", "GradCAMPlusPlus", {}, "layer", True),
        MethodSpec("LRP γ=0.25", "LRP", {}, "layer", True, True),
        MethodSpec("Saliency", "Saliency"),
        MethodSpec("Input x Gradient", "InputXGradient"),
        # the protocol's choice, Captum's defaults as before (the method's own defaults now
        # follow quantus.explain: 10 trapezoid steps)
        MethodSpec("Integrated Gradients", "IntegratedGradients",
                   {"n_steps": 50, "integration_method": "gausslegendre"}),
        MethodSpec("Gradient SHAP", "GradientShap"),
        MethodSpec("Guided Backprop", "GuidedBackprop"),
        MethodSpec("Deconvolution", "Deconvolution"),
        MethodSpec("DeepLift", "DeepLift"),
        MethodSpec("Occlusion", "Occlusion", {"window": window, "stride": max(1, window // 2)}),
        MethodSpec("Feature Ablation", "FeatureAblation", {"feature_mask": ("blocks", block)}),
        MethodSpec("Random Baseline", "Random", {"seed": 0}),
    ]
    if not quick:
        specs.insert(1, MethodSpec(f"SplitCAM (sc, α={a}, wta)", "SplitCAM",
                                   {"alpha": alpha, "maxpool": "wta"}, "split", True, False,
                                   cam_variants, alpha_ablation=True))
    return specs


def resolve_options(options: dict, inputs: torch.Tensor) -> dict:
    """Turn symbolic options into values for a batch (e.g. Feature Ablation's block mask)."""
    out = {}
    for k, v in options.items():
        if k == "feature_mask" and isinstance(v, tuple) and v and v[0] == "blocks":
            block = int(v[1])
            _, _, h, w = inputs.shape
            rows = torch.arange(h, device=inputs.device) // block
            cols = torch.arange(w, device=inputs.device) // block
            grid = rows[:, None] * ((w + block - 1) // block) + cols[None, :]
            out[k] = grid.expand(inputs.shape[0], inputs.shape[1], h, w).contiguous()
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------- layers
def candidate_layers(model: nn.Module, max_layers: int | None = 5) -> list[str]:
    """Layers at which layer-wise methods are evaluated, from the input side to the output.

    Residual networks: the outputs of their blocks (modules whose class name ends with
    ``Block`` or ``Bottleneck``). Otherwise the ReLU modules (each used once in VGG-style
    models), else the convolutions. At most ``max_layers``, evenly spaced, always including
    the last one.
    """
    named = list(model.named_modules())
    blocks = [n for n, m in named if n and type(m).__name__.endswith(("Block", "Bottleneck"))]
    relus = [n for n, m in named if isinstance(m, (nn.ReLU, nn.ReLU6))]
    convs = [n for n, m in named if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if blocks:
        names = blocks
    elif relus and convs:
        # ReLUs that come after a convolution and before the classifier's linear layers
        order = {n: i for i, (n, _) in enumerate(named)}
        first_linear = min((order[n] for n, m in named if isinstance(m, nn.Linear)),
                           default=len(named))
        names = [n for n in relus if order[n] < first_linear] or convs
    else:
        names = convs
    if not names:
        return []
    if max_layers is None or len(names) <= max_layers:
        return names
    if max_layers <= 1:
        return [names[-1]]
    picks = np.linspace(0, len(names) - 1, max_layers).round().astype(int)
    return [names[i] for i in sorted(set(picks.tolist()))]


def check_layers(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """Check ``--layers`` names against ``model.named_modules()`` ("input" is allowed).

    Raises
    ------
    ValueError
        A name that is not a module of the model (the message lists close names).
    """
    for name in layers:
        checks.layer_name(model, name, "--layers", allow_input=True)
    return list(layers)


def configs_for(spec: MethodSpec, layers: Sequence[str]) -> list[Config]:
    """All (layer, variant) configurations of one method."""
    if not spec.layered:
        return [Config(spec, None, "", dict(spec.options))]
    out = []
    names = (["input"] if spec.input_layer else []) + [n for n in layers if n != "input"]
    for layer in names:
        for tag, opts in spec.variants:
            layer_opt = None if (layer == "input" and spec.method == "SplitGrad") else layer
            out.append(Config(spec, layer, tag, {**spec.options, **opts, "layer": layer_opt}))
    return out


# ----------------------------------------------------------------------------- metrics
def features_in_step(shape: Sequence[int]) -> int:
    """Pixel Flipping step: 112 pixels a step at 224x224, scaled to the image size.

    The step is ``112 / 224**2`` of the input features (all channels), rounded to a divisor
    of their number (Quantus requires one).
    """
    n = int(np.prod(shape))
    target = max(1.0, n * 112 / (224 * 224))
    divisors = [d for d in range(1, int(math.sqrt(n)) + 1) if n % d == 0]
    divisors = sorted(set(divisors + [n // d for d in divisors]))
    return int(min(divisors, key=lambda d: (abs(d - target), d)))


def pixel_flipping_curves(model: nn.Module, x: np.ndarray, y: np.ndarray, a: np.ndarray,
                          fraction: float, step: int, device: str = "cpu") -> np.ndarray:
    """Quantus's Pixel Flipping curve (logits, image-mean replacement), up to ``fraction``.

    Equal to ``quantus.PixelFlipping(features_in_step=step, perturb_baseline="mean",
    normalise=False)`` called with ``softmax=False`` for its first
    ``ceil(fraction * n / step)`` steps (the paper reports the AUC up to 20 %; the rest of
    the curve is not needed). The features are ordered by the same ``np.argsort`` call as
    Quantus's, so that tied attributions (zeros, upsampled CAM blocks) are flipped in the
    same order; a stable sort orders ties differently and changed the curve by up to 0.02.

    Returns
    -------
    numpy.ndarray
        (B, 1 + steps): the target logit before and after each step.
    """
    from quantus.functions.perturb_func import batch_baseline_replacement_by_indices

    b = x.shape[0]
    a_full = np.broadcast_to(a, x.shape).reshape(b, -1)
    order = np.argsort(-a_full, axis=1)  # exactly Quantus's call: ties ordered alike
    n_steps = math.ceil(fraction * a_full.shape[1] / step)
    xs = [x.copy()]
    x_pert = x.copy()
    for k in range(n_steps):
        idx = order[:, k * step:(k + 1) * step]
        x_pert = batch_baseline_replacement_by_indices(
            arr=x_pert.reshape(b, -1), indices=idx, perturb_baseline="mean").reshape(x.shape)
        xs.append(x_pert)
    stacked = torch.from_numpy(np.concatenate(xs)).to(device)
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in stacked.split(256)]).cpu().numpy()
    target = np.tile(y, len(xs))
    return logits[np.arange(len(target)), target].reshape(len(xs), b).T


def pixel_flipping_auc(curves: np.ndarray, fraction: float, total: int, step: int) -> np.ndarray:
    """Area under the logit drop over the fraction of perturbed features, up to ``fraction``.

    ``drop_k = logit_0 - logit_k`` after ``k`` steps, integrated (trapezoid) over the
    perturbed fraction ``k * step / total`` from 0 to ``fraction``; a faster drop gives a
    larger area (higher is better).
    """
    k = math.ceil(fraction * total / step)
    drop = curves[:, :1] - curves[:, :k + 1]
    xs = np.minimum(np.arange(k + 1) * step / total, fraction)
    return np.trapezoid(drop, xs, axis=1)


def check_selectivity_patch(patch: int, shape: Sequence[int]) -> int:
    """Refuse a ``--selectivity-patch`` side that does not divide the image size.

    Parameters
    ----------
    patch: int
        The patch side in pixels.
    shape: sequence of int
        The images' shape; the last two entries are height and width.

    Returns
    -------
    int
        ``patch``.

    Raises
    ------
    ValueError
        One line naming the option, the image size and the valid sides.
    """
    h, w = int(shape[-2]), int(shape[-1])
    if patch < 1 or h % patch or w % patch:
        g = math.gcd(h, w)
        valid = ", ".join(str(d) for d in range(1, g + 1) if g % d == 0)
        raise ValueError(f"--selectivity-patch {patch} does not divide the image size {h}x{w}; "
                         f"use one of {valid}")
    return patch


def selectivity_patch(shape: Sequence[int]) -> int:
    """Selectivity's patch side: a divisor of the image side near ``side / 8``.

    Quantus's default is 8 pixels at 224x224 (784 patches, one model call each); an 8x8
    grid of patches keeps the benchmark affordable on CPU (``--selectivity-patch`` sets
    another size).
    """
    h, w = int(shape[-2]), int(shape[-1])
    g = math.gcd(h, w)
    target = max(1.0, min(h, w) / 8)
    divisors = [d for d in range(1, g + 1) if g % d == 0]
    return int(min(divisors, key=lambda d: (abs(d - target), d)))


def selectivity_curves(model: nn.Module, x: np.ndarray, y: np.ndarray, a: np.ndarray,
                       patch: int, device: str = "cpu", chunk: int = 512) -> np.ndarray:
    """Quantus's Selectivity curve (softmax of the target after each removed patch).

    Identical to ``quantus.Selectivity(patch_size=patch)`` (patches ordered by their summed
    attribution over all channels, set to "black" -- the image's minimum -- one after the
    other) for images whose
    sides ``patch`` divides, but with many perturbed images per model call.

    Returns
    -------
    numpy.ndarray
        (B, n_patches): the target's probability after removing 1, 2, ... patches.
    """
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"Selectivity patch {patch} does not divide the image size {h}x{w}")
    a_full = np.broadcast_to(a, x.shape)
    ph, pw = h // patch, w // patch
    sums = a_full.reshape(b, c, ph, patch, pw, patch).sum(axis=(1, 3, 5)).reshape(b, -1)
    order = np.argsort(-sums, -1)
    rank = np.empty_like(order)
    rank[np.arange(b)[:, None], order] = np.arange(ph * pw)[None, :]
    # pixel-level rank of each patch: removed at step k when rank < k
    rank_px = np.repeat(np.repeat(rank.reshape(b, 1, ph, pw), patch, 2), patch, 3)
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    rt = torch.from_numpy(rank_px).to(device)
    yt = torch.as_tensor(y, device=device)
    black = xt.amin(dim=(1, 2, 3), keepdim=True)  # Quantus's "black": the image's minimum
    n = ph * pw
    out = torch.empty(b, n, dtype=torch.float64)
    per = max(1, chunk // b)
    with torch.no_grad():
        for k0 in range(0, n, per):
            ks = torch.arange(k0 + 1, min(n, k0 + per) + 1, device=device)
            keep = rt[None] >= ks[:, None, None, None, None]
            batch = torch.where(keep, xt[None], black[None]).reshape(-1, c, h, w)
            prob = torch.softmax(model(batch).double(), dim=1)
            prob = prob.reshape(len(ks), b, -1)[:, torch.arange(b), yt]
            out[:, k0:k0 + len(ks)] = prob.T.cpu()
    return out.numpy()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's global and torch's generators (Captum and Quantus use them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (Captum's Gradient SHAP draws from it)
    torch.manual_seed(seed)


def localisation_mask(s: np.ndarray) -> np.ndarray:
    """Which images have a usable object mask: some object and some background pixels.

    An empty mask (no object pixel) or an all-object mask makes the localisation metrics
    meaningless (Pointing Game scores such an image as a hit); those images are excluded.
    """
    flat = np.asarray(s).reshape(len(s), -1) > 0
    return flat.any(1) & ~flat.all(1)


def _quantus_scores(metric, model, x, y, a, s, device, batch_size, **call) -> np.ndarray:
    scores = metric(model=model, x_batch=x, y_batch=y, a_batch=a, s_batch=s, device=device,
                    batch_size=batch_size, **call)
    return np.asarray(scores, dtype=np.float64)


def evaluate_metric(name: str, model: nn.Module, x: np.ndarray, y: np.ndarray, a: np.ndarray,
                    s: np.ndarray | None, use_abs: bool, settings: ProtocolSettings,
                    explain_kwargs: dict | None = None,
                    explain_func: Callable | None = None,
                    cache: dict | None = None) -> np.ndarray:
    """Per-image scores of one metric.

    Parameters
    ----------
    name: str
        A key of :data:`METRICS`.
    model: torch.nn.Module
        The model (eval mode).
    x, y, a, s: numpy.ndarray
        Images (B, C, H, W), labels (B,), maps (B, 1, H, W), masks (B, 1, H, W) or None.
        Images whose mask is empty or all object get NaN localisation scores
        (:func:`localisation_mask`).
    use_abs: bool
        Take the absolute value of the maps first (Max Sensitivity always does).
    settings: ProtocolSettings
        Metric parameters.
    explain_kwargs: dict, optional
        ``method`` and options for Max Sensitivity's re-explanations.
    explain_func: callable, optional
        The explain function (``quantus_adapters.explain``).
    cache: dict, optional
        Shared between calls on the same maps (the two Pixel Flipping AUCs share a curve).

    Returns
    -------
    numpy.ndarray
        (B,) float64 scores (NaN where Quantus gives none).
    """
    import quantus

    device = settings.device
    a = np.abs(a) if use_abs else a
    common = dict(disable_warnings=True, display_progressbar=False)
    if name in ("PF@5", "PF@20"):
        frac = 0.05 if name == "PF@5" else 0.20
        step = features_in_step(x.shape[1:])
        key = ("pf", use_abs)
        if cache is None or key not in cache:
            curves = pixel_flipping_curves(model, x, y, a, max(settings.pf_fractions), step,
                                           device)
            if cache is not None:
                cache[key] = curves
        else:
            curves = cache[key]
        return pixel_flipping_auc(curves, frac, int(np.prod(x.shape[1:])), step)
    if name == "Selectivity":
        patch = settings.selectivity_patch or selectivity_patch(x.shape)
        curves = selectivity_curves(model, x, y, a, patch, device)
        return np.trapezoid(curves, axis=1)
    if name in LOCALISATION:
        if s is None:
            raise ValueError(f"{name} needs object masks")
        cls = quantus.AttributionLocalisation if name == "AttrLoc" else quantus.PointingGame
        metric = cls(abs=False, normalise=True, **common)
        ok = localisation_mask(s)
        out = np.full(len(y), np.nan)
        if ok.any():
            out[ok] = _quantus_scores(metric, model, x[ok], y[ok], a[ok], s[ok], device,
                                      settings.batch_size)
        return out
    if name == "RandLogit":
        # class specificity: similarity (SSIM) of the maps of the target and of a random
        # other class; Quantus seeds its draw of the other class with ``seed``
        if explain_func is None:
            explain_func = quantus_adapters.explain
        with torch.no_grad():
            n_classes = int(model(torch.as_tensor(x[:1]).to(device)).shape[1])
        metric = quantus.RandomLogit(num_classes=n_classes, seed=settings.seed, abs=use_abs,
                                     normalise=True, **common)
        scores = metric(model=model, x_batch=x, y_batch=y, a_batch=a, device=device,
                        explain_func=explain_func,
                        explain_func_kwargs=dict(explain_kwargs or {}),
                        batch_size=settings.batch_size)
        return np.asarray(scores, dtype=np.float64)
    if name == "MaxSens":
        if (explain_kwargs or {}).get("method") == "Random":  # not defined for random maps
            return np.full(len(y), np.nan)
        if explain_func is None:
            explain_func = quantus_adapters.explain
        n = min(settings.max_sens_images or len(y), len(y))
        metric = quantus.MaxSensitivity(nr_samples=settings.max_sens_samples, abs=True,
                                        normalise=False, **common)
        # Quantus draws its perturbations from NumPy's global generator, the re-explained
        # methods (Gradient SHAP) from NumPy's and torch's
        seed_everything(settings.seed)
        scores = metric(model=model, x_batch=x[:n], y_batch=y[:n], a_batch=np.abs(a[:n]),
                        device=device, explain_func=explain_func,
                        explain_func_kwargs=dict(explain_kwargs or {}),
                        batch_size=settings.batch_size)
        return np.asarray(scores, dtype=np.float64)
    raise KeyError(f"unknown metric {name!r}; one of {', '.join(METRICS)}")


# ----------------------------------------------------------------------------- selection
def average_ranks(values: dict[Any, dict[str, float]], metrics: Sequence[str]) -> dict[Any, float]:
    """Average rank (1 = best) of each candidate over ``metrics`` (NaN ranks last)."""
    cands = list(values)
    total = {c: 0.0 for c in cands}
    for m in metrics:
        sign = -1.0 if METRICS[m].higher_is_better else 1.0
        keyed = [(sign * values[c][m] if np.isfinite(values[c].get(m, np.nan)) else np.inf, c)
                 for c in cands]
        scores = np.array([k for k, _ in keyed])
        # average ranks of ties
        for c, sc in zip(cands, scores, strict=False):
            less = np.sum(scores < sc)
            equal = np.sum(scores == sc)
            total[c] += less + (equal + 1) / 2.0
    return {c: total[c] / max(1, len(metrics)) for c in cands}


def select_configs(values: dict[tuple, dict[str, float]], metrics: Sequence[str]) -> tuple:
    """The candidate (``(config_key, abs)``) with the best average rank over ``metrics``.

    Ties go to the candidate listed first (the earlier layer, no abs).
    """
    ranks = average_ranks(values, metrics)
    best = min(ranks.values())
    return next(c for c in values if ranks[c] == best)
