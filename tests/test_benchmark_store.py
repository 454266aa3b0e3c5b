"""The result store: fingerprinted cells, atomic appends, several processes on one folder."""

import json
import multiprocessing
import os

import pytest

from quantus_adapters.benchmark.store import ResultStore, StoreError, fingerprint


def test_cells_round_trip_between_instances(tmp_path):
    a = ResultStore(tmp_path / "out")
    key = a.fingerprint({"metric": "PF@20", "seed": 0})
    assert key == fingerprint({"seed": 0, "metric": "PF@20"})  # key order does not matter
    assert key != fingerprint({"metric": "PF@20", "seed": 1})
    assert a.get(key) is None
    a.put(key, {"scores": [1.0, float("nan")], "mean": 1.0})
    b = ResultStore(tmp_path / "out")
    assert b.get(key)["scores"][0] == 1.0 and b.get(key)["mean"] == 1.0
    b.put("other", {"x": 1})
    assert a.get("other") == {"x": 1}  # a sees b's later cell
    assert len(a) == 2


def test_a_cut_line_is_skipped_and_the_next_cell_starts_a_new_line(tmp_path):
    store = ResultStore(tmp_path)
    store.put("k1", {"v": 1})
    with open(store.path, "ab") as fh:  # a writer killed mid-line
        fh.write(b'{"key":"k2","record":{"v"')
    assert ResultStore(tmp_path).get("k2") is None
    store.put("k3", {"v": 3})
    fresh = ResultStore(tmp_path)
    assert fresh.get("k1") == {"v": 1} and fresh.get("k3") == {"v": 3}
    assert fresh.get("k2") is None
    assert store.path.read_bytes().endswith(b"\n")


def test_out_that_is_a_file_or_not_creatable_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        ResultStore(f)
    with pytest.raises(StoreError, match="cannot be written"):
        ResultStore(f / "sub")


def _writer(folder, tag, n):
    store = ResultStore(folder)
    payload = "x" * 20_000  # long lines: interleaved writes would show
    for i in range(n):
        store.put(f"{tag}-{i}", {"tag": tag, "i": i, "payload": payload})


def test_two_processes_append_to_one_store_without_mixing(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(tmp_path, tag, 150)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = (tmp_path / "cells.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    rows = [json.loads(line) for line in lines[:-1]]  # every line is complete JSON
    assert len(rows) == 300
    cells = ResultStore(tmp_path).load()
    for tag in ("a", "b"):
        for i in range(150):
            rec = cells[f"{tag}-{i}"]
            assert rec["tag"] == tag and rec["i"] == i and len(rec["payload"]) == 20_000
    assert os.path.isfile(tmp_path / "cells.lock")
