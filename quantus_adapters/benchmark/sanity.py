"""The model randomisation sanity check of table 6 (Adebayo et al.; paper appendix B.4).

Explanations of the trained model are compared with those of a copy whose last three
linear / convolution layers are re-initialised with Gaussian noise: HOG similarity
(Pearson correlation of the maps' histograms of oriented gradients), Spearman rank
correlation (signed maps) and SSIM. Lower similarity means a stronger dependence on the
learned parameters. The user's model is never modified (the copy is re-initialised).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

__all__ = ["randomised_copy", "last_layers", "similarities", "SIMILARITIES"]

SIMILARITIES = ("HOG", "Spearman", "SSIM")


def last_layers(model: nn.Module, n: int = 3) -> list[str]:
    """Names of the last ``n`` linear / convolution modules (in registration order)."""
    names = [name for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    return names[-n:]


def randomised_copy(model: nn.Module, n: int = 3, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A deep copy of ``model`` with its last ``n`` linear/conv layers re-initialised.

    Weights and biases are drawn from a Gaussian with zero mean and the standard deviation
    of the trained tensor (so that activations keep their scale).

    Returns
    -------
    (torch.nn.Module, list of str)
        The copy (eval mode) and the names of the re-initialised layers.
    """
    clone = copy.deepcopy(model).eval()
    names = last_layers(clone, n)
    modules = dict(clone.named_modules())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for p in modules[name].parameters(recurse=False):
                std = float(p.detach().float().std()) if p.numel() > 1 else 0.05
                noise = torch.randn(p.shape, generator=gen) * (std if std > 0 else 0.05)
                p.copy_(noise.to(p.dtype).to(p.device))
    return clone, names


def _unit(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi - lo < 1e-12 else (a - lo) / (hi - lo)


def _pearson(u: np.ndarray, v: np.ndarray) -> float:
    u = u - u.mean()
    v = v - v.mean()
    den = np.sqrt((u * u).sum() * (v * v).sum())
    return float((u * v).sum() / den) if den > 0 else float("nan")


def similarities(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image HOG, Spearman and SSIM similarity of two batches of maps (B, 1, H, W)."""
    from scipy.stats import spearmanr
    from skimage.feature import hog
    from skimage.metrics import structural_similarity

    out = {k: [] for k in SIMILARITIES}
    flat_a = a.reshape(len(a), *a.shape[-2:])
    flat_b = b.reshape(len(b), *b.shape[-2:])
    for m1, m2 in zip(flat_a, flat_b, strict=True):
        h, w = m1.shape
        cell = max(2, min(h, w) // 8)
        u1, u2 = _unit(m1.astype(np.float64)), _unit(m2.astype(np.float64))
        h1 = hog(u1, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), feature_vector=True)
        h2 = hog(u2, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), feature_vector=True)
        out["HOG"].append(_pearson(h1, h2))
        rho = spearmanr(m1.ravel(), m2.ravel()).statistic
        out["Spearman"].append(float(rho) if np.isfinite(rho) else float("nan"))
        win = min(7, h - (1 - h % 2), w - (1 - w % 2))
        out["SSIM"].append(float(structural_similarity(u1, u2, data_range=1.0, win_size=win)))
    return {k: np.asarray(v) for k, v in out.items()}
