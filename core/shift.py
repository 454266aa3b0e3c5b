r"""The backward alpha shift of the split pair: fixed alphas, ``alpha="auto"`` and diagnostics.

The shifted backward (paper section 3.3, appendix F.3) multiplies the S stream (the sum of the
two shifted local sensitivities) by :math:`f_p = 1 - 2\alpha_p` at every *shift point* ``p``
(the input, the output of every ReLU-type unit, the model output). By Theorem 9 every Split
map is a **gradient part** plus a **shift part**,

.. math:: \delta^{(l,g)}_{\mathrm{shift}} = \underbrace{\tfrac12 \delta^{(l)}}_{\text{gradient
          part}} \; \underbrace{- \tfrac12 \sum_{l \le j < L} \bar\alpha_j\,
          \partial Q[j+1] / \partial a^{(l)}}_{\text{shift part}}, \qquad
          \bar\alpha_j = \prod_{j \le i \le L} (1 - 2\alpha^{(i)}),

where the shift part is fed only by the S stream, :math:`S^{(l)} = \bar\alpha_l\,
\prod |W|` (eq. 78): it depends on the class only through the last layer's ``|W|`` row and on
the input only through ReLU masks. When the shift part is many orders of magnitude larger than
the gradient part the map cannot depend on the class (:class:`SplitClassBlindWarning`).

``alpha="auto"`` picks one factor per shift point and per row, walking back from the output:

.. math:: f_p = \min\Bigl(1,\; r\,\frac{\nu(\delta^{(p)})}{\nu(S^{(p)}_{\mathrm{in}})}\Bigr),
          \qquad \alpha_p = \frac{1 - f_p}{2},

with :math:`\nu(t)` the mean of :math:`|t|` over the row, :math:`\delta^{(p)}` the model's
gradient of the target logit at ``p`` and :math:`S^{(p)}_{\mathrm{in}}` the S stream arriving
at ``p`` (already shifted by the points above). After the shift the S stream has at most
``r`` times the gradient's size at every shift point, so no layer's split term can swamp the
gradient part. Both quantities come from the two backward passes that
:meth:`core.SplitModel.sensitivities` runs anyway (no extra pass); the rule is deterministic.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch

from core import checks
from core.errors import WarnedModels, frames_to_user
from core.pair import Pair
from core.stabilize import ScaleGrad, column

if TYPE_CHECKING:
    from core.split import SplitModel

AUTO = "auto"
#: The paper's alpha; also the value of shift points a mapping leaves out (without "default").
PAPER_ALPHA = 0.4
#: The default alpha of every Split method (a float in ``[0, 0.5]`` or ``"auto"``).
DEFAULT_ALPHA: float | str = AUTO
#: Default target ``r`` of ``alpha="auto"``: S at most ``r`` times the gradient's size.
AUTO_RATIO = 0.1
#: A map whose shift part is more than this many times its gradient part (median over the
#: batch, L2 norms) is reported as class-blind (:class:`SplitClassBlindWarning`).
CLASS_BLIND_RATIO = 10.0

AlphaType = Union[float, str, Mapping[str, float]]  # noqa: UP007 (runtime alias)


#: What to do about a class-blind map (the end of :class:`SplitClassBlindWarning`'s message).
CLASS_BLIND_ADVICE = ("Use alpha='auto' or an alpha closer to 0.5 (see "
                      "core.shift_diagnostics).")


class SplitClassBlindWarning(UserWarning):
    """A Split map is dominated by its shift part and does not depend on the target class.

    Attributes
    ----------
    layer: str or None
        The layer of the map.
    ratio: float
        Its shift part over its gradient part (:func:`shift_ratio`, median over the batch);
        NaN when not given.
    alpha: str or None
        The alpha of the map, as :func:`alpha_label` writes it (``"0.4"``, ``"{...}"``).
    """

    def __init__(self, message: str, layer: str | None = None, ratio: float = math.nan,
                 alpha: str | None = None):
        super().__init__(message)
        self.layer = layer
        self.ratio = float(ratio)
        self.alpha = alpha


def check_alpha(alpha: Any) -> None:
    """Check a user's alpha: a float in ``[0, 0.5]``, ``"auto"`` or a dict of such floats.

    Raises
    ------
    TypeError, ValueError
        With one line naming the bad value and the allowed ones.
    """
    if isinstance(alpha, str):
        if alpha != AUTO:
            raise ValueError(f"alpha={alpha!r} is not valid; use a float in [0, 0.5] or 'auto'.")
        return
    if isinstance(alpha, Mapping):
        keys = [k for k in alpha if not isinstance(k, str)]
        if keys:
            raise TypeError(
                f"alpha: a dict's keys are shift-point names (str) or 'default'; got {keys[0]!r} "
                f"({type(keys[0]).__name__})."
            )
        items = [(f"alpha[{k!r}]", v) for k, v in alpha.items()]
    else:
        items = [("alpha", alpha)]
    for name, v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(
                f"alpha must be a float in [0, 0.5], 'auto' or a dict {{shift point: float}}; "
                f"got {alpha!r}."
            )
        checks.number(name, v, 0.0, 0.5, note=(
            " The shift interpolates between the split-pair gradients (alpha=0) and half the "
            "model's gradient (alpha=0.5)."))


def alpha_label(alpha: AlphaType) -> str:
    """Short text of an alpha for tables (``0.4``, ``auto``, ``{...}``)."""
    if isinstance(alpha, str):
        return alpha
    if isinstance(alpha, Mapping):
        return "{" + ", ".join(f"{k}: {float(v):g}" for k, v in alpha.items()) + "}"
    return f"{float(alpha):g}"


# |t| of a large gradient is summed in blocks of about this many entries: one temporary the
# size of the gradient is fresh memory that the system maps page by page at every call (VGG16
# at batch 8: 42 ms for a gradient at its first ReLU, against 5 ms in blocks)
NU_BLOCK = 1 << 20


def _nu(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Per-row mean absolute value over dimension ``dim`` (the batch's), shape
    ``(t.shape[dim],)``; a large ``t`` in blocks of its next dimension (about
    :data:`NU_BLOCK` entries each)."""
    t = t.detach().movedim(dim, 0) if dim else t.detach()
    if t.dim() < 2 or t.numel() <= NU_BLOCK:
        return t.reshape(t.shape[0], -1).abs().mean(dim=1)
    dims = tuple(range(1, t.dim()))
    step = max(1, t.shape[1] * NU_BLOCK // t.numel())
    total = sum(block.abs().sum(dim=dims) for block in t.split(step, dim=1))
    return total / t[0].numel()


class _Capture(torch.autograd.Function):
    """Identity; the first backward through it records the gradient's per-row size."""

    @staticmethod
    def forward(ctx, d: torch.Tensor, shift: Shift, key: tuple) -> torch.Tensor:  # noqa: D102
        ctx.shift, ctx.key = shift, key
        return d.view_as(d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        sizes = ctx.shift.gradient_size
        if ctx.key not in sizes:  # not setdefault: the later passes need not compute it
            sizes[ctx.key] = _nu(grad, ctx.shift.batch_dim(ctx.key))
        return grad, None, None


class _AutoScale(torch.autograd.Function):
    """Identity; multiplies the incoming S stream by the auto factor ``f_p`` (one per row)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, shift: Shift, key: tuple) -> torch.Tensor:  # noqa: D102
        ctx.shift, ctx.key = shift, key
        return s.view_as(s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        factor = ctx.shift.auto_factor(ctx.key, grad).to(grad.dtype)
        dim = ctx.shift.batch_dim(ctx.key)
        if dim:  # one factor per row of the batch, along the batch's dimension
            return grad * factor.view([-1 if i == dim else 1 for i in range(grad.dim())]), \
                None, None
        return grad * column(factor, grad), None, None


class Shift:
    """The alpha shift of one :meth:`core.SplitModel.sensitivities` call.

    Parameters
    ----------
    points: sequence of str
        The model's shift points (:meth:`core.SplitModel.shift_points`).
    alpha: float, "auto" or mapping
        A float in ``[0, 0.5]`` for every point; a mapping from point names (and
        ``"default"``) to floats; or ``"auto"`` (see the module docstring).
    ratio: float, optional
        The target ``r`` of ``"auto"`` (default :data:`AUTO_RATIO`).

    Attributes
    ----------
    alphas: dict of str to float or torch.Tensor
        The alpha of each shift point; with ``"auto"`` a tensor with one value per row, filled
        in during the backward (points the backward did not reach are absent).
    """

    def __init__(self, points: Sequence[str], alpha: AlphaType = DEFAULT_ALPHA,
                 ratio: float | None = None) -> None:
        check_alpha(alpha)
        ratio = AUTO_RATIO if ratio is None else ratio
        if not (isinstance(ratio, numbers.Real) and ratio > 0 and math.isfinite(ratio)):
            raise ValueError(f"auto ratio={ratio!r} must be a positive finite number")
        self.auto = alpha == AUTO
        self.label = alpha_label(alpha)
        self.ratio = float(ratio)
        self.gradient_size: dict[tuple[str, str], torch.Tensor] = {}
        # the batch size (the first split input's rows) and each auto point's batch dimension
        self._batch: int | None = None
        self._dims: dict[tuple[str, str], int] = {}
        self._names: dict[tuple[str, str], str] = {}
        self.alphas: dict[str, float | torch.Tensor] = {}
        if self.auto:
            # at the output both the gradient and S are the one-hot seed: f = min(1, r)
            self._factors = {"output": min(1.0, self.ratio)}
            self.alphas["output"] = (1.0 - self._factors["output"]) / 2
            return
        if isinstance(alpha, Mapping):
            unknown = sorted(set(alpha) - set(points) - {"default"})
            if unknown:
                raise ValueError(
                    f"alpha names unknown shift points {unknown}; shift points are 'input', "
                    f"'output', 'default' and the ReLU-type units {list(points[1:-1])[:8]}..."
                )
            default = float(alpha.get("default", PAPER_ALPHA))
            values = {p: float(alpha.get(p, default)) for p in points}
        else:
            values = dict.fromkeys(points, float(alpha))
        self.alphas = dict(values)
        self._factors = {p: 1.0 - 2.0 * a for p, a in values.items()}

    def factor(self, point: str) -> float:
        """The fixed factor ``1 - 2 alpha`` of a point (the output's also under ``"auto"``)."""
        return self._factors.get(point, 1.0)

    def apply(self, point: str, pair: Pair, node: str | None = None) -> Pair:
        """The pair after shift point ``point``: its S gradient is scaled in the backward.

        ``node`` names the graph node (default: ``point``); under ``"auto"`` a point whose
        name several nodes share (a ReLU module called twice, several inputs) gets one factor
        per node, recorded as ``point``, ``point#2``, ...
        """
        if self.auto and point != "output":
            key = (point, node or point)
            self._dims[key] = self._find_batch_dim(point, pair.d)
            d = _Capture.apply(pair.d, self, key) if pair.d.requires_grad else pair.d
            s = _AutoScale.apply(pair.s, self, key) if pair.s.requires_grad else pair.s
            return Pair(d, s)
        f = self.factor(point)
        if f == 1.0:
            return pair
        return Pair(pair.d, ScaleGrad.apply(pair.s, f))

    def _find_batch_dim(self, point: str, d: torch.Tensor) -> int:
        """The dimension of ``d`` that holds the batch's rows (a layout guess from shapes).

        0 for the inputs (the first one sets the batch size ``B``) and for a tensor of ``B``
        rows; else the one inner dimension (neither the first nor the last) of size ``B``: a
        ``(T, B, D)`` layout (``batch_first=False``), where sizes per index of the first
        dimension would mix the rows of the batch; else 0: a tensor of ``B * T`` rows
        (``(B * T, D)``), each from one row of the batch, keeps the rows apart as it is.
        Not told apart: ``(T, B, D)`` with ``T == B`` (read as rows) and a ``(B * T, C, ...)``
        tensor with ``C == B`` (read as ``(T, B, ...)``).
        """
        if d.dim() == 0:
            return 0
        if point == "input" and self._batch is None:
            self._batch = d.shape[0]
        if self._batch is None or d.shape[0] == self._batch:
            return 0
        dims = [i for i in range(1, d.dim() - 1) if d.shape[i] == self._batch]
        return dims[0] if len(dims) == 1 else 0

    def batch_dim(self, key: tuple[str, str]) -> int:
        """The batch's dimension at an auto point (see :meth:`apply`)."""
        return self._dims.get(key, 0)

    def auto_factor(self, key: tuple[str, str], s_grad: torch.Tensor) -> torch.Tensor:
        """``f_p = min(1, r nu(delta_p) / nu(S_in))`` per row; records ``alpha_p``.

        ``key`` is ``(point, node)``; ``s_grad`` is the gradient arriving at the point's S
        stream (``S_in / 2``).
        """
        size = self.gradient_size.get(key)
        if size is None:
            raise RuntimeError(
                f"alpha='auto': the model's gradient at shift point {key[0]!r} was not "
                "recorded; the gradient pass must run before the S pass"
            )
        s_size = 2 * _nu(s_grad, self.batch_dim(key))
        ratio = self.ratio * size.to(s_size.dtype) / s_size
        factor = torch.where(s_size > 0, ratio.clamp(max=1.0), torch.ones_like(s_size))
        factor = torch.nan_to_num(factor, nan=1.0)
        name = self._names.setdefault(key, self._free_name(key[0]))
        self.alphas[name] = (1.0 - factor) / 2
        return factor

    def _free_name(self, point: str) -> str:
        taken = set(self._names.values())
        name, k = point, 2
        while name in taken:
            name, k = f"{point}#{k}", k + 1
        return name

    def describe(self) -> str:
        """``"auto"`` or the alpha as given (for messages: :func:`alpha_label`)."""
        return self.label


# ---------------------------------------------------------------------------- diagnostics
def _ratio(shift_part: torch.Tensor, grad_part: torch.Tensor) -> torch.Tensor:
    """Per-row ``||shift part|| / ||gradient part||`` (L2 norms; inf where the gradient is 0)."""
    num = shift_part.reshape(shift_part.shape[0], -1).double().norm(dim=1)
    den = grad_part.reshape(grad_part.shape[0], -1).double().norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-300),
                       torch.where(num > 0, torch.full_like(num, math.inf),
                                   torch.zeros_like(num)))


def shift_ratio(probe: Any, cam: bool = False) -> float:
    """Median over the batch of ``||shift part|| / ||gradient part||`` of a probe's ``g`` map.

    Parameters
    ----------
    probe: core.Probe
        A result of :meth:`core.SplitModel.sensitivities`.
    cam: bool
        False: the sensitivity ``g``; True: the SplitCAM map ``sum_c g_c a_c``.
    """
    grad_part, shift_part = probe.grad_part, probe.shift_part
    if cam:
        act = probe.activation
        grad_part = (grad_part * act).sum(1) if act.dim() > 1 else grad_part * act
        shift_part = (shift_part * act).sum(1) if act.dim() > 1 else shift_part * act
    return float(_ratio(shift_part, grad_part).median())


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Pearson correlation (NaN where a row is constant: undefined)."""
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    nan = torch.full_like(den, math.nan)
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), nan)


def cam_map(probe: Any) -> torch.Tensor:
    """SplitCAM map ``sum_c g_c a_c`` (stream g, no sign) of a probe."""
    prod = probe.g * probe.activation
    return prod.sum(1) if prod.dim() > 1 else prod


def grad_map(probe: Any) -> torch.Tensor:
    """SplitGrad map (channel mean of ``g``) of a probe."""
    return probe.g.mean(1) if probe.g.dim() > 2 else probe.g


@dataclass(frozen=True)
class ShiftReport:
    """One row of :func:`shift_diagnostics` (one layer and one alpha).

    Attributes
    ----------
    layer: str
    alpha: str
        The alpha as given (``"0.4"``, ``"auto"``).
    ratio: float
        Median over the batch of ``||shift part|| / ||gradient part||`` of the sensitivity g.
    cam_ratio: float
        The same for the SplitCAM map ``sum_c g_c a_c``.
    class_corr: float
        Median over the batch of the Pearson correlation of the SplitCAM maps of the target and
        of a second class (1.0: the map does not depend on the class).
    grad_class_corr: float
        The same for the SplitGrad map (channel mean of g).
    alphas: dict of str to float
        The alphas used per shift point (with ``"auto"``: the median over the batch).
    """

    layer: str
    alpha: str
    ratio: float
    cam_ratio: float
    class_corr: float
    grad_class_corr: float
    alphas: dict[str, float]


def _median_alphas(alphas: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v.median()) if isinstance(v, torch.Tensor) else float(v)
            for k, v in alphas.items()}


def shift_diagnostics(
    sm: SplitModel,
    x: torch.Tensor,
    targets: int | torch.Tensor,
    layers: str | Sequence[str],
    alphas: AlphaType | Sequence[AlphaType] = (0.5, 0.45, 0.4, 0.3, AUTO),
    other: int | torch.Tensor | None = None,
    extra_args: tuple = (),
) -> list[ShiftReport]:
    """Shift part versus gradient part and class dependence, per layer and alpha.

    Parameters
    ----------
    sm: core.SplitModel
    x: torch.Tensor or tuple of torch.Tensor
        The input batch (a tuple: several inputs, as for :meth:`core.SplitModel.sensitivities`).
    targets: int or torch.Tensor
        The explained class (one per row or one for all).
    layers: str or sequence of str
        Layer names as for :meth:`core.SplitModel.sensitivities` (one name: that layer).
    alphas: sequence
        Floats in ``[0, 0.5]``, mappings or ``"auto"`` (one of them alone: that alpha).
    other: int or torch.Tensor, optional
        The second class of the class-dependence check; default ``(target + 1) mod K``.

    Returns
    -------
    list of ShiftReport
        One per (alpha, layer), in that order; a layer with a tuple of probes (``"input"``
        with several inputs, a tuple output) gives one per element, named ``"input"``,
        ``"input:1"``... or ``"NAME:0"``, ``"NAME:1"``...
    """
    if isinstance(layers, str):  # one layer, as sensitivities takes it
        layers = [layers]
    if isinstance(alphas, (str, numbers.Real, Mapping, torch.Tensor)):  # one alpha
        alphas = [alphas]
    rows: list[ShiftReport] = []
    for alpha in alphas:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SplitClassBlindWarning)
            probes = sm.sensitivities(x, targets, layers=list(layers), alpha=alpha,
                                      extra_args=extra_args)
            if other is None:
                with torch.no_grad():
                    k = sm.forward_pairs(x, *extra_args).d.shape[1]
                rows_in = (x[0] if isinstance(x, (tuple, list)) else x).shape[0]
                t = torch.as_tensor(targets).reshape(-1).expand(rows_in)
                second = (t + 1) % k
            else:
                second = other
            probes2 = sm.sensitivities(x, second, layers=list(layers), alpha=alpha,
                                       extra_args=extra_args)
        for layer in layers:
            for name, p, q in _elements(layer, probes[layer], probes2[layer]):
                rows.append(ShiftReport(
                    layer=name, alpha=alpha_label(alpha), ratio=shift_ratio(p),
                    cam_ratio=shift_ratio(p, cam=True),
                    class_corr=float(_corr(cam_map(p), cam_map(q)).median()),
                    grad_class_corr=float(_corr(grad_map(p), grad_map(q)).median()),
                    alphas=_median_alphas(p.alphas),
                ))
    return rows


def _elements(layer: str, p: Any, q: Any) -> list[tuple[str, Any, Any]]:
    """``(name, probe, probe of the second class)`` of a layer: one, or one per element of a
    tuple of probes (several inputs: ``"input"``, ``"input:1"``...; a tuple output:
    ``"NAME:0"``, ``"NAME:1"``...)."""
    if not isinstance(p, tuple):
        return [(layer, p, q)]
    inputs = layer in ("input", "")
    return [("input" if inputs and i == 0 else f"{'input' if inputs else layer}:{i}", a, b)
            for i, (a, b) in enumerate(zip(p, q, strict=True))]


# ---------------------------------------------------------------------------- warning
_WARNED = WarnedModels()


def warn_if_class_blind(sm: SplitModel, layer: str, probe: Any, shift: Shift) -> None:
    """Warn once per model and layer when a fixed alpha leaves the map class-blind.

    The check: :func:`shift_ratio` of the probe above :data:`CLASS_BLIND_RATIO`. "Once" is
    per ``torch.nn.Module`` (``sm.model``), also across split models and SplitCAM objects
    built on it.
    """
    if shift.auto:
        return
    if (sm.model, layer) in _WARNED:
        return
    ratio = shift_ratio(probe)
    if ratio > CLASS_BLIND_RATIO:
        _WARNED.add(sm.model, layer)
        dtype = probe.S.dtype
        lost = (f" Beyond 1/eps of {dtype} ({1 / torch.finfo(dtype).eps:.3g}) the gradient part "
                "is lost to rounding: the g and h maps then differ by noise, not by gradient "
                "x activation." if ratio * torch.finfo(dtype).eps > 1 else "")
        warnings.warn(SplitClassBlindWarning(
            f"the Split map at layer {layer!r} does not depend on the target class: its shift "
            f"part is {ratio:.3g} times its gradient part (median over the batch, threshold "
            f"{CLASS_BLIND_RATIO:g}) at alpha={shift.describe()}.{lost} {CLASS_BLIND_ADVICE}",
            layer, ratio, shift.describe(),
        ), stacklevel=1 + frames_to_user())  # the user's line, past adapter frames
