"""Ray for ``splitxai benchmark --ray`` and ``splitxai explain --ray``.

Ray (https://docs.ray.io) is optional (``pip install "splitxai[ray]"``) and imported only
when ``--ray`` is given. ``--ray`` alone starts a local Ray instance that uses every core of
this machine; ``--ray ADDRESS`` joins a running cluster (``auto``: the cluster this machine
belongs to, started with ``ray start``; ``ray://HEAD:10001``: Ray Client). When the calling
process has already connected to Ray (``ray.init`` in a notebook or a test), that connection
is used as it is and left open.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:  # the benchmark package imports this module
    from quantus_adapters.benchmark.zoo.spec import ModelSpec

__all__ = ["INSTALL_HINT", "ObjectStoreValue", "RayOptions", "RayPool", "RayUnavailableError",
           "RemoteModel", "WorkerSetupError", "add_ray_arguments", "error_line", "require_ray"]

INSTALL_HINT = 'pip install "splitxai[ray]"'
LOCAL = "local"


class RayUnavailableError(ImportError):
    """``--ray`` was given but Ray is not installed."""


class WorkerSetupError(RuntimeError):
    """A Ray worker cannot build its state (the model): every task would fail alike, so the
    run stops (the work finished before is kept)."""


def require_ray() -> ModuleType:
    """Import Ray, or raise with the install line.

    Raises
    ------
    RayUnavailableError
        Ray is missing.
    """
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(f"--ray needs Ray, which is not installed ({exc}); install "
                                  f"it with: {INSTALL_HINT}") from None
    return ray


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--ray [ADDRESS]``, ``--workers N`` and ``--gpus-per-worker F`` to ``parser``."""
    group = parser.add_argument_group("Ray (pip install \"splitxai[ray]\")")
    group.add_argument("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                       help="run on Ray: alone, a local Ray instance on all cores of this "
                            "machine; with ADDRESS, join a cluster ('auto' for the cluster "
                            "of this node, or ray://HEAD:10001)")
    group.add_argument("--workers", type=int, default=None,
                       help="Ray workers, each holding the model once (default: one per CPU "
                            "of the cluster, or one per GPU with --gpus-per-worker)")
    group.add_argument("--gpus-per-worker", type=float, default=0.0,
                       help="GPUs reserved by each Ray worker; fractions share a GPU "
                            "(e.g. 0.25: four workers per GPU); use with --device cuda")


@dataclass(frozen=True)
class RayOptions:
    """Placement of the Ray workers.

    Attributes
    ----------
    address: str
        ``"local"`` (a new local instance) or an address for ``ray.init``.
    workers: int or None
        Number of workers (actors); None: as many as the cluster's resources allow.
    gpus_per_worker: float
        GPUs per worker (0: CPU workers).
    """

    address: str = LOCAL
    workers: int | None = None
    gpus_per_worker: float = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: str) -> RayOptions | None:
        """The options of the parsed command line, or None without ``--ray``.

        Raises
        ------
        ValueError
            ``--workers``/``--gpus-per-worker`` without ``--ray``, out of range, or GPUs
            requested for a CPU run (or the other way round).
        """
        if args.ray is None:
            if args.workers is not None or args.gpus_per_worker:
                raise ValueError("--workers and --gpus-per-worker need --ray")
            return None
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        gpus = float(args.gpus_per_worker or 0.0)
        if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
            raise ValueError(f"--gpus-per-worker must be a fraction in (0, 1] or a whole "
                             f"number of GPUs, got {args.gpus_per_worker}")
        if gpus and not device.startswith("cuda"):
            raise ValueError("--gpus-per-worker reserves GPUs for the workers; add "
                             "--device cuda")
        if device.startswith("cuda") and not gpus:
            raise ValueError("--device cuda with --ray: give --gpus-per-worker (e.g. 1, or "
                             "0.5 for two workers per GPU) so that Ray places workers on GPUs")
        return cls(args.ray, args.workers, gpus)

    @contextmanager
    def session(self) -> Iterator[ModuleType]:
        """Connect to Ray for the duration of a ``with`` block; yields the ``ray`` module.

        ``"local"`` starts a Ray instance on this machine (its workers see this process's
        ``PYTHONPATH``) and shuts it down at the end; an address joins a running cluster
        (whose nodes have splitxai installed) and disconnects at the end. A connection the
        calling process already holds is used and left open.
        """
        ray = require_ray()
        started = False
        # ray.init replaces the SIGTERM handler of the main thread with its own (which exits
        # with status 15 and a crash report); the command's handler (exit 130, the
        # "interrupted" line) is put back
        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        if not ray.is_initialized():
            kwargs: dict = {"include_dashboard": False, "log_to_driver": False,
                            "logging_level": "ERROR"}
            if self.address == LOCAL:
                path = os.environ.get("PYTHONPATH")
                if path:
                    kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
                ray.init(**kwargs)
            else:
                try:
                    ray.init(address=self.address, **kwargs)
                except ConnectionError as exc:  # Ray's line names its own --address flag
                    raise ConnectionError(
                        f"--ray {self.address}: cannot join a Ray cluster ({exc}); start one "
                        "with 'ray start --head' on this machine, or give --ray alone for "
                        "a local Ray instance") from None
            started = True
            if sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
        try:
            yield ray
        finally:
            if started:
                ray.shutdown()

    def actors(self, ray: ModuleType) -> int:
        """How many workers to start: ``--workers``, else what the cluster can hold.

        Each worker reserves one CPU (and ``gpus_per_worker`` GPUs).

        Raises
        ------
        ValueError
            More workers than the cluster has CPUs (or GPUs) for.
        """
        res = ray.cluster_resources()
        cpus = int(res.get("CPU", 0))
        gpus = float(res.get("GPU", 0))
        if self.gpus_per_worker:
            fit = int(gpus / self.gpus_per_worker + 1e-9)
            if fit < 1:
                raise ValueError(f"--gpus-per-worker {self.gpus_per_worker:g}: the Ray "
                                 f"cluster has {gpus:g} GPUs")
        else:
            fit = cpus
        fit = min(fit, cpus)
        n = self.workers if self.workers is not None else max(1, fit)
        if n > fit:
            each = "1 CPU" + (f" and {self.gpus_per_worker:g} GPU" if self.gpus_per_worker
                              else "")
            raise ValueError(f"--workers {n}: the Ray cluster has room for {fit} (each worker "
                             f"takes {each}; cluster: {cpus} CPUs, {gpus:g} GPUs)")
        return n


@dataclass(frozen=True)
class ObjectStoreValue:
    """A value in Ray's object store, fetched when called (in a worker: once per actor)."""

    ref: Any

    def __call__(self) -> Any:
        import ray

        return ray.get(self.ref)


@dataclass(frozen=True)
class RemoteModel:
    """Builds the driver's model in a Ray worker.

    The worker builds the architecture named by the spec (``--model``; nothing downloaded
    or trained) and loads the driver's ``state_dict`` from the object store, so every
    worker holds exactly the driver's weights.

    Attributes
    ----------
    spec: ModelSpec
        ``--model`` / ``--weights``.
    state: ObjectStoreValue
        The driver's ``model.state_dict()``.
    """

    spec: ModelSpec
    state: ObjectStoreValue

    @classmethod
    def put(cls, ray: ModuleType, spec: ModelSpec, model: nn.Module) -> RemoteModel:
        """Put ``model``'s weights (on the CPU) into the object store."""
        state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        return cls(spec, ObjectStoreValue(ray.put(state)))

    def __call__(self) -> nn.Module:
        model = self.spec.architecture()
        model.load_state_dict(self.state())
        return model.eval()


def error_line(exc: BaseException) -> str:
    """``"Type: message"`` of an error, its first line, at most 300 characters: how a task
    that failed in a worker (or a cell, or a map) is reported."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def _run_task(state: Any, fn: Callable[[Any, Any], Any], task: Any) -> tuple[bool, Any]:
    """``(True, fn(state, task))``, or ``(False, "Type: message")`` when it raises."""
    try:
        return True, fn(state, task)
    except Exception as exc:  # the caller names the task; other tasks go on
        return False, error_line(exc)


def _cause(exc: BaseException) -> str:
    """The line of a Ray error that says what went wrong (its innermost error line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] and
              not line.startswith(("File ", "Traceback"))]
    return (errors[-1] if errors else lines[0] if lines else type(exc).__name__)[:300]


class _Worker:
    """A Ray actor: builds the state (model, data) on its first task, then runs tasks on it.

    The setup travels with each task (a small object-store value), not as a constructor
    argument, so a restarted actor builds the state again from it. A state that cannot be
    built is kept as its error line (Ray would restart the actor only to fail again), and
    every task returns ``(None, error)``.
    """

    def __init__(self, threads: int):
        import torch

        from splitxai.allocator import keep_freed_memory

        keep_freed_memory()  # the actor's process is ours (splitxai.allocator)
        torch.set_num_threads(threads)
        self.built = False
        self.state: Any = None
        self.setup_error: str | None = None

    def run(self, setup: Callable[[], Any], fn: Callable[[Any, Any], Any],
            task: Any) -> tuple[bool | None, Any]:
        if not self.built:
            self.built = True
            try:
                self.state = setup()
            except Exception as exc:
                self.setup_error = error_line(exc)
        if self.setup_error is not None:
            return None, self.setup_error
        return _run_task(self.state, fn, task)


class RayPool:
    """Runs ``fn(state, task)`` on Ray actors that each build the state once.

    Parameters
    ----------
    ray: module
        The connected ``ray`` module.
    setup: callable
        Picklable; called once in each worker (e.g. builds the model from the object store).
    workers: int
        Number of actors.
    gpus_per_worker: float
        GPUs reserved by each actor.
    retries: int
        How often Ray restarts a lost worker and re-runs its task (a task that raises is not
        retried: it would raise again).
    """

    def __init__(self, ray: ModuleType, setup: Callable[[], Any], workers: int,
                 gpus_per_worker: float = 0.0, retries: int = 2):
        self.ray = ray
        self.setup = ray.put(setup)  # its object-store values stay alive with the pool
        cls = ray.remote(num_cpus=1, num_gpus=gpus_per_worker or 0, max_restarts=retries,
                         max_task_retries=retries)(_Worker)
        self.actors = [cls.remote(1) for _ in range(workers)]

    def imap_unordered(self, fn: Callable[[Any, Any], Any],
                       tasks: Sequence[Any]) -> Iterator[tuple[Any, bool, Any]]:
        """``(task, ok, result or error message)`` for each task, as they finish.

        Each actor has at most two tasks in flight (one running, one queued). A task whose
        worker is lost for good (after ``retries`` restarts) is yielded with ``ok`` False
        and that worker gets no more tasks; when no worker is left, the remaining tasks are
        yielded as failed. Once no task is left to send, a worker that answered takes over
        the tasks queued on a worker that has not answered yet (one that never starts when
        the cluster has no room for it, e.g. a CPU held by another actor); the first result
        of a task is yielded.

        Raises
        ------
        WorkerSetupError
            A worker could not build its state (e.g. the model): the first such error ends
            the iteration (the workers are left to :meth:`close`).
        """
        ray = self.ray
        tasks = list(tasks)
        pending = list(range(len(tasks)))[::-1]
        running: dict[Any, tuple[Any, int]] = {}
        answered: set[int] = set()  # id() of the actors that returned a result
        taken: set[int] = set()  # tasks of such actors sent again to an actor that answered
        finished: set[int] = set()

        def submit(actor, i: int | None = None) -> None:
            if i is None and pending:
                i = pending.pop()
            if i is not None:
                running[actor.run.remote(self.setup, fn, tasks[i])] = (actor, i)

        for actor in self.actors:
            submit(actor)
            submit(actor)
        while running and len(finished) < len(tasks):
            done, _ = ray.wait(list(running), num_returns=1)
            actor, i = running.pop(done[0])
            try:
                ok, value = ray.get(done[0])
            except Exception as exc:  # the worker died and Ray's restarts did not help
                ok, value = False, f"worker lost ({type(exc).__name__}): {_cause(exc)}"
            else:
                if ok is None:
                    raise WorkerSetupError(f"a Ray worker cannot build the model: {value}")
                answered.add(id(actor))
                submit(actor)
                if not pending:  # take over a task queued on a worker that never started
                    # (the cluster has no room for it, e.g. a CPU held by another actor)
                    stuck = [j for a, j in running.values() if id(a) not in answered and
                             j not in taken and j not in finished]
                    if stuck:
                        taken.add(stuck[0])
                        submit(actor, stuck[0])
            if i in finished:  # the other copy of a task taken over came first
                continue
            finished.add(i)
            yield tasks[i], ok, value
        while pending:  # every worker is lost
            yield tasks[pending.pop()], False, "no Ray worker left (all were lost)"

    def close(self) -> None:
        """End the actors."""
        for actor in self.actors:
            self.ray.kill(actor)
