"""SplitCAM and SplitGrad with Captum: explain the bundled CIFAR-10 ResNet-20.

Run ``python examples/captum_example.py [OUTPUT_DIR]``. It prints a few numbers and writes
one figure per image (input, SplitCAM, SplitCAM "+", SplitGrad, LayerCAM, Grad-CAM) to
OUTPUT_DIR (default ``splitcam_maps``). Everything is offline: weights and images ship with
splitxai.
"""

from __future__ import annotations

import sys
from pathlib import Path

from captum.attr import LayerAttribution, LayerGradCam, LayerGradientXActivation, NoiseTunnel
from captum.metrics import sensitivity_max

import core.zoo
from captum_split import LayerCAM, SplitCAM, SplitGrad


def main(out_dir: str = "splitcam_maps", n_images: int = 4) -> int:
    model = core.zoo.resnet20(pretrained=True)
    images, labels = core.zoo.cifar10_samples()
    x, y = core.zoo.normalize_cifar(images[:n_images]), labels[:n_images]
    layer = model.layer2  # a mid layer (16 x 16); model.layer3[2].conv2 is the last conv

    # drop-in for LayerGradCam(model, layer): same call, same (B, 1, h, w) layer map
    maps = {
        "SplitCAM (g)": SplitCAM(model, layer, alpha=0.4).attribute(x, target=y),
        "SplitCAM (+, g)": SplitCAM(model, layer, alpha=0.4, sign="+").attribute(x, target=y),
        "SplitGrad (g)": SplitGrad(model, "layer2", alpha=0.4).attribute(x, target=y),
        "LayerCAM": LayerCAM(model, layer).attribute(x, target=y),
        "Grad-CAM": LayerGradCam(model, layer).attribute(x, target=y, relu_attributions=True),
    }
    maps = {k: LayerAttribution.interpolate(v, (32, 32), "bilinear") for k, v in maps.items()}

    # the exact link to the model's gradient: at alpha 0.5, SplitCAM(g) is half of grad x act
    half = SplitCAM(model, layer, alpha=0.5).attribute(x, target=y)
    gxa = LayerGradientXActivation(model, layer).attribute(x, target=y).sum(1, keepdim=True)
    print(f"alpha=0.5: max |SplitCAM - grad x act / 2| = {(half - gxa / 2).abs().max():.2g}")
    # Captum tools take it unchanged
    smooth = NoiseTunnel(SplitCAM(model, layer)).attribute(
        x, nt_type="smoothgrad", nt_samples=4, stdevs=0.1, target=y
    )
    sens = sensitivity_max(SplitGrad(model).attribute, x, target=y, n_perturb_samples=4)
    print(f"SmoothGrad x SplitCAM shape {tuple(smooth.shape)}; "
          f"max-sensitivity of input SplitGrad per image: {[round(v, 3) for v in sens.tolist()]}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is only needed for the figures
        print("matplotlib not installed: no figures written")
        return 0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(x)):
        fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.2 * (len(maps) + 1), 2.4))
        axes[0].imshow(images[i].permute(1, 2, 0).numpy())
        axes[0].set_title(f"label {int(y[i])}", fontsize=8)
        for ax, (name, m) in zip(axes[1:], maps.items(), strict=True):
            heat = m[i, 0].detach().numpy()
            lim = max(abs(heat.min()), abs(heat.max()), 1e-12)
            ax.imshow(heat, cmap="bwr", vmin=-lim, vmax=lim)
            ax.set_title(name, fontsize=8)
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / f"image{i}.png", dpi=80)
        plt.close(fig)
    print(f"predictions {model(x).argmax(1).tolist()}, labels {y.tolist()}; figures in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
