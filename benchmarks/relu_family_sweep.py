"""Does every ReLU-family model in timm split exactly? Every model, not one per family.

A model is *ReLU-family* when every activation module is a ReLU, ReLU6, LeakyReLU or
Hardtanh and every normalisation module a BatchNorm (:func:`relu_family`; no GELU, SiLU,
sigmoid gates, LayerNorm, GroupNorm, ...). Every name of ``timm.list_models()`` is built on
the meta device (no memory, no initialisation; :func:`filter_on_meta` stops a build as soon
as a module outside the family joins the model). Each ReLU-family model is then checked by
:func:`check`: the meta build gets CPU storage and random weights (:func:`materialise`), it
runs on the smallest of 64x64, 96x96, 160x160, 224x224 and its native size that it accepts,
and it is split with the default ``nonlinear="error"``. It passes when
``max |g - h - f| <= 1e-5 * max(|g|, |h|, |f|)`` (float32; ``relative_error``) and g - h
still carries f: ``max |g - h - f| <= 1e-3 * max |f|`` (``output_error``; a stream
magnitude of 1e37 against an output of 0.3 meets the first bound and loses f entirely). A
model whose forward calls a smooth *function* (``F.softmax`` in an attention block:
invisible to the module filter) is refused with ``UnsupportedOperation`` naming that
function, the split's correct answer (``refused`` and ``operation`` in its row). StarNet
(:data:`SWAMPED`) multiplies two branches in every block, and the split of a product
multiplies the stream magnitudes: with random weights its streams reach 1e19-1e71 at 64x64,
so g - h loses f (``swamped``) or float32 overflows (``SplitOverflowError``); both are
recorded as the known limitation they are.

Resumable (one JSON line per model), one torch thread, a time limit per model::

    nice python -m benchmarks.relu_family_sweep --out relu_sweep.jsonl
    python -m benchmarks.relu_family_sweep --out relu_sweep.jsonl --retry   # failed ones again
    python -m benchmarks.relu_family_sweep --summary relu_sweep.jsonl

A model's last line counts.

The CI test ``tests/test_core_timm.py`` runs the same filter and :func:`check` on every model
of ``timm.list_models()``; this script writes the per-model rows (error, input size, time).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import sys
import time
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from benchmarks.beyond_relu_sweep import (
    TOLERANCE,
    Timeout,
    forward_row,
    last_rows,
    with_time_limit,
)

#: models whose product blocks make the stream magnitude swamp the output (see above)
SWAMPED = ("starnet_",)
SIZES = (64, 96, 160, 224)  # tried in this order, then the model's native size
ALLOWED_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SMOOTH_NAMES = ("gelu", "silu", "swish", "sigmoid", "mish", "tanh", "softmax", "elu",
                 "softplus", "hardswish", "hardsigmoid", "gate", "glu", "prelu", "starrelu",
                 "layernorm", "groupnorm", "rmsnorm", "evonorm", "instancenorm", "attention")
#: smooth functions a ReLU-family model may call outside any module; the split must refuse
#: them by name (``UnsupportedOperation``)
SMOOTH_FUNCTIONS = frozenset({"softmax", "log_softmax", "sigmoid", "tanh", "exp", "sqrt",
                              "rsqrt", "gelu", "silu", "layer_norm", "group_norm"})
_REFUSED = re.compile(r"graph node '\w+' \(call_\w+ (\w+)\) is not piecewise linear")


def allowed(module: nn.Module) -> bool:
    """``module`` itself (not its children) is a ReLU-type activation, a BatchNorm, or
    neither an activation nor a normalisation."""
    cls = type(module)
    if isinstance(module, ALLOWED_ACTIVATIONS):
        return True
    if cls.__module__ == "torch.nn.modules.activation":
        return False  # any other torch activation (GELU, SiLU, Softmax, ...)
    if isinstance(module, nn.modules.batchnorm._NormBase) and not isinstance(module, BATCHNORMS):
        return False  # InstanceNorm
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)):
        return False
    return not any(s in cls.__name__.lower() for s in _SMOOTH_NAMES)


def relu_family(model: nn.Module) -> bool:
    """Every activation module is ReLU-type and every normalisation module a BatchNorm."""
    return all(allowed(m) for m in model.modules())


class _LeavesFamily(Exception):
    """A module outside the ReLU family joined the model under construction."""


def _model_under_construction() -> nn.Module | None:
    """The outermost module whose ``__init__`` is running (the model timm builds)."""
    outermost = None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__init__":
            obj = frame.f_locals.get("self")
            if isinstance(obj, nn.Module):
                outermost = obj
        frame = frame.f_back
    return outermost


def filter_on_meta(name: str, stop_early: bool = True) -> tuple[str, nn.Module | None]:
    """Build ``name`` on the meta device and classify it.

    Returns ``("relu-family", model)``, ``("other", model or None)`` or
    ``("no meta build", None)``. With ``stop_early`` the build stops (``"other"``, None) as
    soon as a module outside the family, or a submodule that holds one, is assigned to the
    model itself: builders make throw-away probe modules (timm's EfficientNet builder makes
    a sigmoid-gated squeeze-excite to test its arguments), so only what joins the model
    counts. A completed build is always classified by :func:`relu_family` on the finished
    model, so stopping early can only say "other" sooner, never "relu-family" wrongly.
    """
    import timm

    holds: weakref.WeakSet = weakref.WeakSet()  # modules that are or hold a non-family module

    def registered(parent: nn.Module, attr: str, child: nn.Module | None) -> None:
        if child is not None and (child in holds or not allowed(child)):
            holds.add(parent)
            if parent is _model_under_construction():
                raise _LeavesFamily(f"{attr}: {type(child).__name__}")

    handle = (nn.modules.module.register_module_module_registration_hook(registered)
              if stop_early else None)
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False, num_classes=10)
    except _LeavesFamily:
        return "other", None
    except Exception:  # noqa: BLE001 - reported as a status
        return "no meta build", None
    finally:
        if handle is not None:
            handle.remove()
    return ("relu-family" if relu_family(model) else "other"), model


def _has_constants(model: nn.Module) -> bool:
    """Buffers other than BatchNorm statistics, or plain tensor attributes: values set in
    ``__init__`` (blur filters, position indices) that a meta build does not carry."""
    for m in model.modules():
        if any(isinstance(v, torch.Tensor) for v in vars(m).values()):
            return True
        if (not isinstance(m, nn.modules.batchnorm._NormBase)
                and next(m.buffers(recurse=False), None) is not None):
            return True
    return False


def random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random, in place: a matrix or kernel ``N(0, 1 / fan_in)`` (fan-in =
    elements per output row), a bias ``N(0, 0.1^2)``, any other vector (gains, layer
    scales) ``U(0.5, 1)``; BatchNorm statistics as :func:`tests.core_checks.randomise_batchnorm`.
    A fast stand-in for timm's initialisation: exactness does not depend on the weights."""
    from tests.core_checks import randomise_batchnorm

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(max(p[0].numel(), 1)), generator=gen)
            elif pname.rsplit(".", 1)[-1] == "bias":
                p.normal_(0.0, 0.1, generator=gen)
            else:
                p.uniform_(0.5, 1.0, generator=gen)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.num_batches_tracked is not None:
                m.num_batches_tracked.zero_()
    return randomise_batchnorm(model, seed)


def materialise(name: str, meta: nn.Module, seed: int = 0) -> nn.Module:
    """The CPU model in eval mode with random weights (:func:`random_weights`): the meta
    build given storage (``to_empty``), or, for a model with constants
    (:func:`_has_constants`), timm's own build."""
    if _has_constants(meta):
        import timm

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False, num_classes=10)
    else:
        model = meta.to_empty(device="cpu")
    return random_weights(model, seed).eval()


def _input(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest input of :data:`SIZES` and the native size the model runs on, and its
    output; raises with the last error when none works."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, *_, native = cfg.get("input_size", (3, 224, 224))
    gen = torch.Generator().manual_seed(1)
    last: Exception | None = None
    for size in dict.fromkeys((*SIZES, int(native))):
        x = torch.randn(1, channels, size, size, generator=gen)
        try:
            with torch.no_grad():
                f = model(x)
        except Exception as err:  # noqa: BLE001 - too small for the model: the next size
            last = err
            continue
        if isinstance(f, torch.Tensor) and f.dim() == 2:
            return x, f
        last = TypeError(f"output {type(f).__name__} is not a (batch, classes) tensor")
    raise RuntimeError(f"runs on none of the sizes {(*SIZES, native)}: "
                       f"{type(last).__name__}: {last}")


def check(name: str, meta: nn.Module, seed: int = 0) -> dict:
    """One ReLU-family model's row: ``ok`` (split within :data:`TOLERANCE`), ``refused``
    with the ``operation`` named by ``UnsupportedOperation``, or ``error``. Never raises
    except :class:`Timeout`."""
    import core

    start = time.perf_counter()
    row: dict = {"model": name, "parameters": sum(p.numel() for p in meta.parameters())}
    try:
        model = materialise(name, meta, seed)
        x, f = _input(model)
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - recorded
        return row | {"runs": False, "ok": False, "error": f"{type(err).__name__}: {err}"[:300],
                      "seconds": time.perf_counter() - start}
    row |= {"runs": True, "input": list(x.shape)}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            g, h = core.split(model)(x)
        row |= forward_row(g, h, f)
    except core.SplitOverflowError as err:
        row |= {"ok": False, "overflow": True, "error": f"SplitOverflowError: {str(err)[:300]}"}
    except core.UnsupportedOperation as err:
        found = _REFUSED.search(str(err))
        row |= {"ok": False, "refused": True, "operation": found and found.group(1),
                "error": f"UnsupportedOperation: {str(err)[:300]}"}
    except Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - recorded
        row |= {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    row["seconds"] = time.perf_counter() - start
    return row


def verdict(row: dict) -> str | None:
    """None when the row meets the contract, else what went wrong. The contract: split
    within :data:`TOLERANCE` with g - h carrying f (``ok``); or refused naming a smooth
    function of :data:`SMOOTH_FUNCTIONS`; or, for a :data:`SWAMPED` model, swamped or
    overflowing (its known limitation; one that splits cleanly must leave the list)."""
    swamped = row["model"].startswith(SWAMPED)
    if row.get("ok"):
        return "splits cleanly now: take it out of SWAMPED" if swamped else None
    if row.get("refused") and row.get("operation") in SMOOTH_FUNCTIONS:
        return None
    if swamped and (row.get("swamped") or row.get("overflow")):
        return None
    if row.get("swamped"):
        return (f"g - h misses f by {row['output_error']:.1e} of max |f| (within "
                f"{TOLERANCE:g} of the stream magnitude only) at {row['input']}")
    if "relative_error" in row:
        return f"relative error {row['relative_error']:.2e} > {TOLERANCE:g} at {row['input']}"
    return str(row.get("error"))


def summary(rows: list[dict]) -> str:
    """The coverage line and every model that did not meet the contract."""
    listed = [r for r in rows if r.get("relu_family")]
    unbuilt = [r for r in rows if r.get("relu_family") is None]
    ran = [r for r in listed if r.get("runs")]
    refused = [r for r in ran if r.get("refused") and verdict(r) is None]
    swamped = [r for r in ran if (r.get("swamped") or r.get("overflow")) and verdict(r) is None]
    ok = [r for r in ran if r.get("ok")]
    failed = [r for r in listed if verdict(r) is not None]
    worst = max((r["relative_error"] for r in ok), default=float("nan"))
    lines = [f"{len(rows)} timm models ({len(unbuilt)} not buildable on meta); "
             f"{len(listed)} ReLU-family; {len(ran)} run on CPU at a small input; {len(ok)} "
             f"split within {TOLERANCE:g} (largest error {worst:.1e}), {len(refused)} refused "
             f"with UnsupportedOperation naming a smooth function, {len(swamped)} swamped "
             f"by their stream magnitude or overflowing (StarNet), {len(failed)} failures"]
    for r in failed:
        lines.append(f"  {r['model']:40s} {verdict(r)}")
    for r in unbuilt:
        lines.append(f"  {r['model']:40s} cannot be built on the meta device")
    return "\n".join(lines)


def sweep_one(name: str, timeout: float | None = None) -> dict:
    """``name``'s row: filtered on meta, checked when ReLU-family."""
    status, meta = filter_on_meta(name)
    if status != "relu-family":
        return {"model": name, "relu_family": False if status == "other" else None}
    if timeout is None:
        row = check(name, meta)
    else:
        row = with_time_limit(timeout, {"model": name}, check, name, meta)
    return {"relu_family": True} | row


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
    torch.set_num_threads(1)
    done = set()
    if args.out.exists():
        done = {r["model"] for r in last_rows(args.out, "model")
                if not (args.retry and r.get("relu_family") and verdict(r) is not None)}
    for name in timm.list_models():
        if name in done:
            continue
        row = sweep_one(name, args.timeout)
        gc.collect()
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if row.get("relu_family"):
            print(f"{name:40s} ok={row.get('ok')} {row.get('seconds', 0):.1f} s "
                  f"{str(row.get('error', ''))[:120]}", flush=True)
    print(summary(last_rows(args.out, "model")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
