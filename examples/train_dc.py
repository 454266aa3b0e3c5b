"""Train a difference-of-convex model (DICIN by default) and render its g / h gradients.

Offline by default: scikit-learn's digits, upsampled to 28x28. With MNIST IDX files, pass
``--data idx:FOLDER`` (or ``--data mnist`` when online).

    python examples/train_dc.py --out splitxai-out/dc-example
    python examples/train_dc.py --mode DMIN --data idx:path/to/mnist --epochs 10

Writes ``model.pt`` (reload it with ``core.dc.train.load_checkpoint``), ``figure3.png``
(per class: g gradient red, h gradient blue) and ``figure8.png`` (each sample's true class).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import core.dc.models
from core.dc.explain import figure_classes, figure_samples
from core.dc.train import evaluate, load_checkpoint, load_data, save_checkpoint, train_model
from quantus_adapters.dc_plugin import dc_grad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp_maxout", choices=["mlp_maxout", "cnn_maxout"])
    parser.add_argument("--mode", default="DICIN", help=", ".join(core.dc.models.MODES))
    parser.add_argument("--data", default="digits", help="digits, mnist or idx:FOLDER")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="first N samples only")
    parser.add_argument("--out", default="splitxai-out/dc-example")
    args = parser.parse_args(argv)
    out = Path(args.out)

    torch.manual_seed(0)
    data = load_data(args.data).limit(args.limit)
    build = getattr(core.dc.models, args.model)
    model = build(args.mode)  # e.g. DICIN: f(x) = g(x) - h(1 - x), g and h input-convex
    train_model(model, data, epochs=args.epochs, batch_size=32, desc=f"{args.model} {args.mode}")
    accuracy = evaluate(model, data.test_x, data.test_y)
    print(f"{args.model} {model.mode}: test accuracy {accuracy:.2f} %")

    # a checkpoint round-trips exactly
    path = save_checkpoint(model, out / "model.pt", args.model)
    restored = load_checkpoint(path)
    assert torch.equal(restored(data.test_x[:64]), model(data.test_x[:64]))

    x, y = data.test_x[:4], data.test_y[:4]
    print("wrote", figure_classes(restored, x, out / "figure3.png", labels=y))
    ten_x, ten_y = data.test_x[:10], data.test_y[:10]
    print("wrote", figure_samples(restored, ten_x, ten_y, out / "figure8.png"))

    if core.dc.models.is_difference_model(restored):
        # the same maps as an explanation method (also: quantus_adapters.explain(...,
        # method="DCGrad", stream="h"))
        present = dc_grad(restored, x, y, stream="g")  # where ink raises the true logit
        missing = dc_grad(restored, x, y, stream="h")  # where the h stream reacts
        print(f"DCGrad maps {tuple(present.shape)}: g mass {present.clamp(min=0).sum():.3g}, "
              f"h mass {missing.clamp(min=0).sum():.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
