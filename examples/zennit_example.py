"""SplitLRP with Zennit: explain the bundled CIFAR-10 ResNet-20 on the bundled images.

Run ``python examples/zennit_example.py [OUTPUT_DIR]``. It prints the relevance totals and
writes one heatmap per image and stream (``pos``, ``neg``, ``comb``) to OUTPUT_DIR
(default ``splitlrp_maps``). Everything is offline: weights and images ship with splitxai.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image
from zennit.attribution import Gradient, SmoothGrad
from zennit.cmap import ColorMap

import zennit_split  # noqa: F401 - registers zennit.composites.COMPOSITES["split_lrp"]
from core import zoo
from zennit_split import SplitLRP, split_lrp

COLD_N_HOT = ColorMap("0ff,00f,80:000,f00,ff0,fff")  # Zennit's "coldnhot"


def save_heatmap(path: Path, heat: torch.Tensor) -> None:
    """Save a 2-D relevance map, symmetric around 0 (blue negative, red positive)."""
    scale = heat.abs().max().clamp_min(1e-12)
    rgb = COLD_N_HOT(((heat / scale + 1) / 2).numpy())
    Image.fromarray((rgb * 255).astype("uint8")).resize((128, 128), Image.NEAREST).save(path)


def main(out_dir: str = "splitlrp_maps", n_images: int = 4) -> int:
    model = zoo.resnet20(pretrained=True)
    images, labels = zoo.cifar10_samples()
    x, y = zoo.normalize_cifar(images[:n_images]), labels[:n_images]
    seed = torch.eye(10)[y]                    # one-hot: total relevance 1 per image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # any Zennit attributor works; Gradient gives plain SplitLRP. The composite also keeps
    # both streams at the input and at the requested layer (the paper's "(l, pos)" maps).
    composite = SplitLRP(stream="comb", layer="layer2.2")
    with Gradient(model, composite) as attributor:
        logits, comb = attributor(x, seed)
    kept = composite.relevance
    maps = {"pos": kept["input"].pos, "neg": kept["input"].neg, "comb": comb}
    for stream, relevance in maps.items():
        for i, heat in enumerate(relevance.sum(1)):
            save_heatmap(out / f"image{i}_{stream}.png", heat)
        print(f"{stream:>4}: relevance per image {relevance.flatten(1).sum(1).tolist()}")
    layer = kept["layer2.2"]
    total = (layer.pos + layer.neg).flatten(1).sum(1)
    print(f"R(layer2.2,+) + R(layer2.2,-) per image: {total.tolist()}")

    # the same without Zennit's attributor: zennit_split.split_lrp
    pos = split_lrp(model, x, y, ["input"])["input"].pos
    print(f"split_lrp agrees with the composite: {torch.allclose(pos, maps['pos'])}")

    # noise-averaged SplitLRP
    with SmoothGrad(model, SplitLRP(), noise_level=0.1, n_iter=3) as attributor:
        _, smooth = attributor(x, seed)
    print(f"SmoothGrad x SplitLRP map shape: {tuple(smooth.shape)}; predictions "
          f"{logits.argmax(1).tolist()}, labels {y.tolist()}; maps in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
