"""Where a node runs its learning jobs: on the event loop when they are short, in its
worker thread when they are not.

A job handed to a thread costs more than the hand-off: while the worker trains, every
torch operation releases and takes back the GIL, and the event loop and the transport's
trio thread contend for it at each of those. A digits round (10 steps of a small MLP,
1.5 ms of work) cost 0.5 ms more CPU in the worker than on the loop (issue 17,
``benchmarks/node_footprint.py``). A long job, on the other hand, must not hold the loop:
pings, timers and models would wait for it.

So each kind of job is timed whenever it runs, and the next one of that kind runs on the
loop if the last one took at most ``inline_limit`` seconds of wall time (10 ms by
default: two orders of magnitude below any timeout a node keeps), in the worker
otherwise. The first job of a kind, whose cost is unknown, goes to the worker; a job
that grows (a slower device, a loaded machine) moves back to the worker after one run.
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

#: the longest a job may have taken for the next one of its kind to run on the loop
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
        #: seconds the last job of each kind took (wall time, where it ran)
        self.last_took: dict[str, float] = {}
        #: jobs run on the loop and in the worker, by kind (for status and tests)
        self.inline: dict[str, int] = {}
        self.threaded: dict[str, int] = {}
        self._in_worker: set[concurrent.futures.Future[Any]] = set()

    def runs_inline(self, kind: str) -> bool:
        """Whether the next job of ``kind`` would run on the loop."""
        took = self.last_took.get(kind)
        return took is not None and took <= self.inline_limit and not self._in_worker

    async def run(self, kind: str, job: Callable[[], T]) -> T:
        """``job()``'s result, computed on the loop or in the worker; its errors raised."""
        if self.runs_inline(kind):
            self.inline[kind] = self.inline.get(kind, 0) + 1
            began = time.perf_counter()
            try:
                return job()
            finally:
                self.last_took[kind] = time.perf_counter() - began
        self.threaded[kind] = self.threaded.get(kind, 0) + 1

        def run_timed() -> T:
            began = time.perf_counter()
            try:
                return job()
            finally:
                self.last_took[kind] = time.perf_counter() - began

        future = self._pool.submit(run_timed)
        # until the job has ended in the worker, even if its awaiting task is cancelled
        self._in_worker.add(future)
        future.add_done_callback(self._in_worker.discard)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Stop the worker (a job in it finishes; queued ones are cancelled)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
