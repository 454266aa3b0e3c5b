"""Maxout networks trained as differences of monotone or input-convex networks (appendix D).

Two base architectures from appendix D.1, each in eight restriction modes:

- single networks: ``"None"`` (unconstrained), ``"Mon"`` (monotone: every weight, bias and
  batch-norm scale/shift passes through the positivity transform p) and ``"IC"``
  (input-convex: like ``"Mon"`` except the first layer's weight, so the network is a
  monotone network on an affine map of the input);
- differences ``f = g - h`` of two such streams, trained jointly: ``"DIC"`` (two IC
  streams), ``"DM"`` (two Mon streams), ``"DiffNone"`` (two unconstrained streams), and the
  inverted-input variants ``"DICIN"`` / ``"DMIN"`` where ``h`` sees ``1 - x``.

Guarantees (in evaluation mode, for every output logit): a Mon stream is non-decreasing in
every input pixel; an IC stream is convex in the input. In training mode batch
normalisation normalises with the statistics of the batch, so a row's output depends on the
other rows and these per-sample guarantees do not hold; they hold for the function the
model computes in ``eval()`` mode (running statistics, a fixed affine map with a
non-negative scale).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from core import checks

__all__ = [
    "MODES",
    "SINGLE_MODES",
    "DIFFERENCE_MODES",
    "POSITIVITY_TRANSFORMS",
    "Maxout",
    "ConstrainedLinear",
    "ConstrainedConv2d",
    "ConstrainedBatchNorm1d",
    "ConstrainedBatchNorm2d",
    "MaxoutMLP",
    "MaxoutCNN",
    "DifferenceModel",
    "mlp_maxout",
    "cnn_maxout",
    "is_difference_model",
    "normalize_mode",
    "eval_mode",
    "on_model_device",
]

SINGLE_MODES = ("IC", "Mon", "None")
#: difference mode -> (restriction mode of both streams, whether h sees ``1 - x``)
DIFFERENCE_MODES: dict[str, tuple[str, bool]] = {
    "DIC": ("IC", False),
    "DM": ("Mon", False),
    "DiffNone": ("None", False),
    "DICIN": ("IC", True),
    "DMIN": ("Mon", True),
}
#: all modes, in the column order of the paper's table 12
MODES = ("IC", "Mon", "None", "DIC", "DM", "DiffNone", "DICIN", "DMIN")
#: default sigma of the constrained layers: those followed by batch norm (which fixes their
#: scale) and the output layer. The hidden fully connected layers of ``cnn_maxout`` have no
#: batch norm after them and default to 1 / fan_in (keeps the activation scale along the
#: 6272-1024-256 chain). A much smaller sigma in the output layer (1 / fan_in) lets Adam's
#: first steps push most of its weights below zero, where p = ReLU freezes them: the
#: constrained ``mlp_maxout`` modes then lose about 5 points of accuracy on MNIST.
BN_INIT_STD = 0.01


def _softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


#: name -> (p, inverse of p on positive values)
POSITIVITY_TRANSFORMS: dict[
    str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
] = {
    "relu": (F.relu, lambda y: y),
    "softplus": (F.softplus, _softplus_inverse),
    "exp": (torch.exp, torch.log),
    "square": (torch.square, torch.sqrt),
}


def _check_positivity(positivity: str) -> str:
    if not isinstance(positivity, str) or positivity not in POSITIVITY_TRANSFORMS:
        raise ValueError(
            f"unknown positivity transform {positivity!r}; "
            f"choose one of {sorted(POSITIVITY_TRANSFORMS)}"
        )
    return positivity


def _count(name: str, value: int) -> int:
    """A size option (``num_classes``, ``hidden``, ``rank``): a positive int, else one clear
    error naming it (torch's own errors came later, or a model with no outputs was built)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def _check_init_std(init_std: float | None) -> float | None:
    """None, or a finite positive number (a NaN or inf gave NaN or inf weights silently, a
    negative one was taken by its absolute value)."""
    if init_std is None:
        return None
    v = checks.number("init_std", init_std, 0.0, low_open=True)
    if math.isinf(v):
        raise ValueError(f"init_std must be finite; got {init_std!r}")
    return v


def normalize_mode(mode: str) -> str:
    """Return the canonical spelling of a restriction mode.

    Parameters
    ----------
    mode: str
        One of ``MODES``, case-insensitive; ``"Diff.None"`` (the paper's column name) is
        accepted for ``"DiffNone"``.

    Returns
    -------
    str
        The mode as spelled in ``MODES``.
    """
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a string, one of {MODES}; got {type(mode).__name__}")
    key = mode.replace(".", "").replace("_", "").replace("-", "").lower()
    for name in MODES:
        if name.lower() == key:
            return name
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


class _Positive(nn.Module):
    """Shared logic: raw parameters, effective parameters ``p(raw)`` where constrained."""

    positivity: str

    def _effective(self, raw: torch.Tensor | None, constrained: bool) -> torch.Tensor | None:
        if raw is None or not constrained:
            return raw
        return POSITIVITY_TRANSFORMS[self.positivity][0](raw)

    def _init_positive(self, raw: torch.Tensor, std: float) -> None:
        """Set ``raw`` so that the effective parameter ``p(raw)`` is ``|N(0, std)|``."""
        with torch.no_grad():
            value = torch.randn_like(raw).mul_(std).abs_().clamp_(min=1e-12)
            raw.copy_(POSITIVITY_TRANSFORMS[self.positivity][1](value))

    def _initialise(self, fan_in: int, std: float) -> None:
        """Constrained: ``p(raw) = |N(0, std)|``; free: PyTorch's default for Linear/Conv."""
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            for raw, constrained in ((self.weight, self.constrain_weight),
                                     (self.bias, self.constrain_bias)):
                if constrained:
                    self._init_positive(raw, float(std))
                else:  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / nn.Conv2d, and their bias
                    raw.uniform_(-bound, bound)

    def _init_constant(self, raw: torch.Tensor, value: float) -> None:
        with torch.no_grad():
            raw.copy_(POSITIVITY_TRANSFORMS[self.positivity][1](torch.full_like(raw, value)))


class ConstrainedLinear(_Positive):
    """A linear layer whose weight and bias can pass through a positivity transform.

    Parameters
    ----------
    in_features, out_features: int
        Sizes as in ``torch.nn.Linear``.
    constrain_weight: bool
        Whether the effective weight is ``p(weight)`` (non-negative).
    constrain_bias: bool
        Whether the effective bias is ``p(bias)``.
    positivity: str
        The transform p: ``"relu"``, ``"softplus"``, ``"exp"`` or ``"square"``.
    init_std: float, optional
        Constrained parameters are initialised so that their effective value is
        ``|N(0, init_std)|``; ``None`` uses ``1 / in_features`` (keeps the scale of the
        activations at initialisation). Unconstrained ones use PyTorch's default.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        constrain_weight: bool,
        constrain_bias: bool,
        positivity: str = "relu",
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.constrain_weight, self.constrain_bias = constrain_weight, constrain_bias
        self.positivity = _check_positivity(positivity)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self._initialise(in_features, 1.0 / in_features if init_std is None else init_std)

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer applies (``p(weight)`` where constrained)."""
        return self._effective(self.weight, self.constrain_weight)

    def effective_bias(self) -> torch.Tensor:
        """The bias the layer applies (``p(bias)`` where constrained)."""
        return self._effective(self.bias, self.constrain_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.effective_bias())

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, constrain_weight={self.constrain_weight},"
            f" constrain_bias={self.constrain_bias}, positivity={self.positivity!r}"
        )


class ConstrainedConv2d(_Positive):
    """A 3x3 (or ``kernel_size``) convolution with optionally non-negative weight and bias.

    Parameters are as in ``ConstrainedLinear``; ``init_std=None`` uses ``1 / fan_in`` with
    ``fan_in = in_channels * kernel_size ** 2``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        constrain_weight: bool,
        constrain_bias: bool,
        positivity: str = "relu",
        init_std: float | None = None,
        kernel_size: int = 3,
        padding: int = 1,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.padding = kernel_size, padding
        self.constrain_weight, self.constrain_bias = constrain_weight, constrain_bias
        self.positivity = _check_positivity(positivity)
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels, kernel_size, kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(out_channels))
        fan_in = in_channels * kernel_size * kernel_size
        self._initialise(fan_in, 1.0 / fan_in if init_std is None else init_std)

    def effective_weight(self) -> torch.Tensor:
        """The kernel the layer applies (``p(weight)`` where constrained)."""
        return self._effective(self.weight, self.constrain_weight)

    def effective_bias(self) -> torch.Tensor:
        """The bias the layer applies (``p(bias)`` where constrained)."""
        return self._effective(self.bias, self.constrain_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.effective_bias(), padding=self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"padding={self.padding}, constrain_weight={self.constrain_weight}, "
            f"constrain_bias={self.constrain_bias}, positivity={self.positivity!r}"
        )


class _ConstrainedBatchNormMixin:
    """Batch norm whose scale and shift are ``p(weight)`` and ``p(bias)`` when constrained.

    In evaluation mode this is the per-channel affine map
    ``p(weight) * (x - running_mean) / sqrt(running_var + eps) + p(bias)``: non-decreasing,
    so it keeps monotone and convex streams monotone and convex.
    """

    def _setup(self, constrained: bool, positivity: str, init_std: float) -> None:
        self.constrained = constrained
        self.positivity = _check_positivity(positivity)
        if constrained:
            _Positive._init_constant(self, self.weight, 1.0)
            _Positive._init_positive(self, self.bias, init_std)

    def effective_weight(self) -> torch.Tensor:
        """The per-channel scale applied after normalisation."""
        return _Positive._effective(self, self.weight, self.constrained)

    def effective_bias(self) -> torch.Tensor:
        """The per-channel shift applied after normalisation."""
        return _Positive._effective(self, self.bias, self.constrained)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as torch.nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.effective_weight(),
            self.effective_bias(),
            use_batch_stats,
            factor,
            self.eps,
        )


class ConstrainedBatchNorm1d(_ConstrainedBatchNormMixin, nn.BatchNorm1d):
    """``BatchNorm1d`` with scale and shift through the positivity transform if constrained."""

    def __init__(
        self, num_features: int, constrained: bool, positivity: str = "relu",
        init_std: float = 1e-3,
    ) -> None:
        nn.BatchNorm1d.__init__(self, num_features)
        self._setup(constrained, positivity, init_std)


class ConstrainedBatchNorm2d(_ConstrainedBatchNormMixin, nn.BatchNorm2d):
    """``BatchNorm2d`` with scale and shift through the positivity transform if constrained."""

    def __init__(
        self, num_features: int, constrained: bool, positivity: str = "relu",
        init_std: float = 1e-3,
    ) -> None:
        nn.BatchNorm2d.__init__(self, num_features)
        self._setup(constrained, positivity, init_std)


class Maxout(nn.Module):
    """Rank-k Maxout over groups of ``rank`` consecutive channels (dimension 1).

    ``(B, rank * C, ...) -> (B, C, ...)``; non-decreasing and convex in its inputs.
    """

    def __init__(self, rank: int = 2) -> None:
        super().__init__()
        self.rank = _count("rank", rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (x.shape[1] // self.rank, self.rank)).amax(dim=2)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def _as_image(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            "expected a floating point torch.Tensor of shape (B, 1, 28, 28) or (B, 784)"
        )
    if x.dim() == 2 and x.shape[1] == 784:
        return x.reshape(-1, 1, 28, 28)
    if x.dim() == 4 and tuple(x.shape[1:]) == (1, 28, 28):
        return x
    raise ValueError(
        f"expected input of shape (B, 1, 28, 28) or (B, 784), got {tuple(x.shape)}; "
        "MNIST-sized grey images in [0, 1]"
    )


def _constraints(restriction: str, first: bool) -> tuple[bool, bool]:
    """(constrain weight, constrain bias/BN affine) of a layer under a restriction mode."""
    if restriction == "None":
        return False, False
    if restriction == "IC" and first:
        return False, True
    return True, True


class _MaxoutNet(nn.Module):
    """Common part of the two base architectures."""

    layers: nn.Sequential

    def __init__(self, restriction: str, positivity: str, init_std: float | None) -> None:
        super().__init__()
        if restriction not in SINGLE_MODES:
            raise ValueError(
                f"a single stream has restriction 'IC', 'Mon' or 'None', got {restriction!r}"
            )
        self.mode = restriction
        self.positivity = _check_positivity(positivity)
        self._init_std = _check_init_std(init_std)

    def _std(self, before_bn: bool) -> float | None:
        if self._init_std is not None:
            return self._init_std
        return BN_INIT_STD if before_bn else None

    def _linear(
        self, n_in: int, n_out: int, first: bool = False, before_bn: bool = False
    ) -> ConstrainedLinear:
        cw, cb = _constraints(self.mode, first)
        return ConstrainedLinear(n_in, n_out, cw, cb, self.positivity, self._std(before_bn))

    def _bn(self, kind: type, n: int) -> nn.Module:
        std = 1e-3 if self._init_std is None else self._init_std
        return kind(n, self.mode != "None", self.positivity, std)

    @property
    def monotone(self) -> bool:
        """True if the network is non-decreasing in every input (eval mode)."""
        return self.mode == "Mon"

    @property
    def convex(self) -> bool:
        """True if the network is convex in its input (eval mode)."""
        return self.mode in ("Mon", "IC")


class MaxoutMLP(_MaxoutNet):
    """``mlp_maxout`` of appendix D.1: 784-800-800-800-10, rank-2 Maxout, batch norm.

    Each hidden layer computes ``2 * 800`` pre-activations (the Maxout expansion), batch
    normalises them and takes the maximum of each pair. See ``mlp_maxout``.
    """

    def __init__(
        self, mode: str = "None", num_classes: int = 10, positivity: str = "relu",
        init_std: float | None = None, hidden: int = 800, rank: int = 2,
    ) -> None:
        super().__init__(mode, positivity, init_std)
        num_classes, hidden, rank = (_count(k, v) for k, v in (
            ("num_classes", num_classes), ("hidden", hidden), ("rank", rank)))
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        n_in = 784
        for i in range(1, 4):
            modules[f"fc{i}"] = self._linear(n_in, rank * hidden, first=i == 1, before_bn=True)
            modules[f"bn{i}"] = self._bn(ConstrainedBatchNorm1d, rank * hidden)
            modules[f"maxout{i}"] = Maxout(rank)
            n_in = hidden
        modules["fc4"] = self._linear(n_in, num_classes, before_bn=True)  # sigma 0.01 too
        self.layers = nn.Sequential(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(_as_image(x).flatten(1))


class MaxoutCNN(_MaxoutNet):
    """``cnn_maxout`` of appendix D.1: conv 32-64-128-128 (3x3, pad 1, batch norm), FC
    6272-1024-256-10, rank-2 Maxout after every hidden layer.

    A 2x2 max pooling after the second and the fourth convolution brings 28x28 to the 7x7
    maps that give the stated 6272 = 128 * 7 * 7 features (max pooling is non-decreasing
    and convex, so it keeps the guarantees). See ``cnn_maxout``.
    """

    def __init__(
        self, mode: str = "None", num_classes: int = 10, positivity: str = "relu",
        init_std: float | None = None, rank: int = 2,
    ) -> None:
        super().__init__(mode, positivity, init_std)
        num_classes, rank = _count("num_classes", num_classes), _count("rank", rank)
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        n_in = 1
        for i, width in enumerate((32, 64, 128, 128), start=1):
            cw, cb = _constraints(self.mode, i == 1)
            modules[f"conv{i}"] = ConstrainedConv2d(
                n_in, rank * width, cw, cb, self.positivity, self._std(before_bn=True)
            )
            modules[f"bn{i}"] = self._bn(ConstrainedBatchNorm2d, rank * width)
            modules[f"maxout{i}"] = Maxout(rank)
            if i in (2, 4):
                modules[f"pool{i}"] = nn.MaxPool2d(2)
            n_in = width
        modules["flatten"] = nn.Flatten()
        n_in = 128 * 7 * 7
        for i, width in enumerate((1024, 256), start=1):
            modules[f"fc{i}"] = self._linear(n_in, rank * width)
            modules[f"maxout_fc{i}"] = Maxout(rank)
            n_in = width
        modules["fc3"] = self._linear(n_in, num_classes, before_bn=True)  # sigma 0.01 too
        self.layers = nn.Sequential(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(_as_image(x))


class DifferenceModel(nn.Module):
    """``f = g - h`` of two streams trained jointly (DIC, DM, DiffNone, DICIN, DMIN).

    Parameters
    ----------
    g, h: torch.nn.Module
        The two streams; each takes its own input (``x``, and ``x`` or ``1 - x``).
    inverted: bool
        If True, ``h`` sees ``1 - x``: ``forward(x) = g(x) - h(1 - x)``.
    mode: str
        The difference mode's name (informative).
    """

    def __init__(self, g: nn.Module, h: nn.Module, inverted: bool, mode: str) -> None:
        super().__init__()
        if not isinstance(inverted, bool):  # bool("False") is True
            raise TypeError(f"inverted must be True or False; got {inverted!r}")
        self.g = g
        self.h = h
        self.inverted = inverted
        self.mode = mode

    def h_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the ``h`` stream sees for model input ``x`` (``1 - x`` if inverted)."""
        return 1.0 - x if self.inverted else x

    def streams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(g(x), h(x))`` or ``(g(x), h(1 - x))``: the two logit vectors."""
        return self.g(x), self.h(self.h_input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g_out, h_out = self.streams(x)
        return g_out - h_out

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, inverted={self.inverted}"


def is_difference_model(model: nn.Module) -> bool:
    """True if ``model`` exposes the streams ``.g``, ``.h`` and the flag ``.inverted``."""
    return all(
        isinstance(getattr(model, name, None), nn.Module) for name in ("g", "h")
    ) and isinstance(getattr(model, "inverted", None), bool)


def _build(factory: Callable[..., nn.Module], mode: str, **kwargs) -> nn.Module:
    mode = normalize_mode(mode)
    if mode in SINGLE_MODES:
        return factory(mode, **kwargs)
    restriction, inverted = DIFFERENCE_MODES[mode]
    return DifferenceModel(
        factory(restriction, **kwargs), factory(restriction, **kwargs), inverted, mode
    )


def mlp_maxout(
    mode: str = "None",
    num_classes: int = 10,
    positivity: str = "relu",
    init_std: float | None = None,
) -> nn.Module:
    """The appendix-D ``mlp_maxout`` (784-800-800-800-10) in a restriction mode.

    Parameters
    ----------
    mode: str
        ``"IC"``, ``"Mon"``, ``"None"`` (a ``MaxoutMLP``) or ``"DIC"``, ``"DM"``,
        ``"DiffNone"``, ``"DICIN"``, ``"DMIN"`` (a ``DifferenceModel`` with streams ``.g``
        and ``.h``).
    num_classes: int
        Output size.
    positivity: str
        The transform p applied to constrained weights, biases and batch-norm scale/shift:
        ``"relu"`` (default, best in the paper), ``"softplus"``, ``"exp"`` or ``"square"``.
    init_std: float, optional
        Constrained weights start at ``|N(0, init_std)|`` (effective value). ``None``:
        ``BN_INIT_STD`` (0.01) for layers followed by batch norm and the output layer,
        ``1 / fan_in`` for the hidden fully connected layers of ``cnn_maxout`` (no batch
        norm after them).

    Returns
    -------
    torch.nn.Module
        Takes ``(B, 1, 28, 28)`` or ``(B, 784)`` input, returns ``(B, num_classes)`` logits.
    """
    return _build(
        MaxoutMLP, mode, num_classes=num_classes, positivity=positivity, init_std=init_std
    )


def cnn_maxout(
    mode: str = "None",
    num_classes: int = 10,
    positivity: str = "relu",
    init_std: float | None = None,
) -> nn.Module:
    """The appendix-D ``cnn_maxout`` (conv 32-64-128-128, FC 6272-1024-256-10).

    Parameters are those of ``mlp_maxout``.

    Returns
    -------
    torch.nn.Module
        Takes ``(B, 1, 28, 28)`` or ``(B, 784)`` input, returns ``(B, num_classes)`` logits.
    """
    return _build(
        MaxoutCNN, mode, num_classes=num_classes, positivity=positivity, init_std=init_std
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in evaluation mode, restoring every module's training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def on_model_device(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the model's device, and in its floating point type if ``x`` is floating
    (integer images are left for the model to refuse: casting 0-255 bytes would scale them
    wrong)."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        return x
    if x.is_floating_point() and parameter.is_floating_point():
        return x.to(parameter.device, parameter.dtype)
    return x.to(parameter.device)
