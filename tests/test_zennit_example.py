"""The Zennit example script runs offline and writes its heatmaps."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "zennit_example.py"


def test_zennit_example_runs(tmp_path, capsys):
    namespace = runpy.run_path(str(EXAMPLE), run_name="zennit_example")
    assert namespace["main"](str(tmp_path), n_images=1) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["image0_comb.png", "image0_neg.png", "image0_pos.png"]
    out = capsys.readouterr().out
    assert "split_lrp agrees with the composite: True" in out
