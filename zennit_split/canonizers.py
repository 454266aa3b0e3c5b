"""Zennit canonizer for the bundled CIFAR-10 ResNet-20 (:func:`core.zoo.resnet20`).

Zennit's :py:class:`~zennit.torchvision.ResNetCanonizer` rewrites only torchvision's ResNet
blocks. :py:class:`core.zoo.BasicBlock` writes its residual as an in-place
``out += self.shortcut(x)``, which no Zennit canonizer sees: the add then passes the plain
gradient, which copies the relevance into both branches (the gamma-LRP relevance of four
CIFAR-10 test images summed to 8.1 - 13.2 instead of at most about 1).
:class:`CifarResNetCanonizer` does for these blocks what ``ResNetCanonizer`` does for
torchvision's: it merges every BatchNorm into the convolution before it and gives each
block a forward whose residual sum runs through a :py:class:`zennit.layer.Sum` module, so
that a composite applies its rule for sums to it (``Norm`` in Zennit's built-in layer maps).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from zennit.canonizers import AttributeCanonizer, CompositeCanonizer, SequentialMergeBatchNorm
from zennit.layer import Sum

from core.zoo import BasicBlock

__all__ = ["CifarBasicBlockCanonizer", "CifarResNetCanonizer", "holds_cifar_blocks"]


def _block_forward(self: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    """:py:meth:`core.zoo.BasicBlock.forward`, with the residual add as a ``Sum`` module.

    Bound to a block instance by :class:`CifarBasicBlockCanonizer`. The value is the
    original's bit for bit: a sum over two stacked tensors rounds once, like the add.
    """
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    out = self.canonizer_sum(torch.stack([out, self.shortcut(x)], dim=-1))
    return F.relu(out)


class CifarBasicBlockCanonizer(AttributeCanonizer):
    """Give every :py:class:`core.zoo.BasicBlock` a residual add that Zennit's rules reach.

    For each block instance it sets two attributes, both removed again with the canonizer:
    ``forward`` (the block's forward with the in-place residual add written as a sum over
    a stack) and ``canonizer_sum`` (the :py:class:`zennit.layer.Sum` module doing that sum,
    a submodule while the canonizer is applied, in the block's training mode).
    BatchNorms are not merged; :class:`CifarResNetCanonizer` does both.
    """

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @staticmethod
    def _attribute_map(name: str, module: nn.Module) -> dict[str, Any] | None:
        """The attributes to set on ``module``.

        Parameters
        ----------
        name: str
            The module's name in the model (unused; part of Zennit's contract).
        module: torch.nn.Module
            A module of the model.

        Returns
        -------
        dict or None
            ``{"forward": ..., "canonizer_sum": ...}`` for a :py:class:`core.zoo.BasicBlock`,
            None for any other module.
        """
        if not isinstance(module, BasicBlock):
            return None
        return {
            "forward": _block_forward.__get__(module),
            "canonizer_sum": Sum(dim=-1).train(module.training),
        }


class CifarResNetCanonizer(CompositeCanonizer):
    """Canonizer for models holding :py:class:`core.zoo.BasicBlock` (:func:`core.zoo.resnet20`).

    Like Zennit's :py:class:`~zennit.torchvision.ResNetCanonizer` for torchvision ResNets:
    :py:class:`~zennit.canonizers.SequentialMergeBatchNorm` (each BatchNorm merged into the
    convolution registered just before it), then :class:`CifarBasicBlockCanonizer`. The
    model's output stays the same up to float rounding (the merged weights); everything is
    undone when the composite is removed.
    """

    def __init__(self) -> None:
        super().__init__((SequentialMergeBatchNorm(), CifarBasicBlockCanonizer()))


def holds_cifar_blocks(model: nn.Module) -> bool:
    """Whether ``model`` holds a :py:class:`core.zoo.BasicBlock` anywhere (also wrapped).

    Parameters
    ----------
    model: torch.nn.Module
        The model.

    Returns
    -------
    bool
    """
    return any(isinstance(module, BasicBlock) for module in model.modules())
