"""``--resume`` and determinism: identical tables after interruptions, concurrent runs and
changed inputs; stored cells are never lost."""

import json
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

from quantus_adapters.benchmark import cli
from quantus_adapters.benchmark.store import ResultStore
from tests.benchmark_files import TABLES, TINY_MODEL_PY, write_masked_folder

MODEL_PY = TINY_MODEL_PY


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    (tmp / "tiny.py").write_text(MODEL_PY)
    root = write_masked_folder(tmp / "data", 8)
    argv = ["--data", f"folder:{root}", "--model", f"{tmp / 'tiny.py'}:build",
            "--methods", "Saliency", "GradientShap", "SplitGrad", "Random",
            "--max-layers", "1", "--alphas", "0.4", "0.5", "--max-sens-samples", "2",
            "--no-progress", "--threads", "1", "--no-figures"]
    # the reference: one uninterrupted run
    assert cli.main(argv + ["--out", str(tmp / "ref")]) == 0
    return tmp, argv, root


def _tables(out):
    return {name: (out / name).read_bytes() for name in TABLES}


def _run_in_child(argv, slow_after):
    if slow_after is not None:
        # after ``slow_after`` stored cells every store waits, so that a signal sent then
        # always lands in the middle of the run (on a fast machine the run could finish first)
        put = ResultStore.put

        def slow_put(self, key, record):
            put(self, key, record)
            if len(self) >= slow_after:
                time.sleep(0.5)

        ResultStore.put = slow_put
    os._exit(cli.main(argv))


def _child(argv, slow_after=None):
    return multiprocessing.get_context("fork").Process(target=_run_in_child,
                                                        args=(argv, slow_after))


def _cells(out):
    path = out / "cells.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def test_two_runs_with_one_seed_give_identical_tables(setup, capsys):
    tmp, argv, _ = setup
    argv = [a for a in argv if a != "--no-figures"]  # with figures once
    assert cli.main(argv + ["--out", str(tmp / "again")]) == 0
    assert _tables(tmp / "again") == _tables(tmp / "ref")  # Gradient SHAP included
    for name in ("table7_timing.md", "figure4_saliency.png", "figure7_layers.png",
                 "report.md", "run.json"):
        assert (tmp / "again" / name).is_file(), name
    # without --resume every cell is computed again (and appended; none is lost)
    n = _cells(tmp / "again")
    assert cli.main(argv + ["--out", str(tmp / "again")]) == 0
    assert _cells(tmp / "again") == 2 * n
    assert "Gradient SHAP" in (tmp / "ref" / "table1_comparison.md").read_text()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_to_identical_tables(setup, sig, capsys):
    tmp, argv, _ = setup
    out = tmp / f"killed{int(sig)}"
    child = _child(argv + ["--out", str(out)], slow_after=12)
    child.start()
    deadline = time.time() + 120
    while _cells(out) < 12 and time.time() < deadline and child.is_alive():
        time.sleep(0.05)
    assert child.is_alive(), "the run finished before it could be interrupted"
    os.kill(child.pid, sig)
    child.join(60)
    assert child.exitcode == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    stored = len(ResultStore(out))
    assert stored >= 12
    capsys.readouterr()
    assert cli.main(argv + ["--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    reused = int(printed.split("--resume: reused ")[1].split()[0])
    assert reused >= stored - 2  # all but the timing cells of the interrupted stage
    assert _tables(out) == _tables(tmp / "ref")


def test_concurrent_runs_on_one_out_neither_mix_nor_corrupt(setup, capsys):
    tmp, argv, _ = setup
    out = tmp / "shared"
    runs = [_child(argv + ["--out", str(out)]),
            _child(argv + ["--out", str(out), "--seed", "1"])]
    for p in runs:
        p.start()
    for p in runs:
        p.join(300)
        assert p.exitcode == 0
    for line in (out / "cells.jsonl").read_bytes().splitlines():
        json.loads(line)  # no line is cut or interleaved
    capsys.readouterr()
    assert cli.main(argv + ["--out", str(out), "--resume"]) == 0
    assert "computed 0" in capsys.readouterr().out  # seed 0's cells are all there, unmixed
    assert _tables(out) == _tables(tmp / "ref")
    assert cli.main(argv + ["--out", str(out), "--resume", "--seed", "1"]) == 0
    assert "computed 0" in capsys.readouterr().out
    assert _tables(out)["table1_comparison.csv"] != _tables(tmp / "ref")["table1_comparison.csv"]


def test_resume_recomputes_what_changed_and_keeps_every_stored_cell(setup, capsys, tmp_path):
    tmp, argv, root = setup
    import shutil

    data = tmp_path / "data"
    shutil.copytree(root, data)
    argv = [a if not a.startswith("folder:") else f"folder:{data}" for a in argv]
    i = argv.index("--methods")
    argv = argv[:i] + ["--methods", "Saliency", "Random", "--metrics", "Pointing", "PF@20",
                       "MaxSens"] + argv[i + 5:]
    out = tmp_path / "out"
    assert cli.main(argv + ["--out", str(out)]) == 0
    n0 = _cells(out)
    before = (out / "table1_comparison.csv").read_text()
    keys0 = set(ResultStore(out).load())

    # another option: new cells beside the old ones, none lost
    capsys.readouterr()
    assert cli.main(argv + ["--out", str(out), "--resume", "--max-sens-samples", "3"]) == 0
    assert "computed 0" not in capsys.readouterr().out
    assert keys0 <= set(ResultStore(out).load()) and _cells(out) > n0

    # a corrected label: the cells of its split are computed again
    labels = (data / "labels.csv").read_text().replace("im1.png,1", "im1.png,2")
    (data / "labels.csv").write_text(labels)
    capsys.readouterr()
    assert cli.main(argv + ["--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "computed 0" not in printed
    # a changed mask, likewise
    m = np.zeros((16, 16), np.uint8)
    m[0:4, 0:4] = 255
    Image.fromarray(m).save(data / "masks" / "im2.png")
    assert cli.main(argv + ["--out", str(out), "--resume"]) == 0
    assert "computed 0" not in capsys.readouterr().out
    # the original inputs again: everything is still stored
    (data / "labels.csv").write_text(labels.replace("im1.png,2", "im1.png,1"))
    shutil.copy(root / "masks" / "im2.png", data / "masks" / "im2.png")
    assert cli.main(argv + ["--out", str(out), "--resume"]) == 0
    assert "computed 0" in capsys.readouterr().out
    assert (out / "table1_comparison.csv").read_text() == before


SCALED_MODEL_PY = '''
import torch
from torch import nn

SCALE = 1.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features((x - 0.5) * SCALE))


def build():
    torch.manual_seed(0)
    return Net().eval()
'''


def test_resume_recomputes_after_the_model_code_changed(setup, capsys, tmp_path):
    """A module-level constant of the model's forward changed: the architecture's repr and
    the weights are the same, the code is not (the stored cells were reused: a table of
    the old model under the new one's name)."""
    _, argv, root = setup
    (tmp_path / "net.py").write_text(SCALED_MODEL_PY)
    argv = list(argv)
    argv[argv.index("--model") + 1] = f"{tmp_path / 'net.py'}:build"
    i = argv.index("--methods")
    argv = argv[:i] + ["--methods", "Saliency", "Random", "--metrics", "PF@20"] + argv[i + 5:]
    out = tmp_path / "out"
    assert cli.main(argv + ["--out", str(out)]) == 0
    before = (out / "table1_comparison.csv").read_text()
    (tmp_path / "net.py").write_text(SCALED_MODEL_PY.replace("SCALE = 1.0", "SCALE = 50.0"))
    capsys.readouterr()
    assert cli.main(argv + ["--out", str(out), "--resume"]) == 0
    assert "computed 0" not in capsys.readouterr().out
    assert (out / "table1_comparison.csv").read_text() != before
    (tmp_path / "net.py").write_text(SCALED_MODEL_PY)  # the first model's cells are kept
    assert cli.main(argv + ["--out", str(out), "--resume"]) == 0
    assert "computed 0" in capsys.readouterr().out
    assert (out / "table1_comparison.csv").read_text() == before
