"""Which torchvision classification models split? Every one of ``torchvision.models``.

Each model is built with random weights (``weights=None``; a head that torchvision starts
at zero, as ViT's, is drawn at random so that ``f`` is not zero), in float64 on CPU, and
split at one input (224x224, 299x299 for Inception V3; batch 1): exactly
(``core.split(model)``) where every operation is piecewise linear, else with
``nonlinear="freeze"``. A model *splits* when
``|g - h - f| <= 1e-12 * max(|g|, |h|, |f|)`` and the input sensitivities at alpha 0.4 are
finite. Models over ``--max-params`` (150 M) parameters are left out (time)::

    nice python -m benchmarks.torchvision_sweep [--max-params 150e6] [--models vit_b_16]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

TOLERANCE = 1e-12


def _options(name: str) -> dict:
    """Options of the builder: no auxiliary heads (GoogLeNet, Inception V3)."""
    if name in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": False}
    return {}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model (random weights, eval, float64) and an input of its size."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None, **_options(name)).eval().double()
    for module in model.modules():  # heads that start at zero (ViT): drawn at random
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and not weight.any():
            nn.init.normal_(weight, std=0.02)
    size = 299 if name == "inception_v3" else 224
    return model, torch.randn(1, 3, size, size, dtype=torch.float64)


def sweep_one(name: str) -> dict:
    """Split one model; the mode, the relative error and whether the sensitivities are
    finite (or the error that stopped it)."""
    import core

    start = time.perf_counter()
    try:
        model, x = build(name)
        with torch.no_grad():
            f = model(x)
        mode = "exact"
        try:  # a model captured by running it is refused at its first call
            sm = core.split(model)
            g, h = sm(x)
        except core.UnsupportedOperation:
            mode = "freeze"
            sm = core.split(model, nonlinear="freeze")
            g, h = sm(x)
        scale = torch.stack([g.abs().max(), h.abs().max(), f.abs().max()]).max()
        error = ((g - h - f).abs().max() / scale).item()
        probe = sm.sensitivities(x, 0, ["input"], alpha=0.4)["input"]
        finite = bool(torch.isfinite(probe.g).all() and torch.isfinite(probe.h).all())
        return {"model": name, "mode": mode, "error": error, "finite": finite,
                "splits": error <= TOLERANCE and finite,
                "seconds": time.perf_counter() - start}
    except Exception as err:  # reported per model: the sweep goes on
        return {"model": name, "mode": "failed", "error": f"{type(err).__name__}: {err}",
                "finite": False, "splits": False, "seconds": time.perf_counter() - start}


def parameters(name: str) -> int:
    """The number of parameters of a torchvision model (built on the meta device)."""
    import torchvision

    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None, **_options(name))
    except (NotImplementedError, RuntimeError):  # an initialiser that reads values (RegNet)
        model = torchvision.models.get_model(name, weights=None, **_options(name))
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--max-params", type=float, default=150e6)
    args = parser.parse_args(argv)
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    rows, left_out = [], []
    for name in names:
        if args.models is None and parameters(name) > args.max_params:
            left_out.append(name)
            continue
        with warnings.catch_warnings():  # freeze, precision and class-blind warnings
            warnings.simplefilter("ignore")
            row = sweep_one(name)
        rows.append(row)
        error = row["error"] if isinstance(row["error"], str) else f"{row['error']:.1e}"
        print(f"{name:24s} {row['mode']:7s} {error:10s} finite={row['finite']} "
              f"{row['seconds']:.1f}s", flush=True)
    splits = sum(r["splits"] for r in rows)
    exact = sum(r["splits"] and r["mode"] == "exact" for r in rows)
    worst = max((r["error"] for r in rows if r["splits"]), default=float("nan"))
    print(f"\n{splits} of {len(rows)} split ({exact} exactly, {splits - exact} under freeze); "
          f"largest error {worst:.1e}; left out (over {args.max_params / 1e6:.0f} M parameters): "
          f"{', '.join(left_out) or 'none'}")


if __name__ == "__main__":
    main()
