"""End to end: every method through Quantus 0.6 metrics under NumPy 2 (shim applied)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import quantus_adapters

os.environ.setdefault("PYTEST", "1")  # Quantus: no progress bars
import quantus  # noqa: E402  (after the PYTEST variable, which Quantus reads)

METHODS = [
    "SplitCAM", "SplitGrad", "SplitLRP", "LayerCAM", "GradCAM", "GradCAMPlusPlus",
    "Saliency", "InputXGradient", "IntegratedGradients", "GradientShap", "GuidedBackprop",
    "Deconvolution", "DeepLift", "Occlusion", "FeatureAblation", "LRP", "Random",
]
STOCHASTIC = {"Random", "GradientShap"}
CLASSES, SIZE, SQUARE = 3, 16, 5
# cheaper settings for the costly methods (the defaults are tested in test_quantus_explain.py);
# they also check that method options travel through Quantus's explain_func_kwargs
OPTIONS = {
    "IntegratedGradients": {"n_steps": 8},
    "Occlusion": {"window": 4, "stride": 4},
    "FeatureAblation": {"feature_mask": torch.arange(64).reshape(8, 8).repeat_interleave(
        2, 0).repeat_interleave(2, 1).reshape(1, 1, SIZE, SIZE)},
}




def squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images with a square that is bright in the channel given by the label; its masks."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand((n, 3, SIZE, SIZE), generator=g)
    y = torch.arange(n) % CLASSES
    s = torch.zeros((n, 1, SIZE, SIZE))
    for i in range(n):
        top, left = torch.randint(0, SIZE - SQUARE + 1, (2,), generator=g).tolist()
        x[i, y[i], top:top + SQUARE, left:left + SQUARE] += 0.7
        s[i, :, top:top + SQUARE, left:left + SQUARE] = 1
    return x, y, s


def make_task():
    """A tiny CNN trained for a second to name the colour of the square; 4 test images."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, CLASSES),
    )
    x, y, _ = squares(64, seed=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-2)
    for _ in range(15):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    xt, yt, st = squares(4, seed=2)
    assert (model(xt).argmax(1) == yt).float().mean() >= 0.75  # the task was learnt
    return model, xt.numpy(), yt.numpy(), st.numpy()


@pytest.fixture(scope="module")
def task():
    return make_task()


def _finite(scores, n: int) -> np.ndarray:
    arr = np.asarray(scores, dtype=float)
    assert arr.shape[0] == n and np.isfinite(arr).all(), scores
    return arr


def test_all_issue_methods_are_offered():
    assert set(METHODS) <= set(quantus_adapters.available_methods())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # MPRT, NaN rows
def test_method_through_quantus(task, method):
    model, x, y, s = task
    n = len(x)
    common = {"model": model, "x_batch": x, "y_batch": y, "device": "cpu",
              "explain_func": quantus_adapters.explain,
              "explain_func_kwargs": {"method": method, **OPTIONS.get(method, {})}}
    quiet = {"disable_warnings": True, "display_progressbar": False}

    pg = _finite(quantus.PointingGame(**quiet)(s_batch=s, **common), n)
    assert set(pg.tolist()) <= {0.0, 1.0}
    al = _finite(quantus.AttributionLocalisation(**quiet)(s_batch=s, **common), n)
    assert ((al >= 0) & (al <= 1)).all()

    pf = quantus.PixelFlipping(features_in_step=32, return_auc_per_sample=True, **quiet)
    _finite(pf(**common), n)  # AUC per sample: np.trapz under NumPy 2.4
    sel = quantus.Selectivity(patch_size=4, **quiet)
    curves = sel(**common)
    assert len(curves) == n
    assert np.isfinite(sel.get_auc_score)  # np.trapz again

    ms = quantus.MaxSensitivity(nr_samples=2, lower_bound=0.1, **quiet)
    assert (_finite(ms(**common), n) >= 0).all()

    mprt = quantus.MPRT(layer_order="bottom_up", **quiet)
    per_layer = mprt(**common)
    assert list(per_layer) == ["original", "0", "3", "7"]  # both convolutions, the linear
    if method not in STOCHASTIC:  # the unchanged model explains the same way twice
        np.testing.assert_allclose(per_layer["original"], 1.0, atol=1e-6)
    for scores in per_layer.values():
        # a randomised model can give a row a constant map (Grad-CAM's ReLU), whose
        # correlation is NaN; the rest must be valid correlations
        scores = np.asarray(scores, dtype=float)
        assert scores.shape == (n,) and np.isfinite(scores).any()
        assert (np.abs(scores[np.isfinite(scores)]) <= 1 + 1e-6).all()

    rl = quantus.RandomLogit(num_classes=CLASSES, seed=0, **quiet)
    _finite(rl(**common), n)

    # quantus.evaluate passes the method name itself (as `method`)
    results = quantus.evaluate(
        metrics={"PointingGame": quantus.PointingGame(**quiet),
                 "PixelFlipping": quantus.PixelFlipping(features_in_step=64,
                                                        return_auc_per_sample=True, **quiet)},
        xai_methods={method: quantus_adapters.explain},
        model=model, x_batch=x, y_batch=y, s_batch=s, explain_func_kwargs=OPTIONS.get(method, {}),
        call_kwargs={"set_1": {"device": "cpu"}},
    )
    assert set(results) == {method}
    if method in STOCHASTIC:
        assert set(np.asarray(results[method]["PointingGame"], float).tolist()) <= {0.0, 1.0}
    else:  # the same maps as the metric's own explain call
        np.testing.assert_array_equal(results[method]["PointingGame"], pg)
    _finite(results[method]["PixelFlipping"], n)


def test_split_cam_localises_better_than_random(task):
    """A check that the metrics see the maps: on the squares task the Split map is useful."""
    model, x, y, s = task
    scores = {}
    for method in ("SplitCAM", "Random"):
        scores[method] = np.mean(quantus.AttributionLocalisation(disable_warnings=True)(
            model=model, x_batch=x, y_batch=y, s_batch=s, device="cpu",
            explain_func=quantus_adapters.explain,
            explain_func_kwargs={"method": method, **({"seed": 0} if method == "Random" else {})},
        ))
    assert scores["SplitCAM"] > scores["Random"]


def test_example_script_runs():
    """examples/quantus_example.py on the bundled ResNet-20 (two images, two methods)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "quantus_example.py"
    spec = importlib.util.spec_from_file_location("quantus_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(n_images=2, methods={"SplitCAM": {"layer": "layer2"}, "Random": {}})
    assert set(results) == {"SplitCAM", "Random"}
    for scores in results.values():
        assert set(scores) == {"PixelFlipping AUC", "Selectivity AUC", "MaxSensitivity",
                               "RandomLogit"}
        assert all(np.isfinite(v) for v in scores.values())
