"""SplitLRP with Zennit: explain the bundled CIFAR-10 ResNet-20 on the bundled images.

Run ``python examples/zennit_example.py [OUTPUT_DIR]``. It prints the relevance totals and
writes one heatmap per image and stream (``pos``, ``neg``, ``comb``) to OUTPUT_DIR
(default ``splitlrp_maps``). Everything is offline: weights and images ship with splitxai.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from zennit.attribution import Gradient, SmoothGrad
from zennit.image import imsave

import core
import zennit_split  # noqa: F401 - registers zennit.composites.COMPOSITES["split_lrp"]
from zennit_split import SplitLRP, split_lrp


def main(out_dir: str = "splitlrp_maps") -> int:
    model = core.zoo.resnet20(pretrained=True)
    images, labels = core.zoo.cifar10_samples()
    mean = torch.tensor(core.zoo.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(core.zoo.CIFAR10_STD).view(1, 3, 1, 1)
    x, y = (images[:4] - mean) / std, labels[:4]
    seed = torch.eye(10)[y]                    # one-hot: total relevance 1 per image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stream in ("pos", "neg", "comb"):
        # any Zennit attributor works; Gradient gives plain SplitLRP
        with Gradient(model, SplitLRP(stream=stream)) as attributor:
            logits, relevance = attributor(x, seed)
        for i, heat in enumerate(relevance.sum(1)):
            imsave(out / f"image{i}_{stream}.png", heat, symmetric=True, cmap="coldnhot")
        print(f"{stream:>4}: relevance per image {relevance.flatten(1).sum(1).tolist()}")

    # the paper's layer maps "(l, pos)": relevance at a module's output
    layer = split_lrp(model, x, y, ["layer2.2", "input"])
    total = (layer["layer2.2"].pos + layer["layer2.2"].neg).flatten(1).sum(1)
    print(f"R(layer2.2,+) + R(layer2.2,-) per image: {total.tolist()}")

    # noise-averaged SplitLRP
    with SmoothGrad(model, SplitLRP(), noise_level=0.1, n_iter=4) as attributor:
        _, smooth = attributor(x, seed)
    print(f"SmoothGrad x SplitLRP map shape: {tuple(smooth.shape)}; predictions "
          f"{logits.argmax(1).tolist()}, labels {y.tolist()}; maps in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
