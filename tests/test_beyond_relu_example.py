"""The beyond-ReLU example runs (ViT and ConvNeXt, random weights, 32x32) and its identities
hold."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "beyond_relu.py"


@pytest.mark.slow
def test_beyond_relu_example_runs(capsys):
    pytest.importorskip("timm")
    namespace = runpy.run_path(str(EXAMPLE), run_name="beyond_relu_example")
    results = namespace["main"](32)
    assert set(results) == {"vit_tiny_patch16_224", "convnext_atto"}
    for name, r in results.items():
        assert r["error"] <= 1e-5, name
        assert r["frozen"], name
        assert r["grad"].shape == (1, 3, 32, 32)
        assert (r["lrp"].pos.sum() + r["lrp"].neg.sum()) > 0.1, name  # relevance arrives
    out = capsys.readouterr().out
    assert out.count("== grad/2 of the frozen model: True") == 2
    assert out.count("== grad x act / 2: True") == 2
