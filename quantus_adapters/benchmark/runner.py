"""The benchmark run: validation (layer selection), test, alpha ablation, sanity, timing.

:class:`Benchmark` holds the model, the data and the methods; :meth:`Benchmark.run`
computes every result cell (reusing stored ones with ``resume``) and returns
:class:`Results`, which :mod:`quantus_adapters.benchmark.report` turns into tables and
figures.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from quantus_adapters.benchmark import sanity, timing
from quantus_adapters.benchmark.data import BenchmarkData
from quantus_adapters.benchmark.protocol import (
    LOCALISATION,
    METRICS,
    PIXEL_FLIPPING,
    Config,
    MethodSpec,
    ProtocolSettings,
    configs_for,
    evaluate_metric,
    resolve_options,
    select_configs,
)
from quantus_adapters.benchmark.store import CellStore

__all__ = ["Benchmark", "Results", "Row", "FIGURE_BASELINES"]

# input-attribution baselines shown in the saliency figure (all Split and layer methods are)
FIGURE_BASELINES = ("Saliency", "IntegratedGradients", "GuidedBackprop", "Occlusion")


@dataclass
class Row:
    """One row of the comparison: a selected configuration and its test scores."""

    config: Config
    use_abs: bool
    selected_by: str
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class Results:
    """Everything the report needs."""

    rows: list[Row]
    validation: dict[tuple[str, bool], dict[str, float]]
    configs: dict[str, Config]
    alpha_table: list[tuple[str, str, dict[float, float]]]
    alphas: list[float]
    sanity_rows: list[tuple[str, dict[str, float]]]
    randomised_layers: list[str]
    timings: list[tuple[str, float]]
    saliency: dict[str, np.ndarray]
    saliency_images: np.ndarray
    saliency_masks: np.ndarray | None
    saliency_titles: list[str]
    notes: list[str]
    metrics: list[str]
    layers: list[str]
    elapsed: float = 0.0


@contextlib.contextmanager
def _quiet():
    """Silence Quantus's warnings and the notes it prints (they would break progress bars)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _progress(iterable, desc: str, enabled: bool, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False,
                dynamic_ncols=True)


class Benchmark:
    """One benchmark run.

    Parameters
    ----------
    model: torch.nn.Module
        The model (eval mode; not modified).
    data: BenchmarkData
        Images, labels, masks, validation/test split.
    specs: list of MethodSpec
        The methods (unavailable ones are dropped with a note by the caller).
    layers: list of str
        Candidate layers of layer-wise methods.
    store: CellStore
        Where finished cells go (and come from, with resume).
    settings: ProtocolSettings
        Metric parameters.
    alphas: list of float
        The alpha grid of the ablation (table 3).
    explain: callable, optional
        The explain function; ``quantus_adapters.explain`` by default.
    n_saliency, n_sanity, n_timing: int
        Test images in figure 4, the sanity check and the timing.
    progress: bool
        Show progress bars.
    log: callable
        Receives progress lines.
    """

    def __init__(self, model: nn.Module, data: BenchmarkData, specs: Sequence[MethodSpec],
                 layers: Sequence[str], store: CellStore, settings: ProtocolSettings,
                 alphas: Sequence[float] = (0.4,), explain: Callable | None = None,
                 n_saliency: int = 4, n_sanity: int = 20, n_timing: int = 8,
                 progress: bool = True, log: Callable[[str], None] = print):
        import quantus_adapters

        self.model = model
        self.data = data
        self.specs = list(specs)
        self.layers = list(layers)
        self.store = store
        self.settings = settings
        self.alphas = list(alphas)
        self.explain = explain or quantus_adapters.explain
        self.n_saliency = n_saliency
        self.n_sanity = n_sanity
        self.n_timing = n_timing
        self.progress = progress
        self.log = log
        self.notes: list[str] = list(data.notes)
        self.errors: dict[str, str] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def metric_names(self) -> list[str]:
        """Metrics that apply to this data (localisation needs masks)."""
        return [m for m in METRICS if self.data.has_masks or not METRICS[m].needs_masks]

    def _arrays(self, split: str):
        x, y, s = self.data.subset(split)
        s_np = None if s is None else s.numpy().astype(np.float32)
        return x, y, x.numpy().astype(np.float32), y.numpy(), s_np

    def maps(self, config: Config, x: torch.Tensor, y: torch.Tensor,
             model: nn.Module | None = None) -> np.ndarray:
        """Explanations (B, 1, H, W) of ``config`` for a batch, computed in chunks."""
        model = self.model if model is None else model
        dev = self.settings.device
        chunk = self.settings.batch_size
        if x.shape[-1] >= 128:  # large images: smaller chunks
            chunk = max(1, chunk // 8)
        out = []
        for i in range(0, len(y), chunk):
            xb, yb = x[i:i + chunk].to(dev), y[i:i + chunk].to(dev)
            opts = resolve_options(config.explain_kwargs, xb)
            out.append(np.asarray(self.explain(model, xb, yb, **opts), dtype=np.float32))
        return np.concatenate(out)

    @staticmethod
    def cell_key(stage: str, config: Config, use_abs: bool, metric: str) -> str:
        return f"{stage}|{config.key()}|abs={int(use_abs)}|{metric}"

    def _evaluate(self, stage: str, split: str, config: Config, abs_choices: Sequence[bool],
                  metrics: Sequence[str], keep: int = 0) -> tuple[dict, np.ndarray | None]:
        """Scores of ``config`` for each abs choice and metric; stored cells are reused."""
        results: dict[tuple[bool, str], float] = {}
        todo = []
        for use_abs in abs_choices:
            for m in metrics:
                key = self.cell_key(stage, config, use_abs if m != "MaxSens" else True, m)
                cell = self.store.get(key)
                if cell is not None:
                    results[(use_abs, m)] = cell["mean"]
                else:
                    todo.append((use_abs, m, key))
        kept = None
        if not todo and not keep:
            return results, kept
        x, y, x_np, y_np, s_np = self._arrays(split)
        try:
            a = self.maps(config, x, y)
            flat = a.reshape(len(a), -1)
            spread = flat.max(1) - flat.min(1)
            if not np.isfinite(a).all():
                raise FloatingPointError("the maps are not finite")
            if (spread <= 1e-7 * np.maximum(np.abs(flat).max(1), 1e-30)).all():
                raise ValueError("every map is spatially constant (e.g. the gradient after "
                                 "global average pooling); no pixel ranking to evaluate")
        except Exception as exc:  # one failing method must not stop the benchmark
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.errors[f"{config.spec.label} {config.layer_label}"] = msg
            for use_abs, m, _ in todo:
                results[(use_abs, m)] = float("nan")
            return results, None
        if keep:
            kept = a[:keep]
        cache: dict = {}
        nonnegative = bool((a >= 0).all())
        for use_abs, m, key in sorted(todo, key=lambda t: t[0]):
            if key in self.store:  # MaxSens shared by both abs choices
                results[(use_abs, m)] = self.store.get(key)["mean"]
                continue
            twin = self.cell_key(stage, config, False, m)
            if use_abs and nonnegative and twin in self.store:  # |a| == a: same scores
                self.store.put(key, self.store.get(twin))
                results[(use_abs, m)] = self.store.get(key)["mean"]
                continue
            t0 = time.perf_counter()
            try:
                with _quiet():
                    scores = evaluate_metric(m, self.model, x_np, y_np, a, s_np, use_abs,
                                             self.settings,
                                             explain_kwargs=config.explain_kwargs,
                                             explain_func=self._resolved_explain(config),
                                             cache=cache)
                finite = scores[np.isfinite(scores)]
                mean = float(finite.mean()) if len(finite) else float("nan")
                self.store.put(key, {"mean": mean, "scores": [float(v) for v in scores],
                                     "seconds": round(time.perf_counter() - t0, 3)})
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                self.errors[f"{config.spec.label} {config.layer_label} {m}"] = msg
                mean = float("nan")
            results[(use_abs, m)] = mean
        return results, kept

    def _resolved_explain(self, config: Config) -> Callable:
        """An explain function that resolves symbolic options per batch (Max Sensitivity)."""
        explain = self.explain

        def fn(model, inputs, targets, **kwargs):
            t = torch.as_tensor(np.asarray(inputs))
            return explain(model, inputs, targets, **resolve_options(kwargs, t))

        return fn

    # ------------------------------------------------------------------ stages
    def validate(self) -> tuple[dict, dict[str, Config]]:
        """Metrics of every configuration on validation (localisation and Pixel Flipping)."""
        metrics = [m for m in (*LOCALISATION, *PIXEL_FLIPPING) if m in self.metric_names]
        configs = [c for spec in self.specs for c in configs_for(spec, self.layers)]
        values: dict[tuple[str, bool], dict[str, float]] = {}
        by_key = {c.key(): c for c in configs}
        for config in _progress(configs, "validation: configurations", self.progress):
            res, _ = self._evaluate("val", "val", config, (False, True), metrics)
            for use_abs in (False, True):
                values[(config.key(), use_abs)] = {m: res[(use_abs, m)] for m in metrics}
        return values, by_key

    def select(self, values: dict, configs: dict[str, Config]) -> list[Row]:
        """Per method: the best configuration for localisation and for Pixel Flipping."""
        rows: list[Row] = []
        criteria = []
        if self.data.has_masks:
            criteria.append(("localisation", LOCALISATION))
        criteria.append(("pixel flipping", PIXEL_FLIPPING))
        for spec in self.specs:
            cands = {k: v for k, v in values.items() if configs[k[0]].spec is spec}
            if not cands:
                continue
            chosen: list[tuple] = []
            for name, metrics in criteria:
                if all(not np.isfinite(v[m]) for v in cands.values() for m in metrics):
                    continue
                best = select_configs(cands, metrics)
                if best in chosen:
                    rows[[(r.config.key(), r.use_abs) for r in rows].index(best)].selected_by += (
                        f", {name}")
                    continue
                chosen.append(best)
                rows.append(Row(configs[best[0]], best[1], name))
        return rows

    def test(self, rows: list[Row]) -> dict[str, np.ndarray]:
        """All metrics of the selected configurations on the test split."""
        kept: dict[str, np.ndarray] = {}
        for row in _progress(rows, "test: selected configurations", self.progress):
            res, maps = self._evaluate("test", "test", row.config, (row.use_abs,),
                                       self.metric_names, keep=self.n_saliency)
            row.scores = {m: res[(row.use_abs, m)] for m in self.metric_names}
            if maps is not None:
                kept[f"{row.config.key()}|{int(row.use_abs)}"] = maps
        return kept

    def alpha_ablation(self, rows: list[Row]) -> list[tuple[str, str, dict[float, float]]]:
        """Table 3: the selected SplitCAM / SplitGrad configurations over the alpha grid."""
        metrics = [m for m in ("Pointing", "AttrLoc", "MaxSens", "PF@20")
                   if m in self.metric_names]
        table = []
        first_rows: dict[int, Row] = {}
        for row in rows:
            if row.config.spec.alpha_ablation and id(row.config.spec) not in first_rows:
                first_rows[id(row.config.spec)] = row
        jobs = [(row, alpha) for row in first_rows.values() for alpha in self.alphas]
        results: dict[tuple[int, float], dict] = {}
        for row, alpha in _progress(jobs, "alpha ablation", self.progress):
            cfg = row.config.with_options(alpha=alpha)
            res, _ = self._evaluate("test", "test", cfg, (row.use_abs,), metrics)
            results[(id(row), alpha)] = res
        for row in first_rows.values():
            pool = row.config.options.get("maxpool")
            label = (f"{row.config.spec.method}{f' ({pool})' if pool else ''} "
                     f"{row.config.layer_label}" + (", abs" if row.use_abs else ""))
            for m in metrics:
                table.append((label, m, {a: results[(id(row), a)][(row.use_abs, m)]
                                         for a in self.alphas}))
        return table

    def sanity_check(self, rows: list[Row]) -> tuple[list[tuple[str, dict]], list[str]]:
        """Table 6: similarity of maps before / after re-initialising the last 3 layers."""
        randomised, names = sanity.randomised_copy(self.model, 3, seed=self.settings.seed)
        randomised.to(next(iter(self.model.parameters()), torch.zeros(0)).device)
        x, y, *_ = self._arrays("test")
        x, y = x[:self.n_sanity], y[:self.n_sanity]
        out = []
        seen = set()
        for row in _progress(rows, "randomisation check", self.progress):
            if row.config.spec.method == "Random" or row.config.key() in seen:
                continue
            seen.add(row.config.key())
            key = f"sanity|{row.config.key()}|n={len(y)}"
            cell = self.store.get(key)
            if cell is None:
                try:
                    a = self.maps(row.config, x, y)
                    b = self.maps(row.config, x, y, model=randomised)
                    with _quiet():
                        sims = sanity.similarities(a, b)
                    cell = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                            for k, v in sims.items()}
                    self.store.put(key, cell)
                except Exception as exc:
                    self.errors[f"sanity {row.config.spec.label}"] = f"{type(exc).__name__}: {exc}"
                    continue
            out.append((f"{row.config.spec.label} {row.config.layer_label}", cell))
        return out, names

    def timings(self) -> list[tuple[str, float]]:
        """Table 7: split time and seconds per image of each method (first layer)."""
        x, y, *_ = self._arrays("test")
        dev = self.settings.device
        x, y = x[:self.n_timing].to(dev), y[:self.n_timing].to(dev)
        out = []
        key = "timing|split"
        cell = self.store.get(key)
        if cell is None:
            try:
                cell = {"seconds": timing.split_time(self.model)}
                self.store.put(key, cell)
            except Exception as exc:
                self.errors["timing split"] = f"{type(exc).__name__}: {exc}"
        if cell is not None:
            out.append(("Model splitting time", cell["seconds"]))
        seen = set()
        first = next((n for n in self.layers if n != "input"), None)
        for spec in _progress(self.specs, "timing", self.progress):
            if spec.method in seen:
                continue
            seen.add(spec.method)
            config = configs_for(spec, [first] if first else [])
            config = [c for c in config if c.layer != "input"] or config
            cfg = config[0]
            key = f"timing|{cfg.key()}|n={len(y)}"
            cell = self.store.get(key)
            if cell is None:
                try:
                    opts = resolve_options(cfg.explain_kwargs, x)
                    cell = {"seconds": timing.explain_time(self.explain, self.model, x, y, opts)}
                    self.store.put(key, cell)
                except Exception as exc:
                    self.errors[f"timing {spec.label}"] = f"{type(exc).__name__}: {exc}"
                    continue
            out.append((spec.method if spec.method not in ("LRP",) else spec.label,
                        cell["seconds"]))
        return out

    # ------------------------------------------------------------------ all
    def run(self) -> Results:
        """Every stage in order; returns the results for the report."""
        start = time.perf_counter()
        self.log(f"validation: {len(self.data.val_idx)} images, test: "
                 f"{len(self.data.test_idx)} images, {len(self.specs)} methods, layers "
                 f"{', '.join(self.layers) or '-'}")
        values, configs = self.validate()
        rows = self.select(values, configs)
        kept = self.test(rows)
        alpha_table = self.alpha_ablation(rows)
        sanity_rows, randomised = self.sanity_check(rows)
        timings = self.timings()
        x, y, *_ = self._arrays("test")
        n = min(self.n_saliency, len(y))
        with torch.no_grad():
            probs = torch.softmax(self.model(x[:n].to(self.settings.device)), 1).cpu()
        names = self.data.class_names
        titles = []
        for i in range(n):
            p = int(probs[i].argmax())
            cls = names[p] if names and p < len(names) else str(p)
            titles.append(f"{cls} ({100 * float(probs[i, p]):.0f} %)")
        saliency: dict[str, np.ndarray] = {}
        shown = set()
        for row in rows:
            k = f"{row.config.key()}|{int(row.use_abs)}"
            spec = row.config.spec
            if spec.group == "baseline" and spec.method not in FIGURE_BASELINES:
                continue
            if spec.label not in shown and k in kept:
                shown.add(spec.label)
                maps = kept[k][:n]
                saliency[f"{row.config.spec.label}\n{row.config.layer_label}"] = (
                    np.abs(maps) if row.use_abs else maps)
        _, _, s = self.data.subset("test")
        notes = list(self.notes)
        for where, msg in self.errors.items():
            notes.append(f"failed: {where}: {msg}")
        return Results(
            rows=rows, validation=values, configs=configs, alpha_table=alpha_table,
            alphas=self.alphas, sanity_rows=sanity_rows, randomised_layers=randomised,
            timings=timings, saliency=saliency, saliency_images=x[:n].numpy(),
            saliency_masks=None if s is None else s[:n].numpy(), saliency_titles=titles,
            notes=notes, metrics=self.metric_names, layers=self.layers,
            elapsed=time.perf_counter() - start)


def fingerprint(model: nn.Module, data: BenchmarkData, settings: ProtocolSettings,
                extra: dict) -> dict:
    """What must match for ``--resume`` to reuse stored cells."""
    with torch.no_grad():
        params = sum(float(p.double().abs().sum()) for p in model.parameters())
    return {
        "model": type(model).__name__,
        "param_abs_sum": f"{params:.6e}",
        "data": data.name,
        "val": [int(i) for i in data.val_idx],
        "test": [int(i) for i in data.test_idx],
        "images_sum": f"{float(data.images.double().sum()):.6e}",
        "settings": {k: v for k, v in vars(settings).items() if k != "batch_size"},
        **extra,
    }

