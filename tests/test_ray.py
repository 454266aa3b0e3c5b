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


def test_failed_workers_are_named_and_a_local_resume_completes(local_ray, bench, capsys):
    tmp, argv = bench
    out = str(tmp / "failing")
    rc = cli.main([*argv, "--model", f"{tmp / 'tiny.py'}:build_in_driver_only", "--out", out,
                   "--ray", "--workers", "1"])
    printed = capsys.readouterr()
    assert rc == 1
    assert "failed on Ray: SplitGrad" in printed.err and "job(s) failed" in printed.err
    assert "MemoryError: simulated" in printed.err
    # the cells of the driver (randomisation check, timing) are stored; a local --resume
    # computes the rest and gives the tables of an uninterrupted run
    rc = cli.main([*argv, "--model", f"{tmp / 'tiny.py'}:build_in_driver_only", "--out", out,
                   "--resume"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "reused" in printed.out
    assert _tables(tmp / "failing") == _tables(tmp / "ref")


def test_explain_on_ray_writes_the_maps_of_a_local_run(local_ray, weights, tmp_path, capsys):
    common = ["explain", "--weights", str(weights), "--methods", "SplitCAM", "SplitLRP",
              "--layers", "features.10", "--max-images", "3", "--batch-size", "2",
              "--no-progress"]
    assert cli.main([*common, "--out", str(tmp_path / "local"), "--threads", "1"]) == 0
    rc = cli.main([*common, "--out", str(tmp_path / "ray"), "--ray", "--workers", "1"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "Ray: 1 worker(s)" in printed.out
    local = sorted((tmp_path / "local").rglob("*.npz"))
    assert len(local) == 2 * 3
    for f in local:  # the same batches on one thread each: identical maps
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
