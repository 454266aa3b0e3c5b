"""Hunted bugs of the ``--ray`` paths (``quantus_adapters.cluster``, ``splitxai explain --ray``)
on a 2-CPU local Ray instance, started once for the module."""

import signal

import pytest

ray = pytest.importorskip("ray", reason='the Ray tests need pip install "splitxai[ray]"')


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPUs for the module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _alarm(signum, frame):
    raise TimeoutError("the Ray pool did not finish")


def _square(state, task):
    return task * task


def test_a_worker_that_never_starts_does_not_hang_the_pool(local_ray):
    """The user's own actor holds one of the 2 CPUs: the pool's second worker can never be
    placed. Its queued tasks were waited for forever (a hang after the other worker had
    done the rest); the worker that runs takes them over."""
    from quantus_adapters.cluster import RayPool

    @local_ray.remote(num_cpus=1)
    class Busy:
        def ping(self) -> int:
            return 1

    busy = Busy.remote()
    local_ray.get(busy.ping.remote())
    pool = RayPool(local_ray, lambda: None, workers=2)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        got = sorted((task, ok, value) for task, ok, value in
                     pool.imap_unordered(_square, list(range(6))))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        pool.close()
        local_ray.kill(busy)
    assert got == [(i, True, i * i) for i in range(6)]


def test_an_out_left_without_maps_is_not_taken_for_one_holding_maps(tmp_path):
    """``--ray auto`` without a cluster (or any stop before the first map) left
    explain.json and an empty index.csv: the same command run again was refused with
    "already holds maps" although the folder held 0 maps."""
    from quantus_adapters.bulk import MapConfig, MapStore, StoreError

    MapStore(tmp_path / "out", {"model": "a"})  # the run stopped here (0 maps)
    store = MapStore(tmp_path / "out", {"model": "b"})  # another setup: nothing to mix with
    store.put(MapConfig("Saliency"), "im0.png", 1, [[0.5, 1.0]])
    with pytest.raises(StoreError, match="already holds maps"):
        MapStore(tmp_path / "out", {"model": "b"})


def test_ray_auto_without_a_cluster_names_the_option(monkeypatch):
    """``--ray auto`` with no running cluster printed Ray's own line, which tells the user
    to set an ``--address`` flag that splitxai does not have; the line names ``--ray auto``
    and how to start a cluster (exit 2)."""
    import types

    from quantus_adapters import cluster

    fake = types.SimpleNamespace(is_initialized=lambda: False)

    def init(**kwargs):
        raise ConnectionError("Could not find any running Ray instance. Please specify the "
                              "one to connect to by setting `--address` flag or "
                              "`RAY_ADDRESS` environment variable.")

    fake.init = init
    monkeypatch.setattr(cluster, "require_ray", lambda: fake)
    with pytest.raises(ConnectionError, match=r"^--ray auto: cannot join a Ray cluster .*"
                                              r"ray start --head"):
        with cluster.RayOptions("auto").session():
            pass
