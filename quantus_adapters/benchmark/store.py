"""Finished result cells on disk, so that ``--resume`` loses no finished work.

Each cell (a stage, a method configuration, the abs choice and a metric -- or a timing or
sanity-check entry) is one JSON line in ``<out>/cells.jsonl``, written as soon as it is
computed. The first line holds a fingerprint of the run's setup (model, data, protocol
settings); ``--resume`` reuses the cells only when the fingerprint matches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["CellStore"]


class CellStore:
    """Append-only store of result cells keyed by strings.

    Parameters
    ----------
    path: path-like
        The JSON-lines file.
    fingerprint: dict
        Describes the setup; cells of another setup are never reused.
    resume: bool
        Reuse the cells already in ``path`` (when the fingerprint matches); otherwise the
        file is started afresh.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict, resume: bool = False):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.cells: dict[str, Any] = {}
        self.reused = 0
        self.mismatch = False
        if resume and self.path.is_file():
            self._load()
        if not self.cells:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as fh:
                fh.write(json.dumps({"fingerprint": self.fingerprint}, sort_keys=True) + "\n")

    def _load(self) -> None:
        with open(self.path) as fh:
            lines = fh.read().splitlines()
        if not lines:
            return
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError:
            return
        if head.get("fingerprint") != self.fingerprint:
            self.mismatch = True
            return
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the interruption
                continue
            self.cells[row["key"]] = row["value"]
        self.reused = len(self.cells)
        if not self.cells:  # rewrite the header so that later appends stay valid
            return
        # drop a trailing partial line, if any, so that appends start on a new line
        with open(self.path, "w") as fh:
            fh.write(json.dumps({"fingerprint": self.fingerprint}, sort_keys=True) + "\n")
            for k, v in self.cells.items():
                fh.write(json.dumps({"key": k, "value": v}) + "\n")

    def __contains__(self, key: str) -> bool:
        return key in self.cells

    def get(self, key: str, default: Any = None) -> Any:
        """The stored value of ``key``, or ``default``."""
        return self.cells.get(key, default)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) and append it to the file at once."""
        self.cells[key] = value
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"key": key, "value": value}) + "\n")
            fh.flush()
