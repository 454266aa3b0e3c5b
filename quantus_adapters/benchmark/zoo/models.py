"""Models for ``splitxai benchmark``.

- :func:`digits_cnn`: the built-in small VGG-style CNN (conv-BN-ReLU-maxpool blocks) for the
  cluttered digits, trained on the fly (about a minute on 2 cores) and cached on disk.
- :func:`cifar10_resnet20`: the ResNet-20 shipped with the package, CIFAR-10 normalisation
  wrapped inside, so that it takes images in [0, 1].
- :func:`torchvision_imagenet`: VGG16 / ResNet-18 with torchvision's IMAGENET1K_V1 weights
  (downloaded when online), ImageNet normalisation wrapped inside.
- :func:`load_factory`: ``FILE.py:FACTORY`` -- the user's own model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import re
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "ModelError",
    "Normalised",
    "DigitsVGG",
    "digits_cnn",
    "digits_cache_path",
    "save_digits_cnn",
    "train_digits_cnn",
    "cifar10_resnet20",
    "torchvision_imagenet",
    "load_factory",
    "load_weights",
    "default_cache_dir",
]

DIGITS_MODEL_VERSION = "digits-vgg-v3"


class ModelError(ValueError):
    """Bad model specification: what was wrong and what to do."""


class Normalised(nn.Module):
    """``model((x - mean) / std)``: takes images in [0, 1].

    The normalisation is a per-channel affine map and part of the graph, so the split
    handles it like any other affine layer. The wrapped model is ``self.model``; layer names
    are prefixed with ``model.``.
    """

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


class DigitsVGG(nn.Module):
    """Small VGG-style CNN for 1x64x64 images: four conv-BN-ReLU-maxpool blocks, global
    average pooling and a two-layer classifier.

    Layer names follow torchvision's VGG: ``features.0`` (conv), ``features.1`` (BN),
    ``features.2`` (ReLU), ``features.3`` (max pool), ..., ``features.14`` (the last ReLU),
    ``pool``, ``classifier.1`` and ``classifier.3`` (linear).
    """

    def __init__(self, n_classes: int = 10, width: int = 8, in_channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=False), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c_in, 128), nn.ReLU(),
                                        nn.Linear(128, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def default_cache_dir() -> Path:
    """``$SPLITXAI_CACHE``, else ``$XDG_CACHE_HOME/splitxai``, else ``~/.cache/splitxai``."""
    if os.environ.get("SPLITXAI_CACHE"):
        return Path(os.environ["SPLITXAI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "splitxai"


def train_digits_cnn(seed: int = 0, epochs: int = 14, batch_size: int = 32,
                     log: Callable[[str], None] | None = print,
                     progress: bool = True) -> tuple[DigitsVGG, float]:
    """Train :class:`DigitsVGG` on cluttered canvases of the training writers' digits.

    Parameters
    ----------
    seed: int
        Seed of weights, canvases and batch order.
    epochs: int
        Passes over the (re-rendered each epoch) training canvases.
    batch_size: int
        Mini-batch size.
    log: callable, optional
        Receives progress lines.
    progress: bool
        Show a progress bar.

    Returns
    -------
    (DigitsVGG, float)
        The trained model in eval mode and its accuracy on the held-out writers' digits.

    Notes
    -----
    Training runs on one torch thread (fastest for these small convolutions, and the
    weights do not depend on the machine's thread count).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_digits_cnn(seed, epochs, batch_size, log, progress)
    finally:
        torch.set_num_threads(threads)


def _train_digits_cnn(seed: int, epochs: int, batch_size: int,
                      log: Callable[[str], None] | None, progress: bool
                      ) -> tuple[DigitsVGG, float]:
    from tqdm.auto import tqdm

    from quantus_adapters.benchmark.data import digits_accuracy_set, digits_training_set

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsVGG()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=1e-4)
    x_all, y_all = digits_training_set(copies=epochs, seed=seed)
    n_per_epoch = len(y_all) // epochs
    steps = epochs * ((n_per_epoch + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps,
                                                pct_start=0.15)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="training the digits CNN", disable=not progress, leave=False)
    for epoch in range(epochs):
        # each epoch sees fresh canvases of the same training digits
        x = x_all[epoch * n_per_epoch:(epoch + 1) * n_per_epoch]
        y = y_all[epoch * n_per_epoch:(epoch + 1) * n_per_epoch]
        model.train()
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    x_te, y_te = digits_accuracy_set(seed=seed)
    with torch.no_grad():
        acc = float((model(x_te).argmax(1) == y_te).float().mean())
    if log is not None:
        log(f"trained the digits CNN in {time.perf_counter() - start:.0f} s: "
            f"held-out accuracy {100 * acc:.1f} % on {len(y_te)} digits")
    return model, acc


def digits_cache_path(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Where :func:`digits_cnn` caches the trained model (keyed by model version and seed)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha1(f"{DIGITS_MODEL_VERSION}-{seed}".encode()).hexdigest()[:10]
    return cache / f"digits_vgg_{key}.pt"


def save_digits_cnn(model: nn.Module, accuracy: float, path: str | os.PathLike) -> None:
    """Write a trained digits CNN to the cache file ``path`` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "accuracy": accuracy}, tmp)
    os.replace(tmp, path)


def digits_cnn(cache_dir: str | os.PathLike | None = None, seed: int = 0,
               log: Callable[[str], None] | None = print, progress: bool = True) -> nn.Module:
    """The built-in digits CNN: loaded from the cache, or trained and cached.

    The cache file is keyed by the model version and seed
    (``<cache_dir>/digits_vgg_<key>.pt``, with its held-out accuracy).
    """
    path = digits_cache_path(cache_dir, seed)
    model = DigitsVGG()
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(blob["state_dict"])
            if log is not None:
                log(f"digits CNN from cache {path} (held-out accuracy "
                    f"{100 * float(blob['accuracy']):.1f} %)")
            return model.eval()
        except Exception as exc:  # a broken cache file is retrained, not fatal
            if log is not None:
                log(f"ignoring unreadable cache {path}: {exc}")
    model, acc = train_digits_cnn(seed=seed, log=log, progress=progress)
    try:
        save_digits_cnn(model, acc, path)
    except OSError as exc:
        if log is not None:
            log(f"could not cache the digits CNN in {path.parent}: {exc}")
    return model


def cifar10_resnet20() -> nn.Module:
    """The bundled CIFAR-10 ResNet-20 with its normalisation inside (inputs in [0, 1])."""
    from core import zoo

    return Normalised(zoo.resnet20(pretrained=True), zoo.CIFAR10_MEAN, zoo.CIFAR10_STD).eval()


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def torchvision_imagenet(name: str, weights_path: str | None = None) -> nn.Module:
    """VGG16 or ResNet-18 with IMAGENET1K_V1 weights and ImageNet normalisation inside.

    Raises
    ------
    ModelError
        An unknown name, or the weights cannot be downloaded (offline) and no
        ``weights_path`` is given.
    """
    import torchvision

    builders = {"vgg16": ("vgg16", "VGG16_Weights"), "resnet18": ("resnet18", "ResNet18_Weights")}
    if name not in builders:
        raise ModelError(f"unknown ImageNet model {name!r}; use vgg16 or resnet18")
    fn_name, weights_name = builders[name]
    builder = getattr(torchvision.models, fn_name)
    if weights_path is not None:
        model = builder(weights=None)
        load_weights(model, weights_path)
    else:
        weights = getattr(torchvision.models, weights_name).IMAGENET1K_V1
        try:
            model = builder(weights=weights)
        except Exception as exc:
            raise ModelError(
                f"could not download torchvision's {weights_name}.IMAGENET1K_V1 ({exc}); "
                "connect to the internet once (the weights are cached in ~/.cache/torch) or "
                f"pass --weights FILE with a {name} state_dict") from None
    return Normalised(model, IMAGENET_MEAN, IMAGENET_STD).eval()


#: SHA-256 of the file each model that :func:`load_factory` built came from, as it was run
#: (weakly keyed: an entry goes with its model)
_FACTORY_FILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def factory_digest(model: nn.Module) -> str | None:
    """SHA-256 of the ``FILE.py`` that :func:`load_factory` built ``model`` from (its content
    when it was imported), else None."""
    return _FACTORY_FILES.get(model)


def load_factory(spec: str) -> nn.Module:
    """Build the user's model from ``FILE.py:FACTORY`` (FACTORY() must return an nn.Module).

    FILE's folder is put on the import path first, as ``python FILE.py`` does, so that the
    file can import the modules next to it.

    Raises
    ------
    ModelError
        A missing file, a missing or non-callable FACTORY, a FACTORY that raises or does not
        return an ``nn.Module``.
    """
    if ":" not in spec:
        raise ModelError(f"--model {spec!r}: expected FILE.py:FACTORY (e.g. mymodel.py:build)")
    file, factory = spec.rsplit(":", 1)
    path = Path(file).expanduser()
    if not path.is_file():
        raise ModelError(f"--model {spec!r}: file {str(path)!r} does not exist")
    name = f"splitxai_user_model_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelError(f"--model {spec!r}: cannot import {str(path)!r} as a Python file")
    try:
        source = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ModelError(f"--model {spec!r}: cannot read {str(path)!r}: {exc.strerror}") from None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    # the file's folder on the import path, as `python FILE.py` puts it there: a model file
    # that imports a module next to it ("from layers import Block") works (kept for imports
    # the forward makes later; this is the command's own process)
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelError(f"--model {spec!r}: importing {str(path)!r} failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    fn = getattr(module, factory, None)
    if fn is None or not callable(fn):
        raise ModelError(f"--model {spec!r}: {str(path)!r} has no callable {factory!r}")
    try:
        model = fn()
    except Exception as exc:
        raise ModelError(f"--model {spec!r}: {factory}() raised {type(exc).__name__}: "
                         f"{exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {spec!r}: {factory}() returned {type(model).__name__}, not a "
                         "torch.nn.Module; return the model (with its normalisation inside)")
    _FACTORY_FILES[model] = source
    return model


def _plain(exc: BaseException) -> str:
    """``exc``'s message on one line without terminal escape codes."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split()) or type(exc).__name__


def _unpickling_message(path: Path, exc: BaseException) -> str:
    """The line for a ``--weights`` file that holds pickled Python objects (not loaded).

    ``torch.load(..., weights_only=True)`` names the first class it refuses; a class of
    ``torch.nn.modules`` among the file's classes means a whole model saved with
    ``torch.save(model)``.
    """
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    names = [found.group(1)] if found else []
    try:  # every class the file names, read without unpickling (torch >= 2.5)
        names += torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # an older torch, or a file it cannot list: the error's class only
        pass
    module = next((n for n in names if n.startswith("torch.nn.modules.")), None)
    fix = ("save its weights with torch.save(model.state_dict(), PATH) and pass that file "
           "(pickled objects are not loaded: unpickling can run arbitrary code)")
    if module is not None:
        return (f"--weights {str(path)!r} holds a pickled model ({names[0]}, written by "
                f"torch.save(model)), not a state_dict; {fix}")
    what = f" ({names[0]})" if names else ""
    return (f"--weights {str(path)!r} holds pickled Python objects{what}, not a state_dict "
            f"of tensors; {fix}")


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state_dict (or ``{"state_dict": ...}``) from ``path`` into ``model``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"--weights {str(p)!r} does not exist")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(_unpickling_message(p, exc)) from exc
    except Exception as exc:
        raise ModelError(f"--weights {str(p)!r} is not a readable torch file: "
                         f"{_plain(exc)}") from exc
    if isinstance(blob, dict) and "state_dict" in blob and isinstance(blob["state_dict"], dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict):
        raise ModelError(f"--weights {str(p)!r} holds a {type(blob).__name__}, not a state_dict")
    target = model.model if isinstance(model, Normalised) and not any(
        k.startswith("model.") for k in blob) else model
    try:
        target.load_state_dict(blob)
    except RuntimeError as exc:
        raise ModelError(f"--weights {str(p)!r} does not fit the model: {exc}") from exc
    return model
