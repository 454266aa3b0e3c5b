"""``--ray`` on a 2-CPU local Ray instance (started once for the module)."""

import numpy as np
import pytest
import torch

from quantus_adapters import cli
from quantus_adapters.benchmark.zoo import models

ray = pytest.importorskip("ray", reason='the Ray tests need pip install "splitxai[ray]"')


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPUs for the module (``--ray`` joins it)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "digits.pt"
    torch.manual_seed(0)
    torch.save(models.DigitsVGG().state_dict(), path)
    return path


def test_explain_on_ray_writes_the_maps_of_a_local_run(local_ray, weights, tmp_path, capsys):
    common = ["explain", "--weights", str(weights), "--methods", "SplitCAM", "SplitLRP",
              "--layers", "features.10", "--max-images", "6", "--batch-size", "4",
              "--no-progress"]
    assert cli.main([*common, "--out", str(tmp_path / "local"), "--threads", "1"]) == 0
    rc = cli.main([*common, "--out", str(tmp_path / "ray"), "--ray", "--workers", "2"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "Ray: 2 worker(s)" in printed.out
    local = sorted((tmp_path / "local").rglob("*.npz"))
    assert len(local) == 2 * 6
    for f in local:  # the same batches on one thread each: identical maps
        other = tmp_path / "ray" / f.relative_to(tmp_path / "local")
        np.testing.assert_array_equal(np.load(f)["map"], np.load(other)["map"])
    assert ray.is_initialized()  # the caller's Ray connection is left open
