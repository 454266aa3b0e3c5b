"""``splitxai benchmark --quick`` end to end on the built-in digits (the README's default)."""

import csv

import pytest
import torch

from quantus_adapters.benchmark import cli
from quantus_adapters.benchmark.zoo import models


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache holding the built-in CNN trained briefly (the full training takes a minute)."""
    path = tmp_path_factory.mktemp("cache")
    threads = torch.get_num_threads()
    model, acc = models.train_digits_cnn(epochs=2, progress=False, log=None)
    assert torch.get_num_threads() == threads  # training's single thread is restored
    assert acc > 0.2  # two short epochs already learn something (chance: 0.1)
    models.save_digits_cnn(model, acc, models.digits_cache_path(path))
    return path


def test_cached_model_is_loaded_without_training(cache, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(models, "train_digits_cnn", no_training)
    model = models.digits_cnn(cache_dir=cache, log=None)
    blob = torch.load(models.digits_cache_path(cache), weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, blob["state_dict"][k])
    assert not model.training


def test_quick_runs_end_to_end(cache, tmp_path, capsys):
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    rc = cli.main(["--quick", "--out", str(out), "--cache-dir", str(cache), "--no-progress"])
    assert torch.get_num_threads() == threads  # the digits' single thread is restored
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    rows = list(csv.DictReader(open(out / "table1_comparison.csv")))
    methods = {r["registry_name"] for r in rows}
    assert {"SplitCAM", "SplitGrad", "SplitLRP", "LayerCAM", "Saliency", "Random"} <= methods
    assert {r["group"] for r in rows} == {"split", "layer", "baseline"}
    # every metric of the protocol has a value for the Split methods, one best mark each
    for metric in ("Selectivity", "AttrLoc", "Pointing", "PF@5", "PF@20", "MaxSens"):
        split_vals = [float(r[metric]) for r in rows if r["group"] == "split"]
        assert any(v == v for v in split_vals), metric
        assert sum(int(r[f"best_{metric}"]) for r in rows) <= 1, metric
        assert all(int(r[f"{metric}_n"]) <= 5 for r in rows)
    for r in rows:  # localisation scores are ratios / hit rates
        assert 0.0 <= float(r["Pointing"]) <= 1.0
    alpha = list(csv.DictReader(open(out / "table3_alpha.csv")))
    assert alpha and set(alpha[0]) == {"method", "metric", "alpha=0.4"}
    sanity = list(csv.DictReader(open(out / "table6_randomisation.csv")))
    assert any(r["method"].startswith("SplitCAM") for r in sanity)
    assert all(-1.0 <= float(r["Spearman"]) <= 1.0 for r in sanity if r["Spearman"] != "nan")
    timing = list(csv.DictReader(open(out / "table7_timing.csv")))
    assert timing[0]["method"] == "Model splitting time"
    assert all(float(r["seconds_per_image"]) > 0 for r in timing)
    for fig in ("figure4_saliency.png", "figure7_layers.png"):
        assert (out / fig).stat().st_size > 10_000, fig
    report = (out / "report.md").read_text()
    assert "Table 1" in report and "digits CNN accuracy" in report
    assert "Wilcoxon signed-rank" in report and " ± " in printed.out
    assert "| SplitCAM" in printed.out
