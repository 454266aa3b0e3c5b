"""Small files for the benchmark's command-line tests: a tiny model factory and a masked folder."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

#: a model file for ``--model FILE.py:build``: a tiny 3-class CNN, the same weights every call
TINY_MODEL_PY = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(6, 3)).eval()
""")

#: the tables that must be identical between two runs of the same setup (table 7 is timing)
TABLES = ("table1_comparison.csv", "table1_comparison.md", "table3_alpha.csv",
          "table3_alpha.md", "table6_randomisation.csv", "table6_randomisation.md",
          "validation.csv")


def write_masked_folder(root: Path, n: int) -> Path:
    """A ``folder:`` data set of ``n`` random 16x16 RGB images with rectangle masks and
    labels ``i % 3``; returns ``root``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    lines = ["name,label"]
    for i in range(n):
        Image.fromarray((rng.uniform(0, 1, (16, 16, 3)) * 255).astype(np.uint8)).save(
            root / "images" / f"im{i}.png")
        m = np.zeros((16, 16), np.uint8)
        m[4:10, 3 + i % 4:9 + i % 4] = 255
        Image.fromarray(m).save(root / "masks" / f"im{i}.png")
        lines.append(f"im{i}.png,{i % 3}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root
