"""``splitxai train-dc``: train the appendix-D difference models and tabulate their accuracy.

Trains ``mlp_maxout`` / ``cnn_maxout`` in the restriction modes of ``core.dc.models`` on MNIST
(torchvision or a local IDX folder) or on scikit-learn's digits (offline, upsampled to
28x28), over several seeds, and writes a table-12 style accuracy table (median [min, max]
over the seeds) as Markdown and CSV.

Example
-------
>>> from core.dc.train import main
>>> main(["--quick", "--out", "runs/quick"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import csv
import gzip
import statistics
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.dc import models as dc_models

__all__ = [
    "Dataset",
    "RunResult",
    "read_idx",
    "load_idx_folder",
    "load_digits_28",
    "load_mnist",
    "load_data",
    "train_model",
    "evaluate",
    "save_checkpoint",
    "load_checkpoint",
    "accuracy_table",
    "main",
]

ARCHITECTURES = {"mlp_maxout": dc_models.mlp_maxout, "cnn_maxout": dc_models.cnn_maxout}
_IDX_DTYPES = {
    0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8",
}


@dataclass
class Dataset:
    """Images ``(N, 1, 28, 28)`` float32 in [0, 1] and labels ``(N,)`` int64, train and test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    name: str

    def limit(self, n: int | None) -> Dataset:
        """The first ``n`` training and the first ``n`` test samples (all if None)."""
        if n is None:
            return self
        if n < 1:
            raise ValueError(f"--limit must be a positive number of samples, got {n}")
        return Dataset(
            self.train_x[:n], self.train_y[:n], self.test_x[:n], self.test_y[:n],
            f"{self.name} (first {n})",
        )


@dataclass
class RunResult:
    """Test accuracy (in %) of one trained model."""

    model: str
    mode: str
    seed: int
    epochs: int
    accuracy: float
    seconds: float


# --------------------------------------------------------------------------------- data


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip'd or raw.

    Parameters
    ----------
    path: str or pathlib.Path
        The file; gzip compression is detected from its first bytes.

    Returns
    -------
    numpy.ndarray
        The array with the shape and dtype stored in the header.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path} is a damaged or truncated gzip file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] < 1:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r}; expected "
                         "0x00 0x00, a type code and the number of dimensions)")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ValueError(f"{path} is truncated: its header promises {ndim} dimensions but the "
                         f"file has {len(raw)} bytes")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims))
    expected = offset + count * dtype.itemsize
    if len(raw) < expected:
        raise ValueError(f"{path} is truncated: header says shape {dims} ({expected} bytes), "
                         f"the file has {len(raw)}")
    if len(raw) > expected:
        raise ValueError(f"{path} has {len(raw) - expected} bytes more than its header's shape "
                         f"{dims} needs; it is damaged or not an IDX file")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return data.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def _find_idx(folder: Path, prefix: str, kind: str) -> Path | None:
    ndim = 3 if kind == "images" else 1
    for sep in ("-", "."):
        for suffix in (".gz", ""):
            candidate = folder / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _images_labels(images: np.ndarray, labels: np.ndarray, source: str) -> tuple:
    """Check one IDX pair: uint8 28x28 images, as many integer labels in 0-9, not empty."""
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{source}: expected 28x28 images, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: expected unsigned-byte images (0-255), got {images.dtype}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{source}: {images.shape[0]} images but labels of shape {labels.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{source}: the set is empty (0 images)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers, got {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if len(bad):
        raise ValueError(f"{source}: {len(bad)} label(s) outside 0-9 (e.g. {int(labels[bad[0]])} "
                         f"at index {int(bad[0])}); the models have 10 classes")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float = 0.2, seed: int = 0):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(len(y) * test_fraction)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def load_idx_folder(folder: str | Path) -> Dataset:
    """Load MNIST-style IDX files from a folder.

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``; a
    ``.`` instead of the ``-`` before ``idx`` is accepted). With both pairs, train on
    ``train`` and test on ``t10k``; with only one pair, a fixed 80 / 20 split of it
    (seed 0) gives the training and the test part.

    Parameters
    ----------
    folder: str or pathlib.Path
        The folder holding the files.

    Returns
    -------
    Dataset
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"IDX folder {folder} does not exist (use --data idx:FOLDER)")
    pairs = {}
    for prefix in ("train", "t10k"):
        images, labels = _find_idx(folder, prefix, "images"), _find_idx(folder, prefix, "labels")
        if images is not None and labels is not None:
            pairs[prefix] = _images_labels(read_idx(images), read_idx(labels), str(images))
    if not pairs:
        raise FileNotFoundError(
            f"no IDX pair in {folder}: expected t10k-images-idx3-ubyte[.gz] with "
            "t10k-labels-idx1-ubyte[.gz] and/or train-images-idx3-ubyte[.gz] with "
            "train-labels-idx1-ubyte[.gz]"
        )
    if len(pairs) == 2:
        return Dataset(*pairs["train"], *pairs["t10k"], name=f"idx:{folder}")
    (prefix, (x, y)), = pairs.items()
    if len(y) < 2:
        raise ValueError(f"{folder}: the {prefix} pair holds {len(y)} sample; an 80/20 split "
                         "needs at least two (or give both the train and the t10k pair)")
    return Dataset(*_split(x, y), name=f"idx:{folder} ({prefix}, 80/20 split)")


def load_digits_28() -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, offline), upsampled and padded to 28x28.

    Each image is scaled to [0, 1], bilinearly upsampled to 24x24 and zero padded by 2
    pixels on every side (MNIST also leaves a border); a fixed 80 / 20 split (seed 0).

    Returns
    -------
    Dataset
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "--data digits needs scikit-learn: pip install scikit-learn "
            "(or pip install 'splitxai[benchmark]')"
        ) from error
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    x = F.pad(x, (2, 2, 2, 2)).clamp_(0.0, 1.0)
    y = torch.from_numpy(digits.target.astype(np.int64))
    return Dataset(*_split(x, y), name="digits (scikit-learn, 28x28)")


def load_mnist(root: str | Path, download: bool = True) -> Dataset:
    """MNIST through torchvision (downloaded into ``root`` when online).

    Parameters
    ----------
    root: str or pathlib.Path
        torchvision's data folder.
    download: bool
        Whether torchvision may download the files.

    Returns
    -------
    Dataset
    """
    try:
        from torchvision.datasets import MNIST
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "--data mnist needs torchvision (pip install torchvision); without it use "
            "--data idx:FOLDER or --data digits"
        ) from error
    try:
        parts = [MNIST(str(root), train=t, download=download) for t in (True, False)]
    except (RuntimeError, OSError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(":")
        raise RuntimeError(
            f"--data mnist: could not download MNIST into {root} ({first}); offline? Pass "
            "--data digits (scikit-learn's digits, no download), or download the four MNIST "
            "IDX files elsewhere and pass --data idx:FOLDER"
        ) from error
    tensors = []
    for part in parts:
        tensors += [part.data.float().div(255.0).unsqueeze(1), part.targets.long()]
    return Dataset(*tensors, name="MNIST (torchvision)")


def load_data(spec: str, root: str | Path = "~/.cache/splitxai/mnist") -> Dataset:
    """Load ``"mnist"``, ``"digits"`` or ``"idx:FOLDER"``.

    Parameters
    ----------
    spec: str
        The ``--data`` argument.
    root: str or pathlib.Path
        Data folder for torchvision's MNIST.

    Returns
    -------
    Dataset
    """
    if spec == "digits":
        return load_digits_28()
    if spec == "mnist":
        return load_mnist(Path(root).expanduser())
    if spec.startswith("idx:") and len(spec) > 4:
        return load_idx_folder(spec[4:])
    raise ValueError(f"unknown --data {spec!r}; use mnist, digits or idx:FOLDER")


# ----------------------------------------------------------------------------- training


def train_model(
    model: nn.Module,
    data: Dataset,
    epochs: int,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    progress: bool = True,
    desc: str = "train",
) -> nn.Module:
    """Train ``model`` with Adam and cross-entropy on ``data``'s training part.

    Parameters
    ----------
    model: torch.nn.Module
        Trained in place (left in evaluation mode).
    data: Dataset
        Training images and labels (moved to the model's device and floating point type
        batch by batch). At least two samples, as many labels as images, each in
        ``0 .. num_classes - 1``; checked before the first step (``ValueError``).
    epochs: int
        Passes over the training set.
    seed: int
        Seeds the batch order.
    batch_size: int
        Mini-batch size, >= 2 (batch norm needs two samples; a last batch of one sample is
        skipped).
    lr: float
        Adam's learning rate.
    weight_decay: float
        L2 weight decay (1e-3 in appendix D.1).
    progress: bool
        Show a tqdm progress bar.
    desc: str
        The progress bar's label.

    Returns
    -------
    torch.nn.Module
        ``model``, in evaluation mode.
    """
    from tqdm.auto import tqdm

    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 (batch norm needs two samples a "
                         f"batch), got {batch_size!r}")
    n = _check_split(model, data.train_x, data.train_y, "training")
    if n < 2:
        raise ValueError(f"the training set holds {n} sample(s); batch norm needs at least two")
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    model.train()
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False, unit="batch") as bar:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start: start + batch_size]
                if len(index) < 2:  # batch norm needs two samples
                    continue
                x = dc_models.on_model_device(model, data.train_x[index])
                y = data.train_y[index].to(device)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    return model.eval()


def _check_split(model: nn.Module, x: torch.Tensor, y: torch.Tensor, part: str) -> int:
    """The size of one part (images ``x``, labels ``y``) after checking it fits ``model``.

    ``ValueError`` for an empty part, labels that are not one integer per image, or labels
    outside the model's classes (read from one evaluation-mode forward of one image, with
    the training flags restored).
    """
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype == torch.bool or (
            y.is_floating_point() or y.is_complex()):
        raise ValueError(f"{part} labels must be a 1-D integer tensor (one class per image), "
                         f"got {getattr(y, 'dtype', type(y).__name__)} of shape "
                         f"{tuple(getattr(y, 'shape', ()))}")
    if len(x) != len(y):
        raise ValueError(f"{part} set: {len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise ValueError(f"the {part} set is empty (0 samples)")
    with dc_models.eval_mode(model), torch.no_grad():
        n_classes = model(dc_models.on_model_device(model, x[:1])).shape[1]
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= n_classes:
        raise ValueError(f"{part} labels must lie in 0..{n_classes - 1} (the model has "
                         f"{n_classes} outputs), got values from {low} to {high}")
    return len(y)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Accuracy of ``model`` (in evaluation mode) on ``(x, y)``, in percent.

    The model's training flag is restored afterwards. ``x`` is moved to the model's device
    and floating point type. An empty set, labels that are not a 1-D integer tensor as long
    as ``x``, or labels outside the model's classes raise ``ValueError``.
    """
    _check_split(model, x, y, "test")
    correct = 0
    with dc_models.eval_mode(model):
        for start in range(0, len(y), batch_size):
            logits = model(dc_models.on_model_device(model, x[start: start + batch_size]))
            correct += int((logits.argmax(1).cpu() == y[start: start + batch_size]).sum())
    return 100.0 * correct / len(y)


_STREAM_CLASSES = {"mlp_maxout": dc_models.MaxoutMLP, "cnn_maxout": dc_models.MaxoutCNN}


def _checkpoint_config(model: nn.Module, architecture: str, config: dict) -> dict:
    """``config`` completed with what ``model`` itself says (positivity, num_classes).

    The raw parameters mean nothing without the positivity transform that maps them to the
    weights, so rebuilding with another transform would load silently wrong numbers.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of "
                         f"{', '.join(ARCHITECTURES)}")
    streams = [model.g, model.h] if dc_models.is_difference_model(model) else [model]
    kind = _STREAM_CLASSES[architecture]
    if not all(isinstance(s, kind) for s in streams) or not isinstance(
            getattr(model, "mode", None), str):
        raise TypeError(f"architecture={architecture!r} needs a model built by "
                        f"core.dc.models.{architecture}; got {type(model).__name__} with "
                        f"streams {', '.join(type(s).__name__ for s in streams)}")
    head = streams[0].layers[-1]
    found = {"positivity": streams[0].positivity, "num_classes": head.out_features}
    for name, value in found.items():
        if name in config and config[name] != value:
            raise ValueError(f"{name}={config[name]!r} given, but the model was built with "
                             f"{name}={value!r}")
    return {**config, **found}


def save_checkpoint(model: nn.Module, path: str | Path, architecture: str, **config) -> Path:
    """Save ``model``'s state dict with what ``load_checkpoint`` needs to rebuild it.

    Parameters
    ----------
    model: torch.nn.Module
        A model built by ``core.dc.models.mlp_maxout`` or ``cnn_maxout``.
    path: str or pathlib.Path
        The file to write.
    architecture: str
        ``"mlp_maxout"`` or ``"cnn_maxout"``.
    **config
        Further arguments of the architecture function. ``positivity`` and ``num_classes``
        are read from the model (a value given here must agree with it).

    Raises
    ------
    ValueError
        For an unknown ``architecture`` or a ``config`` value the model contradicts.
    TypeError
        For a model that ``architecture`` does not build.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    config = _checkpoint_config(model, architecture, config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"architecture": architecture, "mode": model.mode, "config": config,
             "state_dict": model.state_dict()}
    torch.save(state, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by ``save_checkpoint`` (returned in evaluation mode), in the
    floating-point dtype it was saved in (a float64 model came back as float32: loading a
    state dict casts into the new model's parameters)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    build = ARCHITECTURES[state["architecture"]]
    model = build(state["mode"], **state["config"])
    dtype = next((t.dtype for t in state["state_dict"].values() if t.is_floating_point()),
                 None)
    if dtype is not None:
        model.to(dtype)
    model.load_state_dict(state["state_dict"])
    return model.eval()


# ------------------------------------------------------------------------------ reports


def _cell(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def accuracy_table(results: Sequence[RunResult]) -> str:
    """Table 12 of the paper: one row per architecture, one column per mode.

    Each cell is the median test accuracy (%) with its [min, max] over the seeds.

    Parameters
    ----------
    results: sequence of RunResult

    Returns
    -------
    str
        A Markdown table.
    """
    architectures = list(dict.fromkeys(r.model for r in results))
    modes = [m for m in dc_models.MODES if any(r.mode == m for r in results)]
    header = ["Model"] + ["Diff.None" if m == "DiffNone" else m for m in modes]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for arch in architectures:
        cells = [arch]
        for mode in modes:
            values = [r.accuracy for r in results if r.model == arch and r.mode == mode]
            cells.append(_cell(values) if values else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_reports(results: Sequence[RunResult], out: Path, meta: str) -> None:
    with open(out / "accuracy_runs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "mode", "seed", "epochs", "accuracy", "seconds"])
        for r in results:
            writer.writerow([r.model, r.mode, r.seed, r.epochs, f"{r.accuracy:.4f}",
                             f"{r.seconds:.1f}"])
    with open(out / "accuracy_table.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "mode", "median", "min", "max", "runs"])
        for arch in dict.fromkeys(r.model for r in results):
            for mode in dc_models.MODES:
                values = [r.accuracy for r in results if r.model == arch and r.mode == mode]
                if values:
                    writer.writerow([arch, mode, f"{statistics.median(values):.4f}",
                                     f"{min(values):.4f}", f"{max(values):.4f}", len(values)])
    table = accuracy_table(results)
    (out / "accuracy_table.md").write_text(
        "Test accuracy across restriction modes (%): median [min, max] over seeds.\n\n"
        f"{meta}\n\n{table}"
    )


# ---------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitxai train-dc",
        description="Train difference-of-monotone (DM, DMIN) and difference-of-convex (DIC, "
        "DICIN) Maxout models and their single-stream baselines (appendix D), and write a "
        "table-12 style accuracy table (median [min, max] over seeds).",
    )
    parser.add_argument("--model", default=None, choices=[*ARCHITECTURES, "all"],
                        help="architecture (default mlp_maxout)")
    parser.add_argument("--mode", default=None,
                        help=f"one of {', '.join(dc_models.MODES)}, a comma separated list, "
                        "or all (default all)")
    parser.add_argument("--data", default=None,
                        help="mnist (torchvision, downloads when online), digits "
                        "(scikit-learn, offline) or idx:FOLDER with MNIST IDX files "
                        "(default mnist)")
    parser.add_argument("--data-root", default="~/.cache/splitxai/mnist",
                        help="torchvision's MNIST folder")
    parser.add_argument("--seeds", type=int, default=None, help="runs per mode (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 10)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="mini-batch size (default 128; 32 with --quick)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--positivity", default="relu",
                        choices=sorted(dc_models.POSITIVITY_TRANSFORMS),
                        help="positivity transform p of the constrained parameters")
    parser.add_argument("--init-std", type=float, default=None,
                        help="constrained weights start at |N(0, sigma)|; default 0.01 (1/fan_in "
                        "in cnn_maxout's hidden fully connected layers)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N training and N test samples")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: every mode on digits, 1 seed, 3 epochs, batch 32 (about "
                        "2 minutes on 2 CPU cores with mlp_maxout); explicit options win, except "
                        "--data (refused)")
    parser.add_argument("--save", default=None, choices=["none", "first", "all"],
                        help="checkpoints to keep: none, the first seed of each mode, or all "
                        "(default first; none with --quick)")
    parser.add_argument("--explain", type=int, default=0, metavar="N",
                        help="render figure-3/8 style gradient PNGs of N test samples for the "
                        "first seed of each mode")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if "
                        "available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", default="splitxai-train-dc",
                        help="output folder (default ./splitxai-train-dc)")
    return parser


#: the largest --seed (seeds run from --seed to --seed + --seeds - 1; 32 bits as elsewhere)
SEED_MAX = 2**32 - 1


def _check_numbers(args: argparse.Namespace) -> str | None:
    """The first numeric option out of range, as one line (None: all fine)."""
    import math

    for name, least in (("seeds", 1), ("epochs", 1), ("batch_size", 2), ("limit", 2),
                        ("explain", 0)):
        value = getattr(args, name)
        if value is not None and value < least:
            why = " (batch norm needs two samples a batch)" if least == 2 else ""
            return f"--{name.replace('_', '-')} must be >= {least}{why}, got {value}"
    for name, positive in (("lr", True), ("weight_decay", False), ("init_std", True)):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0
                                  or (positive and value == 0)):
            bound = "> 0" if positive else ">= 0"
            return f"--{name.replace('_', '-')} must be a finite number {bound}, got {value}"
    last = args.seed + (args.seeds or 1) - 1
    if args.seed < 0 or last > SEED_MAX:
        return (f"--seed must be an integer from 0 to {SEED_MAX} (2**32 - 1) and so must "
                f"the last seed --seed + --seeds - 1, got {args.seed} .. {last}")
    return None


def _modes(spec: str) -> list[str]:
    if spec.lower() == "all":
        return list(dc_models.MODES)
    return list(dict.fromkeys(dc_models.normalize_mode(m.strip()) for m in spec.split(",")))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``splitxai train-dc``.

    Parameters
    ----------
    argv: sequence of str, optional
        Arguments without the program name (``sys.argv[1:]`` when None).

    Returns
    -------
    int
        Exit status: 0 on success, 2 on bad arguments (a numeric option out of range: one
        line) or unavailable data.
    """
    parser = _parser()
    args = parser.parse_args(None if argv is None else list(argv))
    problem = _check_numbers(args)
    if problem is not None:
        print(f"splitxai train-dc: error: {problem}", file=sys.stderr)
        return 2
    quick = args.quick
    if quick and args.data not in (None, "digits"):
        parser.error("--quick trains on digits; leave out --data or pass --data digits")
    data_spec = args.data or ("digits" if quick else "mnist")
    architectures = list(ARCHITECTURES) if args.model == "all" else [args.model or "mlp_maxout"]
    seeds = args.seeds if args.seeds is not None else 1
    epochs = args.epochs if args.epochs is not None else (3 if quick else 10)
    batch_size = args.batch_size or (32 if quick else 128)
    save = args.save or ("none" if quick else "first")
    try:
        modes = _modes(args.mode or "all")
    except ValueError as error:
        parser.error(str(error))
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    try:
        data = load_data(data_spec, args.data_root).limit(args.limit)
    except (OSError, RuntimeError, ValueError, ImportError) as error:
        print(f"splitxai train-dc: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = (
        f"Data: {data.name}, {len(data.train_y)} training / {len(data.test_y)} test samples; "
        f"{epochs} epochs, batch {batch_size}, Adam lr {args.lr}, weight decay "
        f"{args.weight_decay}, positivity {args.positivity}, seeds {args.seed}.."
        f"{args.seed + seeds - 1}."
    )
    print(meta, flush=True)
    results: list[RunResult] = []
    for arch in architectures:
        for mode in modes:
            for k in range(seeds):
                seed = args.seed + k
                torch.manual_seed(seed)
                model = ARCHITECTURES[arch](
                    mode, positivity=args.positivity, init_std=args.init_std
                ).to(device)
                start = time.perf_counter()
                train_model(
                    model, data, epochs, seed=seed, batch_size=batch_size, lr=args.lr,
                    weight_decay=args.weight_decay, progress=not args.no_progress,
                    desc=f"{arch} {mode} seed {seed}",
                )
                accuracy = evaluate(model, data.test_x, data.test_y)
                seconds = time.perf_counter() - start
                results.append(RunResult(arch, mode, seed, epochs, accuracy, seconds))
                print(f"{arch:10s} {mode:8s} seed {seed}: {accuracy:6.2f} % "
                      f"({seconds:.1f} s)", flush=True)
                if save == "all" or (save == "first" and k == 0):
                    save_checkpoint(model, out / "checkpoints" / f"{arch}_{mode}_seed{seed}.pt",
                                    arch, positivity=args.positivity,
                                    init_std=args.init_std)
                if args.explain > 0 and k == 0:
                    from core.dc.explain import render_explanations

                    render_explanations(
                        model, data.test_x[: args.explain], data.test_y[: args.explain],
                        out / "explanations" / f"{arch}_{mode}",
                    )
                _write_reports(results, out, meta)
    table = accuracy_table(results)
    print("\n" + table)
    print(f"wrote {out / 'accuracy_table.md'}, {out / 'accuracy_table.csv'} and "
          f"{out / 'accuracy_runs.csv'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
