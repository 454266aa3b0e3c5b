"""Per-layer results of :meth:`core.SplitModel.sensitivities`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Probe:
    """Split activations and local sensitivities at one node of the model.

    All tensors have the shape of the node's activation. They are derived from the sum /
    difference form of DESIGN.md section 2: ``activation = a+ - a-``, ``mass = a+ + a-``,
    ``S = d+ + d-`` (the same for g and h) and ``Dg = d+g - d-g``; ``grad`` is the original
    model's gradient of the target logit.

    Attributes
    ----------
    activation: torch.Tensor
        The original model's activation ``a`` (``d`` in DESIGN.md).
    mass: torch.Tensor
        ``a+ + a-`` (``s`` in DESIGN.md), after forward stabilisation.
    S: torch.Tensor
        Sum of the two shifted local sensitivities, ``d+g + d-g == d+h + d-h``.
    Dg: torch.Tensor
        Difference of the shifted local sensitivities of the g stream, ``d+g - d-g``.
    grad: torch.Tensor
        Gradient of the target logit with respect to the activation: of the original model
        when :attr:`frozen` is empty, else of the frozen model (the model with those
        operations' factors held at their values at this input; ``core.frozen``).
    frozen: tuple of str
        The frozen operations (``nonlinear="freeze"``) on a path from this node to the
        output. Empty: the path is exact and ``S``, ``Dg``, ``grad`` are those of the model's
        own split pair.
    """

    activation: torch.Tensor
    mass: torch.Tensor
    S: torch.Tensor
    Dg: torch.Tensor
    grad: torch.Tensor
    frozen: tuple[str, ...] = field(default=())

    @property
    def exact(self) -> bool:
        """Whether the path from this node to the output is exact (nothing frozen on it)."""
        return not self.frozen

    @property
    def pos(self) -> torch.Tensor:
        """Split activation of the positive stream, ``a+ = (s + d) / 2``."""
        return (self.mass + self.activation) / 2

    @property
    def neg(self) -> torch.Tensor:
        """Split activation of the negative stream, ``a- = (s - d) / 2``."""
        return (self.mass - self.activation) / 2

    @property
    def Dh(self) -> torch.Tensor:  # noqa: N802 - the name of DESIGN.md
        """Difference of the h stream's sensitivities, ``Dh = Dg - 2 grad`` (exact)."""
        return self.Dg - 2 * self.grad

    @property
    def pos_g(self) -> torch.Tensor:
        """Shifted local sensitivity of g with respect to ``a+``."""
        return (self.S + self.Dg) / 2

    @property
    def neg_g(self) -> torch.Tensor:
        """Shifted local sensitivity of g with respect to ``a-``."""
        return (self.S - self.Dg) / 2

    @property
    def pos_h(self) -> torch.Tensor:
        """Shifted local sensitivity of h with respect to ``a+``."""
        return (self.S + self.Dh) / 2

    @property
    def neg_h(self) -> torch.Tensor:
        """Shifted local sensitivity of h with respect to ``a-``."""
        return (self.S - self.Dh) / 2

    @property
    def g(self) -> torch.Tensor:
        """Unified sensitivity of g (eq. 46), ``(pos_g - neg_g) / 2``."""
        return self.Dg / 2

    @property
    def h(self) -> torch.Tensor:
        """Unified sensitivity of h (eq. 47), ``(pos_h - neg_h) / 2``; ``g - h == grad``."""
        return self.Dh / 2
