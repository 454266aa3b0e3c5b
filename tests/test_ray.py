"""``--ray`` on a 2-CPU local Ray instance (started once for the module): the same maps and
the same tables as without Ray; failed workers named, resume across Ray and local runs."""

import textwrap

import numpy as np
import pytest
import torch

from quantus_adapters import cli
from quantus_adapters.benchmark.zoo import models
from tests.benchmark_files import TABLES, TINY_MODEL_PY, write_masked_folder

ray = pytest.importorskip("ray", reason='the Ray tests need pip install "splitxai[ray]"')

MODEL_PY = "import os\n" + TINY_MODEL_PY + textwrap.dedent("""

    class DiesOnce(nn.Sequential):
        # kills the first worker process that runs it: a lost worker

        def forward(self, x):
            if os.getpid() != DRIVER and not os.path.exists(MARKER):
                open(MARKER, "w").close()
                os._exit(1)
            return super().forward(x)

    def build_dies_once():
        return DiesOnce(*build())

    class DiesAlways(nn.Sequential):
        # every worker process that runs it exits: a worker lost for good

        def forward(self, x):
            if os.getpid() != DRIVER:
                os._exit(1)
            return super().forward(x)

    def build_dies_always():
        return DiesAlways(*build())

    def build_in_driver_only():
        if os.getpid() != DRIVER:
            raise MemoryError("simulated: the worker cannot hold the model")
        return build()
""")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPUs for the module (``--ray`` joins it)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "digits.pt"
    torch.manual_seed(0)
    torch.save(models.DigitsVGG().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny model and folder, and the reference tables of ``--quick`` without Ray."""
    import os

    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "tiny.py").write_text(MODEL_PY + f"\nDRIVER = {os.getpid()}\n"
                                 f"MARKER = {str(tmp / 'died')!r}\n")
    root = write_masked_folder(tmp / "data", 6)
    # --quick, two layers, a Split method, a layer method, an input method and a random one
    argv = ["benchmark", "--quick", "--data", f"folder:{root}", "--methods", "SplitGrad",
            "LayerCAM", "Saliency", "GradientShap", "--max-sens-samples", "2",
            "--no-progress", "--threads", "1"]
    assert cli.main([*argv, "--model", f"{tmp / 'tiny.py'}:build", "--out",
                     str(tmp / "ref")]) == 0
    return tmp, argv


def _tables(out):
    return {name: (out / name).read_bytes() for name in TABLES}


def test_benchmark_on_ray_gives_identical_tables(local_ray, bench, capsys):
    tmp, argv = bench
    model = ["--model", f"{tmp / 'tiny.py'}:build"]
    rc = cli.main([*argv, *model, "--out", str(tmp / "ray"), "--ray", "--workers", "2"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "Ray: 2 worker(s)" in printed.out
    assert _tables(tmp / "ray") == _tables(tmp / "ref")
    assert ray.is_initialized()  # the caller's Ray connection is left open


def test_a_lost_worker_is_restarted_and_its_job_rerun(local_ray, bench, capsys):
    tmp, argv = bench
    rc = cli.main([*argv, "--model", f"{tmp / 'tiny.py'}:build_dies_once", "--out",
                   str(tmp / "lost"), "--ray", "--workers", "1"])
    printed = capsys.readouterr()
    assert (tmp / "died").exists()  # the worker process did exit mid-job
    assert rc == 0, printed.err
    assert _tables(tmp / "lost") == _tables(tmp / "ref")


def test_workers_lost_for_good_are_named_and_the_run_ends(local_ray, bench, capsys):
    """Every worker process dies: after Ray's two restarts the jobs fail, are named on
    stderr, and the command ends with status 1 (it does not wait forever)."""
    tmp, argv = bench
    rc = cli.main([*argv, "--model", f"{tmp / 'tiny.py'}:build_dies_always", "--out",
                   str(tmp / "dead"), "--ray", "--workers", "1"])
    printed = capsys.readouterr()
    assert rc == 1
    assert "failed on Ray: SplitGrad" in printed.err and "job(s) failed" in printed.err
    assert "worker lost" in printed.err


def test_a_worker_that_cannot_build_the_model_stops_the_run(local_ray, bench, capsys):
    tmp, argv = bench
    out = str(tmp / "failing")
    rc = cli.main([*argv, "--model", f"{tmp / 'tiny.py'}:build_in_driver_only", "--out", out,
                   "--ray", "--workers", "1"])
    printed = capsys.readouterr()
    assert rc == 1
    [line] = [x for x in printed.err.splitlines() if "MemoryError" in x]
    assert line.startswith("splitxai benchmark: error: a Ray worker cannot build the model: "
                           "ModelError: --model")
    assert "MemoryError: simulated" in line
    assert "--resume" in line and len(line) < 400
    assert "Traceback" not in printed.err
    # the cells finished before are stored; a local --resume computes the rest and gives
    # the tables of an uninterrupted run
    rc = cli.main([*argv, "--model", f"{tmp / 'tiny.py'}:build_in_driver_only", "--out", out,
                   "--resume"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert _tables(tmp / "failing") == _tables(tmp / "ref")


def test_explain_workers_lost_or_unbuildable_end_with_one_line(local_ray, bench, capsys):
    tmp, _ = bench
    common = ["explain", "--data", f"folder:{tmp / 'data'}", "--methods", "Saliency",
              "--batch-size", "2", "--no-progress", "--ray", "--workers", "1"]
    rc = cli.main([*common, "--model", f"{tmp / 'tiny.py'}:build_dies_always", "--out",
                   str(tmp / "explain-dead")])
    printed = capsys.readouterr()
    assert rc == 1
    assert "failed: Saliency on" in printed.err and "worker lost" in printed.err
    assert "6 map(s) missing" in printed.err
    rc = cli.main([*common, "--model", f"{tmp / 'tiny.py'}:build_in_driver_only", "--out",
                   str(tmp / "explain-unbuildable")])
    printed = capsys.readouterr()
    assert rc == 1
    errors = [x for x in printed.err.splitlines() if x.strip()]
    assert len(errors) == 1 and errors[0].startswith(
        "splitxai explain: error: a Ray worker cannot build the model: ModelError")
    assert "MemoryError: simulated" in errors[0]


def test_explain_on_ray_writes_the_maps_of_a_local_run(local_ray, weights, tmp_path, capsys):
    common = ["explain", "--weights", str(weights), "--methods", "SplitCAM", "SplitLRP",
              "GradientShap", "--layers", "features.10", "--max-images", "3",
              "--batch-size", "2", "--no-progress"]
    assert cli.main([*common, "--out", str(tmp_path / "local"), "--threads", "1"]) == 0
    rc = cli.main([*common, "--out", str(tmp_path / "ray"), "--ray", "--workers", "1"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "Ray: 1 worker(s)" in printed.out
    local = sorted((tmp_path / "local").rglob("*.npz"))
    assert len(local) == 3 * 3
    for f in local:  # the same batches and seeds on one thread each: identical maps
        other = tmp_path / "ray" / f.relative_to(tmp_path / "local")
        np.testing.assert_array_equal(np.load(f)["map"], np.load(other)["map"])


def test_workers_keep_freed_memory(local_ray):
    """Each Ray worker's process keeps freed memory for reuse, as the command's own
    process does (splitxai.allocator); the driver (this test process) is left alone."""
    import platform

    from quantus_adapters.cluster import RayPool
    from splitxai import allocator

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    pool = RayPool(local_ray, lambda: None, workers=1)
    [(_, ok, kept)] = list(pool.imap_unordered(
        lambda state, task: __import__("splitxai.allocator", fromlist=["kept"]).kept(), [0]))
    assert ok and kept is (glibc and not allocator.user_malloc_settings())
    assert not allocator.kept()


def test_the_commands_sigterm_handler_survives_ray_init(monkeypatch):
    """``ray.init`` installs its own SIGTERM handler (exit 15 and a crash report); the
    session puts the command's back, so SIGTERM still means "interrupted", exit 130."""
    import signal
    import sys
    import types

    from quantus_adapters import cluster

    fake = types.SimpleNamespace(initialized=False)
    fake.is_initialized = lambda: fake.initialized

    def init(**kwargs):
        fake.initialized = True
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(15))

    fake.init = init
    fake.shutdown = lambda: setattr(fake, "initialized", False)
    monkeypatch.setattr(cluster, "require_ray", lambda: fake)

    def ours(*args):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        with cluster.RayOptions().session():
            assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)
