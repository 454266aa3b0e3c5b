"""Evaluation data for ``splitxai benchmark``.

Every loader returns a :class:`BenchmarkData`: images in [0, 1] (channel first), integer
labels, optional ground-truth masks of the object, and a validation / test split (the
validation split tunes the layer and abs choice, the test split reports).

Sources
-------
``digits`` (default)
    scikit-learn's bundled handwritten digits (real, offline) placed on cluttered 64x64
    canvases with distractor strokes and smaller distractor digits; the mask is the target
    digit. Deterministic for a given seed.
``cifar10-resnet20``
    the 20 CIFAR-10 test images shipped with the package (no masks).
``folder:PATH``
    ``PATH/images/*``, optional ``PATH/masks/*`` (same file names, non-zero = object) and
    ``PATH/labels.csv`` with the columns ``name,label``.
``imagenet-s:PATH``
    the ImageNet-S-50 layout: ``PATH/validation/<wnid>/*.JPEG`` (or ``PATH/images/...``)
    and the segmentation PNGs ``PATH/validation-segmentation/<wnid>/*.png`` (class id
    ``R + 256 G``; 0 background, 1000 ignored); one image per
    class goes to validation, as in the paper.
"""

from __future__ import annotations

import csv
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BenchmarkData",
    "DataError",
    "cluttered_digits",
    "digits_training_set",
    "load_data",
    "load_folder",
    "load_imagenet_s",
    "load_cifar10_samples",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DIGITS_CANVAS = 64


class DataError(ValueError):
    """Bad benchmark data: what was wrong and what to do."""


@dataclass
class BenchmarkData:
    """Images, labels, masks and the validation / test split of one benchmark run.

    Attributes
    ----------
    name: str
        Short name of the source (shown in reports).
    images: torch.Tensor
        (N, C, H, W) float32 in [0, 1].
    labels: torch.Tensor
        (N,) int64 class indices.
    masks: torch.Tensor or None
        (N, 1, H, W) bool object masks, or None when the source has none.
    val_idx, test_idx: np.ndarray
        Indices of the validation and test images.
    names: list of str
        One identifier per image.
    class_names: list of str or None
        Names of the classes, when known.
    notes: list of str
        Remarks for the report (e.g. skipped metrics).
    warnings: list of str
        Remarks the command line also prints on stderr (e.g. image files it did not read).
    image_notes: list of str
        How the images were read where that changes what the model sees (first frame of
        an animation, EXIF rotation, alpha dropped, colour converted, resized); also in
        ``notes``. ``splitxai explain``, which writes no report, prints them on stderr.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    val_idx: np.ndarray
    test_idx: np.ndarray
    names: list[str]
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    image_notes: list[str] = field(default_factory=list)

    def usable_masks(self, split: str) -> np.ndarray:
        """Per image of ``split``: whether its mask has object and background pixels."""
        from quantus_adapters.benchmark.protocol import localisation_mask

        idx = self.val_idx if split == "val" else self.test_idx
        if self.masks is None:
            return np.zeros(len(idx), dtype=bool)
        return localisation_mask(self.masks[torch.as_tensor(idx, dtype=torch.long)].numpy())

    @property
    def has_usable_masks(self) -> bool:
        """Whether some test image has a usable mask (else localisation is skipped)."""
        return bool(self.usable_masks("test").any())

    def mask_notes(self) -> list[str]:
        """Report lines: images excluded from localisation, or localisation skipped."""
        if self.masks is None:
            return []
        notes = []
        for split, title in (("val", "validation"), ("test", "test")):
            ok = self.usable_masks(split)
            if (~ok).any():
                idx = self.val_idx if split == "val" else self.test_idx
                bad = [self.names[int(i)] for i in np.asarray(idx)[~ok]]
                shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
                notes.append(f"{len(bad)} {title} image(s) without object pixels or without "
                             f"background pixels in their mask excluded from the localisation "
                             f"metrics: {shown}")
        if not self.has_usable_masks:
            notes.append("no test image has a usable mask: Attribution Localisation and "
                         "Pointing Game are skipped.")
        elif not self.usable_masks("val").any():
            notes.append("no validation image has a usable mask: layers are selected on Pixel "
                         "Flipping only.")
        return notes

    def subset(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images, labels and masks of ``split`` ("val" or "test")."""
        idx = torch.as_tensor(self.val_idx if split == "val" else self.test_idx, dtype=torch.long)
        masks = None if self.masks is None else self.masks[idx]
        return self.images[idx], self.labels[idx], masks

    def limit(self, n_val: int | None, n_test: int | None) -> BenchmarkData:
        """Keep at most ``n_val`` validation and ``n_test`` test images (in order)."""
        val = self.val_idx if n_val is None else self.val_idx[:n_val]
        test = self.test_idx if n_test is None else self.test_idx[:n_test]
        return BenchmarkData(self.name, self.images, self.labels, self.masks, val, test,
                             self.names, self.class_names, list(self.notes),
                             list(self.warnings), list(self.image_notes))


# ----------------------------------------------------------------------------- digits
def _digit_sources() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _source_split(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split the 1797 source digits 3:1 into training and held-out writers' digits."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_train = int(round(0.75 * len(labels)))
    return np.sort(order[:n_train]), np.sort(order[n_train:])


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(img)[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def _stroke(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """Draw a random line or arc stroke (1-2 px wide) into ``canvas`` (max blending)."""
    size = canvas.shape[0]
    n = 64
    t = np.linspace(0.0, 1.0, n)
    p0 = rng.uniform(0, size, 2)
    length = rng.uniform(0.2, 0.5) * size
    angle = rng.uniform(0, 2 * np.pi)
    bend = rng.uniform(-0.6, 0.6)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    pts = p0 + np.outer(t * length, direction) + np.outer(bend * length * t * (1 - t), normal)
    width = int(rng.integers(1, 3))
    value = rng.uniform(0.4, 1.0)
    ys = np.floor(pts[:, 0]).astype(int)
    xs = np.floor(pts[:, 1]).astype(int)
    for oy in range(width):
        for ox in range(width):
            yy, xx = ys + oy, xs + ox
            keep = (yy >= 0) & (yy < size) & (xx >= 0) & (xx < size)
            canvas[yy[keep], xx[keep]] = np.maximum(canvas[yy[keep], xx[keep]], value)


def _paste(canvas: np.ndarray, patch: np.ndarray, y: int, x: int) -> None:
    h, w = patch.shape
    canvas[y:y + h, x:x + w] = np.maximum(canvas[y:y + h, x:x + w], patch)


def _compose(target: np.ndarray, others: np.ndarray, rng: np.random.Generator,
             size: int = DIGITS_CANVAS) -> tuple[np.ndarray, np.ndarray]:
    """One cluttered canvas with ``target`` (8x8) and its mask."""
    canvas = rng.uniform(0.0, 0.08, (size, size)).astype(np.float32)
    t_size = int(rng.integers(size * 3 // 8, size // 2 + 1))  # 24..32 px at 64
    ty, tx = rng.integers(0, size - t_size + 1, 2)
    # distractors: two to four strokes and one or two small digits away from the target
    for _ in range(int(rng.integers(2, 5))):
        _stroke(canvas, rng)
    for _ in range(int(rng.integers(1, 3))):
        d_size = int(rng.integers(size // 7, size // 5 + 1))  # 9..12 px at 64
        for _attempt in range(20):
            dy, dx = rng.integers(0, size - d_size + 1, 2)
            if (dy + d_size <= ty or dy >= ty + t_size or dx + d_size <= tx
                    or dx >= tx + t_size):
                break
        other = others[int(rng.integers(len(others)))]
        _paste(canvas, _resize(other, d_size) * rng.uniform(0.5, 0.9), int(dy), int(dx))
    digit = np.clip(_resize(target, t_size), 0.0, 1.0)
    _paste(canvas, digit, int(ty), int(tx))
    mask = np.zeros((size, size), dtype=bool)
    mask[ty:ty + t_size, tx:tx + t_size] = digit > 0.2
    return np.clip(canvas, 0.0, 1.0), mask


def _render(indices: np.ndarray, copies: int, seed: int, images: np.ndarray,
            size: int = DIGITS_CANVAS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xs, ms, src = [], [], []
    for _ in range(copies):
        for i in indices:
            x, m = _compose(images[i], images, rng, size)
            xs.append(x)
            ms.append(m)
            src.append(i)
    return np.stack(xs)[:, None], np.stack(ms)[:, None], np.asarray(src)


def digits_training_set(copies: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluttered canvases of the training writers' digits (for the built-in CNN).

    Parameters
    ----------
    copies: int
        Canvases per source digit.
    seed: int
        Seed of the canvas layout.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        Images (N, 1, 64, 64) in [0, 1] and labels (N,).
    """
    images, labels = _digit_sources()
    train_src, _ = _source_split(labels)
    x, _, src = _render(train_src, copies, seed + 1000, images)
    return torch.from_numpy(x), torch.from_numpy(labels[src])


def cluttered_digits(n_val_per_class: int = 1, n_test_per_class: int = 10,
                     seed: int = 0) -> BenchmarkData:
    """The built-in benchmark data: held-out digits on cluttered 64x64 canvases.

    Parameters
    ----------
    n_val_per_class, n_test_per_class: int
        Validation and test images per class (drawn from digits the model never saw).
    seed: int
        Seed of the selection and canvas layout.

    Returns
    -------
    BenchmarkData
        Images (N, 1, 64, 64), labels, masks of the target digit, validation/test split.
    """
    images, labels = _digit_sources()
    _, held_out = _source_split(labels)
    rng = np.random.default_rng(seed)
    chosen_val, chosen_test = [], []
    for c in range(10):
        pool = rng.permutation(held_out[labels[held_out] == c])
        need = n_val_per_class + n_test_per_class
        if len(pool) < need:
            raise DataError(f"only {len(pool)} held-out digits of class {c}; ask for fewer "
                            f"than {need} images per class")
        chosen_val.extend(pool[:n_val_per_class])
        chosen_test.extend(pool[n_val_per_class:need])
    # interleave classes so that truncated splits stay balanced
    chosen_val = _interleave(chosen_val, labels)
    chosen_test = _interleave(chosen_test, labels)
    src = np.concatenate([chosen_val, chosen_test]).astype(np.int64)
    x, m, _ = _render(src, 1, seed + 2000, images)
    n_val = len(chosen_val)
    return BenchmarkData(
        name="digits",
        images=torch.from_numpy(x),
        labels=torch.from_numpy(labels[src]),
        masks=torch.from_numpy(m),
        val_idx=np.arange(n_val),
        test_idx=np.arange(n_val, len(src)),
        names=[f"digit{int(i)}" for i in src],
        class_names=[str(c) for c in range(10)],
    )


def digits_accuracy_set(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All held-out digits on cluttered canvases (to measure the built-in CNN's accuracy)."""
    images, labels = _digit_sources()
    _, held_out = _source_split(labels)
    x, _, src = _render(held_out, 1, seed + 3000, images)
    return torch.from_numpy(x), torch.from_numpy(labels[src])


def _interleave(indices: list, labels: np.ndarray) -> np.ndarray:
    by_class: dict[int, list] = {}
    for i in indices:
        by_class.setdefault(int(labels[i]), []).append(i)
    out = []
    while any(by_class.values()):
        for c in sorted(by_class):
            if by_class[c]:
                out.append(by_class[c].pop(0))
    return np.asarray(out, dtype=np.int64)


# ----------------------------------------------------------------------------- CIFAR-10
def load_cifar10_samples(n_val: int = 5) -> BenchmarkData:
    """The CIFAR-10 sample images shipped with the package (no masks)."""
    from core import zoo

    x, y = zoo.cifar10_samples()
    n = len(y)
    return BenchmarkData(
        name="cifar10-resnet20", images=x.float(), labels=y.long(), masks=None,
        val_idx=np.arange(n_val), test_idx=np.arange(n_val, n),
        names=[f"cifar10_{i:02d}" for i in range(n)],
        class_names=["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                     "ship", "truck"],
        notes=["CIFAR-10 samples have no object masks: Attribution Localisation and Pointing "
               "Game are skipped; layers are selected on Pixel Flipping only."],
    )


# ----------------------------------------------------------------------------- folders
def _is_image_name(p: Path) -> bool:
    """An image suffix, and not hidden: macOS writes ``._NAME.png`` (AppleDouble metadata,
    not an image) next to each file on FAT / exFAT drives and network shares."""
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (a subfolder named like one, ``old.png/``, is
    a subfolder)."""
    return sorted(p for p in folder.iterdir() if _is_image_name(p) and p.is_file())


def _nested_images(folder: Path) -> list[Path]:
    """Image files in the subfolders of ``folder`` (which ``folder:PATH`` does not read)."""
    return sorted(p for sub in folder.iterdir() if sub.is_dir() for p in sub.rglob("*")
                  if _is_image_name(p) and p.is_file())


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _shown(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def load_folder(path: str | os.PathLike, n_classes: int | None = None, size: int | None = None,
                n_val: int | None = None, seed: int = 0, channels: int = 3,
                split: bool = True) -> BenchmarkData:
    """Read ``PATH/images/*``, optional ``PATH/masks/*`` and ``PATH/labels.csv``.

    Only the files directly in ``PATH/images`` are read; image files in its subfolders are
    named in ``warnings`` (an ImageFolder layout ``images/<class>/*`` is not read: its labels
    come from ``labels.csv``).

    Parameters
    ----------
    path: str or path-like
        The folder.
    n_classes: int, optional
        Number of model outputs; labels outside ``[0, n_classes)`` are an error.
    size: int, optional
        Resize every image (bilinear, antialiased) and mask (nearest) to ``size`` x
        ``size``; without it the images must share one size.
    n_val: int, optional
        Number of validation images (default: a fifth, at least one).
    seed: int
        Seed of the validation / test split.
    channels: int
        1 (grayscale) or 3 (RGB): the model's input channels
        (:mod:`quantus_adapters.benchmark.images` reads every PIL mode).
    split: bool
        Whether the images are split into validation and test images (the benchmark: at
        least two images are needed); False: one image suffices and every image is a test
        image (``splitxai explain``).

    Returns
    -------
    BenchmarkData

    Raises
    ------
    DataError
        A missing folder or labels file; no image directly in ``PATH/images``; an image
        without a label or a label without an image; a name listed twice; a label that is
        not an integer or out of range; an unreadable image; images of different sizes
        (without ``size``); a missing mask; one image only with ``split``.
    """
    from quantus_adapters.benchmark import images as imio

    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist; --data folder:PATH needs "
                        "PATH/images/*, PATH/labels.csv and optionally PATH/masks/*")
    img_dir, label_file, mask_dir = root / "images", root / "labels.csv", root / "masks"
    if not img_dir.is_dir():
        raise DataError(f"{str(img_dir)!r} does not exist; put the images there")
    files = _images_in(img_dir)
    nested = _nested_images(img_dir)
    if not files:
        hint = ""
        if nested:
            hint = (f"; its subfolders hold {len(nested)} image file(s) (e.g. "
                    f"{nested[0].relative_to(img_dir)}), but subfolders are not read: put the "
                    "images directly in images/ and each one's class index in labels.csv "
                    "('name,label')")
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) directly in "
                        f"{str(img_dir)!r}{hint}")
    if split and len(files) < 2:
        raise DataError(f"{str(img_dir)!r} holds one image; the benchmark needs at least two "
                        "(validation and test)")
    warnings = []
    if nested:
        warnings.append(f"{len(nested)} image file(s) in subfolders of {str(img_dir)!r} were "
                        f"not used (e.g. {nested[0].relative_to(img_dir)}); only the files "
                        "directly in images/ are read")
    if not label_file.is_file():
        raise DataError(f"{str(label_file)!r} does not exist; write one line 'name,label' per "
                        "image (name = the image's file name)")
    labels = _read_labels(label_file, n_classes)
    # each image's line in labels.csv: its file name, else its name without extension,
    # compared in Unicode NFC (macOS -- HFS+, its zip files -- stores 'é' decomposed)
    keys = {p: next((k for k in (_nfc(p.name), _nfc(p.stem)) if k in labels), None)
            for p in files}
    missing = [p.name for p, key in keys.items() if key is None]
    if missing:
        raise DataError(f"{len(missing)} image(s) in {str(img_dir)!r} have no label in "
                        f"{str(label_file)!r}: {_shown(missing)}")
    used = set(keys.values())
    orphans = [name for name in labels if name not in used]
    if orphans:
        raise DataError(f"{len(orphans)} name(s) in {str(label_file)!r} match no image in "
                        f"{str(img_dir)!r}: {_shown(orphans)}; fix the names or remove the "
                        "lines")
    notes_set: set[str] = set()
    image_notes: set[str] = set()
    arrays, own_sizes = [], []  # own_sizes: before --image-size, which the masks must fit
    try:
        for p in files:
            a = imio.read_image(p, channels, None, image_notes)
            own_sizes.append(a.shape[1:])
            arrays.append(a if size is None or a.shape[1:] == (size, size)
                          else imio.resize(a, size))
    except imio.ImageError as exc:
        raise DataError(str(exc)) from None
    shapes = sorted({a.shape[1:] for a in arrays})
    if len(shapes) > 1:
        raise DataError(f"images in {str(img_dir)!r} have different sizes "
                        f"{', '.join(f'{h}x{w}' for h, w in shapes)}; pass --image-size N to "
                        "resize them all to N x N, or resize them yourself")
    x = torch.from_numpy(np.stack(arrays))
    y = torch.tensor([labels[keys[p]] for p in files], dtype=torch.long)
    masks = None
    if mask_dir.is_dir():
        by_stem: dict[str, list[Path]] = {}
        for p in _images_in(mask_dir):
            by_stem.setdefault(_nfc(p.stem), []).append(p)
        # the mask of the same file name, else the one of the same name without extension;
        # in Unicode NFC, as labels.csv (an image and its mask may come from other systems)
        candidates = {p.name: [m for m in by_stem.get(_nfc(p.stem), [])
                               if _nfc(m.name) == _nfc(p.name)]
                      or by_stem.get(_nfc(p.stem), []) for p in files}
        lacking = [name for name, ms in candidates.items() if not ms]
        if lacking:
            raise DataError(f"{len(lacking)} image(s) have no mask in {str(mask_dir)!r}: "
                            f"{_shown(lacking)}; give every image a mask (same file name) or "
                            "remove masks/")
        ambiguous = [f"{name} ({', '.join(m.name for m in ms)})"
                     for name, ms in candidates.items() if len(ms) > 1]
        if ambiguous:
            raise DataError(f"{len(ambiguous)} image(s) have several masks in "
                            f"{str(mask_dir)!r}: {_shown(ambiguous, 3)}; keep one mask per "
                            "image, of the image's file name")
        mask_files = {name: ms[0] for name, ms in candidates.items()}
        h, w = x.shape[-2:]
        ms, resized = [], []
        for p, own in zip(files, own_sizes, strict=True):
            try:
                m = imio.read_mask(mask_files[p.name], notes_set)
            except imio.ImageError as exc:
                raise DataError(str(exc)) from None
            if m.shape != own:
                resized.append(p.name)
            if m.shape != (h, w):
                m = _resize_mask(m.astype(np.float32), h, w) > 0.5
            ms.append(m)
        masks = torch.from_numpy(np.stack(ms))[:, None]
        if resized:
            notes_set.add(f"{len(resized)} mask(s) of another size than their image were "
                          f"resized to it (nearest neighbour): {_shown(resized)}")
    else:
        notes_set.add(f"no masks/ in {str(root)!r}: Attribution Localisation and Pointing "
                      "Game are skipped; layers are selected on Pixel Flipping only.")
    if size is not None:
        image_notes.add(f"images resized to {size}x{size} (bilinear, antialiased) by "
                        "--image-size")
    n = len(files)
    if split:
        order = np.random.default_rng(seed).permutation(n)
        k = max(1, n // 5) if n_val is None else min(max(1, n_val), n - 1)
        val_idx, test_idx = np.sort(order[:k]), np.sort(order[k:])
    else:
        val_idx, test_idx = np.arange(0), np.arange(n)
    return BenchmarkData(
        name=f"folder:{root.name}", images=x, labels=y, masks=masks,
        val_idx=val_idx, test_idx=test_idx, names=[p.name for p in files],
        notes=sorted(notes_set | image_notes | set(warnings)), warnings=warnings,
        image_notes=sorted(image_notes))


def _resize_mask(m: np.ndarray, h: int, w: int) -> np.ndarray:
    t = torch.from_numpy(m.astype(np.float32))[None, None]
    return F.interpolate(t, size=(h, w), mode="nearest-exact")[0, 0].numpy()


_INTEGER = re.compile(r"[+-]?[0-9]+")
_LARGEST = 2 ** 63  # labels are int64 tensors


def _read_labels(label_file: Path, n_classes: int | None) -> dict[str, int]:
    """``name,label`` lines (a header line, a UTF-8 BOM and CRLF line ends are accepted)."""
    labels: dict[str, int] = {}
    lines: dict[str, list[int]] = {}
    try:
        fh = open(label_file, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"cannot read {str(label_file)!r}: {exc.strerror}") from None
    with fh:
        try:
            rows = list(csv.reader(fh))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{label_file} is not a UTF-8 CSV file ({exc}); save it as CSV "
                            "UTF-8") from None
    for lineno, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DataError(f"{label_file}:{lineno}: expected 'name,label', got {row!r}")
        name, value = _nfc(row[0].strip()), row[1].strip()
        if lineno == 1 and name.lower() == "name" and value.lower() == "label":
            continue
        if not _INTEGER.fullmatch(value):  # int() also reads '1_0' as 10, and other digits
            raise DataError(f"{label_file}:{lineno}: label {value!r} of {name!r} is not an "
                            "integer class index (digits 0-9 only)")
        label = int(value)
        if label < 0:
            raise DataError(f"{label_file}:{lineno}: label {label} of {name!r} is negative; "
                            "labels are class indices of the model's output (0, 1, ...)")
        if label >= _LARGEST:
            raise DataError(f"{label_file}:{lineno}: label {value} of {name!r} is too large for "
                            "a class index")
        if n_classes is not None and label >= n_classes:
            raise DataError(f"{label_file}:{lineno}: label {label} of {name!r} is out of "
                            f"the model's range [0, {n_classes}); labels are class "
                            "indices of the model's output")
        labels[name] = label
        lines.setdefault(name, []).append(lineno)
    if not labels:
        raise DataError(f"{label_file} holds no labels; write one line 'name,label' per image")
    twice = [f"{n} (lines {', '.join(map(str, ls))})" for n, ls in lines.items() if len(ls) > 1]
    if twice:
        raise DataError(f"{label_file}: {len(twice)} name(s) listed more than once: "
                        f"{_shown(twice, 3)}; keep one line per image")
    return labels


# ----------------------------------------------------------------------------- ImageNet-S
def load_imagenet_s(path: str | os.PathLike, size: int = 224, max_images: int | None = None,
                    seed: int = 0, channels: int = 3) -> BenchmarkData:
    """Read the ImageNet-S-50 validation layout.

    Images ``PATH/validation/<wnid>/<name>.JPEG`` (also accepted: ``PATH/images/``,
    ``PATH/val/``), segmentations ``PATH/validation-segmentation/<wnid>/<name>.png`` (class
    id ``R + 256 G``; every id but 0 and 1000 = object), the class index from ImageNet's
    order of the wnids (``PATH/LOC_synset_mapping.txt``, 1000 lines 'wnid name'). One image
    per class goes to validation, the rest to test, as in the paper. Images are resized to ``size``
    (direct resize, no crop) and left in [0, 1]; the model wraps the ImageNet
    normalisation.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"ImageNet-S folder {str(root)!r} does not exist")
    img_root = next((root / d for d in ("validation", "images", "val")
                     if (root / d).is_dir()), None)
    seg_root = next((root / d for d in ("validation-segmentation", "segmentations",
                                        "masks") if (root / d).is_dir()), None)
    if img_root is None or seg_root is None:
        raise DataError(f"{str(root)!r} is not an ImageNet-S-50 folder: expected "
                        "validation/<wnid>/*.JPEG and validation-segmentation/<wnid>/*.png")
    wnid_index = _imagenet_wnid_index(root)
    classes = sorted(d.name for d in img_root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"no class folders <wnid>/ in {str(img_root)!r}")
    unknown = [c for c in classes if c not in wnid_index]
    if unknown:
        raise DataError(f"class folders {unknown[:3]} are not ImageNet wnids; put "
                        "LOC_synset_mapping.txt (wnid per line in ImageNet order) in "
                        f"{str(root)!r}")
    from PIL import Image

    from quantus_adapters.benchmark import images as imio

    rng = np.random.default_rng(seed)
    xs, ms, ys, names, val = [], [], [], [], []
    image_notes: set[str] = set()
    for c in classes:
        files = _images_in(img_root / c)
        pairs = [(p, seg_root / c / (p.stem + ".png")) for p in files]
        pairs = [(p, s) for p, s in pairs if s.is_file()]
        if not pairs:
            continue
        pick = int(rng.integers(len(pairs)))
        for j, (p, s) in enumerate(pairs):
            try:
                xs.append(imio.read_image(p, channels, size, image_notes))
                with Image.open(s) as seg:
                    rgb = np.asarray(seg.convert("RGB"), dtype=np.float64)
            except imio.ImageError as exc:
                raise DataError(str(exc)) from None
            except Exception as exc:  # PIL's errors on a broken segmentation PNG
                raise DataError(f"cannot read {str(s)!r} as an image "
                                f"({' '.join(str(exc).split())})") from None
            ids = rgb[..., 0] + 256.0 * rgb[..., 1]  # ImageNet-S: class id = R + 256 G
            obj = ((ids != 0) & (ids != 1000)).astype(np.float32)  # 0 background, 1000 other
            ms.append(_resize_mask(obj, size, size) > 0)
            ys.append(wnid_index[c])
            names.append(f"{c}/{p.name}")
            val.append(j == pick)
    if not xs:
        raise DataError(f"no image in {str(img_root)!r} has a segmentation in "
                        f"{str(seg_root)!r}")
    val_idx = np.flatnonzero(val)
    test_idx = np.flatnonzero(~np.asarray(val))
    if max_images is not None:
        test_idx = test_idx[:max_images]
    image_notes.add(f"images of another size resized to {size}x{size} (bilinear, "
                    "antialiased; no crop)")
    return BenchmarkData(
        name="imagenet-s", images=torch.from_numpy(np.stack(xs)),
        labels=torch.tensor(ys), masks=torch.from_numpy(np.stack(ms))[:, None],
        val_idx=val_idx, test_idx=test_idx, names=names, notes=sorted(image_notes),
        image_notes=sorted(image_notes))


def _imagenet_wnid_index(root: Path) -> dict[str, int]:
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.is_file():
        wnids = [line.split()[0] for line in mapping.read_text().splitlines() if line.strip()]
        return {w: i for i, w in enumerate(wnids)}
    raise DataError(f"{str(mapping)!r} is missing: ImageNet-S names classes by wnid; put "
                    "ImageNet's LOC_synset_mapping.txt (1000 lines 'wnid name', in class-index "
                    "order) into the ImageNet-S folder")


# ----------------------------------------------------------------------------- dispatch
def load_data(spec: str, n_classes: int | None = None, seed: int = 0,
              image_size: int | None = None, channels: int = 3,
              split: bool = True) -> BenchmarkData:
    """Load the data named by ``--data`` (see the module docstring).

    ``channels`` (1 or 3, the model's input channels) applies to image files; ``split``
    False lets ``folder:PATH`` hold a single image (see :func:`load_folder`).
    """
    if spec == "digits":
        return cluttered_digits(seed=seed)
    if spec == "cifar10-resnet20":
        return load_cifar10_samples()
    if spec.startswith("folder:"):
        return load_folder(spec[len("folder:"):], n_classes=n_classes, size=image_size,
                           seed=seed, channels=channels, split=split)
    if spec.startswith("imagenet-s:"):
        return load_imagenet_s(spec[len("imagenet-s:"):], size=image_size or 224, seed=seed,
                               channels=channels)
    raise DataError(f"unknown --data {spec!r}; use digits, cifar10-resnet20, folder:PATH or "
                    "imagenet-s:PATH")
