"""One-call helpers around the Zennit composites: SplitLRP at any layer, and the LRP baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import LayerMapComposite, layer_map_base
from zennit.rules import Gamma
from zennit.types import Convolution, Linear

from core import checks
from core.explaining import model_lock

from .canonizers import CifarBasicBlockCanonizer, CifarResNetCanonizer, holds_cifar_blocks
from .composite import (
    SplitLRP,
    layer_list,
    layer_names,
    module_slots,
    refuse_inference_mode,
    restore_slots,
    several_inputs,
)


def output_seed(targets: int | torch.Tensor, batch_size: int) -> Any:
    """Return a Zennit ``attr_output`` function: the one-hot seed of ``targets``.

    Parameters
    ----------
    targets: int or :py:obj:`torch.Tensor`
        A class index, a 1-D tensor of class indices (one per row), or a float tensor shaped
        like the model output, used as the seed unchanged.
    batch_size: int
        Number of rows of the input.

    Returns
    -------
    callable
        ``(output: torch.Tensor) -> torch.Tensor``. It raises ``ValueError`` (before any
        backward pass) for an output without one row per input row
        (:func:`core.checks.output_rows`), and, for class indices, for an output that is not
        ``(batch, classes)`` or a target out of range.
    """
    if isinstance(targets, torch.Tensor) and targets.is_floating_point():
        seed = targets
        checks.finite("the seed", seed, fix="pass a finite seed or class indices.")

        def given(output: torch.Tensor) -> torch.Tensor:
            checks.output_rows(output, batch_size)
            if seed.shape != output.shape:
                raise ValueError(
                    f"the seed has shape {tuple(seed.shape)} but the model output has shape "
                    f"{tuple(output.shape)}; pass a seed shaped like the output or class indices."
                )
            return seed.to(output)

        return given
    index = checks.targets(targets, batch_size)

    def one_hot(output: torch.Tensor) -> torch.Tensor:
        checks.logits(output, fix="Pass a seed tensor shaped like the output instead of "
                      "class indices (e.g. the one-hot class map of a segmentation).",
                      batch=batch_size)
        checks.target_range(index, output.shape[1])
        return torch.nn.functional.one_hot(index.to(output.device), output.shape[1]).to(output)

    return one_hot


def split_lrp(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: int | torch.Tensor,
    layers: str | nn.Module | Sequence[str | nn.Module] = ("input",),
    *,
    epsilon: float = 1e-6,
    maxpool: str = "wta",
    stabilizer: str = "scale",
    input_split: str = "relu",
    activation_rule: str = "pass",
    residual: str = "even",
    nonlinear: str = "error",
) -> dict[str, Any]:
    """SplitLRP relevances ``R(l,+)``, ``R(l,-)`` and ``comb`` at the outputs of ``layers``.

    Runs Zennit's :py:class:`~zennit.attribution.Gradient` with :class:`SplitLRP`.

    Parameters
    ----------
    model: :py:class:`torch.nn.Module`
        The model; it is not modified.
    inputs: :py:obj:`torch.Tensor`
        Input batch: one tensor (Zennit's attributors take one; for a model with several
        inputs use :meth:`core.SplitModel.relevance`).
    targets: int or :py:obj:`torch.Tensor`
        Class index or indices (seed: one-hot at ``a(L,+)``), or a float seed shaped like
        the model output.
    layers: str, torch.nn.Module or a list of them, optional
        Module names as in ``model.named_modules()``, or the submodules themselves (the
        result is keyed by their names); ``"input"`` is the input (default); ``"NAME:0"``,
        ``"NAME:1"``... the elements of a module's tuple output.
    epsilon, maxpool, stabilizer, input_split, activation_rule, residual, nonlinear:
        As in :class:`SplitLRP`.

    Returns
    -------
    dict[str, object]
        Layer name to an object with the tensors ``pos``, ``neg`` and ``comb``.

    Raises
    ------
    ValueError
        For a tuple or list of inputs and for ``"input:1"``... (one line naming
        :meth:`core.SplitModel.relevance`, which takes several inputs), before any forward.
    RuntimeError
        Inside ``torch.inference_mode()`` (autograd is off there). Under ``torch.no_grad()``
        gradients are switched on for the computation.
    """
    if isinstance(inputs, (tuple, list)):
        raise several_inputs(f"split_lrp got a {type(inputs).__name__} of {len(inputs)} inputs")
    refuse_inference_mode("SplitLRP")
    names = layer_names(model, layer_list(layers, "SplitLRP"), "SplitLRP")
    composite = SplitLRP(
        epsilon=epsilon,
        maxpool=maxpool,
        stabilizer=stabilizer,
        layer=names,
        input_split=input_split,
        activation_rule=activation_rule,
        residual=residual,
        nonlinear=nonlinear,
    )
    # gradients on for the attributor's own backward pass, also under torch.no_grad()
    # (Quantus calls explain functions inside it)
    with model_lock(model), torch.enable_grad(), Gradient(model, composite) as attributor:
        attributor(inputs, output_seed(targets, inputs.shape[0]))
        relevance = composite.relevance
    return {name: relevance[name] for name in names}


class _OutputGradient(torch.autograd.Function):
    """Identity that keeps the gradient reaching a module's output (the LRP relevance there)."""

    @staticmethod
    def forward(ctx, input, store):  # noqa: A002 - torch's argument name
        ctx.store = store
        return input.clone()

    @staticmethod
    def backward(ctx, grad_output):
        ctx.store.append(grad_output.detach())
        return grad_output, None


def gamma_composite(gamma: float = 0.25, canonizers: list | None = None) -> LayerMapComposite:
    """Zennit composite of the LRP baseline: the gamma rule on every convolution and linear layer.

    Activations pass relevance unchanged, sums and average pooling use Zennit's ``Norm``
    rule (Zennit's defaults); BatchNorm is merged into the preceding layer by
    :py:class:`~zennit.canonizers.SequentialMergeBatchNorm` unless ``canonizers`` is given.

    Parameters
    ----------
    gamma: float, optional
        Gamma of the rule (0.25, Zennit's default).
    canonizers: list, optional
        Canonizers to apply instead of the default one.

    Returns
    -------
    :py:class:`zennit.composites.LayerMapComposite`
    """
    layer_map = layer_map_base() + [
        (Convolution, Gamma(gamma=gamma)),
        (Linear, Gamma(gamma=gamma)),
    ]
    if canonizers is None:
        canonizers = [SequentialMergeBatchNorm()]
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


def _default_canonizers(model: nn.Module) -> list:
    """The canonizers of the LRP baseline for ``model``.

    Zennit's ``ResNetCanonizer`` for a model holding torchvision ResNet blocks anywhere
    (a ResNet itself, or one wrapped: ``nn.Sequential(normalize, resnet)``), and
    :class:`~zennit_split.canonizers.CifarResNetCanonizer` for one holding the bundled
    ResNet-20's :py:class:`core.zoo.BasicBlock` (with both, ``ResNetCanonizer`` and the
    block part :class:`~zennit_split.canonizers.CifarBasicBlockCanonizer`); their residual
    adds then get Zennit's ``Norm`` rule. ``SequentialMergeBatchNorm`` otherwise. (Deciding
    by the root's type sent a wrapped ResNet's adds through the plain gradient, which copies
    the relevance into both branches: a ResNet-18 returned 190 times the relevance; the
    ResNet-20's in-place adds, which no Zennit canonizer rewrites, 8 - 13 times.)
    """
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - torchvision is optional
        torchvision_blocks = False
    else:
        torchvision_blocks = any(isinstance(module, (BasicBlock, Bottleneck))
                                 for module in model.modules())
    cifar_blocks = holds_cifar_blocks(model)
    if torchvision_blocks:
        from zennit.torchvision import ResNetCanonizer

        return [ResNetCanonizer()] + ([CifarBasicBlockCanonizer()] if cifar_blocks else [])
    if cifar_blocks:
        return [CifarResNetCanonizer()]
    return [SequentialMergeBatchNorm()]


def lrp_gamma(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: int | torch.Tensor,
    *,
    gamma: float = 0.25,
    layer: str | nn.Module | None = None,
) -> torch.Tensor:
    """LRP with the gamma rule (Zennit), at the input or at the output of ``layer``.

    Parameters
    ----------
    model: :py:class:`torch.nn.Module`
        The model; it is not modified.
    inputs: :py:obj:`torch.Tensor`
        Input batch.
    targets: int or :py:obj:`torch.Tensor`
        Class index or indices, or a float seed shaped like the output.
    gamma: float, optional
        Gamma of the rule (0.25).
    layer: str or torch.nn.Module, optional
        Module name as in ``model.named_modules()``, or the submodule itself; ``None`` or
        ``"input"``: the input.

    Returns
    -------
    :py:obj:`torch.Tensor`
        The relevance, shaped like the input or like the layer's output.

    Raises
    ------
    TypeError
        For inputs that are not one tensor (a tuple of inputs: Zennit's attributors take
        one input tensor), before any forward.
    RuntimeError
        Inside ``torch.inference_mode()``, as :func:`split_lrp`; ``torch.no_grad()`` is fine.
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"LRP: inputs must be one tensor (Zennit's attributors take one "
                        f"input), got a {type(inputs).__name__}")
    refuse_inference_mode("LRP")
    checks.number("gamma", gamma, 0.0, who="LRP")
    composite = gamma_composite(gamma, canonizers=_default_canonizers(model))
    handle = None
    store: list[torch.Tensor] = []
    name = checks.layer_name(model, layer, "LRP", allow_input=True)
    with model_lock(model):  # the layer's hook, too: another call's forward would feed it
        if name != "input":
            handle = model.get_submodule(name).register_forward_hook(
                lambda module, args, output: _OutputGradient.apply(output, store)
            )
        slots = module_slots(model)
        try:
            with torch.enable_grad(), Gradient(model, composite) as attributor:  # as split_lrp
                _, relevance = attributor(inputs, output_seed(targets, inputs.shape[0]))
        finally:
            restore_slots(slots)  # zennit 1.0's rules and reverts leave them changed
            if handle is not None:
                handle.remove()
    if handle is not None:
        if not store:
            raise RuntimeError(f"LRP: no relevance reached layer {name!r}.")
        return store[-1]
    return relevance
