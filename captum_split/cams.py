"""LayerCAM and Grad-CAM++ as Captum layer attributions (the CAM baselines Captum lacks).

Both follow Captum's :py:class:`captum.attr.LayerGradCam` interface: construct with the model
and a layer, call ``attribute(inputs, target)`` and get a map of shape ``(B, 1, h, w)`` at the
layer's resolution (upsample with :py:meth:`captum.attr.LayerAttribution.interpolate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from captum._utils.common import (
    _format_additional_forward_args,
    _format_tensor_into_tuples,
    _run_forward,
)
from captum._utils.gradient import compute_layer_gradients_and_eval
from captum._utils.typing import TargetType
from captum.attr import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from core import checks

from ._utils import (
    checked_forward,
    dtype_errors,
    element_input_error,
    eval_context,
    input_tensors,
    owner_module,
    resolve_layer,
    split_element,
)

__all__ = ["LayerCAM", "GradCAMPlusPlus"]


def _activations(name: str, out: Sequence[Any]) -> list[str]:
    """The names ``"NAME:i"`` of the floating-point tensors of a layer's tuple output."""
    return [f"{name}:{i}" for i, v in enumerate(out)
            if isinstance(v, Tensor) and v.is_floating_point()]


class _CAMBase(LayerAttribution, GradientAttribution):
    """Shared constructor and gradient/activation collection of the CAM baselines."""

    _name = "CAM"

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layer: nn.Module | str,
        device_ids: list[int] | None = None,
    ) -> None:
        model, name = resolve_layer(forward_func, layer, type(self).__name__,
                                    allow_elements=True)
        #: the layer's name (None for a module of a forward_func that is no module) and,
        #: for "NAME:i", the index of the explained element of NAME's tuple output
        if model is None or name is None:
            self.layer_name, self._element, module = None, None, layer
        else:
            base, self._element = split_element(model, name)
            self.layer_name, module = name, model.get_submodule(base)
        LayerAttribution.__init__(self, forward_func, module, device_ids)
        GradientAttribution.__init__(self, forward_func)

    @property
    def multiplies_by_inputs(self) -> bool:
        """True: the maps weight the layer activations (a global attribution).

        As ``LayerGradientXActivation``'s; Captum's ``LayerGradCam`` reports False although it
        also weights activations, because it does not override the base property.
        """
        return True

    def _check_flags(self, attribute_to_layer_input: Any, relu_attributions: Any,
                     attr_dim_summation: Any) -> None:
        """``TypeError`` for a flag that is not a bool (an argument in the wrong position)."""
        for name, value in (("attribute_to_layer_input", attribute_to_layer_input),
                            ("relu_attributions", relu_attributions),
                            ("attr_dim_summation", attr_dim_summation)):
            checks.flag(name, value, type(self).__name__)

    def _grads_and_acts(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
        grad_kwargs: dict[str, Any] | None,
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Check the arguments, then collect the layer gradients and activations with the
        model in eval semantics (a training-mode model keeps its flags and buffers,
        :func:`core.explaining.eval_semantics`) and PyTorch's dtype errors named."""
        method = type(self).__name__
        # what the model takes, as LayerGradCam: token ids, uint8 images, float64 into a
        # model that casts its input; a true dtype mismatch is named when the forward fails
        items = input_tensors(inputs, method, floating=False)
        if target is not None and not isinstance(target, tuple) and not (
            isinstance(target, list) and any(isinstance(t, tuple) for t in target)
        ):  # class indices (not Captum's tuples for outputs with more dimensions): checked,
            # and handed to Captum as the plain ints its target selection takes (it rejects
            # NumPy ints and arrays, 0-d tensors in a list, an (N, 1) tensor: AssertionError)
            target = checks.targets(target, items[0].shape[0], method).tolist()
        if self._element is not None and attribute_to_layer_input:
            raise element_input_error(str(self.layer_name), method)
        # the warning's stacklevel: 3 is this line, then attribute, log_usage's wrapper
        # and (6) the user's call
        with eval_context(self.forward_func, stacklevel=6), \
                dtype_errors(items, owner_module(self.forward_func), method):
            return self._collect(_format_tensor_into_tuples(items), target,
                                 _format_additional_forward_args(additional_forward_args),
                                 attribute_to_layer_input, grad_kwargs)

    def _collect(
        self,
        inputs: tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
        grad_kwargs: dict[str, Any] | None,
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Layer gradients and activations from Captum's machinery (or, for ``"NAME:i"``,
        :meth:`_element_grads_and_acts`), inside :meth:`_grads_and_acts`' checks."""
        if self._element is not None:
            return self._element_grads_and_acts(inputs, target, additional_forward_args,
                                                grad_kwargs)
        # registered before Captum's own hook, so it runs first: a tuple output that Captum
        # cannot differentiate is refused at the layer, before any backward pass
        handle = None if attribute_to_layer_input else \
            self.layer.register_forward_hook(self._refuse_tuple_with_constants)
        try:
            grads, acts = compute_layer_gradients_and_eval(
                checked_forward(self.forward_func, target, type(self).__name__),
                self.layer,
                inputs,
                target,
                additional_forward_args,
                device_ids=self.device_ids,
                attribute_to_layer_input=attribute_to_layer_input,
                grad_kwargs=grad_kwargs,
            )
        finally:
            if handle is not None:
                handle.remove()
        # as in LayerGradCam: gradients detached, activations keep their autograd history
        return tuple(g.detach() for g in grads), tuple(acts)

    def _refuse_tuple_with_constants(self, module: nn.Module, args: Any, out: Any) -> None:
        """Forward hook: ``ValueError`` (:func:`core.checks.tuple_output`, the message of
        SplitCAM and :mod:`core` for a tuple output) for a layer named by its bare name whose
        tuple output holds a value that is no floating-point tensor (pooling indices), which
        Captum's layer gradients cannot differentiate; the message lists ``"NAME:i"`` of
        the activations. A tuple of activations only is Captum's (one map per element)."""
        if not isinstance(out, tuple | list) or all(
                isinstance(v, Tensor) and v.is_floating_point() for v in out):
            return
        name = self.layer_name if self.layer_name is not None else type(module).__name__
        raise checks.tuple_output(name, _activations(name, out), len(out), type(self).__name__)

    def _element_grads_and_acts(
        self,
        inputs: tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        grad_kwargs: dict[str, Any] | None,
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Gradient and value of element ``i`` of the layer's tuple output (``"NAME:i"``).

        Captum's layer machinery differentiates every element of a tuple output (and fails
        on one without gradients, such as pooling indices), so the element is kept by a
        forward hook of its own: the forward continues with a clone of it, as in Captum, so
        that in-place operations after the layer leave the kept value alone.
        """
        method, name, index = type(self).__name__, str(self.layer_name), self._element
        assert index is not None
        base = name.rpartition(":")[0]
        kept: dict[torch.device, Tensor] = {}

        def keep(module: nn.Module, args: Any, out: Any) -> Any:
            if not isinstance(out, tuple | list):
                raise ValueError(
                    f"{method}: layer {name!r} names element {index} of a tuple output, but "
                    f"{base!r} outputs a {type(out).__name__}; pass layer {base!r}."
                )
            valid = _activations(base, out)
            part = out[index] if index < len(out) else None
            if not isinstance(part, Tensor) or not part.is_floating_point():
                what = (f"does not exist ({base!r} outputs {len(out)} values)" if part is None
                        else f"is {part.dtype if isinstance(part, Tensor) else type(part)}, "
                        "not an activation (e.g. pooling indices)")
                raise ValueError(f"{method}: layer {name!r} {what}; pass "
                                 f"{', '.join(map(repr, valid)) or 'another layer'}.")
            if not part.requires_grad:
                part.requires_grad_()
            kept[part.device] = part
            parts = list(out)
            parts[index] = part.clone()
            if isinstance(out, list):
                return parts
            return out._make(parts) if hasattr(out, "_make") else type(out)(parts)

        with torch.enable_grad():
            handle = self.layer.register_forward_hook(keep)
            try:
                scores = _run_forward(checked_forward(self.forward_func, target, method),
                                      inputs, target, additional_forward_args)
            finally:
                handle.remove()
            if not kept:
                raise ValueError(f"{method}: the forward never called {base!r}, so {name!r} "
                                 "has no value; pass a layer that runs.")
            if len(kept) > 1:
                raise ValueError(
                    f"{method}: {base!r} ran on {len(kept)} devices (DataParallel); layer "
                    f"{name!r} is explained on one: pass the module inside (.module)."
                )
            if scores.dim() > 1 and scores[0].numel() != 1:
                raise ValueError(f"{method}: the model output has shape "
                                 f"{tuple(scores.shape)}; pass target= (one class per row).")
            (act,) = kept.values()
            (grad,) = torch.autograd.grad(torch.unbind(scores), act, **(grad_kwargs or {}))
        if grad is None:  # grad_kwargs allow_unused=True, the score does not depend on it
            grad = torch.zeros_like(act)
        return (grad.detach(),), (act,)


class LayerCAM(_CAMBase):
    r"""LayerCAM (Jiang et al., 2021) for a chosen layer.

    Each activation is weighted by its own positive gradient and the products are summed over
    channels:

    .. math:: \mathrm{LayerCAM}^{(l)} = \mathrm{ReLU}\Big(\sum_c \mathrm{ReLU}
              \big(\tfrac{\partial y}{\partial a^{(l)}_c}\big) \odot a^{(l)}_c\Big)

    (the paper's eq. 5 writes the weights without the inner ReLU; Jiang et al.'s original
    method, implemented here, has it). The outer ReLU is ``relu_attributions`` (default True, as
    in the original method; it only matters for layers whose activations can be negative).

    Parameters
    ----------
    forward_func : callable
        The model (or any function of the inputs returning ``(B, n_classes)`` scores).
    layer : :py:class:`torch.nn.Module` or str
        The layer whose output (or input, see ``attribute``) is explained: a submodule or its
        name as in ``model.named_modules()``; for a ``torch.compile``d or ``DataParallel``
        model also as in the wrapper's (``"_orig_mod.conv"``, ``"module.conv"``), as for
        :py:class:`~captum_split.SplitCAM`. A name requires ``forward_func`` to be the
        ``nn.Module`` (or its bound ``forward``). ``"NAME:i"`` explains element ``i`` of the
        tuple output of module ``NAME`` alone (Captum's ``layer`` is then ``NAME``; the bare
        ``"NAME"`` gives one map per element, as Captum, where every element is a
        floating-point tensor, and is refused at the layer with a ``ValueError`` naming the
        ``"NAME:i"`` to pass where one is not, such as pooling indices); an element that is
        no floating-point tensor, or with ``device_ids`` spread over several devices, is
        refused (``ValueError``).
    device_ids : list of int, optional
        As in Captum, only needed when ``forward_func`` applies a ``DataParallel`` model.
    """

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = True,
        attr_dim_summation: bool = True,
        grad_kwargs: dict[str, Any] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """Compute the LayerCAM map.

        Parameters
        ----------
        inputs : :py:class:`torch.Tensor` or tuple of tensors
            Model inputs with the batch dimension first, e.g. ``(B, C, H, W)``; several
            tensors for a model with several inputs. Any dtype the model takes, as for
            ``LayerGradCam``: token ids (``int64``) into an embedding, ``uint8`` or
            ``float64`` into a model that casts its input itself. An input the model cannot
            take (``float64`` into a ``float32`` convolution) is a ``TypeError`` naming
            both dtypes (PyTorch's ``RuntimeError`` is its cause). A model in training
            mode is explained with eval semantics and keeps its flags and buffers.
        target : int, list, tuple or :py:class:`torch.Tensor`, optional
            Captum's target: one class for all rows or one per row; None for a model with
            one score per row (``(B,)`` or ``(B, 1)``), as Captum. Class indices take the
            forms SplitCAM takes (NumPy ints and arrays, a list of 0-d tensors, a ``(B, 1)``
            tensor); tuples (outputs with more dimensions) go to Captum as given.
        additional_forward_args : any, optional
            Further arguments of ``forward_func`` (not attributed).
        attribute_to_layer_input : bool
            Explain the layer's input instead of its output (not for an element name
            ``"NAME:i"``: ``ValueError``, pass ``"NAME"``).
        relu_attributions : bool
            Apply the outer ReLU (default True, as in Jiang et al.).
        attr_dim_summation : bool
            Sum over dimension 1 (channels); anything but a bool here, in
            ``relu_attributions`` or ``attribute_to_layer_input`` is a ``TypeError`` (an
            argument in the wrong position). False returns the per-channel products.
        grad_kwargs : dict, optional
            Passed to :py:func:`torch.autograd.grad`, as in Captum.

        Returns
        -------
        :py:class:`torch.Tensor` or tuple of tensors
            ``(B, 1, h, w)`` for a ``(B, C, h, w)`` layer (``(B, 1)`` for a ``(B, C)`` layer);
            a tuple if ``inputs`` is a tuple (so that ``captum.metrics.sensitivity_max`` works,
            where ``LayerGradCam``'s tensor fails) or the layer has several output tensors.
            Attached to the autograd graph through
            the activations, as ``LayerGradCam``'s maps.
        """
        self._check_flags(attribute_to_layer_input, relu_attributions, attr_dim_summation)
        grads, acts = self._grads_and_acts(
            inputs, target, additional_forward_args, attribute_to_layer_input, grad_kwargs
        )
        maps = []
        for grad, act in zip(grads, acts, strict=True):
            cam = F.relu(grad) * act
            if attr_dim_summation:
                cam = cam.sum(dim=1, keepdim=True)
            maps.append(F.relu(cam) if relu_attributions else cam)
        return maps[0] if len(maps) == 1 and not isinstance(inputs, tuple) else tuple(maps)


class GradCAMPlusPlus(_CAMBase):
    r"""Grad-CAM++ (Chattopadhay et al., 2018) for a chosen layer.

    Channel weights are positive gradients summed over space with the pixel weights

    .. math:: \alpha^{kc}_{ij} = \frac{(\partial_{ij} y^c_k)^2}{2 (\partial_{ij} y^c_k)^2
              + \sum_{ab} A^k_{ab} (\partial_{ij} y^c_k)^3}

    (the closed form for an exponential of the class score, which needs only first
    derivatives; zero where the gradient is zero). The map is
    :math:`\mathrm{ReLU}(\sum_k w^c_k A^k)`; the ReLU is ``relu_attributions`` (default True).
    ``eps`` is added to the denominator; pytorch-grad-cam uses ``eps=1e-6``, which changes
    the weights where gradients are small (``2 g^2`` comparable to ``eps``); the default 0
    is the formula as published.

    Parameters
    ----------
    forward_func : callable
        The model (or any function of the inputs returning ``(B, n_classes)`` scores).
    layer : :py:class:`torch.nn.Module` or str
        The layer whose activations are weighted (usually the last convolution); named as
        for :py:class:`LayerCAM`.
    device_ids : list of int, optional
        As in Captum, only needed when ``forward_func`` applies a ``DataParallel`` model.
    eps : float, optional
        Keyword-only: added to the denominator of the pixel weights (default 0.0;
        ``1e-6`` reproduces pytorch-grad-cam's ``GradCAMPlusPlus``).
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layer: nn.Module | str,
        device_ids: list[int] | None = None,
        *,
        eps: float = 0.0,
    ) -> None:
        eps = checks.number("eps", eps, 0.0, who="GradCAMPlusPlus")
        super().__init__(forward_func, layer, device_ids)
        self.eps = eps

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = True,
        attr_dim_summation: bool = True,
        grad_kwargs: dict[str, Any] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """Compute the Grad-CAM++ map.

        Parameters
        ----------
        inputs : :py:class:`torch.Tensor` or tuple of tensors
            Model inputs with the batch dimension first, e.g. ``(B, C, H, W)``; several
            tensors for a model with several inputs. Any dtype the model takes, as for
            ``LayerGradCam``: token ids (``int64``) into an embedding, ``uint8`` or
            ``float64`` into a model that casts its input itself. An input the model cannot
            take (``float64`` into a ``float32`` convolution) is a ``TypeError`` naming
            both dtypes (PyTorch's ``RuntimeError`` is its cause). A model in training
            mode is explained with eval semantics and keeps its flags and buffers.
        target : int, list, tuple or :py:class:`torch.Tensor`, optional
            Captum's target: one class for all rows or one per row; None for a model with
            one score per row (``(B,)`` or ``(B, 1)``), as Captum. Class indices take the
            forms SplitCAM takes (NumPy ints and arrays, a list of 0-d tensors, a ``(B, 1)``
            tensor); tuples (outputs with more dimensions) go to Captum as given.
        additional_forward_args : any, optional
            Further arguments of ``forward_func`` (not attributed).
        attribute_to_layer_input : bool
            Explain the layer's input instead of its output (not for an element name, see
            :py:meth:`LayerCAM.attribute`).
        relu_attributions : bool
            Apply the final ReLU (default True, as in the original method).
        attr_dim_summation : bool
            Sum over dimension 1 (channels); anything but a bool here, in
            ``relu_attributions`` or ``attribute_to_layer_input`` is a ``TypeError`` (an
            argument in the wrong position). False returns the weighted channels.
        grad_kwargs : dict, optional
            Passed to :py:func:`torch.autograd.grad`, as in Captum.

        Returns
        -------
        :py:class:`torch.Tensor` or tuple of tensors
            ``(B, 1, h, w)`` for a ``(B, C, h, w)`` layer (``(B, 1)`` for a ``(B, C)`` layer);
            a tuple if ``inputs`` is a tuple or the layer has several output tensors (see
            :py:meth:`LayerCAM.attribute`). Attached to the autograd graph through the
            activations, as ``LayerGradCam``'s.
        """
        self._check_flags(attribute_to_layer_input, relu_attributions, attr_dim_summation)
        grads, acts = self._grads_and_acts(
            inputs, target, additional_forward_args, attribute_to_layer_input, grad_kwargs
        )
        maps = []
        for grad, act in zip(grads, acts, strict=True):
            space = tuple(range(2, grad.dim()))
            g2 = grad.pow(2)
            g3 = grad.pow(3)
            act_sum = act.sum(dim=space, keepdim=True) if space else act
            denom = 2 * g2 + act_sum * g3 + self.eps
            denom = torch.where(denom != 0, denom, torch.ones_like(denom))
            alpha = torch.where(grad != 0, g2 / denom, torch.zeros_like(g2))
            weights = (alpha * F.relu(grad))
            if space:
                weights = weights.sum(dim=space, keepdim=True)
            cam = weights * act
            if attr_dim_summation:
                cam = cam.sum(dim=1, keepdim=True)
            maps.append(F.relu(cam) if relu_attributions else cam)
        return maps[0] if len(maps) == 1 and not isinstance(inputs, tuple) else tuple(maps)
