"""Explain a ViT and a ConvNeXt: SplitCAM, SplitGrad and SplitLRP with ``nonlinear="freeze"``.

Run ``python examples/beyond_relu.py [IMAGE_SIZE]`` (default 64). timm's
``vit_tiny_patch16_224`` and ``convnext_atto`` are built with random weights (offline); the
script splits each with its smooth operations frozen at the model's activations, checks
``g - h == f``, lists what was frozen and prints the three maps' shapes and the identities
they satisfy:

- SplitGrad at ``alpha=0.5`` is half the gradient of the *frozen* model;
- SplitCAM at ``alpha=0.5`` is half of gradient x activation (of the frozen model) summed
  over channels;
- SplitLRP's ``pos`` and ``neg`` relevances at the input.
"""

from __future__ import annotations

import sys
import warnings

import timm
import torch

import core
from captum_split import SplitCAM, SplitGrad
from zennit_split import split_lrp


def explain(model: torch.nn.Module, x: torch.Tensor, layer: str, target: int) -> dict:
    """The three maps of one model, and the checks printed by :func:`main`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sm = core.split(model, nonlinear="freeze")
    frozen = sm.frozen_operations()
    g, h = sm(x)
    with torch.no_grad():
        f = model(x)
    error = ((g - h - f).abs().max() / g.abs().max()).item()
    print(f"  {len(frozen)} frozen operations, e.g. {frozen[0]}")
    print(f"  warning: {str(caught[0].message)[:100]}...")
    print(f"  |g - h - f| / |g| = {error:.1e}")

    grad = SplitGrad(model, alpha=0.5, nonlinear="freeze").attribute(x, target=target)
    probe = sm.sensitivities(x, target, ["input"], alpha=0.5)["input"]
    print(f"  SplitGrad (alpha 0.5) {tuple(grad.shape)} == grad/2 of the frozen model: "
          f"{torch.allclose(grad, probe.grad / 2, atol=1e-6)}; path exact: {probe.exact}")

    cam_explainer = SplitCAM(model, layer, alpha=0.5, nonlinear="freeze")
    cam = cam_explainer.attribute(x, target=target, attr_dim_summation=False)
    at_layer = sm.sensitivities(x, target, [layer], alpha=0.5)[layer]
    half = at_layer.grad * at_layer.activation / 2
    print(f"  SplitCAM at {layer!r} (alpha 0.5) {tuple(cam.shape)} == grad x act / 2: "
          f"{torch.allclose(cam, half, atol=1e-6)}")

    lrp = split_lrp(model, x, target, ["input"], nonlinear="freeze")["input"]
    print(f"  SplitLRP at the input {tuple(lrp.pos.shape)}: sum R+ = {lrp.pos.sum():.3f}, "
          f"sum R- = {lrp.neg.sum():.3f}")
    return {"error": error, "frozen": frozen, "grad": grad, "cam": cam, "lrp": lrp}


def main(image_size: int = 64) -> dict:
    torch.manual_seed(0)
    results = {}
    for name, layer in (("vit_tiny_patch16_224", "blocks.11"), ("convnext_atto", "stages.3")):
        extra = {"img_size": image_size} if name.startswith("vit") else {}
        model = timm.create_model(name, pretrained=False, num_classes=10, **extra).eval()
        x = torch.randn(1, 3, image_size, image_size)
        print(f"{name} at {image_size}x{image_size} (random weights):")
        results[name] = explain(model, x, layer, target=3)
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
