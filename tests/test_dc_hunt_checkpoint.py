"""``core.dc.train.save_checkpoint`` records what the model needs to be rebuilt exactly."""

from __future__ import annotations

import pytest
import torch

import core.dc.models as dc
from core.dc import train as dc_train


def test_checkpoint_keeps_the_positivity_transform_and_class_count(tmp_path):
    """Saved without config=, an ``exp`` / 3-class model reloads to the same outputs
    (the raw parameters were rebuilt under ReLU before: logits off by about 89)."""
    torch.manual_seed(0)
    model = dc.mlp_maxout("DM", positivity="exp", num_classes=3).eval()
    path = dc_train.save_checkpoint(model, tmp_path / "m.pt", "mlp_maxout")
    restored = dc_train.load_checkpoint(path)
    assert restored.g.positivity == "exp" and restored.g.layers.fc4.out_features == 3
    x = torch.rand(3, 784)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


def test_checkpoint_refuses_a_wrong_architecture_or_config(tmp_path):
    model = dc.mlp_maxout("Mon")
    with pytest.raises(ValueError, match="unknown architecture 'resnet'.*mlp_maxout"):
        dc_train.save_checkpoint(model, tmp_path / "a.pt", "resnet")
    with pytest.raises(TypeError, match="cnn_maxout.*MaxoutMLP"):
        dc_train.save_checkpoint(model, tmp_path / "b.pt", "cnn_maxout")
    with pytest.raises(ValueError, match="positivity='exp' given.*'relu'"):
        dc_train.save_checkpoint(model, tmp_path / "c.pt", "mlp_maxout", positivity="exp")
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_a_float64_checkpoint_reloads_in_float64(tmp_path):
    """It came back as float32 (loading a state dict casts into the new parameters)."""
    torch.manual_seed(0)
    model = dc.mlp_maxout("DMIN").double().eval()
    path = dc_train.save_checkpoint(model, tmp_path / "m64.pt", "mlp_maxout")
    restored = dc_train.load_checkpoint(path)
    assert all(p.dtype == torch.float64 for p in restored.parameters())
    x = torch.rand(2, 784, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
