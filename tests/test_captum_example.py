"""The Captum example runs offline and writes its figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
