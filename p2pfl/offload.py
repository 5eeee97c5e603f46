"""Where a node runs its learning jobs: on the event loop when they are short, in its
worker thread when they are not.

A job handed to a thread costs more than the hand-off: while the worker trains, every
torch operation releases and takes back the GIL, and the event loop and the transport's
trio thread contend for it at each of those. A digits round (10 steps of a small MLP,
1.5 ms of work) cost 0.5 ms more CPU in the worker than on the loop (issue 17,
``benchmarks/node_footprint.py``). A long job, on the other hand, must not hold the loop:
pings, timers and models would wait for it.

So each kind of job is timed whenever it runs, and the next one of that kind runs on the
loop if the last one cost at most ``inline_limit`` seconds of CPU (10 ms by default: two
orders of magnitude below any timeout a node keeps) and took at most ten times that of
wall time; in the worker otherwise. CPU time, because it is the job's own cost: on a
machine busy with other processes a 2 ms job can take 15 ms of wall time, and a wall
limit alone sent it back and forth between loop and worker (the loop would not have run
meanwhile either); the wall limit still keeps a job that waits (on a disk, on memory)
off the loop. The first job of a kind, whose cost is unknown, goes to the worker; a job
that grows (a bigger model, a slower device) moves back to the worker after one run.
A job never runs on the loop while another one is in the worker: both use the trainer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import Any, TypeVar

from p2pfl.threadname import name_os_thread

__all__ = ["INLINE_LIMIT_S", "Offload"]

T = TypeVar("T")

#: the most CPU a job may have cost for the next one of its kind to run on the loop (and
#: ten times this, the most wall time it may have taken)
INLINE_LIMIT_S = 0.01


class Offload:
    """Runs jobs on the event loop or in one worker thread, by their kind's last duration."""

    def __init__(self, *, inline_limit: float = INLINE_LIMIT_S, thread_name: str = "p2pfl-train") -> None:
        if inline_limit < 0:
            raise ValueError("inline_limit is seconds, >= 0")
        self.inline_limit = inline_limit
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=thread_name, initializer=name_os_thread
        )
        #: (CPU seconds, wall seconds) of the last job of each kind, where it ran
        self.last_took: dict[str, tuple[float, float]] = {}
        #: jobs run on the loop and in the worker, by kind (for status and tests)
        self.inline: dict[str, int] = {}
        self.threaded: dict[str, int] = {}
        self._in_worker: set[concurrent.futures.Future[Any]] = set()

    def runs_inline(self, kind: str) -> bool:
        """Whether the next job of ``kind`` would run on the loop."""
        took = self.last_took.get(kind)
        if took is None or self._in_worker:
            return False
        cpu, wall = took
        return cpu <= self.inline_limit and wall <= 10 * self.inline_limit

    async def run(self, kind: str, job: Callable[[], T]) -> T:
        """``job()``'s result, computed on the loop or in the worker; its errors raised."""
        if self.runs_inline(kind):
            self.inline[kind] = self.inline.get(kind, 0) + 1
            return self._timed(kind, job)
        self.threaded[kind] = self.threaded.get(kind, 0) + 1

        future = self._pool.submit(self._timed, kind, job)
        # until the job has ended in the worker, even if its awaiting task is cancelled
        self._in_worker.add(future)
        future.add_done_callback(self._in_worker.discard)
        return await asyncio.wrap_future(future)

    def _timed(self, kind: str, job: Callable[[], T]) -> T:
        """``job()``, its CPU (this thread's) and wall time kept for its kind."""
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            return job()
        finally:
            self.last_took[kind] = (time.thread_time() - cpu, time.perf_counter() - wall)

    def shutdown(self) -> None:
        """Stop the worker (a job in it finishes; queued ones are cancelled)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
