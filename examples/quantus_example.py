"""Benchmark SplitCAM against baselines with Quantus on the bundled CIFAR-10 ResNet-20.

Run ``python examples/quantus_example.py [N_IMAGES]`` (default 4). It prints, per method,
Pixel Flipping AUC (lower is better: the logit falls fast when the top pixels go), Selectivity
AUC (lower is better), Max Sensitivity (lower is better) and Random Logit similarity (lower is
better). Everything is offline: weights and images ship with splitxai. ``splitxai benchmark``
runs the paper's full protocol; this script shows the few lines a Quantus user needs.
"""

from __future__ import annotations

import sys

import numpy as np
import quantus

import core.zoo
import quantus_adapters  # applies the NumPy 2 shim that Quantus 0.6 needs

# method -> options passed to quantus_adapters.explain (through explain_func_kwargs); the
# Split methods at their default alpha="auto" (class-specific maps): the paper's alpha=0.4
# gives maps here that do not depend on the class (SplitClassBlindWarning; Random Logit
# similarity 0.99 against 0.28 on four images, docs/alpha.md)
METHODS: dict[str, dict] = {
    "SplitCAM": {"layer": "layer2"},
    "SplitGrad": {},
    "LayerCAM": {"layer": "layer2"},
    "Saliency": {},
    "Random": {},
}


def main(n_images: int = 4, methods: dict[str, dict] | None = None) -> dict[str, dict]:
    """Score each method with four Quantus metrics; return ``{method: {metric: mean}}``."""
    model = core.zoo.resnet20(pretrained=True)  # eval mode, expects normalised inputs
    images, labels = core.zoo.cifar10_samples()
    x = core.zoo.normalize_cifar(images[:n_images]).numpy()
    y = labels[:n_images].numpy()
    quiet = {"disable_warnings": True, "display_progressbar": False}

    results: dict[str, dict] = {}
    print(f"{'method':<10} {'PF AUC':>8} {'Sel AUC':>8} {'MaxSens':>8} {'RandLogit':>9}")
    for method, options in (methods or METHODS).items():
        call = {
            "model": model, "x_batch": x, "y_batch": y, "device": "cpu",
            "explain_func": quantus_adapters.explain,
            "explain_func_kwargs": {"method": method, **options},
        }
        pixel_flipping = quantus.PixelFlipping(
            features_in_step=64, perturb_baseline="mean", return_auc_per_sample=True, **quiet
        )
        selectivity = quantus.Selectivity(patch_size=8, perturb_baseline="mean", **quiet)
        selectivity(**call)
        scores = {
            "PixelFlipping AUC": float(np.mean(pixel_flipping(**call))),
            "Selectivity AUC": float(selectivity.get_auc_score),
            "MaxSensitivity": float(np.mean(quantus.MaxSensitivity(
                nr_samples=3, lower_bound=0.05, **quiet)(**call))),
            "RandomLogit": float(np.nanmean(quantus.RandomLogit(
                num_classes=10, seed=0, **quiet)(**call))),
        }
        results[method] = scores
        print(f"{method:<10} " + " ".join(f"{v:>8.3f}" for v in scores.values()))
    return results


if __name__ == "__main__":
    sys.exit(0 if main(*(int(a) for a in sys.argv[1:2])) else 1)
