"""Proof of generality (issue 11, point 2): timm's ReLU-family models split exactly.

A model is ReLU-family when every activation module is a ReLU, ReLU6, LeakyReLU or Hardtanh
and every normalisation module is a BatchNorm (no GELU, SiLU, sigmoid gates, LayerNorm,
GroupNorm, ...). The filter instantiates models on the meta device (no memory, no weight
initialisation) and inspects their module types.

Coverage: one model per timm architecture module (``timm.list_modules()``): the first
ReLU-family model among the module's eight shortest model names, random weights; plus the
models that failed before the eager capture (``vgg11``, ``nasnetalarge``, ``pnasnet5large``,
``resnetblur18``, ``densenetblur121d``). Scanning every one of timm's ~1300 models is too slow
for the test suite (a meta-device instantiation takes 0.05-5 s); an architecture module
without a ReLU-family model among its candidates is skipped with that reason. Inputs are
64x64 (or the model's minimum).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import core
from tests.core_checks import max_abs, randomise_batchnorm

timm = pytest.importorskip("timm")

ALLOWED_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SMOOTH_NAMES = ("gelu", "silu", "swish", "sigmoid", "mish", "tanh", "softmax", "elu",
                 "softplus", "hardswish", "hardsigmoid", "gate", "glu", "prelu", "star")
KNOWN = ["vgg11", "nasnetalarge", "pnasnet5large", "resnetblur18", "densenetblur121d"]
SLOW = {"nasnetalarge", "pnasnet5large", "densenetblur121d"}
CANDIDATES = 8


def relu_family(model: nn.Module) -> bool:
    """Every activation is ReLU-type and every normalisation a BatchNorm."""
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
        name = cls.__name__.lower()
        if any(s in name for s in _SMOOTH_NAMES) or ("norm" in name
                                                      and not isinstance(m, BATCHNORMS)):
            return False
    return True


def _meta(name: str) -> nn.Module | None:
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return timm.create_model(name, pretrained=False)
    except Exception:  # a model that cannot be built on meta is not a candidate
        return None


def _first_relu_model(family: str) -> tuple[str | None, int]:
    names = sorted(timm.list_models(module=family), key=lambda n: (len(n), n))[:CANDIDATES]
    for name in names:
        model = _meta(name)
        if model is not None and relu_family(model):
            return name, len(names)
    return None, len(names)


def _check(name: str) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False, num_classes=10)
    assert relu_family(model), f"{name} is not ReLU-family"
    model = randomise_batchnorm(model.eval(), 0)
    size = 64
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    minimum = cfg.get("min_input_size")
    if minimum:
        size = max(size, minimum[-1])
    if name in ("nasnetalarge", "pnasnet5large"):
        size = max(size, 96)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        f = model(x)
    g, h = core.split(model)(x)
    err = max_abs(g - h - f)
    assert err <= 1e-5 * max_abs(g), f"{name}: max |g - h - f| = {err:.3e}, max|g| = {max_abs(g):.3e}"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in KNOWN])
def test_models_that_tracing_could_not_follow_split_exactly(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("family", timm.list_modules())
def test_one_relu_family_model_per_timm_architecture_splits_exactly(family):
    name, tried = _first_relu_model(family)
    if name is None:
        pytest.skip(f"no ReLU-family model among the {tried} shortest names of {family}")
    _check(name)
