"""Statistics of table 1: mean ± standard error, a paired test for the best entry, and how
many test images a difference needs.

- :func:`summary`: mean, standard error ``s / sqrt(n)`` (``s`` the sample standard
  deviation, ``ddof=1``) and ``n`` over the images with a finite score.
- :func:`paired_p`: the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) of
  two methods' per-image scores, over the images where both have a score; zero
  differences are dropped (Wilcoxon's original treatment).
- :func:`best_entry`: per metric the best row is marked only when its paired difference to
  the runner-up is significant (p < ``level``).
- :func:`images_needed`: ``n = ((z_{1-a/2} + z_{power}) * sd / delta)^2``, the number of
  paired images for which a true mean difference ``delta`` is detected with the given power
  at level ``a`` (normal approximation of the paired test, ``sd`` the standard deviation
  of the per-image differences).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["summary", "paired_p", "best_entry", "images_needed", "Best", "TEST_NAME",
           "LEVEL"]

TEST_NAME = "two-sided Wilcoxon signed-rank test over the paired test images"
LEVEL = 0.05


def summary(scores: Sequence[float]) -> tuple[float, float, int]:
    """Mean, standard error and number of the finite scores (NaN, NaN, 0 when none)."""
    v = np.asarray(scores, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se, int(len(v))


def _pairs(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


def paired_p(a: Sequence[float], b: Sequence[float]) -> float:
    """p-value of the two-sided Wilcoxon signed-rank test of ``a - b`` (1.0 when all the
    paired differences are zero or fewer than two pairs exist)."""
    from scipy.stats import wilcoxon

    x, y = _pairs(a, b)
    d = x - y
    if np.count_nonzero(d) < 2:
        return 1.0
    return float(wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_sd(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard deviation (``ddof=1``) of the per-image differences ``a - b``."""
    x, y = _pairs(a, b)
    return float(np.std(x - y, ddof=1)) if len(x) > 1 else float("nan")


def images_needed(sd: float, delta: float = 0.05, level: float = LEVEL,
                  power: float = 0.8) -> int | None:
    """Paired images needed to detect a mean difference ``delta`` (see the module doc)."""
    from scipy.stats import norm

    if not np.isfinite(sd) or sd <= 0:
        return None
    z = norm.ppf(1 - level / 2) + norm.ppf(power)
    return int(math.ceil((z * sd / delta) ** 2))


@dataclass
class Best:
    """The outcome for one metric: best and runner-up (row indices), p, paired SD, marked."""

    best: int | None
    runner_up: int | None
    p: float
    sd: float
    marked: bool


def best_entry(scores: Sequence[Sequence[float] | None], higher_is_better: bool,
               level: float = LEVEL) -> Best:
    """Rank the rows by mean and test the best against the runner-up.

    Parameters
    ----------
    scores: list of per-image scores or None
        One entry per row (None: the row takes no part, e.g. the random baseline).
    higher_is_better: bool
        The metric's direction.
    level: float
        Significance level of the paired test.
    """
    means = []
    for i, s in enumerate(scores):
        if s is None:
            continue
        m, _, n = summary(s)
        if n:
            means.append((-m if higher_is_better else m, i))
    if not means:
        return Best(None, None, float("nan"), float("nan"), False)
    means.sort()
    best = means[0][1]
    if len(means) == 1:
        return Best(best, None, float("nan"), float("nan"), False)
    runner = means[1][1]
    if means[0][0] == means[1][0]:
        return Best(best, runner, 1.0, paired_sd(scores[best], scores[runner]), False)
    p = paired_p(scores[best], scores[runner])
    return Best(best, runner, p, paired_sd(scores[best], scores[runner]), bool(p < level))
