"""Running ``splitxai explain`` in this process and reading its index, for the explain tests."""

from __future__ import annotations

import csv
from pathlib import Path

from quantus_adapters import cli


def run_explain(args, capsys) -> tuple:
    """``splitxai explain ARGS --no-progress``: the exit code and pytest's captured output."""
    rc = cli.main(["explain", *map(str, args), "--no-progress"])
    return rc, capsys.readouterr()


def read_index(out: Path) -> list[dict]:
    """The rows of ``OUT/index.csv``."""
    with open(out / "index.csv", newline="") as fh:
        return list(csv.DictReader(fh))
