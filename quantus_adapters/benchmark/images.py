"""Reading image and mask files of any PIL mode into arrays the benchmark can trust.

Images become float32 arrays (C, H, W) in [0, 1] with the model's channel count:

==============  ==========================================================================
PIL mode        values
==============  ==========================================================================
``1``           0 or 1
``L``, ``RGB``  8 bit: divided by 255
``I;16*``       16 bit: divided by 65535
``RGB``, ...    16 bits per colour sample (48/64-bit PNG, 16-bit colour TIFF): refused,
                as Pillow reads them at 8 bits (off by up to 1/255)
``I``           32-bit integers holding 16-bit data (how Pillow reads 16-bit TIFFs):
                divided by 65535 (noted: 8-bit values in such a file come out nearly
                black); values outside [0, 65535] are refused
``F``           floats, which must already lie in [0, 1]
``P``           the palette expanded (to RGB, or RGBA when it has transparency)
``LA``, ``RGBA``  the alpha channel is dropped (noted in the report)
``CMYK``, ...   converted to RGB by Pillow
==============  ==========================================================================

Of a file with several frames (animated GIF, multi-page TIFF) the first is read (noted).
Images and masks with an EXIF orientation (a phone's JPEG) are rotated / flipped as image
viewers show them (noted in the report), so that a mask drawn on the shown image fits.

A 1-channel model gets grayscale (RGB converted with the ITU-R 601-2 luma weights
0.299, 0.587, 0.114 -- those of Pillow's ``L`` mode), a 3-channel model gets RGB
(grayscale repeated). Masks are non-zero = object (several non-zero levels, e.g. soft
edges or JPEG noise, are noted); a mask with a varying alpha channel
takes its object from the alpha channel (opaque = object).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ImageError", "read_image", "read_mask", "model_channels", "resize",
           "LUMA_WEIGHTS"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageError(ValueError):
    """An image or mask file that cannot be read correctly (the message names the file)."""


def model_channels(model: nn.Module) -> int | None:
    """Input channels of the model's first convolution (None when it has none)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return int(m.in_channels)
    return None


def _open(path: Path, notes: set[str]):
    from PIL import Image, ImageOps

    try:
        img = Image.open(path)
        img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageError(f"cannot read {str(path)!r} as an image ({msg}); replace or remove "
                         "the file") from None
    bits = _colour_bits(img, path)
    if bits > 8:
        img.close()
        raise ImageError(f"{str(path)!r} has {bits}-bit colour or alpha channels, which "
                         "Pillow reads at 8 bits (values off by up to 1/255); convert it to "
                         "8 bits per channel, or to 16-bit grayscale without alpha for a "
                         "1-channel model")
    if getattr(img, "n_frames", 1) > 1:
        notes.add("of files with several frames (animated GIF / WebP, multi-page TIFF) only "
                  "the first frame was read")
    if img.getexif().get(0x0112, 1) not in (0, 1):  # EXIF Orientation: as viewers show it
        notes.add("files with an EXIF orientation were rotated / flipped as image viewers "
                  "show them")
        turned = ImageOps.exif_transpose(img)
        img.close()
        return turned
    return img


#: PNG colour types with more than one sample per pixel: grey + alpha, RGB, RGB + alpha
_PNG_MULTI_SAMPLE = (2, 4, 6)


def _colour_bits(img, path: Path) -> int:
    """Bits per sample of a multi-sample (colour or grey + alpha) PNG or TIFF; 8 otherwise.

    Pillow reads only 16-bit grayscale exactly (modes ``I;16*``); 16-bit colour samples
    come back as 8-bit RGB(A) without a word.
    """
    if img.format == "PNG":
        try:
            with open(path, "rb") as fh:
                head = fh.read(26)  # signature (8), IHDR length and type (8), IHDR data
        except OSError:
            return 8
        if len(head) == 26 and head[12:16] == b"IHDR" and head[25] in _PNG_MULTI_SAMPLE:
            return int(head[24])
        return 8
    if img.format == "TIFF":
        samples = getattr(img, "tag_v2", {}).get(258)  # BitsPerSample
        if isinstance(samples, tuple) and len(samples) > 1:
            return int(max(samples))
    return 8


def _values(img, path: Path, notes: set[str]) -> np.ndarray:
    """(H, W) or (H, W, 3) float64 in [0, 1] of any PIL mode (alpha dropped)."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in _ALPHA_MODES:
        notes.add("alpha channels of the images were dropped")
        img = img.convert("LA" if mode in ("LA", "La") else "RGBA")
        arr = np.asarray(img)
        return (arr[..., 0] if img.mode == "LA" else arr[..., :3]).astype(np.float64) / 255.0
    if mode == "1":
        return np.asarray(img, dtype=np.float64)
    if mode in ("L", "RGB"):
        return np.asarray(img, dtype=np.float64) / 255.0
    if mode in _SIXTEEN_BIT:
        return np.asarray(img, dtype=np.float64) / 65535.0
    if mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageError(f"{str(path)!r}: 32-bit integer image with values in "
                             f"[{arr.min():g}, {arr.max():g}]; only 16-bit data (0..65535) "
                             "has a known scale -- convert it to 8 or 16 bit")
        notes.add("32-bit integer images were read as 16-bit data (divided by 65535); if "
                  "they hold 8-bit values they look nearly black -- save them as 8-bit PNGs")
        return arr / 65535.0
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all() or (arr.size and (arr.min() < 0 or arr.max() > 1)):
            raise ImageError(f"{str(path)!r}: floating-point image with values outside "
                             "[0, 1]; scale it to [0, 1] or save it as 8/16-bit integers")
        return arr
    try:  # CMYK, YCbCr, LAB, HSV, ...
        return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    except Exception as exc:
        raise ImageError(f"{str(path)!r}: image mode {mode} cannot be converted to RGB "
                         f"({exc})") from None


def resize(arr: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """(C, H, W) resized to (C, size, size): bilinear with antialiasing, or nearest."""
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    if nearest:
        out = F.interpolate(t, size=(size, size), mode="nearest")
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True).clamp(0.0, 1.0)
    return out[0].numpy()


def read_image(path: str | os.PathLike, channels: int, size: int | None = None,
               notes: set[str] | None = None) -> np.ndarray:
    """One image file as float32 (channels, H, W) in [0, 1] (see the module docstring).

    Parameters
    ----------
    path: path-like
        The file.
    channels: int
        1 (grayscale) or 3 (RGB): what the model's first layer takes.
    size: int, optional
        Resize to ``size`` x ``size``.
    notes: set of str, optional
        Receives remarks for the report (alpha dropped, colour converted).

    Raises
    ------
    ImageError
        The file cannot be read, or its values have no known scale.
    """
    path = Path(path)
    notes = set() if notes is None else notes
    with _open(path, notes) as img:
        vals = _values(img, path, notes)
    if vals.ndim == 2:
        arr = vals[None]
        if channels == 3:
            arr = np.repeat(arr, 3, axis=0)
            notes.add("grayscale images were repeated to 3 channels for the model")
    else:
        arr = vals.transpose(2, 0, 1)
        if channels == 1:
            arr = np.tensordot(np.asarray(LUMA_WEIGHTS), arr, axes=1)[None]
            notes.add("colour images were converted to grayscale (ITU-R 601-2 luma) for the "
                      "1-channel model")
    if channels not in (1, 3):
        raise ImageError(f"images can be read with 1 or 3 channels, not {channels}")
    arr = arr.astype(np.float32)
    if size is not None and arr.shape[-2:] != (size, size):
        arr = resize(arr, size)
    return arr


def read_mask(path: str | os.PathLike, notes: set[str] | None = None) -> np.ndarray:
    """One mask file as a bool (H, W) array: non-zero = object.

    With an alpha channel that varies, the object is where the mask is not transparent
    (noted in the report); otherwise any non-zero colour channel marks the object.
    """
    path = Path(path)
    notes = set() if notes is None else notes
    with _open(path, notes) as img:
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode in _ALPHA_MODES:
            arr = np.asarray(img.convert("RGBA"))
            alpha = arr[..., 3]
            if alpha.min() != alpha.max():
                notes.add("masks with a transparent background: the opaque pixels are the "
                          "object")
                return _non_zero(alpha, notes)
            return _non_zero(arr[..., :3].max(-1), notes)
        vals = np.asarray(img)
    return _non_zero(vals.max(-1) if vals.ndim == 3 else vals, notes)


def _non_zero(level: np.ndarray, notes: set[str]) -> np.ndarray:
    """``level > 0``; several non-zero levels (soft edges, JPEG noise) are noted."""
    obj = level > 0
    if np.unique(level[obj]).size > 1:
        notes.add("masks with several non-zero levels (anti-aliased edges, JPEG noise or "
                  "class indices): every non-zero pixel counts as object, which widens a "
                  "soft edge; save binary masks (0 / 255, PNG) for exact edges")
    return obj
