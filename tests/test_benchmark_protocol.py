"""Benchmark protocol: Pixel Flipping against Quantus, AUCs, ranks, layers, method specs."""

import numpy as np
import pytest
import torch
from torch import nn

import quantus_adapters  # noqa: F401  (NumPy 2 shim before Quantus)
from quantus_adapters.benchmark import protocol
from quantus_adapters.benchmark.zoo.models import DigitsVGG


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 3)).eval()


def test_features_in_step_scales_112_pixels_at_224():
    assert protocol.features_in_step((3, 224, 224)) == 336  # 112 pixels x 3 channels
    assert protocol.features_in_step((1, 224, 224)) == 112
    step = protocol.features_in_step((1, 64, 64))
    assert 4096 % step == 0 and step in (8,)  # 9.1 rounded to a divisor of 4096
    assert 3072 % protocol.features_in_step((3, 32, 32)) == 0


def _tied_maps(rng, n, side=64, block=4):
    """Maps like upsampled CAMs after a ReLU: many exactly tied values (zeros, blocks)."""
    a = np.maximum(rng.normal(size=(n, 1, side // block, side // block)), 0)
    return np.repeat(np.repeat(a, block, 2), block, 3).astype(np.float32)


@pytest.fixture(scope="module")
def digits_case():
    torch.manual_seed(0)
    model = DigitsVGG().eval()
    with torch.no_grad():  # trained-like logit scale (tens), where ordering errors show
        model.classifier[-1].weight.mul_(400.0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (6, 1, 64, 64)).astype(np.float32)
    return model, x, np.arange(6) % 10, _tied_maps(rng, 6)


def test_pixel_flipping_equals_quantus_on_tied_maps(digits_case):
    """The curve equals ``quantus.PixelFlipping`` step by step (ties ordered alike)."""
    import quantus

    model, x, y, a = digits_case
    step = protocol.features_in_step(x.shape[1:])
    ours = protocol.pixel_flipping_curves(model, x, y, a, fraction=0.2, step=step)
    metric = quantus.PixelFlipping(features_in_step=step, perturb_baseline="mean",
                                   normalise=False, abs=False, disable_warnings=True)
    theirs = np.asarray(metric(model=model, x_batch=x, y_batch=y, a_batch=a, softmax=False,
                               device="cpu"))
    k = ours.shape[1] - 1
    assert k == int(np.ceil(0.2 * 64 * 64 / step))
    with torch.no_grad():
        clean = model(torch.from_numpy(x))[np.arange(6), y].numpy()
    assert np.abs(clean).max() > 5
    np.testing.assert_allclose(ours[:, 0], clean, rtol=1e-6)
    np.testing.assert_allclose(ours[:, 1:], theirs[:, :k], rtol=0, atol=1e-5)


def test_selectivity_equals_quantus_on_tied_maps(digits_case):
    import quantus

    model, x, y, a = digits_case
    ours = protocol.selectivity_curves(model, x, y, a, patch=8)
    metric = quantus.Selectivity(patch_size=8, normalise=False, abs=False,
                                 disable_warnings=True)
    theirs = np.asarray(metric(model=model, x_batch=x, y_batch=y, a_batch=a, device="cpu"))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    s = protocol.evaluate_metric("Selectivity", model, x, y, a, None, False,
                                 protocol.ProtocolSettings(selectivity_patch=8))
    auc = [quantus.helpers.utils.calculate_auc(np.asarray(c)) for c in theirs]
    np.testing.assert_allclose(s, auc, rtol=1e-6)


def test_localisation_is_quantus_on_usable_masks_and_nan_on_the_rest(digits_case):
    import quantus

    model, x, y, a = digits_case
    s = np.zeros((6, 1, 64, 64), np.float32)
    s[:, :, 10:30, 20:40] = 1
    s[1] = 0  # empty mask
    s[4] = 1  # all object
    settings = protocol.ProtocolSettings()
    ok = np.array([True, False, True, True, False, True])
    for name, cls in (("AttrLoc", quantus.AttributionLocalisation),
                      ("Pointing", quantus.PointingGame)):
        ours = protocol.evaluate_metric(name, model, x, y, a, s, False, settings)
        theirs = cls(abs=False, normalise=True, disable_warnings=True)(
            model=model, x_batch=x[ok], y_batch=y[ok], a_batch=a[ok], s_batch=s[ok],
            device="cpu")
        assert np.isnan(ours[~ok]).all()
        np.testing.assert_allclose(ours[ok], np.asarray(theirs, np.float64))


def test_pixel_flipping_auc_is_area_of_the_drop():
    # logit drops linearly by 1 per step; 10 steps of 10 features out of 100 = 100 %
    curves = np.array([[5.0 - k for k in range(11)]])
    auc20 = protocol.pixel_flipping_auc(curves, 0.20, total=100, step=10)
    auc5 = protocol.pixel_flipping_auc(curves, 0.05, total=100, step=10)
    # drop(x) = 10 x on [0, 0.2]: area 0.2; the 5 % point lies inside the first step
    assert auc20 == pytest.approx(0.2)
    assert auc5 == pytest.approx(0.5 * 0.05 * 1.0)


def test_ranks_and_selection_prefer_better_values():
    values = {
        ("a", False): {"AttrLoc": 0.5, "Pointing": 0.9, "PF@5": 0.1, "PF@20": 1.0},
        ("b", False): {"AttrLoc": 0.7, "Pointing": 0.95, "PF@5": 0.05, "PF@20": 0.2},
        ("b", True): {"AttrLoc": 0.6, "Pointing": float("nan"), "PF@5": 0.3, "PF@20": 2.0},
    }
    assert protocol.select_configs(values, protocol.LOCALISATION) == ("b", False)
    assert protocol.select_configs(values, protocol.PIXEL_FLIPPING) == ("b", True)
    ranks = protocol.average_ranks(values, ["PF@5"])
    assert ranks[("b", True)] == 1 and ranks[("b", False)] == 3


def test_candidate_layers_and_layer_check():
    model = DigitsVGG()
    layers = protocol.candidate_layers(model, 5)
    assert layers == ["features.2", "features.6", "features.10", "features.14"]
    assert protocol.candidate_layers(model, 2) == ["features.2", "features.14"]
    assert protocol.check_layers(model, ["features.6", "input"]) == ["features.6", "input"]
    with pytest.raises(ValueError, match="'features.99' is not a module"):
        protocol.check_layers(model, ["features.99"])


def test_configs_cover_layers_variants_and_input():
    specs = {s.method: s for s in protocol.default_methods(0.3, image_size=64)}
    cam = protocol.configs_for(specs["SplitCAM"], ["features.2", "features.6"])
    assert [(c.layer, c.options["sign"]) for c in cam] == [
        ("features.2", None), ("features.2", "+"), ("features.6", None), ("features.6", "+")]
    assert all(c.options["alpha"] == 0.3 for c in cam)
    grad = protocol.configs_for(specs["SplitGrad"], ["features.2"])
    assert grad[0].layer == "input" and grad[0].options["layer"] is None
    sal = protocol.configs_for(specs["Saliency"], ["features.2"])
    assert len(sal) == 1 and "layer" not in sal[0].options
    assert cam[0].key() != cam[1].key() and cam[0].with_options(alpha=0.5).key() != cam[0].key()
    mask = protocol.resolve_options(specs["FeatureAblation"].options, torch.zeros(2, 1, 64, 64))
    assert mask["feature_mask"].shape == (2, 1, 64, 64)
    assert int(mask["feature_mask"].max()) + 1 == 8 * 8


def test_selectivity_matches_quantus():
    import quantus

    model = _tiny_model()
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (2, 1, 8, 8)).astype(np.float32)
    y = np.array([2, 0])
    a = rng.normal(size=(2, 1, 8, 8)).astype(np.float32)
    ours = protocol.selectivity_curves(model, x, y, a, patch=2, chunk=7)
    metric = quantus.Selectivity(patch_size=2, normalise=False, disable_warnings=True)
    theirs = np.asarray(metric(model=model, x_batch=x, y_batch=y, a_batch=a, device="cpu"))
    assert ours.shape == theirs.shape == (2, 16)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert protocol.selectivity_patch((1, 64, 64)) == 8
    assert protocol.selectivity_patch((3, 224, 224)) == 28
    assert protocol.selectivity_patch((3, 30, 30)) == 3
