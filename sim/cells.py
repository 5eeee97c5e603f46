"""Run independent cells (sweep cells, the seeds of one scenario) one by one, in a local
process pool, or as Ray tasks, with the same outcomes in the same order whichever way.

Why one executor: a study is many runs that share nothing while they run, so they can go
anywhere; what must not change is what comes back. ``run_cells(fn, tasks)`` calls
``fn(task)`` for every task and returns one :class:`Outcome` per task, **in the order of
the tasks** (not of completion), so that whatever a caller writes from them is the same
bytes for ``jobs=1``, ``jobs=N`` and Ray. ``on_done`` sees each outcome as it completes
(progress bars, files written as cells finish).

A cell that raises is an outcome with ``error`` set (``"ExceptionType: message"``) and
its traceback in ``detail``; the other cells go on. A worker process that dies (killed,
out of memory) breaks a process pool for every cell then in flight: those cells are run
again, each alone in a fresh one-worker pool, so only the cell that kills its worker is
reported failed (``"worker process died"``). Ray retries a task whose worker died once.

Threads: torch's OpenMP pool, left at its default of one thread per core in every worker,
oversubscribes the machine ``jobs`` times over, and on a loaded box rounds then take 10x
longer. Workers therefore pin torch to ``threads`` (default: cores // jobs, at least 1;
one per Ray task) before the first task; a task may still set its own (a scenario's
``sim.threads``). The serial path runs in this process and leaves threads alone.

``fn`` and the tasks must be picklable (``fn`` a module-level function). Workers are not
forked from this process, which may have started torch's thread pools (a forked child
can then deadlock), but from a ``forkserver`` that has only imported torch and ``fn``'s
module (``spawn`` where there is no fork).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from p2pfl.errors import P2PFLError

__all__ = ["CellsError", "Outcome", "run_cells", "worker_threads"]

T = TypeVar("T")
R = TypeVar("R")

#: ``ray=`` value that starts a private local Ray instance (and shuts it down after)
RAY_LOCAL = "local"


class CellsError(P2PFLError, RuntimeError):
    """The executor cannot run at all (Ray missing or unreachable); the message says why."""


@dataclass(frozen=True)
class Outcome(Generic[R]):
    """What one task gave: its value, or the error that stopped it."""

    index: int  # position of the task in ``tasks``
    value: R | None = None
    error: str | None = None  # one line, None when the task succeeded
    detail: str = ""  # the traceback of ``error``
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def worker_threads(jobs: int) -> int:
    """Torch threads for each of ``jobs`` parallel workers: the cores shared out, at least 1."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def _pin_threads(threads: int) -> None:
    # Before torch is imported the environment sizes its OpenMP pool; after, the call does.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _call(fn: Callable[[T], R], task: T, index: int, threads: int | None) -> Outcome[R]:
    """Run one task where it lands, turning an exception into a failed outcome."""
    if threads is not None:
        _pin_threads(threads)
    started = time.perf_counter()
    try:
        value = fn(task)
    except Exception as error:  # a failed cell is an outcome, not the end of the study
        return Outcome(
            index,
            error=f"{type(error).__name__}: {error}".splitlines()[0][:500],
            detail=traceback.format_exc(),
            wall_s=time.perf_counter() - started,
        )
    return Outcome(index, value=value, wall_s=time.perf_counter() - started)


def _died(index: int, why: str) -> Outcome[Any]:
    return Outcome(index, error=f"worker process died: {why}", detail=why)


def run_cells(
    fn: Callable[[T], R],
    tasks: Sequence[T],
    *,
    jobs: int = 1,
    ray: str | None = None,
    threads: int | None = None,
    on_done: Callable[[Outcome[R]], None] | None = None,
) -> list[Outcome[R]]:
    """``fn(task)`` for every task: serially (``jobs=1``), in ``jobs`` processes, or on Ray.

    ``ray``: ``"local"`` starts a local Ray instance of ``jobs`` CPUs (every core when
    ``jobs`` is 1; shut down after), ``"auto"`` joins the running cluster, anything else
    is a cluster address; when Ray is already initialised in this process it is used as
    it is. ``threads``: torch threads in
    each worker (default :func:`worker_threads`; 1 on Ray, where each task reserves that
    many CPUs). Returns the outcomes in task order; raises :class:`CellsError` when Ray is
    missing or cannot be reached.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    outcomes: list[Outcome[R] | None] = [None] * len(tasks)

    def record(outcome: Outcome[R]) -> None:
        outcomes[outcome.index] = outcome
        if on_done is not None:
            on_done(outcome)

    if not tasks:  # e.g. a resumed sweep with every cell done: start no pool, no Ray
        return []
    if ray is not None:
        _run_ray(fn, tasks, ray, jobs, threads or 1, record)
    elif jobs == 1:
        for index, task in enumerate(tasks):
            record(_call(fn, task, index, None))
    else:
        _run_pool(fn, tasks, min(jobs, len(tasks)), threads or worker_threads(jobs), record)
    missing = [i for i, outcome in enumerate(outcomes) if outcome is None]
    assert not missing, f"tasks without an outcome: {missing}"  # every path records each once
    return [outcome for outcome in outcomes if outcome is not None]


def _context(module: str) -> multiprocessing.context.BaseContext:
    """``forkserver``: a clean server process that has imported torch and ``fn``'s module,
    but started no thread, forks the workers, so each starts in milliseconds instead of
    importing torch anew (seconds); ``spawn`` where there is no fork. (The server is
    started once per process; its preload is what the first pool asked for.)"""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", module])
    return context


def _pool(jobs: int, threads: int, module: str) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=_context(module),
        initializer=_pin_threads,
        initargs=(threads,),
    )


def _stop(pool: ProcessPoolExecutor) -> None:
    """End a pool's workers now (the executor has no public way; it would wait for them)."""
    processes: dict[int, Any] = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def _run_pool(
    fn: Callable[[T], R],
    tasks: Sequence[T],
    jobs: int,
    threads: int,
    record: Callable[[Outcome[R]], None],
) -> None:
    """At most ``jobs`` tasks in flight, so a broken pool names exactly the cells it hit."""
    queue = list(range(len(tasks)))[::-1]  # popped from the end: task order
    suspects: list[int] = []  # in flight when a worker died: rerun each alone
    pool = _pool(jobs, threads, fn.__module__)
    try:
        running: dict[Future[Outcome[R]], int] = {}
        while queue or running:  # each pass finishes >= 1 task or breaks the pool: bounded
            while queue and len(running) < jobs:
                index = queue.pop()
                running[pool.submit(_call, fn, tasks[index], index, threads)] = index
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for future in finished:
                index = running.pop(future)
                try:
                    record(future.result())
                except BrokenProcessPool:
                    suspects.append(index)
                    broken = True
            if broken:  # every other future of this pool is lost too
                suspects.extend(running.values())
                running.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                pool = _pool(jobs, threads, fn.__module__)
    except BaseException:  # Ctrl-C: do not wait for the cells in flight
        _stop(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for index in sorted(suspects):  # alone in a fresh worker: a death is this cell's own
        alone = _pool(1, threads, fn.__module__)
        try:
            record(alone.submit(_call, fn, tasks[index], index, threads).result())
        except BrokenProcessPool as error:
            record(_died(index, str(error) or "the worker exited abruptly"))
        finally:
            alone.shutdown(wait=True, cancel_futures=True)


def check_ray(address: str) -> None:
    """Refuse ``--ray ADDRESS`` before anything is written: Ray missing, or a ``host:port``
    nobody listens on (a sweep or seed group would otherwise leave its folder behind)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise CellsError(_NO_RAY) from None
    if address != RAY_LOCAL:
        _reachable(address)


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``host:port`` nobody listens on at once: Ray itself retries for minutes."""
    host, colon, port = address.rpartition(":")
    if "://" in address or not colon or not port.isdigit():
        return  # "auto", ray://...: Ray's own resolution and errors
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as error:
        raise CellsError(f"ray: cannot reach cluster {address!r}: {error}") from None


_NO_RAY = "--ray needs Ray, an optional extra: pip install ray==2.60.0 (or install p2pfl-gossip with its ray extra)"


def _run_ray(
    fn: Callable[[T], R],
    tasks: Sequence[T],
    address: str,
    jobs: int,
    threads: int,
    record: Callable[[Outcome[R]], None],
) -> None:
    try:
        import ray as ray_api
    except ImportError:
        raise CellsError(_NO_RAY) from None
    started_here = not ray_api.is_initialized()
    if started_here:
        if address != RAY_LOCAL:
            _reachable(address)
        try:
            if address == RAY_LOCAL:
                cpus = max(jobs, threads) if jobs > 1 else None  # None: every core
                ray_api.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            else:
                ray_api.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise CellsError(f"ray: cannot reach cluster {address!r}: {error}") from None
    pending: dict[Any, int] = {}
    try:
        remote: Any = ray_api.remote(num_cpus=threads, max_retries=1)(_call)
        pending = {
            remote.remote(fn, task, index, threads): index for index, task in enumerate(tasks)
        }
        while pending:  # each pass collects >= 1 finished task: bounded by len(tasks)
            done, _ = ray_api.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    outcome = ray_api.get(ref)
                except Exception as error:  # the worker died (twice): Ray's own error
                    outcome = _died(index, f"{type(error).__name__}: {error}".splitlines()[0])
                record(outcome)
    except BaseException:  # Ctrl-C: the cluster's tasks stop with us
        for ref in pending:
            ray_api.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray_api.shutdown()
