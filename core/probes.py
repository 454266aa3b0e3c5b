"""Per-layer results of :meth:`core.SplitModel.sensitivities`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Probe:
    """Split activations and local sensitivities at one node of the model.

    All tensors have the shape of the node's activation. They are derived from the sum /
    difference form (docs/math.md sections 1 and 4): ``activation = a+ - a-``,
    ``mass = a+ + a-``, ``S = d+ + d-`` (the same for g and h, Theorem 7) and
    ``Dg = d+g - d-g``; ``grad`` is the original model's gradient of the target logit.
    The properties halve before they add (``S / 2 + Dg / 2``: the same numbers, halving is
    exact), so that finite ``S`` and ``Dg`` give a finite ``pos_g`` also above half the
    dtype's range.

    Attributes
    ----------
    activation: torch.Tensor
        The original model's activation ``a`` (the pair's ``d``).
    mass: torch.Tensor
        ``a+ + a-`` (the pair's ``s``), after forward stabilisation.
    S: torch.Tensor
        Sum of the two shifted local sensitivities, ``d+g + d-g == d+h + d-h``.
    Dg: torch.Tensor
        Difference of the shifted local sensitivities of the g stream, ``d+g - d-g``.
    grad: torch.Tensor
        Gradient of the target logit with respect to the activation: of the original model
        when :attr:`frozen` is empty, else of the frozen model (the model with those
        operations' factors held at their values at this input; ``core.frozen``).
    alphas: dict of str to float or torch.Tensor
        The alpha of every shift point in this call (with ``alpha="auto"``: one value per row
        for the points the backward passed; see :mod:`core.shift`).
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
    alphas: Mapping[str, float | torch.Tensor] = field(default_factory=dict)
    frozen: tuple[str, ...] = field(default=())

    @property
    def exact(self) -> bool:
        """Whether the path from this node to the output is exact (nothing frozen on it)."""
        return not self.frozen

    @property
    def pos(self) -> torch.Tensor:
        """Split activation of the positive stream, ``a+ = (s + d) / 2``."""
        return self.mass / 2 + self.activation / 2

    @property
    def neg(self) -> torch.Tensor:
        """Split activation of the negative stream, ``a- = (s - d) / 2``."""
        return self.mass / 2 - self.activation / 2

    @property
    def Dh(self) -> torch.Tensor:  # noqa: N802 - the name of docs/math.md
        """Difference of the h stream's sensitivities, ``Dh = Dg - 2 grad`` (exact, eq. 4)."""
        return self.Dg - 2 * self.grad

    @property
    def pos_g(self) -> torch.Tensor:
        """Shifted local sensitivity of g with respect to ``a+``."""
        return self.S / 2 + self.Dg / 2

    @property
    def neg_g(self) -> torch.Tensor:
        """Shifted local sensitivity of g with respect to ``a-``."""
        return self.S / 2 - self.Dg / 2

    @property
    def pos_h(self) -> torch.Tensor:
        """Shifted local sensitivity of h with respect to ``a+``."""
        return self.S / 2 + self.Dh / 2

    @property
    def neg_h(self) -> torch.Tensor:
        """Shifted local sensitivity of h with respect to ``a-``."""
        return self.S / 2 - self.Dh / 2

    @property
    def g(self) -> torch.Tensor:
        """Unified sensitivity of g (eq. 46), ``(pos_g - neg_g) / 2``."""
        return self.Dg / 2

    @property
    def h(self) -> torch.Tensor:
        """Unified sensitivity of h (eq. 47), ``(pos_h - neg_h) / 2``; ``g - h == grad``."""
        return self.Dh / 2

    @property
    def grad_part(self) -> torch.Tensor:
        """Gradient part of ``g`` (Theorem 9): ``grad / 2``."""
        return self.grad / 2

    @property
    def shift_part(self) -> torch.Tensor:
        """Shift part of ``g`` (Theorem 9): ``g - grad / 2``, fed by the S stream only."""
        return self.g - self.grad / 2

    def parts(self, stream: str = "g", sign: str | None = None) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
        """Gradient part and shift part of one shifted sensitivity (they add up to it).

        ``g = grad/2 + shift``, ``h = -grad/2 + shift``, ``pos_g = grad/2 + (S/2 + shift)``,
        ``neg_g = -grad/2 + (S/2 - shift)``, ``pos_h = -grad/2 + (S/2 + shift)``,
        ``neg_h = grad/2 + (S/2 - shift)``. Multiply both by the activation a SplitCAM uses
        for the parts of its products.

        Parameters
        ----------
        stream: {"g", "h"}
        sign: {None, "+", "-"}

        Returns
        -------
        tuple of torch.Tensor
            ``(gradient part, shift part)``.
        """
        half, shift = self.grad_part, self.shift_part
        sign_of_grad = {("g", None): 1, ("h", None): -1, ("g", "+"): 1, ("g", "-"): -1,
                        ("h", "+"): -1, ("h", "-"): 1}
        if (stream, sign) not in sign_of_grad:
            raise ValueError(f"stream={stream!r}, sign={sign!r}: use stream 'g'/'h' and sign "
                             "None, '+' or '-'")
        rest = {None: shift, "+": self.S / 2 + shift, "-": self.S / 2 - shift}[sign]
        return sign_of_grad[(stream, sign)] * half, rest
