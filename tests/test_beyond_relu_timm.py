"""timm families beyond ReLU split with ``nonlinear="freeze"`` (random weights, 32x32 input).

A representative subset of ``benchmarks/beyond_relu_sweep.py`` (which covers every family):
ConvNeXt (LayerNorm, GELU), EfficientNet (SiLU, sigmoid squeeze-excitation), ViT and Swin
(attention, LayerNorm, GELU), MobileNetV3 (Hardswish and a hard-sigmoid gate: exact
products, no freezing needed), RegNetY (sigmoid squeeze-excitation), PoolFormer (GroupNorm),
PVTv2 (spatial-reduction attention).
"""

from __future__ import annotations

import pytest
import torch

import core
from benchmarks.beyond_relu_sweep import TOLERANCE, build, family_of

pytest.importorskip("timm")

MODELS = ["convnext_atto", "efficientnet_b0", "vit_tiny_patch16_224",
          "swin_tiny_patch4_window7_224", "mobilenetv3_small_050", "regnety_002",
          "poolformer_s12", "pvt_v2_b0"]
EXACT = {"mobilenetv3_small_050"}  # piecewise linear and products only: split by default


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_timm_family_splits_with_freeze(name):
    model, x = build(name, size=32)
    if name in EXACT:
        sm = core.split(model)
        assert sm.frozen_operations() == []
    else:
        with pytest.warns(UserWarning, match="froze"):
            sm = core.split(model, nonlinear="freeze")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g, h = sm(x)
    with torch.no_grad():
        f = model(x)
    scale = max(g.abs().max(), h.abs().max(), f.abs().max())
    assert ((g - h - f).abs().max() / scale) <= TOLERANCE
    assert torch.equal(sm.forward_pairs(x).d, f)  # the model's own output, bit for bit
    try:
        probe = sm.sensitivities(x, 3, ["input"], alpha=0.4)["input"]
    except core.SplitOverflowError:
        # exact products of masses overflow float32 in MobileNetV3's chain of hard-sigmoid
        # gates; float64 holds them
        assert name == "mobilenetv3_small_050"
        sm64 = core.split(model.double())
        probe = sm64.sensitivities(x.double(), 3, ["input"], alpha=0.4)["input"]
        model.float()
    assert torch.isfinite(probe.S).all() and torch.isfinite(probe.Dg).all()
    assert probe.exact == (name in EXACT)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    if name not in EXACT:  # the default names the option
        fresh, _ = build(name, size=32)
        with pytest.raises(core.UnsupportedOperation, match="nonlinear='freeze'"):
            core.split(fresh)


def test_family_names():
    assert family_of("convnext_atto") == "convnext"
    assert family_of("tf_efficientnet_b0") == "tf"
    assert family_of("resnet50d") == "resnet"


@pytest.mark.slow
def test_overflow_on_a_frozen_attention_model_is_named():
    """EfficientViM's float32 S stream overflows at alpha 0.4: a SplitOverflowError that
    names where, even though some of its nodes' mass gets no gradient (hooks see None)."""
    model, x = build("efficientvim_m1", size=32)
    with pytest.warns(UserWarning, match="froze"):
        sm = core.split(model, nonlinear="freeze")
    with pytest.raises(core.SplitOverflowError, match="first at graph node"):
        sm.sensitivities(x, 0, ["input"], alpha=0.4)
    probe = sm.sensitivities(x, 0, ["input"], alpha="auto")["input"]  # auto stays finite
    assert torch.isfinite(probe.S).all() and torch.isfinite(probe.Dg).all()
