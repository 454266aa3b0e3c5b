"""Input gradients of the g and h streams of difference models, rendered as in figures 3 and 8.

For a difference model ``f = g - h`` (``core.dc.models`` modes DIC, DM, DiffNone, DICIN,
DMIN) the gradient of a class logit of ``g`` (with respect to ``g``'s input ``x``) marks
present evidence, the gradient of ``h`` (with respect to ``h``'s own input, ``1 - x`` in
the inverted variants) marks missing evidence: a bright blue pixel of a DICIN model means
that adding ink there would raise that class's logit.

Rendering (figures 3 and 8 of the paper): g red, h blue (for a single network: the
positive gradient red, the negative one blue). Each map is divided by its stream's largest
value over all classes of the sample, values above ``threshold`` (0.2) are coloured, and the
colour intensity decays exponentially with the pixel's rank: ``exp(-rank / (decay * H * W))``.

Gradients are taken with the model in evaluation mode (batch norm with running
statistics, so each row's gradient is its own); the model's training flags are restored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core import checks
from core.dc.models import eval_mode, is_difference_model, on_model_device

__all__ = [
    "STREAMS",
    "eval_mode",
    "input_gradients",
    "target_gradients",
    "split_colour_map",
    "colour_maps",
    "figure_classes",
    "figure_samples",
    "render_explanations",
]

STREAMS = ("g", "h", "diff")
_ROWS_PER_PASS = 256


def _check_stream(model: nn.Module, stream: str) -> None:
    checks.option("stream", stream, STREAMS)
    if stream != "diff" and not is_difference_model(model):
        raise TypeError(
            f"stream {stream!r} needs a difference model with streams .g and .h and a flag "
            f".inverted (core.dc.models modes DIC, DM, DiffNone, DICIN, DMIN); "
            f"{type(model).__name__} has none. Use stream='diff' for the model's own gradient."
        )


def _stream_logits(model: nn.Module, x: torch.Tensor, stream: str) -> tuple:
    """(logits, leaf) of the chosen stream: the leaf is the input that stream sees."""
    if stream == "h":
        leaf = model.h_input(x.detach()).requires_grad_(True)
        return model.h(leaf), leaf
    leaf = x.detach().requires_grad_(True)
    return (model.g(leaf) if stream == "g" else model(leaf)), leaf


def input_gradients(
    model: nn.Module,
    x: torch.Tensor,
    stream: str = "g",
    classes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Gradients of every class logit of one stream with respect to that stream's input.

    Parameters
    ----------
    model: torch.nn.Module
        A difference model (``.g``, ``.h``, ``.inverted``), or any classifier for
        ``stream="diff"``.
    x: torch.Tensor
        Model input, ``(B, 1, 28, 28)`` or ``(B, 784)``.
    stream: str
        ``"g"`` (d g_k / d x), ``"h"`` (d h_k / d u with u the input of h: ``1 - x`` if
        the model is inverted, else ``x``) or ``"diff"`` (d f_k / d x of the model).
    classes: sequence of int, optional
        The logits to differentiate; all when None. Empty, or outside the model's classes:
        ``ValueError``.

    Returns
    -------
    torch.Tensor
        ``(B, K) + x.shape[1:]``, one gradient per sample and class.
    """
    _check_stream(model, stream)
    x = on_model_device(model, x)
    with eval_mode(model), torch.no_grad():
        n_classes = _stream_logits(model, x[:1], stream)[0].shape[1]
    if classes is None:
        classes = range(n_classes)
    elif isinstance(classes, int) or (isinstance(classes, torch.Tensor) and classes.dim() == 0):
        raise TypeError("classes must be a sequence of class indices (e.g. [3]), not a "
                        "single index")
    classes = torch.as_tensor(list(classes), dtype=torch.long, device=x.device)
    k = len(classes)
    if k == 0:
        raise ValueError("classes is empty; pass at least one class index (or None for all)")
    if int(classes.min()) < 0 or int(classes.max()) >= n_classes:
        raise ValueError(f"classes must lie in [0, {n_classes}), got {classes.tolist()}")
    if x.shape[0] == 0:
        return x.new_zeros((0, k) + tuple(x.shape[1:]))
    # one backward pass: every sample repeated once per class (rows are independent in
    # eval mode), each copy differentiating its own class logit
    chunk = max(1, _ROWS_PER_PASS // k)
    parts = []
    for start in range(0, x.shape[0], chunk):
        rows = x[start: start + chunk]
        repeated = rows.repeat_interleave(k, dim=0)
        targets = classes.repeat(rows.shape[0])
        parts.append(target_gradients(model, repeated, targets, stream).unflatten(0, (-1, k)))
    return torch.cat(parts)


def target_gradients(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor | int, stream: str = "g"
) -> torch.Tensor:
    """Gradient of each row's target logit of one stream, at input resolution.

    Parameters
    ----------
    model: torch.nn.Module
        As in ``input_gradients``.
    x: torch.Tensor
        Model input.
    targets: torch.Tensor or int
        One class per row (``(B,)`` long) or one class for all rows. Floats with a
        fractional part, bools and negative values raise.
    stream: str
        ``"g"``, ``"h"`` or ``"diff"``, as in ``input_gradients``.

    Returns
    -------
    torch.Tensor
        Same shape as ``x``, on the model's device and in its floating point type.
    """
    _check_stream(model, stream)
    x = on_model_device(model, x)
    targets = checks.targets(targets, x.shape[0], whole_floats=True).to(x.device)
    with eval_mode(model), torch.enable_grad():
        logits, leaf = _stream_logits(model, x, stream)
        if targets.numel() and int(targets.max()) >= logits.shape[1]:
            raise ValueError(f"targets must lie in [0, {logits.shape[1]}), got {targets.tolist()}")
        selected = logits.gather(1, targets.to(logits.device)[:, None]).sum()
        return torch.autograd.grad(selected, leaf)[0]


def split_colour_map(
    red: np.ndarray, blue: np.ndarray, threshold: float = 0.2, decay: float = 0.05
) -> np.ndarray:
    """RGB image of two normalised maps: ``red`` in the red, ``blue`` in the blue channel.

    Parameters
    ----------
    red, blue: numpy.ndarray
        ``(H, W)`` maps, normalised so that 1 is the largest value of the comparison set.
    threshold: float
        Only values above it are coloured (0.2 in the paper).
    decay: float
        The intensity of a coloured pixel is ``exp(-rank / (decay * H * W))``, rank 0
        being the map's largest value.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` float in [0, 1], black where nothing is above the threshold.
    """
    image = np.zeros(red.shape + (3,), dtype=np.float32)
    scale = max(decay * red.size, 1e-12)
    for channel, values in ((0, red), (2, blue)):
        flat = values.reshape(-1)
        order = np.argsort(-flat, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(flat.size)
        intensity = np.exp(-rank / scale) * (flat > threshold)
        image[..., channel] = intensity.reshape(values.shape)
    return image


def _digits(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(B, 1, 28, 28)``: accepted are ``(B, 1, 28, 28)``, ``(B, 28, 28)`` and
    ``(B, 784)``; anything else is one ``ValueError`` (a reshape alone read a
    ``(2, 3, 28, 28)`` batch as six grey digits, and gave torch's error for other sizes)."""
    shape = tuple(x.shape)
    if not (shape[1:] in ((1, 28, 28), (28, 28), (784,)) and len(shape) >= 2):
        raise ValueError(f"x must be (B, 1, 28, 28), (B, 28, 28) or (B, 784) digits; got "
                         f"shape {shape}")
    return x.reshape(-1, 1, 28, 28)


def colour_maps(
    model: nn.Module, x: torch.Tensor, classes: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The red and blue maps of figures 3 and 8, normalised per sample over all classes.

    Difference model: red = positive part of the g gradient, blue = positive part of the h
    gradient (each divided by its stream's maximum over the sample's classes). Other
    models: red / blue = positive / negative part of the gradient (divided by the maximum
    absolute gradient over the sample's classes).

    Returns
    -------
    tuple of numpy.ndarray
        ``(red, blue)``, each ``(B, K, 28, 28)``.
    """
    x = _digits(x)
    if is_difference_model(model):
        g = input_gradients(model, x, "g", classes).clamp(min=0)
        h = input_gradients(model, x, "h", classes).clamp(min=0)
        maps = []
        for grad in (g, h):
            peak = grad.flatten(1).amax(1).clamp(min=1e-30).view(-1, 1, 1, 1, 1)
            maps.append((grad / peak)[:, :, 0].detach().cpu().numpy())
        return maps[0], maps[1]
    grad = input_gradients(model, x, "diff", classes)
    peak = grad.abs().flatten(1).amax(1).clamp(min=1e-30).view(-1, 1, 1, 1, 1)
    grad = (grad / peak)[:, :, 0].detach().cpu().numpy()
    return np.clip(grad, 0, None), np.clip(-grad, 0, None)


def _canvas(rows: int, cols: int, size: float = 1.1):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "rendering needs matplotlib: pip install matplotlib (or 'splitxai[benchmark]')"
        ) from error
    figure = Figure(figsize=(cols * size, rows * size + 0.3))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return figure, axes


def figure_classes(
    model: nn.Module,
    x: torch.Tensor,
    path: str | Path,
    labels: torch.Tensor | None = None,
    threshold: float = 0.2,
    decay: float = 0.05,
) -> Path:
    """Figure 3: for each sample the digit, then one g (red) / h (blue) overlay per class.

    Parameters
    ----------
    model: torch.nn.Module
        A difference model (or a single network: positive / negative gradient).
    x: torch.Tensor
        ``(B, 1, 28, 28)``, ``(B, 28, 28)`` or ``(B, 784)`` samples, one row of the figure
        each (another shape is a ``ValueError``).
    path: str or pathlib.Path
        The PNG to write (``.png`` is appended to a name without a suffix; missing folders
        are created).
    labels: torch.Tensor, optional
        True classes, marked in the column titles.
    threshold, decay: float
        As in ``split_colour_map``.

    Returns
    -------
    pathlib.Path
    """
    x = on_model_device(model, _digits(x))
    if labels is not None:
        labels = _figure_labels(model, x, labels)
    red, blue = colour_maps(model, x)
    with eval_mode(model), torch.no_grad():
        predicted = model(x).argmax(1).tolist()
    n_classes = red.shape[1]
    figure, axes = _canvas(x.shape[0], n_classes + 1)
    for i in range(x.shape[0]):
        axes[i, 0].imshow(x[i, 0].detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        title = f"pred {predicted[i]}"
        if labels is not None:
            title = f"true {int(labels[i])}, {title}"
        axes[i, 0].set_title(title, fontsize=6)
        for k in range(n_classes):
            axes[i, k + 1].imshow(split_colour_map(red[i, k], blue[i, k], threshold, decay))
            axes[i, k + 1].set_title(str(k), fontsize=7)
    stream = "g red, h blue" if is_difference_model(model) else "grad > 0 red, < 0 blue"
    figure.suptitle(f"{getattr(model, 'mode', type(model).__name__)}: {stream}", fontsize=8)
    return _save(figure, path)


def figure_samples(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    path: str | Path,
    threshold: float = 0.2,
    decay: float = 0.05,
) -> Path:
    """Figure 8: top row the maps for each sample's true class, bottom row the samples.

    Parameters are those of ``figure_classes``; ``labels`` selects the class per sample
    (one per sample, each in ``0 .. num_classes - 1``, else ``ValueError``).

    Returns
    -------
    pathlib.Path
    """
    x = on_model_device(model, _digits(x))
    labels = _figure_labels(model, x, labels)
    red, blue = colour_maps(model, x)
    figure, axes = _canvas(2, x.shape[0])
    for i in range(x.shape[0]):
        k = int(labels[i])
        axes[0, i].imshow(split_colour_map(red[i, k], blue[i, k], threshold, decay))
        axes[0, i].set_title(str(k), fontsize=7)
        axes[1, i].imshow(x[i, 0].detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
    return _save(figure, path)


def _figure_labels(model: nn.Module, x: torch.Tensor, labels) -> torch.Tensor:
    """One class index per row of ``x``, each below the model's class count (checked with
    one cheap forward, before any gradient); a negative label used to pick a class from
    the end silently."""
    labels = checks.targets(labels, x.shape[0], whole_floats=True)
    with eval_mode(model), torch.no_grad():
        checks.target_range(labels, model(x[:1]).shape[1])
    return labels


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    if not path.suffix:  # matplotlib appends .png: return the file actually written
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def render_explanations(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, prefix: str | Path
) -> list[Path]:
    """Write ``<prefix>_classes.png`` (figure 3) and ``<prefix>_samples.png`` (figure 8).

    Returns
    -------
    list of pathlib.Path
        The two files.
    """
    prefix = Path(prefix)
    return [
        figure_classes(model, x, prefix.with_name(prefix.name + "_classes.png"), labels),
        figure_samples(model, x, labels, prefix.with_name(prefix.name + "_samples.png")),
    ]
