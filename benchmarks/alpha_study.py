"""Alpha study: shift/gradient ratio, class specificity and Pixel Flipping per alpha.

For the bundled ResNet-20 (20 CIFAR-10 samples, ``core/assets``) and the benchmark's digits
CNN (held-out cluttered digits), at a few layers, for alpha in {0.5, 0.45, 0.4, 0.3, auto}:

- ``ratio``: median over the images of ||shift part|| / ||gradient part|| of SplitCAM's map
  (Theorem 9; :func:`core.shift_diagnostics`, ``cam_ratio``);
- ``corr``: median Pearson correlation of the SplitCAM (SplitGrad) maps of the target and
  of the next class (1.0 = the map ignores the class);
- ``RL``: Quantus RandomLogit (SSIM of the maps of the target and of a random other class;
  lower = more class-specific);
- ``PF``: Pixel Flipping: mean drop of the target logit while the most relevant input
  features are replaced by the image mean in 64 equal steps, area over the whole curve
  (Quantus ``PixelFlipping`` curves; higher = more faithful),

next to LayerCAM and Grad-CAM at the same layer. ``nan``: Quantus refuses the maps (constant,
or negative everywhere: ``assert_attributions``). Writes a Markdown table (stdout and
``--out``). Run from the repository root::

    PYTHONPATH=$PWD python benchmarks/alpha_study.py --out docs/alpha_study.md
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

import core
import core.shift
import quantus_adapters
from quantus_adapters.explain import ConstantExplanationError

ALPHAS: tuple = (0.5, 0.45, 0.4, 0.3, "auto")


def _models(quick: bool, which: tuple[str, ...] = ("resnet20", "digits")):
    from quantus_adapters.benchmark.data import cluttered_digits, load_cifar10_samples
    from quantus_adapters.benchmark.zoo.models import cifar10_resnet20, digits_cnn

    if "resnet20" in which:
        cifar = load_cifar10_samples(n_val=0)
        yield ("ResNet-20 (CIFAR-10, 20 images)", cifar10_resnet20(), cifar.images, cifar.labels,
               ["model.layer1.2", "model.layer2.1"])
    if "digits" in which:
        digits = cluttered_digits(n_val_per_class=0, n_test_per_class=2 if quick else 3)
        x, y, _ = digits.subset("test")
        yield (f"digits CNN (64x64, {len(y)} images)", digits_cnn(), x, y,
               ["features.6", "features.10"])


def _pf(model, x, y, maps, steps: int = 64) -> np.ndarray:
    import quantus

    n = int(np.prod(x.shape[2:]))  # Quantus counts pixel positions
    step = max(1, n // steps)
    while n % step:
        step -= 1
    metric = quantus.PixelFlipping(features_in_step=step, perturb_baseline="mean",
                                   disable_warnings=True)
    curves = np.asarray(metric(model=model, x_batch=x, y_batch=y, a_batch=maps,
                               softmax=False, device="cpu", channel_first=True))
    with torch.no_grad():
        logit0 = model(torch.from_numpy(x)).numpy()[np.arange(len(y)), y]
    drop = logit0[:, None] - curves
    frac = np.linspace(0, 1, drop.shape[1])
    return np.trapezoid(drop, frac, axis=1)


def _rl(model, x, y, method, kwargs) -> np.ndarray:
    import quantus

    metric = quantus.RandomLogit(num_classes=10, seed=42, disable_warnings=True)
    return np.asarray(metric(model=model, x_batch=x, y_batch=y, softmax=False, device="cpu",
                             explain_func=quantus_adapters.explain,
                             explain_func_kwargs={"method": method, **kwargs}))


def run(quick: bool, which: tuple[str, ...] = ("resnet20", "digits")) -> str:
    lines = ["| model | layer | method | alpha | ratio | corr | RL (SSIM) | PF |",
             "|---|---|---|---|---|---|---|---|"]
    for title, model, xt, yt, layers in _models(quick, which):
        model.eval()
        x, y = xt.float().numpy(), yt.long().numpy()
        sm = core.split(model)
        for layer in layers:
            diag = {r.alpha: r for r in core.shift_diagnostics(
                sm, xt.float(), yt.long(), [layer], alphas=ALPHAS)}
            configs = [("SplitCAM", a) for a in ALPHAS] + [("SplitGrad", a) for a in ALPHAS]
            configs += [("LayerCAM", None), ("GradCAM", None)]
            for method, alpha in configs:
                kwargs = {"layer": layer}
                if alpha is not None:
                    kwargs["alpha"] = alpha
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        maps = quantus_adapters.explain(model, x, y, method=method, **kwargs)
                        pf = float(np.mean(_pf(model, x, y, maps)))
                        rl = float(np.nanmean(_rl(model, x, y, method, kwargs)))
                except ConstantExplanationError:
                    pf = rl = float("nan")
                except AssertionError as err:  # Quantus refuses maps that are all negative
                    if "less than zero" not in str(err):
                        raise
                    pf = rl = float("nan")
                if alpha is None:
                    ratio = corr = "–"
                else:
                    d = diag[core.shift.alpha_label(alpha)]
                    ratio = f"{d.cam_ratio:.2g}"
                    c = d.class_corr if method == "SplitCAM" else d.grad_class_corr
                    corr = f"{c:.2f}"
                label = "–" if alpha is None else core.shift.alpha_label(alpha)
                lines.append(f"| {title} | {layer} | {method} | {label} | {ratio} | {corr} | "
                             f"{rl:.3f} | {pf:.3f} |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the Markdown table here")
    p.add_argument("--quick", action="store_true", help="fewer digits images")
    p.add_argument("--models", nargs="+", default=["resnet20", "digits"],
                   choices=["resnet20", "digits"], help="models to study (default both)")
    p.add_argument("--ratio", type=float, default=None,
                   help="target r of alpha='auto' (default core.shift.AUTO_RATIO)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.ratio is not None:
        core.shift.AUTO_RATIO = args.ratio
    t = time.perf_counter()
    table = run(args.quick, tuple(args.models))
    footer = (f"\nauto target r = {core.shift.AUTO_RATIO:g}; "
              f"{time.perf_counter() - t:.0f} s on one CPU thread.")
    print(footer)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n" + footer + "\n")


if __name__ == "__main__":
    main()
