"""Class-blind Split maps in a long run: collected while it runs, summarised once at the end.

A Split map whose shift part is many times its gradient part does not depend on the target
class (:class:`core.SplitClassBlindWarning`; the check is :func:`core.shift.shift_ratio` above
:data:`core.shift.CLASS_BLIND_RATIO`). ``splitxai benchmark`` runs the paper's alpha 0.4 on
purpose, where this happens at some layers; printed as it happens, the warning would break
the progress bars once per layer. The commands collect it with :func:`collect` (every other
warning is shown as usual), keep one :class:`ClassBlind` per alpha and layer and print
:func:`summary` once at the end (the benchmark also writes it into ``report.md``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from core.shift import CLASS_BLIND_ADVICE, CLASS_BLIND_RATIO, SplitClassBlindWarning

__all__ = ["ClassBlind", "alpha_text", "collect", "merge", "summary"]


@dataclass(frozen=True)
class ClassBlind:
    """One class-blind map: its layer, its alpha and its shift part / gradient part ratio."""

    layer: str
    alpha: str
    ratio: float


@contextmanager
def collect(alpha: object = "?") -> Iterator[list[ClassBlind]]:
    """Record :class:`core.SplitClassBlindWarning` inside the block instead of showing it.

    Parameters
    ----------
    alpha: float, str or None
        The alpha of the maps computed in the block (recorded with each warning).

    Yields
    ------
    list of ClassBlind
        Filled as warnings arrive. Every other warning goes to the ``warnings.showwarning``
        in effect outside the block, as it would without it.
    """
    found: list[ClassBlind] = []
    label = alpha_text(alpha)
    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.simplefilter("always", SplitClassBlindWarning)  # core warns once per layer

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, SplitClassBlindWarning):
                found.append(ClassBlind(str(getattr(message, "layer", None) or "?"), label,
                                        float(getattr(message, "ratio", math.nan))))
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield found


def alpha_text(alpha: object) -> str:
    """How an alpha is named in the summary (``"?"`` when the method's default was used)."""
    return "?" if alpha is None else str(alpha)


def merge(found: Iterable[ClassBlind]) -> dict[tuple[str, str], tuple[float, float]]:
    """``{(alpha, layer): (smallest ratio, largest ratio)}`` of many records."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for item in found:
        lo, hi = out.get((item.alpha, item.layer), (math.inf, -math.inf))
        out[(item.alpha, item.layer)] = (min(lo, item.ratio), max(hi, item.ratio))
    return out


def summary(found: Iterable[ClassBlind]) -> str:
    """One paragraph naming the class-blind alpha/layer pairs and the ratio range ("" if none).

    Each layer is reported by the core once per model (at the first alpha where its check
    fires), so the pairs are those first detections, not every alpha that is class-blind.
    """
    pairs = merge(found)
    if not pairs:
        return ""
    by_alpha: dict[str, list[str]] = {}
    for alpha, layer in sorted(pairs, key=lambda k: (-_number(k[0]), k[0], k[1])):
        by_alpha.setdefault(alpha, []).append(layer)
    ratios = [r for lo_hi in pairs.values() for r in lo_hi if math.isfinite(r)]
    where = "; ".join(f"alpha {a} at {', '.join(map(repr, layers))}"
                      for a, layers in by_alpha.items())
    size = (f"{min(ratios):.3g} to {max(ratios):.3g} times" if ratios and
            min(ratios) != max(ratios) else f"{ratios[0]:.3g} times" if ratios else "many times")
    return (f"class-blind Split maps (SplitClassBlindWarning) at {len(pairs)} alpha/layer "
            f"pair(s): {where}. Their shift part is {size} their gradient part (median over "
            f"a batch; threshold {CLASS_BLIND_RATIO:g}), so these maps do not depend on the "
            f"target class. {CLASS_BLIND_ADVICE} A layer is reported once per model, at the "
            "first alpha whose map there was class-blind.")


def _number(alpha: str) -> float:
    try:
        return float(alpha)
    except ValueError:
        return -math.inf
