"""The Captum example runs offline and writes its figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: small tensors only lose time to thread contention under xdist."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "captum_example.py"


def test_captum_example_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("captum_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(str(tmp_path), n_images=2) == 0
    out = capsys.readouterr().out
    gap = float(out.split("max |SplitCAM - grad x act / 2| = ")[1].split()[0])
    assert gap < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image0.png", "image1.png"]
