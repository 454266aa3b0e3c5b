"""Does every ReLU-family model in timm split exactly? Every model, not one per family.

A model is *ReLU-family* when every activation module is a ReLU, ReLU6, LeakyReLU or
Hardtanh and every normalisation module a BatchNorm (:func:`relu_family`; no GELU, SiLU,
sigmoid gates, LayerNorm, GroupNorm, ...). Every name of ``timm.list_models()`` is built on
the meta device (no memory, no initialisation) and filtered; each ReLU-family model with at
most 100 M parameters is then built with random weights (``pretrained=False``, 10 classes,
BatchNorm statistics randomised), run on CPU at 64x64 (or its native size up to 320) and
split with the default ``nonlinear="error"``: it passes when
``|g - h - f| <= 1e-5 * max(|g|, |h|, |f|)`` (float32). A model whose forward calls a smooth
*function* (``F.softmax`` in an attention block: invisible to the module filter) is
recorded as refused with ``UnsupportedOperation``, the split's correct answer.

Resumable (one JSON line per model), one torch thread, a time limit per model::

    nice python -m benchmarks.relu_family_sweep --out relu_sweep.jsonl
    python -m benchmarks.relu_family_sweep --out relu_sweep.jsonl --retry   # failed ones again
    python -m benchmarks.relu_family_sweep --summary relu_sweep.jsonl

A model's last line counts.

The CI test (``tests/test_core_timm.py``) runs one model per timm architecture module with
the same filter; this script is the full list.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import warnings
from pathlib import Path

from torch import nn

from benchmarks.beyond_relu_sweep import Timeout, build, last_rows, relative_error, with_time_limit

TOLERANCE = 1e-5
MAX_PARAMETERS = 100_000_000
ALLOWED_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SMOOTH_NAMES = ("gelu", "silu", "swish", "sigmoid", "mish", "tanh", "softmax", "elu",
                 "softplus", "hardswish", "hardsigmoid", "gate", "glu", "prelu", "starrelu",
                 "layernorm", "groupnorm", "rmsnorm", "evonorm", "instancenorm", "attention")


def relu_family(model: nn.Module) -> bool:
    """Every activation module is ReLU-type and every normalisation module a BatchNorm."""
    for m in model.modules():
        cls = type(m)
        if isinstance(m, ALLOWED_ACTIVATIONS):
            continue
        if cls.__module__ == "torch.nn.modules.activation":
            return False  # any other torch activation (GELU, SiLU, Softmax, ...)
        if isinstance(m, nn.modules.batchnorm._NormBase) and not isinstance(m, BATCHNORMS):
            return False  # InstanceNorm
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)):
            return False
        if any(s in cls.__name__.lower() for s in _SMOOTH_NAMES):
            return False
    return True


def on_meta(name: str) -> nn.Module | None:
    """``name`` built on the meta device, or None when timm cannot build it there."""
    import timm
    import torch

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return timm.create_model(name, pretrained=False, num_classes=10)
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is not listed
        return None


def check(name: str) -> dict:
    """One model's row (never raises except on the time limit)."""
    import torch

    import core
    from tests.core_checks import randomise_batchnorm

    torch.set_num_threads(1)
    start = time.perf_counter()
    row: dict = {"model": name}
    try:
        model, x = build(name, largest=320)
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - recorded
        return row | {"runs": False, "ok": False, "error": str(err)[:300]}
    randomise_batchnorm(model)
    row |= {"runs": True, "input": list(x.shape)}
    try:
        with torch.no_grad():
            f = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g, h = core.split(model)(x)
        error = relative_error(g, h, f)
        row |= {"relative_error": error, "ok": error <= TOLERANCE}
    except core.UnsupportedOperation as err:
        row |= {"ok": False, "refused": True, "error": f"UnsupportedOperation: {str(err)[:300]}"}
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - recorded
        row |= {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    row["seconds"] = time.perf_counter() - start
    return row


def summary(rows: list[dict]) -> str:
    """The coverage line and every model that did not split."""
    listed = [r for r in rows if r.get("relu_family")]
    big = [r for r in listed if r.get("skipped")]
    ran = [r for r in listed if r.get("runs")]
    refused = [r for r in ran if r.get("refused")]
    ok = [r for r in ran if r.get("ok")]
    worst = max((r["relative_error"] for r in ok), default=float("nan"))
    lines = [f"{len(rows)} timm models; {len(listed)} ReLU-family ({len(big)} over "
             f"{MAX_PARAMETERS / 1e6:.0f} M parameters, not built); {len(ran)} run on CPU at a "
             f"small input; {len(ok)} split within {TOLERANCE:g} (largest error {worst:.1e}), "
             f"{len(refused)} refused with UnsupportedOperation (a smooth function in the "
             f"forward), {len(ran) - len(ok) - len(refused)} other failures"]
    for r in ran:
        if not r.get("ok"):
            lines.append(f"  {r['model']:40s} {r.get('error')}")
    for r in listed:
        if r.get("runs") is None and not r.get("skipped"):
            lines.append(f"  {r['model']:40s} {r.get('error')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: sweep every timm model (resumable) or summarise a result file."""
    import timm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("relu_family_sweep.jsonl"))
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--summary", type=Path)
    parser.add_argument("--retry", action="store_true",
                        help="check again the ReLU-family models that did not split")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(last_rows(args.summary, "model")))
        return 0
    done = set()
    if args.out.exists():
        done = {r["model"] for r in last_rows(args.out, "model")
                if not (args.retry and r.get("relu_family") and not r.get("ok")
                        and not r.get("skipped"))}
    for name in timm.list_models():
        if name in done:
            continue
        meta = on_meta(name)
        if meta is None or not relu_family(meta):
            row = {"model": name, "relu_family": False if meta is not None else None}
        else:
            count = sum(p.numel() for p in meta.parameters())
            if count > MAX_PARAMETERS:
                row = {"model": name, "relu_family": True, "skipped": True,
                       "error": f"{count / 1e6:.0f} M parameters"}
            else:
                row = {"relu_family": True} | with_time_limit(args.timeout, {"model": name},
                                                              check, name)
        del meta
        gc.collect()
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if row.get("relu_family"):
            print(f"{name:40s} ok={row.get('ok')} {str(row.get('error', ''))[:120]}",
                  flush=True)
    print(summary(last_rows(args.out, "model")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
