"""Randomisation check (table 6): the copy is re-initialised, the user's model is not."""

import numpy as np
import torch

from quantus_adapters.benchmark import sanity
from quantus_adapters.benchmark.zoo.models import DigitsVGG


def test_randomised_copy_reinitialises_the_last_three_layers_only():
    torch.manual_seed(0)
    model = DigitsVGG().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone, names = sanity.randomised_copy(model, 3, seed=1)
    assert names == ["features.12", "classifier.1", "classifier.3"]
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])
    changed = {k for k, v in clone.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    assert not clone.training
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(clone(x), model(x))


def test_similarities_of_identical_and_unrelated_maps():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 1, 32, 32)).cumsum(-1).astype(np.float32)
    same = sanity.similarities(a, a.copy())
    for k in sanity.SIMILARITIES:
        np.testing.assert_allclose(same[k], 1.0, atol=1e-6)
    other = sanity.similarities(a, rng.normal(size=a.shape).astype(np.float32))
    assert abs(float(other["Spearman"].mean())) < 0.2
    assert float(other["SSIM"].mean()) < 0.5
    flipped = sanity.similarities(a, -a)
    np.testing.assert_allclose(flipped["Spearman"], -1.0, atol=1e-6)
