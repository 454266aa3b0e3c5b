"""The core example runs offline, meets the invariants and writes its figure."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "split_resnet20.py"


def test_split_resnet20_example(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("split_resnet20", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(str(tmp_path), n_images=2) == 0
    out = capsys.readouterr().out
    error = float(out.split("max|g - h - f| / max|f| = ")[1].split()[0])
    assert error < 1e-5
    assert (tmp_path / "split_resnet20.png").stat().st_size > 1000
