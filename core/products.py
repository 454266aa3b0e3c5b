"""Products of activations, split exactly (paper appendix E, Theorems 3 and 4).

For two split pairs ``a = a+ - a-`` and ``b = b+ - b-`` and any bilinear operation ``B``
with non-negative coefficients (the elementwise product, ``matmul``/``bmm``, ``einsum``),
multiplying out the differences gives the product's split pair (eq. 19 with two factors)::

    B(a, b) = [B(a+, b+) + B(a-, b-)] - [B(a+, b-) + B(a-, b+)] =: c+ - c-

In sum/difference form (``d = a+ - a-``, ``s = a+ + a-``) both parts are again products::

    d_c = c+ - c- = B(d_a, d_b)        (the model's own product: exact in float32)
    s_c = c+ + c- = B(s_a, s_b)        (the product of the masses)

and the backward recursions of the local sensitivities (``S = d+ + d-``, ``Dg = d+g - d-g``,
see :mod:`core.probes`) are the adjoints of the same products::

    S_a  = B*_a(S_c,  s_b)      S_b  = B*_b(S_c,  s_a)
    Dg_a = B*_a(Dg_c, d_b)      Dg_b = B*_b(Dg_c, d_a)

(``B*_a(u, b)`` is the vector-Jacobian product of ``a -> B(a, b)`` with ``u``; for the
elementwise product ``S_a = S_c * s_b``). The model's gradient follows ``grad_a =
B*_a(grad_c, d_b)``, so ``Dh = Dg - 2 grad`` holds through products too. Integer powers
``a ** n`` (``n >= 1``) are repeated products: ``d' = d ** n``, ``s' = s ** n``.

Guarantees: with non-negative streams (``input_split="relu"``, ``stabilizer="none"``) the
streams ``c+``, ``c-`` are sums of products of non-negative functions that are monotone in
the split inputs ``(x+, x-)``, hence monotone (Theorem 3: maxima of posynomials); they are
*not* convex (``a+ b+`` is bilinear). A forward stabiliser shifts both streams of a factor by
the same amount ``t``; through a product that is still a common shift of ``c+`` and ``c-``
(by ``t * s_b``), so ``g - h`` stays exact, but the masses it reads differ, and with them the
``S`` stream.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from core.pair import Pair

Bilinear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def product(a: Pair, b: Pair, op: Bilinear = torch.mul) -> Pair:
    """The split pair of ``op(a, b)`` for two split pairs: ``d' = op(d_a, d_b)``,
    ``s' = op(s_a, s_b)``.

    Parameters
    ----------
    a, b: Pair
        The two factors.
    op: callable
        A bilinear operation with non-negative coefficients (``torch.mul``,
        ``torch.matmul``, ``torch.bmm``, an ``einsum`` with a fixed equation).

    Returns
    -------
    Pair
        The product's pair; ``d`` is the model's own product of the activations.
    """
    return Pair(op(a.d, b.d), op(a.s, b.s))


def power(a: Pair, n: int | float) -> Pair:
    """``a ** n`` for a whole ``n >= 1`` (``2`` or ``2.0``, kept as the model wrote it):
    ``d' = d ** n``, ``s' = s ** n`` (binomial expansion, eq. 19)."""
    return Pair(torch.pow(a.d, n), torch.pow(a.s, n))


def product_backward(S_c: torch.Tensor, Dg_c: torch.Tensor, a: Pair, b: Pair,  # noqa: N803
                     op: Bilinear = torch.mul) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                        tuple[torch.Tensor, torch.Tensor]]:
    """The sensitivities ``(S, Dg)`` of both factors from those of the product.

    ``S_a = B*_a(S_c, s_b)``, ``Dg_a = B*_a(Dg_c, d_b)`` and symmetrically for ``b``; the
    engine gets the same numbers from autograd on :func:`product`. This function states the
    rule on its own (used by the tests against the four-product reference).

    Returns
    -------
    tuple
        ``((S_a, Dg_a), (S_b, Dg_b))``.
    """
    def vjp(x: torch.Tensor, y: torch.Tensor, u: torch.Tensor,
            wrt_first: bool) -> torch.Tensor:
        x = x.detach().requires_grad_(wrt_first)
        y = y.detach().requires_grad_(not wrt_first)
        with torch.enable_grad():
            out = op(x, y)
            return torch.autograd.grad(out, x if wrt_first else y, u)[0]

    S_a = vjp(a.s, b.s, S_c, True)  # noqa: N806 - the names of the formulation
    S_b = vjp(a.s, b.s, S_c, False)  # noqa: N806
    Dg_a = vjp(a.d, b.d, Dg_c, True)  # noqa: N806
    Dg_b = vjp(a.d, b.d, Dg_c, False)  # noqa: N806
    return (S_a, Dg_a), (S_b, Dg_b)


def einsum_op(equation: str) -> Bilinear:
    """``torch.einsum(equation, ., .)`` as a bilinear operation (non-negative coefficients:
    an einsum only multiplies and sums)."""

    def op(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.einsum(equation, x, y)

    return op
