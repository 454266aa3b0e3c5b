r"""SplitCAM and SplitGrad (paper section 4.1) as Captum attributions.

Both read the shifted local sensitivities of the split pair :math:`f = g - h` at one layer
(computed by :func:`core.split`) and follow Captum's conventions, so that a Captum user swaps
``LayerGradCam(model, layer)`` for ``SplitCAM(model, layer)`` and changes nothing else.

Streams and signs (paper eqs. 6 and 7, :math:`l` the layer):

========  =========  ============================================  ==============================
stream    sign       sensitivity :math:`\delta`                    activation :math:`a`
========  =========  ============================================  ==============================
``"g"``   ``"+"``    :math:`\delta^{(l,+g)}` (``probe.pos_g``)     :math:`a^{(l,+)}` (``pos``)
``"g"``   ``"-"``    :math:`\delta^{(l,-g)}` (``probe.neg_g``)     :math:`a^{(l,-)}` (``neg``)
``"g"``   ``None``   :math:`\delta^{(l,g)}` (``probe.g``)          :math:`a^{(l)}` (the model's)
``"h"``   ...        the same with ``pos_h``, ``neg_h``, ``h``     the same
========  =========  ============================================  ==============================

SplitCAM sums :math:`\delta \odot a` over channels, SplitGrad averages :math:`\delta` over
channels. Neither applies a ReLU unless asked to.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from captum._utils.typing import TargetType
from captum.attr import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

import core
from core import checks
from core.capture import selector
from core.errors import SplitOverflowError, caller, precision_advice
from core.shift import DEFAULT_ALPHA, AlphaType, Shift, alpha_label, check_alpha
from core.split import INPUT_SPLITS, MAXPOOL_MODES, NONLINEAR_MODES, STABILIZERS

from ._utils import (
    SIGNS,
    STREAMS,
    adapter_words,
    check_grad_kwargs,
    element_input_error,
    eval_context,
    format_additional_args,
    one_score,
    resolve_layer,
    single_input,
    split_element,
    unwrap_model,
)

__all__ = ["SplitCAM", "SplitGrad"]

_SENSITIVITY = {
    ("g", "+"): "pos_g",
    ("g", "-"): "neg_g",
    ("g", None): "g",
    ("h", "+"): "pos_h",
    ("h", "-"): "neg_h",
    ("h", None): "h",
}
_ACTIVATION = {"+": "pos", "-": "neg", None: "activation"}


class _SplitAttribution(LayerAttribution, GradientAttribution):
    """Shared constructor and probing of SplitCAM and SplitGrad."""

    _allow_input_layer = False

    def __init__(
        self,
        forward_func: Callable[..., Tensor] | nn.Module,
        layer: nn.Module | str | None,
        device_ids: list[int] | None = None,
        *,
        alpha: AlphaType = DEFAULT_ALPHA,
        stream: str = "g",
        sign: str | None = None,
        maxpool: str = "convex",
        stabilizer: str = "scale",
        input_split: str = "relu",
        nonlinear: str = "error",
        output: Any = None,
        reuse_capture: bool = True,
    ) -> None:
        method = type(self).__name__
        checks.option("stream", stream, who=method, allowed=STREAMS)
        checks.option("sign", sign, who=method, allowed=SIGNS)
        checks.option("maxpool", maxpool, who=method, allowed=MAXPOOL_MODES)
        checks.option("stabilizer", stabilizer, who=method, allowed=STABILIZERS)
        checks.option("input_split", input_split, who=method, allowed=INPUT_SPLITS)
        checks.option("nonlinear", nonlinear, who=method, allowed=NONLINEAR_MODES)
        checks.flag("reuse_capture", reuse_capture, method)
        with caller(method):  # an index, a key or a callable, else one TypeError line
            selector(output)
        model = unwrap_model(forward_func, method)
        # a module is found by identity at every call, a name looked up at every call
        self._layer = layer
        self.layer_name = self._layer_name(forward_func)
        module = self._module(model)
        LayerAttribution.__init__(self, forward_func, module, device_ids)
        GradientAttribution.__init__(self, forward_func)
        self.model = model
        self.alpha = alpha
        self.stream = stream
        self.sign = sign
        self.maxpool = maxpool
        self.stabilizer = stabilizer
        self.input_split = input_split
        self.nonlinear = nonlinear
        self.output = output
        self.reuse_capture = reuse_capture
        self.split_model = self._split()
        static = self.split_model.capture.symbolic is not None  # else names need an input
        base = split_element(model, self.layer_name)[0]
        if static and base != "input" and base not in self.split_model.layer_names():
            raise ValueError(
                f"{method}: layer {base!r} is a module of the model but its forward "
                "never calls it, so it has no activation to explain; pick a module that runs."
            )
        with caller(method):  # the one check of alpha (floats in [0, 0.5], "auto", names)
            check_alpha(alpha)
            if static:  # else the shift points are known once an input was seen
                Shift(self.split_model.shift_points(), alpha)
        self.last_alphas: dict[str, Any] = {}

    def _layer_name(self, forward_func: Callable[..., Tensor] | nn.Module) -> str:
        """The name of the layer in the model behind ``forward_func`` (the one resolver of
        every Captum adapter: :func:`captum_split._utils.resolve_layer`)."""
        _, name = resolve_layer(forward_func, self._layer, type(self).__name__,
                                allow_input=self._allow_input_layer, allow_elements=True)
        assert name is not None  # forward_func was unwrapped: a module is behind it
        return name

    def _module(self, model: nn.Module) -> nn.Module | None:
        """Captum's ``layer``: the module named (for ``"NAME:i"`` the module ``NAME``)."""
        if self.layer_name == "input":
            return None
        return model.get_submodule(split_element(model, self.layer_name)[0])

    def _words(self) -> AbstractContextManager[None]:
        """Errors of the split in the adapter's words: the method's name in front, and
        ``SplitCAM(model, 'layer', output=...)`` where core would advise ``core.split(model,
        output=...)`` (:func:`captum_split._utils.adapter_words`)."""
        name = getattr(self, "layer_name", None)
        return adapter_words(type(self).__name__, None if name == "input" else name)

    def _split(self, output: Any = None, single_score: bool = False) -> core.SplitModel:
        """The split of the model as it is now (with ``reuse_capture``, an unchanged model
        costs a fingerprint and is not warned about again: :mod:`core.reuse`); its errors
        name the method. ``single_score``: split the one score per row of the output
        (``target=None``, :func:`captum_split._utils.one_score`)."""
        output = self.output if output is None else output
        if single_score:
            output = one_score(output, type(self).__name__)
        with self._words():
            return core.split(
                self.model, maxpool=self.maxpool, stabilizer=self.stabilizer,
                input_split=self.input_split, nonlinear=self.nonlinear, output=output,
                reuse_capture=self.reuse_capture,
            )

    def _refresh(self, single_score: bool = False) -> None:
        """Follow changes of the model since the last call: the layer is looked up again
        (a module by identity, a name by name; Captum's ``layer`` attribute follows) and the
        model split again, so that a replaced module or loaded weights are explained
        (``single_score``: for ``target=None``, see :meth:`_split`)."""
        self.layer_name = self._layer_name(self.forward_func)
        self.layer = self._module(self.model)
        self.split_model = self._split(single_score=single_score)

    def _finite(self, result: Tensor, sens: Tensor, act: Tensor | None = None) -> Tensor:
        """``result`` (a map made from the finite probe), or :class:`core.SplitOverflowError`
        naming the layer where it left the dtype's range: the product of a sensitivity and an
        activation, or a sum over channels, can overflow where both factors are finite."""
        if bool(torch.isfinite(result).all()):
            return result
        parts = f"sensitivities up to {float(sens.abs().amax()):.3g}"
        if act is not None:
            parts += f" times activations up to {float(act.abs().amax()):.3g}"
        raise SplitOverflowError(
            f"{type(self).__name__}: the map at layer {self.layer_name!r} overflowed "
            f"{result.dtype} at alpha={alpha_label(self.alpha)} ({parts}). "
            + precision_advice(result.dtype, "a larger alpha (closer to 0.5)", "alpha='auto'",
                               otherwise="Rescale the input.")
        )

    def _probe(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
        grad_kwargs: dict[str, Any] | None,
    ) -> tuple[Tensor, Tensor, bool]:
        """Sensitivity and activation at the layer for the chosen stream and sign."""
        method = type(self).__name__
        self.last_alphas = {}  # this call's, once it succeeds (not an earlier call's)
        check_grad_kwargs(grad_kwargs, method)
        x, is_tuple = single_input(inputs, method, self.model)
        first = x[0] if isinstance(x, tuple) else x
        # target=None: the one score per row of a (B,) or (B, 1) output, as LayerGradCam
        t = 0 if target is None else checks.targets(target, first.shape[0], method)
        checks.flag("attribute_to_layer_input", attribute_to_layer_input, method)
        self._refresh(single_score=target is None)
        name = self.layer_name
        if attribute_to_layer_input:
            if name == "input":
                raise ValueError(
                    f"{method}: attribute_to_layer_input needs a layer; the model input has none."
                )
            if split_element(self.model, name)[1] is not None:
                raise element_input_error(name, method)
            name = f"{name}:input"
        extra = format_additional_args(additional_forward_args)
        try:  # every error of the split names the method, in the adapter's words (who=)
            # a training-mode model: eval semantics, flags and buffers kept; the warning's
            # stacklevel: 3 is this line, then attribute, log_usage's wrapper and (6) the
            # user's call
            with self._words(), torch.enable_grad(), eval_context(self.model, stacklevel=6):
                probes = self.split_model.sensitivities(
                    tuple(v.detach() for v in x) if isinstance(x, tuple) else x.detach(), t,
                    layers=[name], alpha=self.alpha, extra_args=extra, who=method
                )
        except core.SeveralInputsError as err:  # in the words of attribute_to_layer_input
            raise core.SeveralInputsError(
                f"{method}: attribute_to_layer_input=True needs a layer with one input tensor; "
                f"{err.module!r} is called with {len(err.sources)} ({', '.join(err.sources)}). "
                "Explain its output (attribute_to_layer_input=False) or the layers that "
                "compute its inputs.", err.module, err.sources
            ) from None
        probe = probes[name]
        first = probe[0] if isinstance(probe, tuple) else probe
        self.last_alphas = dict(first.alphas)
        if isinstance(probe, tuple):  # several inputs, or a layer with a tuple output
            sens = tuple(getattr(p, _SENSITIVITY[(self.stream, self.sign)]).detach()
                         for p in probe)
            act = tuple(getattr(p, _ACTIVATION[self.sign]).detach() for p in probe)
            return sens, act, True
        sens = getattr(probe, _SENSITIVITY[(self.stream, self.sign)]).detach()
        act = getattr(probe, _ACTIVATION[self.sign]).detach()
        return sens, act, is_tuple


class SplitCAM(_SplitAttribution):
    r"""SplitCAM: LayerCAM on the split pair, without its ReLU (paper eqs. 6, 7).

    .. math:: \mathrm{SplitCAM}^{(l,+g)} = \sum_c \delta^{(l,+g)}_c \odot a^{(l,+)}_c, \qquad
              \mathrm{SplitCAM}^{(l,g)} = \sum_c \delta^{(l,g)}_c \odot a^{(l)}_c

    and analogously for sign ``"-"`` and stream ``"h"`` (see the module docstring). At
    ``alpha=0.5``, ``stream="g"``, ``sign=None`` it equals half of
    ``LayerGradientXActivation(model, layer).attribute(...).sum(1, keepdim=True)``.

    Parameters
    ----------
    forward_func : :py:class:`torch.nn.Module`
        The model (also accepted: its bound ``forward`` or a ``DataParallel`` wrapper). It must
        return ``(B, n_classes)`` scores; the split is built from its modules.
    layer : :py:class:`torch.nn.Module` or str
        A submodule of the model (found by identity, Captum's convention) or its name as in
        ``model.named_modules()``; for a ``torch.compile``d or ``DataParallel`` model also
        as in the wrapper's (``"_orig_mod.layer2"``, ``"module.layer2"``; a wrong one is
        reported as typed, with close names under the same prefix). All Captum
        adapters read a layer the same way (``captum_split._utils.resolve_layer``).
        ``"NAME:0"``, ``"NAME:1"``... explain element ``i`` of the tuple output of module
        ``NAME`` (the names that the error for a tuple output probed as ``"NAME"`` lists),
        with the same exact links as a plain layer; Captum's ``layer`` attribute is then
        the module ``NAME``.
    alpha : float, "auto" or dict of str to float
        Default ``"auto"``. The sensitivity shift in ``[0, 0.5]`` (0: true split-pair
        gradients, 0.5: half the model's gradient); a dict sets it per shift point (module
        name); ``"auto"`` chooses it per shift point and row so that the shift part stays
        near the gradient part's size (docs/alpha.md). After :meth:`attribute`,
        ``last_alphas`` holds the alphas used (with ``"auto"``: one value per row for each
        shift point the backward passed); after a call that raised, it is empty.
    stream : {"g", "h"}
        Which network of the split pair ``f = g - h`` to read.
    sign : {None, "+", "-"}
        ``"+"``/``"-"``: the shifted local sensitivity of the positive/negative split stream
        times that stream's activation; ``None``: the unified sensitivity times the model's
        own activation.
    maxpool : {"convex", "wta"}
        Max-pooling rule of the split (paper section 3.4).
    stabilizer : {"scale", "shift", "none"}
        Forward stabilisation of the split activations (paper section 3.2); changes ``a+``,
        ``a-`` (signs ``"+"``, ``"-"``), never the sensitivities.
    input_split : {"relu", "half"}
        How the input is split into ``x+ - x-``.
    device_ids : list of int, optional
        The third positional parameter, as in ``LayerGradCam(forward_func, layer,
        device_ids)``; accepted for Captum compatibility, the split runs on the device of the
        inputs. The SplitCAM options above are keyword-only.
    nonlinear : {"error", "freeze"}
        ``"freeze"`` explains models with smooth units, gates, attention and normalisations
        (:func:`core.split`); the frozen operations are listed by
        ``self.split_model.frozen_operations()``.
    output : int, str or callable, optional
        Keyword-only. For a model whose output is a tuple, dict or dataclass: the index,
        key/attribute or function that picks the logits (``core.split``'s ``output=``).
    reuse_capture : bool
        Keyword-only, default True: reuse what an earlier split of the unchanged model
        captured (``core.split``'s ``reuse_capture``, :mod:`core.reuse`). Its check of
        "unchanged" covers the module tree, module attributes, parameter and buffer shapes
        and hooks, not Python state outside modules that the forward branches on (a global
        flag, a config object changed in place): pass False for such a model, so that every
        call captures the forward afresh.

    Notes
    -----
    ``attribute`` explains the model as it is at that call: the model is split again (with
    ``reuse_capture``, cheap for an unchanged model, whose warnings are not repeated) and
    ``split_model`` is that split; the layer is looked up again (a module by identity, a
    name by name). A ``torch.compile``d model is split through the module it wraps (its
    ``_orig_mod``). A model in training mode is explained with eval semantics and keeps its
    training flags and buffers (:func:`core.explaining.eval_semantics`, warned once per
    model).

    Every error of the split starts with the method's name (``"SplitCAM: ..."``) and asks for
    a ``layer`` to pass; it keeps its type and arguments (:func:`core.errors.caller`).
    """

    @property
    def multiplies_by_inputs(self) -> bool:
        """True: sensitivities are multiplied by the layer activations (a global attribution).

        The same meaning as Captum's ``LayerGradientXActivation(multiply_by_inputs=True)``
        (SplitCAM at ``alpha=0.5`` is half of it). Captum's ``LayerGradCam`` reports False
        although it also weights activations, because it does not override the base property.
        """
        return True

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
        attr_dim_summation: bool = True,
        grad_kwargs: dict[str, Any] | None = None,
    ) -> Tensor | tuple[Tensor]:
        """Compute SplitCAM maps at the layer.

        Parameters
        ----------
        inputs : :py:class:`torch.Tensor` or 1-tuple of it
            Floating-point model input with the batch first, e.g. ``(B, C, H, W)``, in the
            model's dtype (a float64 input on a float32 model is refused, naming both), dense
            (a sparse input is refused: pass ``x.to_dense()``). It may
            or may not require grad; the call also works under :py:func:`torch.no_grad`. A
            NumPy array is refused: pass a :py:class:`torch.Tensor`. A tuple of several
            tensors is refused (the split engine has one attributed input; pass further model
            inputs through ``additional_forward_args``).
        target : int, list of int, :py:class:`torch.Tensor` or None
            The class explained: one for all rows, or one per row (``(B,)``); NaN is
            refused (``ValueError``), as is an empty batch. None, as in Captum, for a model
            with one score per row (a ``(B,)`` or ``(B, 1)`` output, the score explained);
            refused for any other output after the forward, before any backward
            (``ValueError``). With None the model is captured afresh at every call.
        additional_forward_args : any, optional
            Further positional arguments of the model (not attributed), Captum's convention.
        attribute_to_layer_input : bool
            Use the layer's input instead of its output; a layer called with several
            tensors has none and is refused (``ValueError``), as is an element name
            ``"NAME:i"`` (pass ``"NAME"`` for the module's input).
        relu_attributions : bool
            Apply a ReLU to the map (default False, as in the paper).
        attr_dim_summation : bool
            Sum over dimension 1 (channels, default); False returns the per-channel products.
            For this and the two flags above, anything but a bool is refused with
            ``TypeError`` (an argument in the wrong position).
        grad_kwargs : dict, optional
            Captum's keyword (forwarded to :py:func:`torch.autograd.grad` there); only None or
            ``{}``: the split engine's backward passes are fixed, a non-empty dict is refused.

        Returns
        -------
        :py:class:`torch.Tensor` or 1-tuple of it
            ``(B, 1, h, w)`` for a ``(B, C, h, w)`` layer, ``(B, 1)`` for a ``(B, C)`` layer
            (as Captum's ``LayerGradCam``); ``(B, C, ...)`` with ``attr_dim_summation=False``.
            Dtype and device of the input. A 1-tuple when ``inputs`` is a tuple (Captum's
            convention for input attributions, which ``captum.metrics.sensitivity_max``
            relies on; ``LayerGradCam`` returns a tensor there and fails in it). Without
            autograd history
            (``requires_grad`` False), unlike ``LayerGradCam``, whose maps stay attached to the
            graph through the activations.
        """
        for flag, value in (("relu_attributions", relu_attributions),
                            ("attr_dim_summation", attr_dim_summation)):
            checks.flag(flag, value, type(self).__name__)
        sens, act, is_tuple = self._probe(
            inputs, target, additional_forward_args, attribute_to_layer_input, grad_kwargs
        )
        sens_t = sens if isinstance(sens, tuple) else (sens,)
        act_t = act if isinstance(act, tuple) else (act,)
        cams = []
        for s, a in zip(sens_t, act_t, strict=True):
            cam = s * a
            if attr_dim_summation:
                cam = cam.sum(dim=1, keepdim=True)
            if relu_attributions:
                cam = torch.relu(cam)
            cams.append(self._finite(cam, s, a))
        return tuple(cams) if is_tuple else cams[0]


class SplitGrad(_SplitAttribution):
    r"""SplitGrad: the channel mean of a shifted split-pair sensitivity (paper section 4.1).

    With a ``layer``, returns :math:`\frac{1}{C}\sum_c \delta^{(l,\cdot)}_c`, shape
    ``(B, 1, h, w)``. With ``layer=None`` (the default) it is an input attribution shaped like
    Captum's ``Saliency``: the sensitivity at the input, ``(B, C, H, W)``, channels **not**
    averaged (take ``.mean(1, keepdim=True)`` for the paper's map). At ``alpha=0.5``,
    ``stream="g"``, ``sign=None`` it is half the model's gradient (channel-averaged at a layer).

    Parameters
    ----------
    forward_func : :py:class:`torch.nn.Module`
        The model (also accepted: its bound ``forward`` or a ``DataParallel`` wrapper).
    layer : :py:class:`torch.nn.Module`, str or None
        A submodule or its name (``"NAME:i"`` for an element of a tuple output, as in
        :py:class:`SplitCAM`); ``None`` (or ``"input"``) for the model input.
    alpha, stream, sign, maxpool, stabilizer, input_split, device_ids, nonlinear
        As in :py:class:`SplitCAM`; ``sign`` picks ``pos_g``/``neg_g``/``g`` (or the ``h``
        ones), the activations are not used.
    output, reuse_capture
        Keyword-only, as in :py:class:`SplitCAM`.
    """

    _allow_input_layer = True

    def __init__(
        self,
        forward_func: Callable[..., Tensor] | nn.Module,
        layer: nn.Module | str | None = None,
        device_ids: list[int] | None = None,
        *,
        alpha: AlphaType = DEFAULT_ALPHA,
        stream: str = "g",
        sign: str | None = None,
        maxpool: str = "convex",
        stabilizer: str = "scale",
        input_split: str = "relu",
        nonlinear: str = "error",
        output: Any = None,
        reuse_capture: bool = True,
    ) -> None:
        super().__init__(
            forward_func, layer, alpha=alpha, stream=stream, sign=sign, maxpool=maxpool,
            stabilizer=stabilizer, input_split=input_split, device_ids=device_ids,
            nonlinear=nonlinear, output=output, reuse_capture=reuse_capture,
        )

    @property
    def multiplies_by_inputs(self) -> bool:
        """False: a sensitivity (local, gradient-like) attribution, as Captum's ``Saliency``."""
        return False

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        abs: bool = False,
        additional_forward_args: Any = None,
        *,
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """Compute SplitGrad maps.

        The first four parameters are those of Captum's ``Saliency.attribute``, in its order
        (``attribute(x, y, True, extra)`` works positionally); the two after them are
        keyword-only.

        Parameters
        ----------
        inputs : :py:class:`torch.Tensor` or 1-tuple of it
            Floating-point model input with the batch first, e.g. ``(B, C, H, W)``, in the
            model's dtype (as for :py:meth:`SplitCAM.attribute`).
        target : int, list of int, :py:class:`torch.Tensor` or None
            The class explained: one for all rows, or one per row (``(B,)``); None for a
            model with one score per row (see :py:meth:`SplitCAM.attribute`).
        abs : bool
            Return the absolute value. Default False, unlike ``Saliency`` (True): the
            signed map is the one of the paper's exact links (half the gradient at
            ``alpha=0.5``). Anything but a bool is refused with ``TypeError`` (an argument
            in the wrong position).
        additional_forward_args : any, optional
            Further positional arguments of the model (not attributed).
        attribute_to_layer_input : bool, keyword-only
            Use the layer's input instead of its output (needs a layer with one input
            tensor).
        grad_kwargs : dict, optional, keyword-only
            Only None or ``{}`` (see :py:meth:`SplitCAM.attribute`).

        Returns
        -------
        :py:class:`torch.Tensor` or 1-tuple of it
            With a layer: ``(B, 1, h, w)`` (``(B, 1)`` for a ``(B, C)`` layer). Without:
            shaped like the input, ``(B, C, H, W)``. A 1-tuple when ``inputs`` is a tuple
            (as ``Saliency``; see :py:meth:`SplitCAM.attribute`). Without autograd history.
        """
        checks.flag("abs", abs, type(self).__name__)
        sens, _, is_tuple = self._probe(
            inputs, target, additional_forward_args, attribute_to_layer_input, grad_kwargs
        )
        out = []
        for s in sens if isinstance(sens, tuple) else (sens,):
            sens_map = s.mean(dim=1, keepdim=True) if self.layer_name != "input" else s
            out.append(self._finite(sens_map.abs() if abs else sens_map, s))
        return tuple(out) if is_tuple else out[0]
