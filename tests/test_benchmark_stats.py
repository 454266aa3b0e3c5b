"""Table 1 statistics: mean ± standard error, the paired test behind the best mark."""

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from quantus_adapters.benchmark import report, stats
from quantus_adapters.benchmark.protocol import Config, MethodSpec
from quantus_adapters.benchmark.runner import Results, Row


def test_summary_is_mean_standard_error_and_n_of_finite_scores():
    mean, se, n = stats.summary([1.0, 2.0, float("nan"), 4.0])
    assert n == 3 and mean == pytest.approx(7 / 3)
    assert se == pytest.approx(np.std([1, 2, 4], ddof=1) / math.sqrt(3))
    assert stats.summary([float("nan")])[2] == 0


def test_paired_p_is_scipys_wilcoxon_over_pairs_with_both_scores():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30) + 0.3
    a[3] = np.nan
    ok = np.isfinite(a)
    assert stats.paired_p(a, b) == pytest.approx(wilcoxon(a[ok], b[ok]).pvalue)
    assert stats.paired_p([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0


def test_best_is_marked_only_when_significantly_better_than_the_runner_up():
    rng = np.random.default_rng(1)
    base = rng.normal(size=40)
    clear = base + 0.5 + 0.05 * rng.normal(size=40)
    close = base + 0.01 * rng.normal(size=40)
    b = stats.best_entry([base, clear, None], higher_is_better=True)
    assert (b.best, b.runner_up, b.marked) == (1, 0, True) and b.p < 1e-6
    b = stats.best_entry([base, close, clear + 100], higher_is_better=False)
    assert b.best in (0, 1) and b.runner_up in (0, 1)
    assert b.marked == (b.p < 0.05)
    b = stats.best_entry([base, base.copy()], higher_is_better=True)  # tie
    assert not b.marked


def test_images_needed_for_a_difference():
    # (1.95996 + 0.84162)^2 * (0.1 / 0.05)^2 = 31.4 -> 32
    assert stats.images_needed(0.1) == 32
    assert stats.images_needed(0.0) is None


def _results(scores_by_row):
    rows = []
    for i, scores in enumerate(scores_by_row):
        spec = MethodSpec(f"M{i}", "Saliency")
        row = Row(Config(spec, None, "", {}), False, "pixel flipping")
        row.records = {"PF@20": {"scores": list(scores), "mean": float(np.mean(scores))}}
        row.scores = {"PF@20": float(np.mean(scores))}
        rows.append(row)
    return Results(rows=rows, validation={}, configs={}, alpha_table=[], alphas=[],
                   sanity_rows=[], randomised_layers=[], timings=[], saliency={},
                   saliency_images=np.zeros((0, 1, 2, 2)), saliency_masks=None,
                   saliency_titles=[], notes=[], metrics=["PF@20"], layers=[])


def test_table1_shows_errors_and_bolds_only_significant_bests():
    rng = np.random.default_rng(2)
    base = rng.normal(1.0, 0.1, 30)
    md = report.markdown_table1(_results([base, base + 0.3]))
    se = np.std(base + 0.3, ddof=1) / math.sqrt(30)
    assert f"**{np.mean(base + 0.3):.3f} ± {se:.3f}**" in md
    md = report.markdown_table1(_results([base, base + rng.normal(0, 0.01, 30)]))
    assert "**" not in md
    text = report.statistics_md(_results([base, base + 0.3]))
    assert "Wilcoxon signed-rank" in text and "| 30 |" in text


def test_table1_shows_tiny_scores_and_p_values_instead_of_zero():
    rng = np.random.default_rng(3)
    tiny = 2e-5 + 1e-6 * rng.normal(size=30)  # mean 2.0e-05, standard error about 2e-07
    md = report.markdown_table1(_results([tiny, np.ones(30)]))
    se = np.std(tiny, ddof=1) / math.sqrt(30)
    assert f"{np.mean(tiny):.1e} ± {se:.1e}" in md and "0.000 ±" not in md
    assert "1.000 ± 0.000" in md  # a standard error that is 0 stays 0.000
    base = rng.normal(1.0, 0.1, 30)
    text = report.statistics_md(_results([base, base + 0.3]))
    p = stats.best_entry([base, base + 0.3], higher_is_better=True).p
    assert p < 5e-4 and f"| {p:.1e} |" in text
