"""``splitxai benchmark --ray``: the benchmark's cell jobs on Ray workers.

The unit of work is :func:`~quantus_adapters.benchmark.cells.run_cells` on one
:class:`~quantus_adapters.benchmark.cells.CellJob` (one method configuration on one split:
its maps are computed once and shared by that configuration's metrics). :class:`RayJobs`
is the runner's ``map_jobs``: it sends each job to a pool of Ray actors, each holding the
model once (built from ``--model`` with the driver's weights from the object store), and
yields the results as they finish; the driver alone writes them to the result store. The
jobs travel without their model, and their images, labels and masks go to the object store
once per split. A job gives the same records in any process (``run_cells`` seeds every
random source), so the tables are the same as without Ray.

A job whose worker is lost is re-run by Ray on a restarted worker; a job that fails for good
(the worker was lost again, or it raised outside the per-cell error handling) is reported
in :attr:`RayJobs.failures`, naming its method configuration, and the command exits
non-zero after writing every other cell.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from torch import nn

from quantus_adapters.benchmark.cells import CellJob, CellResult
from quantus_adapters.cluster import ObjectStoreValue, RayPool, RemoteModel

__all__ = ["RayJobs", "describe_job"]


@dataclasses.dataclass(frozen=True)
class _WorkerModel:
    """A worker's state: the model, built once and moved to the device."""

    make_model: Callable[[], nn.Module]
    device: str

    def __call__(self) -> nn.Module:
        return self.make_model().to(self.device).eval()


def _run_job(model: nn.Module, task: tuple[Callable, CellJob]) -> CellResult:
    """In a worker: the job with the worker's model and its arrays from the object store."""
    fn, job = task
    arrays = {name: (value() if isinstance(value, ObjectStoreValue) else value)
              for name, value in (("x", job.x), ("y", job.y), ("masks", job.masks))}
    return fn(dataclasses.replace(job, model=model, **arrays))


def describe_job(job: CellJob) -> str:
    """The method configuration of a job and its images, for error messages."""
    kwargs = dict(job.explain_kwargs)
    method = kwargs.pop("method", "?")
    return (f"{method} {json.dumps(kwargs, sort_keys=True, default=str)} on "
            f"{len(job.y)} images")


class RayJobs:
    """The runner's ``map_jobs`` on Ray actors.

    Parameters
    ----------
    ray: module
        The connected ``ray`` module.
    model: RemoteModel
        Builds the driver's model in a worker.
    device: str
        Torch device of the workers' models (``--device``).
    workers: int
        Number of actors (each takes one CPU and ``gpus_per_worker`` GPUs).
    gpus_per_worker: float
        GPUs per actor.

    Attributes
    ----------
    failures: list of str
        Jobs that failed for good, each ``"<configuration>: <error>"``.
    """

    def __init__(self, ray: ModuleType, model: RemoteModel, device: str, workers: int,
                 gpus_per_worker: float = 0.0):
        self.ray = ray
        self.pool = RayPool(ray, _WorkerModel(model, device), workers, gpus_per_worker)
        self.failures: list[str] = []
        self._refs: dict[int, tuple[Any, ObjectStoreValue]] = {}

    def _shipped(self, value: np.ndarray | None) -> ObjectStoreValue | None:
        """``value`` in the object store (each array once)."""
        if value is None:
            return None
        if id(value) not in self._refs:  # keep the array alive so that its id stays unique
            self._refs[id(value)] = (value, ObjectStoreValue(self.ray.put(value)))
        return self._refs[id(value)][1]

    def __call__(self, fn: Callable[[CellJob], CellResult],
                 jobs: Sequence[CellJob]) -> Iterator[tuple[int, CellResult]]:
        """``(i, fn(jobs[i]))`` for every job, as the workers finish them."""
        tasks = []
        for i, job in enumerate(jobs):
            slim = dataclasses.replace(job, model=None, x=self._shipped(job.x),
                                       y=self._shipped(job.y), masks=self._shipped(job.masks))
            tasks.append((i, (fn, slim)))
        for (i, _), ok, value in self.pool.imap_unordered(_indexed, tasks):
            if ok:
                yield i, value
            else:
                self.failures.append(f"{describe_job(jobs[i])}: {value}")
                yield i, CellResult(errors={"Ray worker": value})

    def close(self) -> None:
        """End the workers."""
        self.pool.close()


def _indexed(model: nn.Module, task: tuple[int, tuple[Callable, CellJob]]) -> CellResult:
    return _run_job(model, task[1])
