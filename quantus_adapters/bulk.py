"""Bulk explanations: many images, several methods, one compressed array per map.

The job behind ``splitxai explain``: every (image, method configuration) pair gives one map,
written to ``<out>/maps/<configuration>/<image>.npz`` (``numpy.savez_compressed``; the array
``map`` of shape (H, W), float32 or float16, and the explained ``label``), listed in
``<out>/index.csv`` and described by ``<out>/explain.json`` (what produced the maps, checked
by ``--resume``). Maps are computed by :class:`MapWorker` -- in this process, or on each
Ray worker (:func:`explain_on_ray`); only the calling process writes files, as results
arrive, so an interrupted run keeps every finished map. Random methods (``Random``,
``GradientShap``) are seeded per batch and configuration from the seed, the configuration
and the batch's images, so a batch gives the same maps in any process.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import inspect
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["MapConfig", "MapStore", "MapWorker", "StoreError", "batch_seed", "clashing_names",
           "explain_locally", "explain_on_ray", "failed_batch", "make_batches", "map_stem",
           "model_digest", "plan_configs", "todo_pairs"]

INDEX_COLUMNS = ("image", "label", "method", "layer", "options", "dtype", "file")
FLOAT16_MAX = float(np.finfo(np.float16).max)
FLOAT16_TINY = float(np.finfo(np.float16).tiny)  # the smallest normal float16, 6.1e-5


class StoreError(ValueError):
    """The output folder cannot take these maps (another setup, not writable...)."""


@dataclass(frozen=True)
class MapConfig:
    """One method with fixed options (one map per image).

    Attributes
    ----------
    method: str
        A name of :func:`quantus_adapters.available_methods`.
    options: dict
        Its options (``layer``, ``alpha``, ...), passed to :func:`quantus_adapters.explain`.
    """

    method: str
    options: dict = field(default_factory=dict)

    @property
    def folder(self) -> str:
        """The sub-folder of its maps: the method, ``@layer`` and the other options."""
        parts = [self.method]
        if self.options.get("layer") is not None:
            parts.append(f"@{self.options['layer']}")
        rest = {k: v for k, v in sorted(self.options.items()) if k != "layer"}
        parts += [f"_{k}={v}" for k, v in rest.items()]
        return re.sub(r"[^A-Za-z0-9._@=+-]", "_", "".join(parts))

    def key(self) -> str:
        """A stable identifier (method and options)."""
        return json.dumps({"method": self.method, "options": self.options}, sort_keys=True)


def _keyword_options(method: str) -> set[str]:
    """The options (keyword parameters after model, inputs, targets) a method accepts."""
    from quantus_adapters.registry import method_info

    params = list(inspect.signature(method_info(method).function).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {"*"}
    return {p.name for p in params[3:] if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                     inspect.Parameter.POSITIONAL_OR_KEYWORD)}


def plan_configs(methods: Sequence[str], layers: Sequence[str] | None = None,
                 options: dict | None = None) -> list[MapConfig]:
    """The configurations of a run: each method at each layer (if it takes a ``layer``).

    Parameters
    ----------
    methods: sequence of str
        Method names.
    layers: sequence of str, optional
        Layers for the methods that take a ``layer`` option (one configuration per layer);
        the others ignore them. None: each method's default layer.
    options: dict, optional
        Options (e.g. ``{"alpha": 0.4}``) given to every method that accepts them.

    Raises
    ------
    UnknownMethodError
        A method no plugin offers.
    ValueError
        ``layers`` or an option that none of the methods accepts.
    """
    options = dict(options or {})
    configs: list[MapConfig] = []
    used: set[str] = set()
    for method in dict.fromkeys(methods):
        accepted = _keyword_options(method)
        takes = (lambda name, acc=accepted: "*" in acc or name in acc)  # noqa: E731
        fixed = {k: v for k, v in options.items() if takes(k)}
        used |= set(fixed)
        if layers and takes("layer"):
            used.add("layer")
            configs += [MapConfig(method, {**fixed, "layer": layer})
                        for layer in dict.fromkeys(layers)]
        else:
            configs.append(MapConfig(method, fixed))
    unused = sorted(set(options) - used)
    if unused:
        raise ValueError(f"option(s) {', '.join(unused)} are accepted by none of the methods "
                         f"{', '.join(methods)}")
    if layers and "layer" not in used:
        raise ValueError(f"--layers: none of the methods {', '.join(methods)} takes a layer")
    folders: dict[str, MapConfig] = {}
    for config in configs:  # one folder per configuration, or maps overwrite each other
        other = folders.setdefault(config.folder.casefold(), config)
        if other is not config:
            raise ValueError(f"{other.method} with {other.options} and with {config.options} "
                             f"would share the map folder {config.folder!r}; give layers "
                             "and options whose names differ in more than case or "
                             "punctuation")
    return configs


class MapWorker:
    """Computes maps; holds the model once (one in each Ray worker).

    Parameters
    ----------
    model: torch.nn.Module or callable
        The model, or a function building it (called once, in the worker's process).
    images: numpy.ndarray or callable
        (N, C, H, W) float32 images in [0, 1], addressed by row (or a function returning
        them, e.g. fetching them from Ray's object store).
    labels: numpy.ndarray or callable
        (N,) classes explained (or a function returning them).
    configs: sequence of MapConfig
        Addressed by index.
    device: str
        Torch device of the model.
    threads: int, optional
        Torch CPU threads of this worker.
    seed: int
        Base seed: before each configuration's call on a batch, Python's, NumPy's and
        torch's generators are seeded from it, the configuration and the batch's rows
        (:func:`batch_seed`).
    """

    def __init__(self, model: nn.Module | Callable[[], nn.Module],
                 images: np.ndarray | Callable[[], np.ndarray],
                 labels: np.ndarray | Callable[[], np.ndarray], configs: Sequence[MapConfig],
                 device: str = "cpu", threads: int | None = None, seed: int = 0):
        if threads is not None:
            torch.set_num_threads(threads)
        if not isinstance(model, nn.Module):
            model = model()
        if callable(images):
            images = images()
        if callable(labels):
            labels = labels()
        self.model = model.to(device).eval()
        self.images = images
        self.labels = labels
        self.configs = list(configs)
        self.device = device
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Maps of ``batch["row"]`` x ``batch["config"]`` pairs.

        Returns
        -------
        dict
            ``row``, ``config``, ``map`` ((B, H, W) float32; zeros where it failed),
            ``error`` ("" or the failure of that pair's configuration on its images) and
            ``class_blind`` ("" or, JSON, the ``[layer, ratio]`` pairs of the
            :class:`core.SplitClassBlindWarning` of that configuration's call, collected
            instead of shown).
        """
        import quantus_adapters
        from quantus_adapters.benchmark.protocol import seed_everything
        from quantus_adapters.class_blind import collect
        from quantus_adapters.cluster import error_line

        rows = np.asarray(batch["row"], dtype=np.int64)
        cfgs = np.asarray(batch["config"], dtype=np.int64)
        h, w = self.images.shape[-2:]
        maps = np.zeros((len(rows), h, w), dtype=np.float32)
        errors = np.array([""] * len(rows), dtype=object)
        blind = np.array([""] * len(rows), dtype=object)
        for c in np.unique(cfgs):
            sel = np.flatnonzero(cfgs == c)
            config = self.configs[int(c)]
            x = torch.from_numpy(np.ascontiguousarray(self.images[rows[sel]]))
            y = torch.from_numpy(np.ascontiguousarray(self.labels[rows[sel]]))
            seed_everything(batch_seed(self.seed, config, rows[sel]))
            try:
                with collect(config.options.get("alpha")) as found:
                    out = quantus_adapters.explain(self.model, x.to(self.device),
                                                   y.to(self.device), method=config.method,
                                                   **config.options)
                maps[sel] = out[:, 0]
            except Exception as exc:  # reported per map by the caller; other maps go on
                errors[sel] = error_line(exc)
            if found:
                blind[sel[0]] = json.dumps([[f.layer, f.ratio] for f in found])
        return {"row": rows, "config": cfgs, "map": maps, "error": errors.astype(str),
                "class_blind": blind.astype(str)}


class MapStore:
    """The output folder: maps as ``.npz`` files, ``index.csv``, ``explain.json``.

    Parameters
    ----------
    out: path-like
        The folder.
    fingerprint: dict
        What produced the maps (model, weights, data, configurations, dtype).
    resume: bool
        Keep the maps of an earlier run with the same fingerprint (and skip them).
    float16: bool
        Store maps as float16.

    Raises
    ------
    StoreError
        ``out`` is a file or not writable; it holds maps but ``resume`` is False; it holds
        maps of another setup.
    """

    def __init__(self, out: str | os.PathLike, fingerprint: dict, resume: bool = False,
                 float16: bool = False):
        self.out = Path(out)
        self.float16 = float16
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.index = self.out / "index.csv"
        self.meta = self.out / "explain.json"
        if self.out.exists() and not self.out.is_dir():
            raise StoreError(f"--out {str(self.out)!r} is a file; give a folder")
        self.done: set[tuple[str, str]] = set()
        self._made_by: dict[str, tuple[str, str]] = {}  # map folder: (method, options JSON)
        if self.meta.is_file() or self.index.is_file():
            if resume:
                self._load()
            elif self._holds_maps():  # not a run stopped before its first map (no cluster)
                raise StoreError(f"--out {str(self.out)!r} already holds maps; pass --resume "
                                 "to add the missing ones, or choose another --out")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.meta.write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True))
            self._rewrite_index()
        except OSError as exc:
            raise StoreError(f"--out {str(self.out)!r} is not writable: {exc}") from None

    def _holds_maps(self) -> bool:
        """Whether the folder holds a map file or an index line of one."""
        if any(p.is_file() for p in (self.out / "maps").rglob("*")):
            return True
        try:
            with open(self.index, newline="") as fh:
                return any(True for _ in csv.DictReader(fh))
        except OSError:
            return False

    def _load(self) -> None:
        try:
            stored = json.loads(self.meta.read_text())
        except (OSError, json.JSONDecodeError):
            stored = None
        if stored != self.fingerprint:
            differ = sorted(k for k in set(self.fingerprint) | set(stored or {})
                            if (stored or {}).get(k) != self.fingerprint.get(k))
            raise StoreError(f"--resume: --out {str(self.out)!r} holds maps of another setup "
                             f"(different {', '.join(differ)}); choose another --out")
        self._rows: list[dict] = []
        if self.index.is_file():
            with open(self.index, newline="") as fh:
                for row in csv.DictReader(fh):
                    if None in row.values() or set(row) != set(INDEX_COLUMNS):
                        continue  # the line cut by an interruption
                    # a map indexed twice (two runs into one --out at once): one line
                    if (self.out / row["file"]).is_file() and (
                            (row["image"], row["file"]) not in self.done):
                        self._rows.append(row)
                        self.done.add((row["image"], row["file"]))
                        self._made_by.setdefault(str(Path(row["file"]).parent),
                                                 (row["method"], row["options"]))

    def _rewrite_index(self) -> None:
        rows = getattr(self, "_rows", [])
        with open(self.index, "w", newline="") as fh:
            writer = csv.DictWriter(fh, INDEX_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def relpath(self, config: MapConfig, name: str) -> str:
        """The map's file, relative to the folder (image sub-folders kept)."""
        return f"maps/{config.folder}/{map_stem(name)}.npz"

    def has(self, config: MapConfig, name: str) -> bool:
        """Whether the map of ``name`` under ``config`` is stored.

        Raises
        ------
        StoreError
            ``config``'s map folder holds maps of another method or options (names that
            differ only in characters a folder name does not keep).
        """
        rel = self.relpath(config, name)
        made_by = self._made_by.get(str(Path(rel).parent))
        mine = (config.method, json.dumps(config.options, sort_keys=True))
        if made_by is not None and made_by != mine:  # one folder name, other options
            raise StoreError(f"--resume: {str(self.out / Path(rel).parent)!r} holds maps of "
                             f"{made_by[0]} with options {made_by[1]}, not {mine[1]}; choose "
                             "another --out")
        return (name, rel) in self.done

    def put(self, config: MapConfig, name: str, label: int, amap: np.ndarray) -> None:
        """Write one map (atomically) and its index line.

        Raises
        ------
        StoreError
            With float16, a map whose values exceed float16's range, or whose largest
            magnitude is below its normal range (every value would be subnormal).
        """
        rel = self.relpath(config, name)
        arr = np.asarray(amap, dtype=np.float32)
        if self.float16:
            peak = float(np.abs(arr).max(initial=0.0))
            if peak > FLOAT16_MAX:
                raise StoreError(f"{config.folder} {name}: values up to {peak:.3g} exceed "
                                 "float16's range; run without --float16")
            if 0.0 < peak < FLOAT16_TINY:  # all of it subnormal: a digit or none (<6e-8: 0)
                raise StoreError(f"{config.folder} {name}: values at most {peak:.3g}, below "
                                 f"float16's normal range ({FLOAT16_TINY:.2g}), would keep "
                                 "fewer than three digits; run without --float16")
            arr = arr.astype(np.float16)
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, map=arr, label=np.int64(label))
        os.replace(tmp, path)
        with open(self.index, "a", newline="") as fh:
            csv.writer(fh).writerow([name, int(label), config.method,
                                     config.options.get("layer", ""),
                                     json.dumps(config.options, sort_keys=True),
                                     str(arr.dtype), rel])
        self.done.add((name, rel))


def map_stem(name: str) -> str:
    """The file name of an image's maps, without ``.npz``: ``name`` with every character
    but ``A-Z a-z 0-9 . _ / @ = + -`` replaced by ``_`` (image sub-folders kept)."""
    return re.sub(r"[^A-Za-z0-9._/@=+-]", "_", name).lstrip("/")


def clashing_names(names: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs of image names whose maps would share one file: the same :func:`map_stem`, also
    on a case-insensitive file system (macOS, Windows, FAT / exFAT drives)."""
    first: dict[str, str] = {}
    pairs = []
    for name in names:
        key = map_stem(name).casefold()
        if key in first and first[key] != name:
            pairs.append((first[key], name))
        first.setdefault(key, name)
    return pairs


def model_digest(model: nn.Module) -> str:
    """SHA-1 of the model's parameters and buffers (names, shapes, bytes)."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else
                      t.float().numpy().tobytes())
    return digest.hexdigest()


def todo_pairs(store: MapStore, configs: Sequence[MapConfig],
               names: Sequence[str]) -> list[tuple[int, int]]:
    """The (row, config) pairs whose maps are not stored yet, configuration by configuration."""
    return [(r, c) for c, config in enumerate(configs) for r, name in enumerate(names)
            if not store.has(config, name)]


def make_batches(pairs: Sequence[tuple[int, int]], size: int) -> list[dict[str, np.ndarray]]:
    """``pairs`` cut into batches of ``size`` (the same batches in every kind of run)."""
    out = []
    for i in range(0, len(pairs), size):
        chunk = np.asarray(pairs[i:i + size], dtype=np.int64).reshape(-1, 2)
        out.append({"row": chunk[:, 0], "config": chunk[:, 1]})
    return out


def explain_locally(worker: MapWorker, batches: Sequence[dict[str, np.ndarray]]
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Results of :class:`MapWorker` on ``batches`` in this process, one at a time."""
    for batch in batches:
        yield worker(batch)


def batch_seed(seed: int, config: MapConfig, rows: np.ndarray) -> int:
    """The seed of one configuration's call on a batch: a 32-bit hash of the base seed, the
    configuration and the rows (the same in any process and order)."""
    text = f"{seed}|{config.key()}|{','.join(map(str, np.asarray(rows).tolist()))}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def failed_batch(batch: dict[str, np.ndarray], shape: tuple[int, int],
                 error: str) -> dict[str, np.ndarray]:
    """The result of a batch that could not be computed: every pair failed with ``error``."""
    n = len(batch["row"])
    return {"row": np.asarray(batch["row"]), "config": np.asarray(batch["config"]),
            "map": np.zeros((n, *shape), dtype=np.float32),
            "error": np.array([error] * n), "class_blind": np.array([""] * n)}


def explain_on_ray(ray, make_model: Callable[[], nn.Module], images: np.ndarray,
                   labels: np.ndarray, configs: Sequence[MapConfig],
                   batches: Sequence[dict[str, np.ndarray]], device: str, workers: int,
                   gpus_per_worker: float, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Results of :class:`MapWorker` on Ray workers (a :class:`~quantus_adapters.cluster.
    RayPool`), as they finish.

    Images and labels go to the object store once; each worker builds the model once with
    ``make_model`` (picklable) and explains the batches it is sent -- the batches of a
    local run, with the same seeds, so the maps are the same. A batch whose worker is lost
    (after Ray's restarts) comes back with every pair failed, naming the cause.

    Raises
    ------
    WorkerSetupError
        A worker cannot build the model (the same in every worker: the run stops).
    """
    from quantus_adapters.cluster import ObjectStoreValue, RayPool

    setup = functools.partial(MapWorker, make_model, ObjectStoreValue(ray.put(images)),
                              ObjectStoreValue(ray.put(labels)), list(configs), device,
                              seed=seed)
    pool = RayPool(ray, setup, workers, gpus_per_worker)
    try:
        for batch, ok, value in pool.imap_unordered(MapWorker.__call__, batches):
            yield value if ok else failed_batch(batch, images.shape[-2:], f"Ray: {value}")
    finally:
        pool.close()
