"""LayerCAM and Grad-CAM++ against ``pytorch-grad-cam`` (PyPI ``grad-cam``), the reference
implementation that CAM users compare with: same model (the bundled ResNet-20), same layer,
same target.

pytorch-grad-cam returns each map ReLU'd, min-max normalised per image
(``(m - min) / (max - min + 1e-7)``) and resized to the input; the layers used here have the
input's resolution (32 x 32), so no resizing is involved and the comparison is exact up to
that normalisation. Variant difference (documented in docs/captum.md): pytorch-grad-cam adds
``eps = 1e-6`` to Grad-CAM++'s denominator ``2 g^2 + sum(A) g^3``; ours has ``eps=0`` by
default (the published formula) and matches with ``GradCAMPlusPlus(..., eps=1e-6)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import core.zoo
from captum_split import GradCAMPlusPlus, LayerCAM

reference = pytest.importorskip(
    "pytorch_grad_cam",
    reason="pytorch-grad-cam is not installed (pip install grad-cam; the 'test' extra has it)",
)
targets_module = pytest.importorskip("pytorch_grad_cam.utils.model_targets")

PAIRS = [(LayerCAM, "LayerCAM"), (GradCAMPlusPlus, "GradCAMPlusPlus")]
OPTIONS = {"LayerCAM": {}, "GradCAMPlusPlus": {"eps": 1e-6}}


@pytest.fixture(scope="module")
def data():
    model = core.zoo.resnet20()
    images, labels = core.zoo.cifar10_samples()
    return model, core.zoo.normalize_cifar(images[:4]), labels[:4]


def _normalised(maps: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's per-image scaling of a (B, 1, H, W) map."""
    out = maps[:, 0].detach().numpy().astype(np.float32)
    out = out - out.min(axis=(1, 2), keepdims=True)
    return out / (1e-7 + out.max(axis=(1, 2), keepdims=True))


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=[p[1] for p in PAIRS])
@pytest.mark.parametrize("layer", ["layer1", "layer1.1"])
def test_matches_pytorch_grad_cam(data, ours, theirs, layer):
    model, x, y = data
    module = model.get_submodule(layer)
    mine = ours(model, module, **OPTIONS[theirs]).attribute(x, target=y)  # (B, 1, 32, 32)
    assert mine.shape == (4, 1, 32, 32)
    with getattr(reference, theirs)(model=model, target_layers=[module]) as cam:
        ref = cam(input_tensor=x.clone(),
                  targets=[targets_module.ClassifierOutputTarget(int(c)) for c in y])
    assert ref.shape == (4, 32, 32)
    np.testing.assert_allclose(_normalised(mine), ref, atol=2e-5)


def test_grad_cam_plus_plus_eps_is_the_only_difference(data):
    """Without pytorch-grad-cam's eps the maps differ measurably (the documented variant)."""
    model, x, y = data
    with reference.GradCAMPlusPlus(model=model, target_layers=[model.layer1]) as cam:
        ref = cam(input_tensor=x.clone(),
                  targets=[targets_module.ClassifierOutputTarget(int(c)) for c in y])
    published = GradCAMPlusPlus(model, model.layer1).attribute(x, target=y)
    assert np.abs(_normalised(published) - ref).max() > 1e-4


def test_a_different_target_gives_a_different_map(data):
    """The comparison above is not vacuous: the maps depend on the target."""
    model, x, y = data
    a = LayerCAM(model, model.layer1).attribute(x, target=y)
    b = LayerCAM(model, model.layer1).attribute(x, target=(y + 1) % 10)
    assert not np.allclose(_normalised(a), _normalised(b), atol=1e-3)
