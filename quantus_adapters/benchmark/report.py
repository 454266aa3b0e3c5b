"""Tables (CSV and Markdown) and figures (PNG) of ``splitxai benchmark``.

Files written to the output folder:

- ``table1_comparison.{csv,md}``: the table-1 style comparison, mean ± standard error
  (and n) per cell, the best per metric marked where a paired test finds it significantly
  better than the runner-up (:mod:`quantus_adapters.benchmark.stats`);
- ``table3_alpha.{csv,md}``: the alpha ablation;
- ``table6_randomisation.{csv,md}``: the randomisation sanity check;
- ``table7_timing.{csv,md}``: computation times;
- ``validation.csv``: every configuration's validation metrics (the layer selection);
- ``figure4_saliency.png``: saliency maps of the selected configurations;
- ``figure7_layers.png``: layer dependence (validation, normalised per method);
- ``report.md``: all tables and notes in one file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from core.shift import alpha_label
from quantus_adapters import class_blind
from quantus_adapters.benchmark import stats
from quantus_adapters.benchmark.protocol import METRICS
from quantus_adapters.benchmark.runner import Results

__all__ = ["write_report", "markdown_table1", "statistics_md", "table1_stats",
           "GROUP_TITLES"]

GROUP_TITLES = {"split": "Split methods", "layer": "Baselines (with layer optimisation)",
                "baseline": "Baselines"}


def _fmt(v: float, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals; a value that would show as 0 but is not (a score or
    a standard error below 0.0005) with two significant digits (``2.3e-05``)."""
    if v is None or not np.isfinite(v):
        return "–"
    if v != 0 and abs(v) < 0.5 * 10.0 ** -digits:
        return f"{v:.1e}"
    return f"{v:.{digits}f}"


def _per_image(row, metric: str) -> list[float] | None:
    rec = row.records.get(metric)
    return None if rec is None else rec["scores"]


def table1_stats(results: Results) -> dict[str, stats.Best]:
    """Per metric: best row, runner-up, paired test (the random baseline takes no part)."""
    out = {}
    for m in results.metrics:
        scores = [None if r.config.spec.method == "Random" else _per_image(r, m)
                  for r in results.rows]
        out[m] = stats.best_entry(scores, METRICS[m].higher_is_better)
    return out


def _arrow(metric: str) -> str:
    return "↑" if METRICS[metric].higher_is_better else "↓"


def _cell(row, metric: str) -> tuple[float, float, int]:
    scores = _per_image(row, metric)
    if scores is None:
        return float("nan"), float("nan"), 0
    return stats.summary(scores)


def markdown_table1(results: Results) -> str:
    """The comparison as Markdown: mean ± standard error per cell, groups of rows; the
    best value per metric in bold where it is significantly better than the runner-up."""
    metrics = results.metrics
    head = ["Method", "Layer", "Abs", "Selected by"] + [
        f"{METRICS[m].title} {_arrow(m)}" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = table1_stats(results)
    for group in ("split", "layer", "baseline"):
        idx = [i for i, r in enumerate(results.rows) if r.config.spec.group == group]
        if not idx:
            continue
        lines.append(f"| *{GROUP_TITLES[group]}* |" + " |" * (len(head) - 1))
        for i in idx:
            r = results.rows[i]
            cells = [r.config.spec.label, r.config.layer_label, "y" if r.use_abs else "n",
                     r.selected_by]
            for m in metrics:
                mean, se, _ = _cell(r, m)
                text = _fmt(mean) if not np.isfinite(se) else f"{_fmt(mean)} ± {_fmt(se)}"
                if best[m].marked and best[m].best == i:
                    text = f"**{text}**"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def statistics_md(results: Results) -> str:
    """Per metric: n, best and runner-up, the paired test's p, images needed for 0.05."""
    best = table1_stats(results)
    lines = [f"Cells are mean ± standard error over the test images with a score (n). The "
             f"best entry of a metric is in bold only when its paired difference to the "
             f"runner-up is significant ({stats.TEST_NAME}, p < {stats.LEVEL:g}); "
             "\"n for 0.05\" is the number of test images for which a true mean difference "
             "of 0.05 between these two would be detected with 80 % power (from their "
             "paired standard deviation).", "",
             "| Metric | n | best (mean) | runner-up (mean) | p | marked | paired SD | "
             "n for 0.05 |", "|---|---|---|---|---|---|---|---|"]
    for m in results.metrics:
        b = best[m]
        ns = sorted({_cell(r, m)[2] for r in results.rows
                     if m in r.records and r.config.spec.method != "Random"})
        n_text = "–" if not ns else (str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}")

        def name(i, m=m):
            if i is None:
                return "–"
            r = results.rows[i]
            return f"{r.config.spec.label} {r.config.layer_label} ({_fmt(_cell(r, m)[0])})"

        need = stats.images_needed(b.sd)
        lines.append(f"| {METRICS[m].title} | {n_text} | {name(b.best)} | "
                     f"{name(b.runner_up)} | {_fmt(b.p, 3)} | {'yes' if b.marked else 'no'} "
                     f"| {_fmt(b.sd)} | {need if need is not None else '–'} |")
    return "\n".join(lines)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _table1_csv(results: Results, path: Path) -> None:
    metrics = results.metrics
    best = table1_stats(results)
    header = ["group", "method", "registry_name", "layer", "variant", "abs", "selected_by"]
    header += metrics + [f"{m}_se" for m in metrics] + [f"{m}_n" for m in metrics]
    header += [f"best_{m}" for m in metrics]
    rows = []
    for i, r in enumerate(results.rows):
        cells = [_cell(r, m) for m in metrics]
        flags = [int(best[m].marked and best[m].best == i) for m in metrics]
        rows.append([r.config.spec.group, r.config.spec.label, r.config.spec.method,
                     r.config.layer or "input", r.config.variant, int(r.use_abs),
                     r.selected_by] + [f"{c[0]:.6g}" for c in cells] +
                    [f"{c[1]:.6g}" for c in cells] + [c[2] for c in cells] + flags)
    _write_csv(path, header, rows)


def _alpha_md(results: Results) -> str:
    if not results.alpha_table:
        return "(no SplitCAM / SplitGrad configuration was evaluated)"
    head = ["Method", "Metric"] + [f"α={alpha_label(a)}" for a in results.alphas]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last = None
    for label, metric, vals in results.alpha_table:
        shown = label if label != last else ""
        last = label
        lines.append("| " + " | ".join([shown, f"{METRICS[metric].title} {_arrow(metric)}"] +
                                       [_fmt(vals[a]) for a in results.alphas]) + " |")
    return "\n".join(lines)


def _sanity_md(results: Results) -> str:
    if not results.sanity_rows:
        return "(no method could be checked)"
    lines = ["| Method | HOG | Spearman | SSIM |", "|---|---|---|---|"]
    for label, cell in results.sanity_rows:
        lines.append(f"| {label} | {_fmt(cell['HOG'])} | {_fmt(cell['Spearman'])} | "
                     f"{_fmt(cell['SSIM'])} |")
    return "\n".join(lines)


def _timing_md(results: Results) -> str:
    lines = ["| Method | seconds per image |", "|---|---|"]
    for label, sec in results.timings:
        lines.append(f"| {label} | {sec:.4f} |")
    return "\n".join(lines)


def _validation_csv(results: Results, path: Path) -> None:
    metrics = sorted({m for v in results.validation.values() for m in v},
                     key=list(METRICS).index)
    rows = []
    for (key, use_abs), vals in results.validation.items():
        c = results.configs[key]
        rows.append([c.spec.label, c.layer or "input", c.variant, int(use_abs)] +
                    [f"{vals[m]:.6g}" for m in metrics])
    _write_csv(path, ["method", "layer", "variant", "abs"] + metrics, rows)


def figure_saliency(results: Results, path: Path) -> None:
    """Figure 4: rows = test images (predicted class and confidence), columns = methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(results.saliency)
    n = len(results.saliency_titles)
    if n == 0 or not cols:
        return
    fig, axes = plt.subplots(n, len(cols) + 1, figsize=(1.6 * (len(cols) + 1), 1.75 * n),
                             squeeze=False)
    for i in range(n):
        img = results.saliency_images[i]
        ax = axes[i, 0]
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1))
        if results.saliency_masks is not None:
            ax.contour(results.saliency_masks[i, 0].astype(float), levels=[0.5],
                       colors="yellow", linewidths=0.6)
        ax.set_ylabel(results.saliency_titles[i], fontsize=7)
        if i == 0:
            ax.set_title("image", fontsize=6)
        for j, name in enumerate(cols):
            m = results.saliency[name][i, 0]
            lim = float(np.abs(m).max()) or 1.0
            ax = axes[i, j + 1]
            ax.imshow(m, cmap="bwr", vmin=-lim, vmax=lim)
            if i == 0:
                ax.set_title(name, fontsize=5)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_layers(results: Results, path: Path) -> None:
    """Figure 7: validation metrics over layers, each method normalised to [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({m for v in results.validation.values() for m in v},
                     key=list(METRICS).index)
    layered = [r for r in results.rows if r.config.spec.layered]
    if not metrics or not layered:
        return
    layer_names = ["input"] + [n for n in results.layers if n != "input"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.2), squeeze=False)
    seen = set()
    for row in layered:
        spec = row.config.spec
        if spec.label in seen:
            continue
        seen.add(spec.label)
        for ax, m in zip(axes[0], metrics, strict=False):
            xs, ys = [], []
            for li, layer in enumerate(layer_names):
                key = next((k for (k, a), _v in results.validation.items()
                            if a == row.use_abs and results.configs[k].spec is spec
                            and (results.configs[k].layer or "input") == layer
                            and results.configs[k].variant == row.config.variant), None)
                if key is None:
                    continue
                v = results.validation[(key, row.use_abs)].get(m, np.nan)
                if np.isfinite(v):
                    xs.append(li)
                    ys.append(v)
            if len(ys) < 1:
                continue
            ys = np.asarray(ys)
            span = ys.max() - ys.min()
            ys = (ys - ys.min()) / span if span > 0 else np.full_like(ys, 0.5)
            ax.plot(xs, ys, marker="o", label=f"{spec.label} {row.config.variant}".strip())
    for ax, m in zip(axes[0], metrics, strict=False):
        ax.set_title(f"{METRICS[m].title} {_arrow(m)}", fontsize=9)
        ax.set_xticks(range(len(layer_names)))
        ax.set_xticklabels(layer_names, rotation=60, fontsize=6, ha="right")
        ax.set_ylim(-0.05, 1.05)
    axes[0, 0].set_ylabel("normalised per method")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))),
               fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * (len(labels) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: Results, out: str | Path, header: str = "",
                 figures: bool = True) -> Path:
    """Write every table (and, with ``figures``, the figures) to ``out``; returns the path
    of ``report.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _table1_csv(results, out / "table1_comparison.csv")
    t1 = markdown_table1(results)
    (out / "table1_comparison.md").write_text(t1 + "\n")
    _write_csv(out / "table3_alpha.csv", ["method", "metric"] + [f"alpha={alpha_label(a)}"
                                                                 for a in results.alphas],
               [[label, m] + [f"{vals[a]:.6g}" for a in results.alphas]
                for label, m, vals in results.alpha_table])
    t3 = _alpha_md(results)
    (out / "table3_alpha.md").write_text(t3 + "\n")
    _write_csv(out / "table6_randomisation.csv", ["method", "HOG", "Spearman", "SSIM"],
               [[label, f"{c['HOG']:.6g}", f"{c['Spearman']:.6g}", f"{c['SSIM']:.6g}"]
                for label, c in results.sanity_rows])
    t6 = _sanity_md(results)
    (out / "table6_randomisation.md").write_text(t6 + "\n")
    _write_csv(out / "table7_timing.csv", ["method", "seconds_per_image"],
               [[label, f"{s:.6g}"] for label, s in results.timings])
    t7 = _timing_md(results)
    (out / "table7_timing.md").write_text(t7 + "\n")
    _validation_csv(results, out / "validation.csv")
    if figures:
        figure_saliency(results, out / "figure4_saliency.png")
        figure_layers(results, out / "figure7_layers.png")
    notes = "\n".join(f"- {n}" for n in results.notes) or "- none"
    blind = class_blind.summary(results.class_blind)
    blind = (f"\n## Class-blind Split maps\n\n{blind}\n" if blind else "")
    text = f"""# splitxai benchmark

{header}

## Table 1: comparison on the test split

Layer and abs selected per method on the validation split (best average rank over the
localisation pair and, separately, over the Pixel Flipping pair). Mean ± standard error
over the test images; the best per metric in bold only where it is significantly better
than the runner-up (see the statistics below).

{t1}

### Statistics of table 1

{statistics_md(results)}

## Table 3: alpha ablation (test split)

{t3}

## Table 6: randomisation sanity check

Re-initialised: {', '.join(results.randomised_layers)} (the last three linear / conv layers).

Lower similarity = stronger dependence on the learned parameters.

{t6}

## Table 7: computation time

{t7}

Figures: `figure4_saliency.png`, `figure7_layers.png`.
{blind}
## Notes

{notes}

Finished in {results.elapsed:.0f} s.
"""
    path = out / "report.md"
    path.write_text(text)
    return path
