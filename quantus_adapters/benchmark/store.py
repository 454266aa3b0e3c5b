"""Finished result cells on disk, keyed by a fingerprint of what produced them.

A *cell* is one result of the benchmark: a method configuration's scores of one metric on
one split (per image), a randomisation-check entry or a timing. Its key is the SHA-256 of a
canonical JSON description of everything the result depends on -- the model (architecture
and a hash of the weights), the images, masks and labels it was computed on, the method and
its options, the metric and its options, the seed and the library versions (see
:func:`fingerprint` and :meth:`ResultStore.fingerprint`). ``--resume`` reuses a stored cell
only when its key matches exactly; every other cell is computed again and added beside the
old ones, which are never deleted.

On disk the store is one append-only JSON-lines file, ``<folder>/cells.jsonl``; each line
is ``{"key": ..., "record": {...}}``. Every :meth:`ResultStore.put` appends one complete
line with a single ``write`` under an exclusive ``fcntl`` lock on ``<folder>/cells.lock``,
so that several processes (two runs on the same ``--out``, or workers of a distributed run)
can share one folder: their cells never mix (different setups have different keys) and a
line is never interleaved with another. A line cut short by a killed process (``kill -9``)
is skipped when reading, and the next writer starts on a fresh line.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["ResultStore", "StoreError", "fingerprint", "canonical_json"]

CELLS_FILE = "cells.jsonl"
LOCK_FILE = "cells.lock"


class StoreError(ValueError):
    """The result folder cannot be used (not a folder, not writable)."""


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no whitespace (tuples become lists)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str,
                      allow_nan=True)


def fingerprint(parts: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of ``parts``: the key of one cell."""
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


class ResultStore:
    """Append-only store of result cells in ``folder``, safe across processes.

    Parameters
    ----------
    folder: path-like
        The result folder (created when missing).

    Raises
    ------
    StoreError
        ``folder`` is a file, or it cannot be created or written.

    Examples
    --------
    >>> store = ResultStore(tmp)                                  # doctest: +SKIP
    >>> key = store.fingerprint({"metric": "PF@20", "seed": 0})   # doctest: +SKIP
    >>> store.put(key, {"scores": [1.0, 2.0]})                    # doctest: +SKIP
    >>> store.get(key)["scores"]                                  # doctest: +SKIP
    [1.0, 2.0]
    """

    fingerprint = staticmethod(fingerprint)

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise StoreError(f"--out {str(self.folder)!r} is a file, not a folder; give a "
                             "folder for the results")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / LOCK_FILE, "a"):
                pass
            if not os.access(self.folder, os.W_OK):
                raise PermissionError("not writable")
        except OSError as exc:
            raise StoreError(f"--out {str(self.folder)!r} cannot be written "
                             f"({exc.strerror or exc}); choose a writable folder") from None
        self.path = self.folder / CELLS_FILE
        self._cells: dict[str, dict] = {}
        self._offset = 0  # bytes of cells.jsonl already read

    # ------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self, shared: bool = False) -> Iterator[None]:
        """Hold the folder's lock (exclusive by default) for the ``with`` block.

        Writers of files that must come from one run together (the report) hold it too.
        """
        with open(self.folder / LOCK_FILE, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reading
    def load(self) -> dict[str, dict]:
        """Read the cells written since the last call (by any process); returns all cells.

        Incomplete or unreadable lines (a process killed mid-write) are skipped; a later
        record of the same key replaces an earlier one.
        """
        if not self.path.is_file():
            return self._cells
        with self.lock(shared=True), open(self.path, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return self._cells
        for line in chunk[:end].split(b"\n"):
            try:
                row = json.loads(line)
                key, record = row["key"], row["record"]
            except (ValueError, KeyError, TypeError):
                continue  # a cut line, or a line of another format
            if isinstance(key, str) and isinstance(record, dict):
                self._cells[key] = record
        self._offset += end + 1
        return self._cells

    def get(self, key: str) -> dict | None:
        """The stored record of ``key`` (reading new lines first), or None."""
        if key not in self._cells:
            self.load()
        return self._cells.get(key)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return len(self.load())

    # ------------------------------------------------------------------ writing
    def put(self, key: str, record: dict) -> None:
        """Append ``record`` (a JSON-serialisable dict) under ``key``, atomically.

        The line is written with one ``write`` call under the exclusive lock; when the file
        ends in a cut line (a writer was killed), a newline goes first.
        """
        if not isinstance(record, dict):
            raise TypeError(f"a record is a dict, not {type(record).__name__}")
        line = (canonical_json({"key": key, "record": record}) + "\n").encode()
        with self.lock():
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size:
                    with open(self.path, "rb") as fh:
                        fh.seek(size - 1)
                        if fh.read(1) != b"\n":
                            line = b"\n" + line
                os.write(fd, line)
            finally:
                os.close(fd)
        self._cells[key] = json.loads(canonical_json(record))
