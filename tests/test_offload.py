"""A node's learning jobs run on the event loop when short, in the worker when not
(``p2pfl.offload``, issue 17)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from p2pfl.offload import Offload


def where() -> str:
    return threading.current_thread().name


def test_a_short_kind_moves_to_the_loop_after_its_first_run() -> None:
    offload = Offload(inline_limit=0.5)

    async def main() -> list[str]:
        return [await offload.run("train", where) for _ in range(3)]

    try:
        threads = asyncio.run(main())
    finally:
        offload.shutdown()
    assert threads[0].startswith("p2pfl-train")  # its cost was unknown
    assert threads[1:] == ["MainThread", "MainThread"]
    assert offload.threaded == {"train": 1} and offload.inline == {"train": 2}


def test_a_long_job_goes_back_to_the_worker_and_kinds_are_timed_apart() -> None:
    offload = Offload(inline_limit=0.05)
    calls = iter([0.0, 0.0, 0.1, 0.0])

    def job() -> str:
        time.sleep(next(calls))
        return where()

    async def main() -> list[str]:
        threads = [await offload.run("train", job) for _ in range(4)]
        threads.append(await offload.run("losses", where))  # a kind of its own: unknown
        return threads

    try:
        threads = asyncio.run(main())
    finally:
        offload.shutdown()
    # worker (unknown), loop (0 s), loop (took 0.1 s), worker again (after the long one)
    assert [t == "MainThread" for t in threads] == [False, True, True, False, False]


def test_no_job_runs_on_the_loop_while_one_is_in_the_worker() -> None:
    """Both would use the trainer: a short job waits for the worker's instead."""
    offload = Offload(inline_limit=0.5)
    release = threading.Event()
    running = threading.Event()

    def long_job() -> str:
        running.set()
        assert release.wait(10)
        return where()

    async def main() -> tuple[str, str]:
        await offload.run("losses", where)  # now known and short
        offload.last_took["train"] = 1.0  # train: long, so in the worker
        slow = asyncio.ensure_future(offload.run("train", long_job))
        await asyncio.to_thread(running.wait, 10)
        assert not offload.runs_inline("losses")
        short = asyncio.ensure_future(offload.run("losses", where))
        release.set()
        return await slow, await short

    try:
        slow, short = asyncio.run(main())
    finally:
        offload.shutdown()
    assert slow.startswith("p2pfl-train") and short.startswith("p2pfl-train")


def test_a_jobs_error_reaches_the_caller_wherever_it_ran() -> None:
    offload = Offload(inline_limit=0.5)

    def boom() -> None:
        raise RuntimeError("diverged")

    async def main() -> None:
        for _ in range(2):  # in the worker, then on the loop
            with pytest.raises(RuntimeError, match="diverged"):
                await offload.run("train", boom)

    try:
        asyncio.run(main())
    finally:
        offload.shutdown()
    assert offload.threaded == {"train": 1} and offload.inline == {"train": 1}


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="inline_limit"):
        Offload(inline_limit=-1.0)
