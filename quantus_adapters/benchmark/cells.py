"""The unit of work of the benchmark: one method configuration on one set of images.

:func:`run_cells` takes a :class:`CellJob` -- plain, picklable inputs: the model, the images,
labels and masks as arrays, the method's options, the cells to compute (key, abs choice,
metric) and the protocol settings -- explains the images once and returns every requested
cell's record. It reads no global state and seeds every random source from the settings'
seed, so it gives the same records in any process and in any order (a distributed runner
maps it over workers; :class:`~quantus_adapters.benchmark.runner.Benchmark` maps it in
order).

The keys come from :func:`cell_key`: the fingerprint of the model (architecture and
weights), the data (:func:`data_digest`), the method options, the metric and its options
(:func:`metric_options`), the seed and the library versions (:func:`context`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.shift import SplitClassBlindWarning
from quantus_adapters.benchmark.protocol import (
    LOCALISATION,
    ProtocolSettings,
    evaluate_metric,
    features_in_step,
    resolve_options,
    seed_everything,
    selectivity_patch,
)
from quantus_adapters.benchmark.store import fingerprint
from quantus_adapters.benchmark.zoo.models import factory_digest
from quantus_adapters.class_blind import ClassBlind, collect
from quantus_adapters.cluster import error_line

__all__ = [
    "CellJob",
    "CellResult",
    "run_cells",
    "explain_maps",
    "seed_everything",
    "cell_key",
    "context",
    "architecture_digest",
    "model_digest",
    "data_digest",
    "metric_options",
    "library_versions",
    "PROTOCOL_VERSION",
]

# bump when a metric's implementation changes its numbers: stored cells are then recomputed
PROTOCOL_VERSION = 2


# ----------------------------------------------------------------------------- fingerprints
def library_versions() -> dict[str, str]:
    """Versions of the libraries whose code produces the numbers."""
    from importlib import metadata

    out = {}
    for name in ("splitxai", "torch", "numpy", "scipy", "quantus", "captum", "zennit",
                 "scikit-image"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def _source_of(obj: Any) -> Any:
    """The function or class whose source defines ``obj`` (a partial's function, a bound
    method's function), or None."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    obj = getattr(obj, "__func__", obj)
    return obj if inspect.isclass(obj) or inspect.isfunction(obj) else None


def code_digest(model: nn.Module) -> str:
    """SHA-256 of the code the model's forward runs: the source files defining each class
    in the module tree and each ``forward`` replaced on an instance, and the ``FILE.py`` of
    ``--model FILE.py:FACTORY`` (whose factory may set what neither ``repr`` nor the weights
    show, such as ``inception_v3(transform_input=...)``).

    A whole file takes part, so a change of the forward, of a helper function or of a
    module-level constant in that file (``SCALE = 50.0``) gives another digest, while
    ``repr`` and the weights stay the same. Files are hashed by content (not by path); a
    class or function without a readable source file (defined in an interactive session)
    takes part through its compiled code.
    """
    digests: set[str] = set()
    for m in model.modules():
        factory = factory_digest(m)  # a model built by FILE.py:FACTORY, maybe wrapped
        if factory is not None:
            digests.add(factory)
        for obj in (type(m), vars(m).get("forward")):
            obj = _source_of(obj)
            if obj is None:
                continue
            try:
                path = inspect.getsourcefile(obj)
                data = Path(path).read_bytes() if path else None
            except (TypeError, OSError):
                data = None
            if data is None:  # no file: the compiled code of its functions
                funcs = [obj] if inspect.isfunction(obj) else [
                    f for f in vars(obj).values() if inspect.isfunction(f)]
                data = b"".join(f.__code__.co_code + repr(f.__code__.co_consts).encode()
                                for f in funcs)
            digests.add(hashlib.sha256(data).hexdigest())
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def model_digest(model: nn.Module) -> dict[str, str]:
    """The model's architecture (its class and ``repr``), a SHA-256 of its weights and of
    its code (:func:`code_digest`).

    Every parameter and buffer takes part (name, dtype, shape and bytes), in
    ``state_dict`` order.
    """
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"architecture": architecture_digest(model),
            "weights": h.hexdigest(), "code": code_digest(model)}


def architecture_digest(model: nn.Module) -> str:
    """SHA-256 of the model's class and ``repr``: the options of its modules that are
    neither weights nor code (``transforms.Normalize``'s mean, a LeakyReLU's slope, a
    convolution's stride)."""
    arch = f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}"
    return hashlib.sha256(arch.encode()).hexdigest()


def data_digest(x: torch.Tensor | np.ndarray, y, masks=None, names: Sequence[str] = ()) -> str:
    """SHA-256 of a set of images (the exact pixel values used), labels, masks and names."""
    h = hashlib.sha256()
    for part in (x, y, masks):
        if part is None:
            h.update(b"none|")
            continue
        arr = np.ascontiguousarray(part.numpy() if isinstance(part, torch.Tensor) else part)
        h.update(f"{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    h.update("\n".join(names).encode())
    return h.hexdigest()


def context(model: nn.Module, settings: ProtocolSettings) -> dict:
    """The parts of every cell's fingerprint that do not depend on the cell."""
    return {"model": model_digest(model), "versions": library_versions(),
            "seed": settings.seed, "device": settings.device, "protocol": PROTOCOL_VERSION}


def metric_options(metric: str, settings: ProtocolSettings, shape: Sequence[int]) -> dict:
    """The options that determine ``metric``'s scores for images of ``shape`` (C, H, W)."""
    if metric in ("PF@5", "PF@20"):
        return {"fraction": 0.05 if metric == "PF@5" else 0.20,
                "features_in_step": features_in_step(shape), "baseline": "mean"}
    if metric == "Selectivity":
        return {"patch": settings.selectivity_patch or selectivity_patch(shape)}
    if metric in LOCALISATION:
        return {"abs": False, "normalise": True, "exclude": "empty or all-object masks"}
    if metric == "MaxSens":
        return {"samples": settings.max_sens_samples, "images": settings.max_sens_images,
                "batch_size": settings.batch_size}
    if metric == "RandLogit":
        return {"similarity": "ssim", "normalise": True, "batch_size": settings.batch_size}
    return {}


def cell_key(ctx: dict, data: str, explain_kwargs: dict, use_abs: bool, metric: str,
             options: dict, batch_size: int) -> str:
    """The fingerprint of one cell (see the module docstring)."""
    return fingerprint({"context": ctx, "data": data, "method": explain_kwargs,
                        "batch_size": batch_size, "abs": bool(use_abs), "metric": metric,
                        "metric_options": options})


# ----------------------------------------------------------------------------- explaining
def explain_maps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, explain_kwargs: dict,
                 explain: Callable | None = None, batch_size: int = 64, device: str = "cpu",
                 seed: int = 0) -> np.ndarray:
    """Explanations (B, 1, H, W) of a batch, in chunks, every chunk seeded.

    Chunk ``i`` (starting at image ``i``) runs after ``seed_everything(seed + i)``, so that
    random methods (Gradient SHAP's baselines and noise) give the same maps in every run.
    """
    if explain is None:
        import quantus_adapters

        explain = quantus_adapters.explain
    chunk = max(1, batch_size // 8) if x.shape[-1] >= 128 else batch_size
    out = []
    for i in range(0, len(y), chunk):
        xb, yb = x[i:i + chunk].to(device), y[i:i + chunk].to(device)
        seed_everything(seed + i)
        opts = resolve_options(explain_kwargs, xb)
        out.append(np.asarray(explain(model, xb, yb, **opts), dtype=np.float32))
    return np.concatenate(out)


@contextlib.contextmanager
def quiet():
    """Silence Quantus's warnings and the notes it prints (they would break progress bars).

    :class:`core.SplitClassBlindWarning` of the metrics' own explanations still reaches the
    :func:`~quantus_adapters.class_blind.collect` around :func:`run_cells` (the core reports
    a layer once per model, so a silenced one would be lost for the run).
    """
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", SplitClassBlindWarning)
        yield


def _resolving(explain: Callable) -> Callable:
    """An explain function that resolves symbolic options per batch (Max Sensitivity)."""

    def fn(model, inputs, targets, **kwargs):
        t = torch.as_tensor(np.asarray(inputs))
        return explain(model, inputs, targets, **resolve_options(kwargs, t))

    return fn


# ----------------------------------------------------------------------------- the unit
@dataclass
class CellJob:
    """One method configuration on one set of images, and the cells wanted from it.

    Attributes
    ----------
    model: torch.nn.Module
        The model (eval mode; not modified).
    x, y: numpy.ndarray
        Images (B, C, H, W) float32 in [0, 1] and labels (B,).
    masks: numpy.ndarray or None
        Object masks (B, 1, H, W) float32, or None.
    explain_kwargs: dict
        ``method`` and its options for ``quantus_adapters.explain``.
    cells: tuple of (str, bool, str)
        (key, abs, metric) of each wanted cell.
    settings: ProtocolSettings
        Metric parameters and the seed.
    keep: int
        Also return the first ``keep`` maps (for the figure).
    explain: callable or None
        The explain function; None: ``quantus_adapters.explain``.
    """

    model: nn.Module
    x: np.ndarray
    y: np.ndarray
    masks: np.ndarray | None
    explain_kwargs: dict
    cells: tuple
    settings: ProtocolSettings
    keep: int = 0
    explain: Callable | None = None


@dataclass
class CellResult:
    """What :func:`run_cells` returns: records by key, kept maps, errors by place, and the
    class-blind maps met on the way (:mod:`quantus_adapters.class_blind`)."""

    records: dict[str, dict] = field(default_factory=dict)
    maps: np.ndarray | None = None
    errors: dict[str, str] = field(default_factory=dict)
    class_blind: list[ClassBlind] = field(default_factory=list)


def _check_maps(a: np.ndarray) -> None:
    flat = a.reshape(len(a), -1)
    spread = flat.max(1) - flat.min(1)
    if not np.isfinite(a).all():
        raise FloatingPointError("the maps are not finite")
    if (spread <= 1e-7 * np.maximum(np.abs(flat).max(1), 1e-30)).all():
        raise ValueError("every map is spatially constant (e.g. the gradient after global "
                         "average pooling); no pixel ranking to evaluate")


def run_cells(job: CellJob) -> CellResult:
    """Explain ``job.x`` once and compute every cell of ``job``; returns the records.

    A record is ``{"scores": [per image, NaN where undefined], "mean": ..., "n": finite
    scores, "seconds": ..., "metric": ..., "abs": ..., "method": ...}`` (the last three
    describe the cell for a reader of ``cells.jsonl``). A failure of the method (no maps)
    or of one metric is reported in ``errors`` and its cells are left out (they are not
    stored, so a resumed run tries again). :class:`core.SplitClassBlindWarning` is not
    shown but returned in ``class_blind`` (also from a Ray worker, whose output nobody sees).
    """
    with collect(job.explain_kwargs.get("alpha")) as found:
        res = _run_cells(job)
    res.class_blind = found
    return res


def _run_cells(job: CellJob) -> CellResult:
    res = CellResult()
    if not job.cells and not job.keep:
        return res
    settings = job.settings
    x = torch.from_numpy(np.ascontiguousarray(job.x))
    y = torch.from_numpy(np.ascontiguousarray(job.y))
    try:
        a = explain_maps(job.model, x, y, job.explain_kwargs, job.explain,
                         settings.batch_size, settings.device, settings.seed)
        _check_maps(a)
    except Exception as exc:  # one failing method must not stop the benchmark
        res.errors[""] = error_line(exc)
        return res
    if job.keep:
        res.maps = a[:job.keep]
    explain = job.explain
    if explain is None:
        import quantus_adapters

        explain = quantus_adapters.explain
    nonnegative = bool((a >= 0).all())
    cache: dict = {}
    by_choice: dict[tuple[bool, str], dict] = {}
    for key, use_abs, metric in job.cells:
        if key in res.records:
            continue
        same = by_choice.get((not use_abs, metric)) if nonnegative else None
        if same is not None:  # |a| == a: the same scores
            res.records[key] = {**same, "abs": bool(use_abs)}
            continue
        t0 = time.perf_counter()
        # every cell starts from the same random state: its record does not depend on the
        # cells computed before it in this job (or left out because another job has them)
        seed_everything(settings.seed)
        try:
            with quiet():
                scores = evaluate_metric(metric, job.model, job.x, job.y, a, job.masks,
                                         use_abs, settings,
                                         explain_kwargs=job.explain_kwargs,
                                         explain_func=_resolving(explain), cache=cache)
        except Exception as exc:
            res.errors[metric] = error_line(exc)
            continue
        finite = scores[np.isfinite(scores)]
        record = {"scores": [float(v) for v in scores],
                  "mean": float(finite.mean()) if len(finite) else float("nan"),
                  "n": int(len(finite)), "seconds": round(time.perf_counter() - t0, 3),
                  "metric": metric, "abs": bool(use_abs),
                  "method": job.explain_kwargs.get("method")}
        res.records[key] = record
        by_choice[(use_abs, metric)] = record
    return res
