"""The benchmark run: validation (layer selection), test, alpha ablation, sanity, timing.

:class:`Benchmark` holds the model, the data and the methods; :meth:`Benchmark.run`
computes every result cell through :func:`~quantus_adapters.benchmark.cells.run_cells`
(reusing stored ones whose fingerprint matches, with ``reuse``) and returns
:class:`Results`, which :mod:`quantus_adapters.benchmark.report` turns into tables and
figures.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from quantus_adapters.benchmark import cells, sanity, timing
from quantus_adapters.benchmark.data import BenchmarkData
from quantus_adapters.benchmark.protocol import (
    LOCALISATION,
    METRICS,
    PIXEL_FLIPPING,
    Config,
    MethodSpec,
    ProtocolSettings,
    configs_for,
    resolve_options,
    select_configs,
)
from quantus_adapters.benchmark.store import ResultStore
from quantus_adapters.class_blind import ClassBlind, collect

__all__ = ["Benchmark", "Results", "Row", "FIGURE_BASELINES", "map_in_order"]

# input-attribution baselines shown in the saliency figure (all Split and layer methods are)
FIGURE_BASELINES = ("Saliency", "IntegratedGradients", "GuidedBackprop", "Occlusion")


#: the errors of a configuration whose maps are constant (``quantus_adapters.explain``'s
#: ConstantExplanationError, or cells.py's check of spatially constant maps): an outcome of
#: the method at that layer, reported but no failure of the run
CONSTANT_MAPS = ("ConstantExplanationError:", "every map is spatially constant")


@dataclass
class Row:
    """One row of the comparison: a selected configuration and its test cells.

    ``scores`` holds the mean of each metric, ``records`` the stored cells (per-image
    scores in ``records[metric]["scores"]``, used by the significance test).
    """

    config: Config
    use_abs: bool
    selected_by: str
    scores: dict[str, float] = field(default_factory=dict)
    records: dict[str, dict] = field(default_factory=dict)


@dataclass
class Results:
    """Everything the report needs.

    ``errors`` maps each failed part (a configuration's maps, a metric cell, the
    randomisation check, a timing) to its error; configurations with spatially constant maps
    are only noted (``notes``), as they are an outcome, not a failure.
    """

    rows: list[Row]
    validation: dict[tuple[str, bool], dict[str, float]]
    configs: dict[str, Config]
    alpha_table: list[tuple[str, str, dict[float | str, float]]]
    alphas: list[float | str]
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
    reused: int = 0
    computed: int = 0
    class_blind: list[ClassBlind] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def _progress(iterable, desc: str, enabled: bool, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False,
                dynamic_ncols=True)


def map_in_order(fn: Callable, jobs: Sequence) -> Iterable[tuple[int, Any]]:
    """The default job mapper: ``(i, fn(jobs[i]))`` in this process, lazily, in order."""
    return enumerate(map(fn, jobs))


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
    store: ResultStore
        Where finished cells go (and, with ``reuse``, come from).
    settings: ProtocolSettings
        Metric parameters and the seed.
    alphas: list of float or "auto"
        The alpha grid of the ablation (table 3).
    explain: callable, optional
        The explain function; ``quantus_adapters.explain`` by default.
    n_saliency, n_sanity, n_timing: int
        Test images in figure 4, the sanity check and the timing.
    progress: bool
        Show progress bars.
    log: callable
        Receives progress lines.
    reuse: bool
        Reuse stored cells whose fingerprint matches (``--resume``); otherwise every cell
        is computed (and appended to the store).
    map_jobs: callable, optional
        ``map_jobs(run_cells, jobs)`` yields ``(i, result)``: the :class:`CellResult` of
        ``jobs[i]`` for every :class:`CellJob`, in any order (each is stored as it
        arrives); :func:`map_in_order` by default. A distributed runner
        (:class:`~quantus_adapters.benchmark.distributed.RayJobs`) passes its own.
    """

    def __init__(self, model: nn.Module, data: BenchmarkData, specs: Sequence[MethodSpec],
                 layers: Sequence[str], store: ResultStore, settings: ProtocolSettings,
                 alphas: Sequence[float | str] = (0.4,), explain: Callable | None = None,
                 n_saliency: int = 4, n_sanity: int = 20, n_timing: int = 8,
                 progress: bool = True, log: Callable[[str], None] = print,
                 reuse: bool = False, map_jobs: Callable | None = None):
        import quantus_adapters

        self.model = model
        self.data = data
        self.specs = list(specs)
        self.layers = list(layers)
        self.store = store
        self.settings = settings
        self.alphas = list(alphas)
        self.explain = explain
        self._explain_fn = explain or quantus_adapters.explain
        self.n_saliency = n_saliency
        self.n_sanity = n_sanity
        self.n_timing = n_timing
        self.progress = progress
        self.log = log
        self.reuse = reuse
        self.map_jobs = map_jobs or map_in_order
        self.notes: list[str] = list(data.notes)
        self.errors: dict[str, str] = {}
        self.class_blind: list[ClassBlind] = []
        self.reused = 0
        self.computed = 0
        self._fresh: set[str] = set()
        self._ctx = cells.context(model, settings)
        self._arrays_cache: dict[str, tuple] = {}
        self._digests = {split: cells.data_digest(*self._arrays(split)[2:],
                                                  names=self._names(split))
                         for split in ("val", "test")}

    # ------------------------------------------------------------------ helpers
    @property
    def metric_names(self) -> list[str]:
        """Metrics that apply to this data (localisation needs usable masks)."""
        return [m for m in self.settings.metrics
                if not METRICS[m].needs_masks or self.data.has_usable_masks]

    def _names(self, split: str) -> list[str]:
        idx = self.data.val_idx if split == "val" else self.data.test_idx
        return [self.data.names[int(i)] for i in idx]

    def _arrays(self, split: str):
        if split not in self._arrays_cache:
            x, y, s = self.data.subset(split)
            s_np = None if s is None else s.numpy().astype(np.float32)
            self._arrays_cache[split] = (x, y, x.numpy().astype(np.float32), y.numpy(), s_np)
        return self._arrays_cache[split]

    def _lookup(self, key: str) -> dict | None:
        """A stored cell, when this run may use it (``reuse``, or computed in this run)."""
        if not self.reuse and key not in self._fresh:
            return None
        return self.store.get(key)

    def maps(self, config: Config, x: torch.Tensor, y: torch.Tensor,
             model: nn.Module | None = None) -> np.ndarray:
        """Explanations (B, 1, H, W) of ``config`` for a batch (seeded, in chunks)."""
        return cells.explain_maps(self.model if model is None else model, x, y,
                                  config.explain_kwargs, self._explain_fn,
                                  self.settings.batch_size, self.settings.device,
                                  self.settings.seed)

    def cell_key(self, split: str, config: Config, use_abs: bool, metric: str) -> str:
        """The fingerprint of one cell (Max Sensitivity always takes abs)."""
        shape = tuple(self.data.images.shape[1:])
        return cells.cell_key(self._ctx, self._digests[split], config.explain_kwargs,
                              True if metric == "MaxSens" else use_abs, metric,
                              cells.metric_options(metric, self.settings, shape),
                              self.settings.batch_size)

    def _evaluate_many(self, split: str, requests: Sequence[tuple], desc: str,
                       keep: int = 0) -> list[tuple[dict, np.ndarray | None]]:
        """Cells of many configurations: ``requests`` are (config, abs choices, metrics).

        Returns, per request, ``{(abs, metric): record or None}`` and the kept maps. The
        missing cells are computed by :func:`cells.run_cells` through ``map_jobs`` and
        stored as each job finishes.
        """
        x, y, x_np, y_np, s_np = self._arrays(split)
        jobs, plans = [], []
        planned: set[str] = set()  # a cell is computed by one job of the stage only
        for config, abs_choices, metrics in requests:
            keys = {(ua, m): self.cell_key(split, config, ua, m)
                    for ua in abs_choices for m in metrics}
            todo = []
            for (ua, m), k in keys.items():
                # one key, one computation: Max Sensitivity's key ignores the abs choice
                # (it always takes abs), so two picks of one configuration that differ
                # only in abs share that cell
                if k in planned or k in self._fresh:
                    continue
                planned.add(k)
                if self._lookup(k) is None:
                    todo.append((k, True if m == "MaxSens" else ua, m))
                else:
                    self.reused += 1
            plans.append(keys)
            jobs.append(cells.CellJob(self.model, x_np, y_np, s_np, config.explain_kwargs,
                                      tuple(todo), self.settings, keep=keep,
                                      explain=self.explain))
        maps: dict[int, np.ndarray | None] = {}
        for i, res in _progress(self.map_jobs(cells.run_cells, jobs), desc, self.progress,
                                total=len(jobs)):
            config = requests[i][0]
            for k, record in res.records.items():
                self.store.put(k, record)
                self._fresh.add(k)
            self.computed += len(res.records)
            self.class_blind += res.class_blind
            for where, msg in res.errors.items():
                self.errors[" ".join(p for p in (config.spec.label, config.layer_label, where)
                                     if p)] = msg
            maps[i] = res.maps
        if len(maps) != len(jobs):
            raise RuntimeError(f"{desc}: {len(jobs) - len(maps)} job(s) returned no result")
        return [({c: self._lookup(k) for c, k in keys.items()}, maps[i])
                for i, keys in enumerate(plans)]

    @staticmethod
    def _mean(record: dict | None) -> float:
        return float("nan") if record is None else float(record["mean"])

    # ------------------------------------------------------------------ stages
    def validate(self) -> tuple[dict, dict[str, Config]]:
        """Metrics of every configuration on validation (localisation and Pixel Flipping)."""
        metrics = [m for m in (*LOCALISATION, *PIXEL_FLIPPING) if m in self.metric_names]
        configs = [c for spec in self.specs for c in configs_for(spec, self.layers)]
        by_key = {c.key(): c for c in configs}
        values: dict[tuple[str, bool], dict[str, float]] = {}
        found = self._evaluate_many("val", [(c, (False, True), metrics) for c in configs],
                                    "validation: configurations")
        for config, (res, _) in zip(configs, found, strict=True):
            for use_abs in (False, True):
                values[(config.key(), use_abs)] = {m: self._mean(res[(use_abs, m)])
                                                   for m in metrics}
        return values, by_key

    def select(self, values: dict, configs: dict[str, Config]) -> list[Row]:
        """Per method: the best configuration for localisation and for Pixel Flipping."""
        rows: list[Row] = []
        criteria = []
        if any(m in self.metric_names for m in LOCALISATION):
            criteria.append(("localisation", LOCALISATION))
        if any(m in self.metric_names for m in PIXEL_FLIPPING):
            criteria.append(("pixel flipping", PIXEL_FLIPPING))
        for spec in self.specs:
            cands = {k: v for k, v in values.items() if configs[k[0]].spec is spec}
            if not cands:
                continue
            chosen: list[tuple] = []
            for name, metrics in criteria:
                metrics = [m for m in metrics if m in self.metric_names]
                if all(not np.isfinite(v[m]) for v in cands.values() for m in metrics):
                    continue
                best = select_configs(cands, metrics)
                if best in chosen:
                    rows[[(r.config.key(), r.use_abs) for r in rows].index(best)].selected_by += (
                        f", {name}")
                    continue
                chosen.append(best)
                rows.append(Row(configs[best[0]], best[1], name))
            if not criteria:  # no selection metric: the first configuration
                first = next(iter(cands))
                rows.append(Row(configs[first[0]], first[1], "first layer"))
        return rows

    def test(self, rows: list[Row]) -> dict[str, np.ndarray]:
        """All metrics of the selected configurations on the test split."""
        kept: dict[str, np.ndarray] = {}
        found = self._evaluate_many(
            "test", [(r.config, (r.use_abs,), self.metric_names) for r in rows],
            "test: selected configurations", keep=self.n_saliency)
        for row, (res, maps) in zip(rows, found, strict=True):
            row.records = {m: res[(row.use_abs, m)] for m in self.metric_names
                           if res[(row.use_abs, m)] is not None}
            row.scores = {m: self._mean(res[(row.use_abs, m)]) for m in self.metric_names}
            if maps is not None:
                kept[f"{row.config.key()}|{int(row.use_abs)}"] = maps
        return kept

    def alpha_ablation(self, rows: list[Row]) -> list[tuple[str, str, dict[float | str, float]]]:
        """Table 3: the selected SplitCAM / SplitGrad configurations over the alpha grid."""
        metrics = [m for m in ("Pointing", "AttrLoc", "MaxSens", "PF@20")
                   if m in self.metric_names]
        table = []
        first_rows: dict[int, Row] = {}
        for row in rows:
            if row.config.spec.alpha_ablation and id(row.config.spec) not in first_rows:
                first_rows[id(row.config.spec)] = row
        jobs = [(row, alpha) for row in first_rows.values() for alpha in self.alphas]
        found = self._evaluate_many(
            "test", [(row.config.with_options(alpha=alpha), (row.use_abs,), metrics)
                     for row, alpha in jobs], "alpha ablation")
        results = {(id(row), alpha): res for (row, alpha), (res, _) in zip(jobs, found,
                                                                            strict=True)}
        for row in first_rows.values():
            pool = row.config.options.get("maxpool")
            label = (f"{row.config.spec.method}{f' ({pool})' if pool else ''} "
                     f"{row.config.layer_label}" + (", abs" if row.use_abs else ""))
            for m in metrics:
                table.append((label, m, {a: self._mean(results[(id(row), a)][(row.use_abs, m)])
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
            key = self.store.fingerprint({
                "context": self._ctx, "data": self._digests["test"], "images": len(y),
                "method": row.config.explain_kwargs, "batch_size": self.settings.batch_size,
                "sanity": {"layers": names, "similarities": sanity.SIMILARITIES}})
            cell = self._lookup(key)
            if cell is None:
                try:
                    alpha = row.config.options.get("alpha")
                    with collect(alpha) as found:
                        a = self.maps(row.config, x, y)
                    with collect(alpha) as found_randomised:
                        b = self.maps(row.config, x, y, model=randomised)
                    self.class_blind += found + [
                        dataclasses.replace(f, layer=f"{f.layer} (randomised copy)")
                        for f in found_randomised]
                    with cells.quiet():
                        sims = sanity.similarities(a, b)
                    cell = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                            for k, v in sims.items()}
                    self.store.put(key, cell)
                    self._fresh.add(key)
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
        base = {"context": self._ctx, "images": len(y), "shape": list(x.shape[1:]),
                "threads": torch.get_num_threads()}
        key = self.store.fingerprint({**base, "timing": "split"})
        cell = self._lookup(key)
        if cell is None:
            try:
                cell = {"seconds": timing.split_time(self.model)}
                self.store.put(key, cell)
                self._fresh.add(key)
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
            key = self.store.fingerprint({**base, "timing": cfg.explain_kwargs})
            cell = self._lookup(key)
            if cell is None:
                try:
                    opts = resolve_options(cfg.explain_kwargs, x)
                    with collect(cfg.options.get("alpha")) as found:
                        seconds = timing.explain_time(self._explain_fn, self.model, x, y, opts)
                    self.class_blind += found
                    cell = {"seconds": seconds}
                    self.store.put(key, cell)
                    self._fresh.add(key)
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
            elapsed=time.perf_counter() - start, reused=self.reused, computed=self.computed,
            class_blind=list(self.class_blind),
            errors={where: msg for where, msg in self.errors.items()
                    if not any(text in msg for text in CONSTANT_MAPS)})



