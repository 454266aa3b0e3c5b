"""Split the bundled CIFAR-10 ResNet-20 into its split pair and look at its sensitivities.

Runs offline: ``python examples/split_resnet20.py [OUT_DIR]``. Prints the forward and
backward invariant errors and writes ``split_resnet20.png`` (input, SplitGrad and the
g/h sensitivities at the input, SplitCAM at ``layer2``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import core
from core.zoo import CIFAR10_CLASSES, cifar10_samples, normalize_cifar, resnet20


def main(out_dir: str = ".", n_images: int = 4) -> int:
    """Split, check the invariants, save the figure; returns an exit status."""
    model = resnet20()
    images, labels = cifar10_samples()
    images, labels = images[:n_images], labels[:n_images]
    x = normalize_cifar(images)

    sm = core.split(model)
    g, h = sm(x)
    with torch.no_grad():
        f = model(x)
    forward_error = float((g - h - f).abs().max() / f.abs().max())
    print(f"forward invariant: max|g - h - f| / max|f| = {forward_error:.2e}")

    probes = sm.sensitivities(x, labels, ["input", "layer2"], alpha=0.4)
    p = probes["input"]
    backward_error = float((p.g - p.h - p.grad).abs().max() / p.g.abs().max())
    print(f"backward invariant: max|delta_g - delta_h - grad| / max|delta_g| = "
          f"{backward_error:.2e}")

    split_grad = p.g.mean(1)                                       # SplitGrad at the input
    cam = (probes["layer2"].g * probes["layer2"].activation).sum(1)  # SplitCAM (eq. 7)
    cam = torch.nn.functional.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear")[:, 0]

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    columns = [("image", None), ("SplitGrad (g)", split_grad), ("delta_g", p.g.sum(1)),
               ("delta_h", p.h.sum(1)), ("SplitCAM layer2", cam)]
    fig, axes = plt.subplots(n_images, len(columns), figsize=(2 * len(columns), 2 * n_images))
    for row in range(n_images):
        for col, (title, maps) in enumerate(columns):
            ax = axes[row, col]
            if maps is None:
                ax.imshow(images[row].permute(1, 2, 0).numpy())
                ax.set_ylabel(CIFAR10_CLASSES[int(labels[row])])
            else:
                m = maps[row].detach()
                lim = float(m.abs().max()) or 1.0
                ax.imshow(m.numpy(), cmap="bwr", vmin=-lim, vmax=lim)
            if row == 0:
                ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    path = Path(out_dir) / "split_resnet20.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"wrote {path}")
    return 0 if forward_error < 1e-5 and backward_error < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
